"""The command line: subcommands other than train (train is covered by test_config/test_train)."""
import pytest

from commtrain.config import CONFIG_DIR
from commtrain.cli import main


def test_schedule_prints_the_grid(capsys):
    assert main(["schedule", "--schedule", "1f1b", "--pp", "4", "--microbatches", "6"]) == 0
    out = capsys.readouterr().out
    assert "schedule completes in" in out and "stage 3" in out and "F5" in out and "bubble:" in out


def test_schedule_rejects_unknown_name():
    with pytest.raises(ValueError, match="zigzag"):
        main(["schedule", "--schedule", "zigzag"])


def test_compare_writes_table_and_plot(tmp_path, capsys):
    png = tmp_path / "cmp.png"
    assert main(["compare", "--model", "gpt-nano", "--hardware", "rtx3090-pcie,dgx1-v100",
                 "--codecs", "none,quant:bits=4,group=128", "--seq-len", "128", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "rtx3090-pcie" in out and "dgx1-v100" in out and "tokens/s" in out
    assert png.stat().st_size > 10_000


# -- issue 13: one line per error ------------------------------------------------------------------
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = CONFIG_DIR / "tiny.yaml"


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}


@pytest.mark.parametrize("path_set", ["data.path=/nonexistent/corpus.txt", None])
def test_missing_data_path_on_two_ranks_is_at_most_three_lines(tmp_path, path_set):
    sets = ["data.source=files", f"out_dir={tmp_path / 'run'}", *([path_set] if path_set else [])]
    r = subprocess.run([sys.executable, "-m", "commtrain", "train", "--nproc", "2", "--config", str(TINY),
                        *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=180,
                       env=_env())
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and 1 <= len(lines) <= 3, r.stderr
    assert lines[0].startswith("commtrain: config error: data.path=")
    assert not (tmp_path / "run").exists()


def test_under_plain_torchrun_only_rank_0_prints(tmp_path):
    """torchrun adds its own failure report; of the ranks, only rank 0 says anything."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={_free_port()}", "-m", "commtrain", "train", "--config", str(TINY), "--set",
                        "data.source=files", "--set", "data.path=/nonexistent/corpus.txt"],
                       capture_output=True, text=True, timeout=180, env=_env())
    assert r.returncode != 0
    assert [line for line in r.stderr.splitlines() if line.startswith("commtrain:")] == [
        "commtrain: config error: data.path='/nonexistent/corpus.txt' does not exist"]
    assert "exitcode  : 2" in r.stderr  # every rank exited 2


def test_debug_prints_the_traceback(tmp_path, capsys):
    from commtrain.cli import main

    assert main(["train", "--config", str(TINY), "--set", "data.source=files", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
        "commtrain: config error: data.path=None")


def test_demo_runs_never_mix(monkeypatch, tmp_path):
    """`commtrain demo` starts every run fresh (resume=never) and moves an old one aside (--overwrite)."""
    from commtrain import demo

    calls = []
    monkeypatch.setattr(demo, "torchrun", lambda nproc, args: calls.append(args))
    monkeypatch.setattr(demo, "summarize", lambda d: dict(step_time_s=1.0, wire_bytes=1.0, final_loss=1.0, eval_loss=1.0))
    from argparse import Namespace

    demo.run_demo(Namespace(out_dir=str(tmp_path), steps=2, nproc=2, link="100mbit", codec="quant:bits=4,group=128",
                            set=[]))
    assert len(calls) == 2
    for args in calls:
        assert "--overwrite" in args and "resume=never" in args and "resume=false" not in args
