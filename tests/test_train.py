"""End-to-end trainer runs under torchrun (gloo on loopback): equivalence, resume, recovery, pp x dp."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from commtrain.config import CONFIG_DIR
from commtrain.metrics import read_metrics

TINY = CONFIG_DIR / "tiny.yaml"
pytestmark = pytest.mark.slow


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp, nproc, *sets, env=None, extra=(), check=True, timeout=240):
    out = Path(tmp)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_port()}", *extra, "-m", "commtrain", "train", "--config", str(TINY),
           "--set", f"out_dir={out}", "--set", "train.progress=false", "--set", "timeout_s=60"]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def losses(out, name="metrics.jsonl"):
    return [m["loss"] for m in read_metrics(Path(out) / name) if "event" not in m]


def test_dp_none_equals_single_process_on_the_global_batch(tmp_path):
    """2 ranks x batch 4 with codec none == 1 rank x batch 8 (same global batches, same init)."""
    run(tmp_path / "dp2", 2, "train.batch_size=4", "compression.grad=none")
    run(tmp_path / "dp1", 1, "train.batch_size=8", "compression.grad=none")
    a, b = losses(tmp_path / "dp2"), losses(tmp_path / "dp1")
    assert len(a) == 6 and a == pytest.approx(b, abs=1e-5)


def test_metrics_schema_and_wire_bytes(tmp_path):
    run(tmp_path, 2, "compression.grad=quant:bits=4,group=128", "compression.min_numel=1024", "link.profile=10gbit",
        "compression.policy=always")  # auto would (rightly) send raw bytes on a 10 Gbit/s link
    rows = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in rows if "event" not in r]
    for r in steps:
        assert {"step", "loss", "step_time_s", "tokens_per_s", "wire_bytes", "compute_s", "comm_s"} <= r.keys()
        assert set(r["wire_bytes"]) == {"grad", "act", "act_grad", "param"}
    # 4-bit payloads: far fewer gradient bytes than the fp32 ring all-reduce would send
    n_params = 132_864
    assert 0 < steps[-1]["wire_bytes"]["grad"] < 0.35 * 4 * n_params
    assert [r["eval_loss"] for r in rows if r.get("event") == "eval"]


def test_stopped_and_resumed_run_reproduces_losses(tmp_path):
    sets = ("compression.grad=quant:bits=4,group=64", "compression.min_numel=512", "train.checkpoint_every=3")
    run(tmp_path / "full", 2, *sets)
    # Same config, killed after step 4 (checkpoint at 3), then restarted by hand.
    r = run(tmp_path / "cut", 2, *sets, env={"COMMTRAIN_FAULT_STEP": "4", "COMMTRAIN_FAULT_RANK": "1"}, check=False)
    assert r.returncode != 0
    run(tmp_path / "cut", 2, *sets)
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_torchrun_max_restarts_recovers_from_a_killed_rank(tmp_path):
    sets = ("compression.grad=quant:bits=4,group=64", "compression.min_numel=512", "train.checkpoint_every=2")
    run(tmp_path / "full", 2, *sets)
    # Kill rank 0 after step 5; torchrun restarts the group, which resumes from step 4.
    run(tmp_path / "crash", 2, *sets, env={"COMMTRAIN_FAULT_STEP": "5"}, extra=["--max-restarts=1"])
    assert losses(tmp_path / "crash") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    sets = ("train.checkpoint_every=2", "train.steps=4", "train.keep_checkpoints=5")
    run(tmp_path, 2, *sets)
    newest = tmp_path / "checkpoints" / "step_00000004" / "rank1.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 3] ^= 0x55
    newest.write_bytes(bytes(data))
    r = run(tmp_path, 2, "train.checkpoint_every=2", "train.steps=6", "train.keep_checkpoints=5")
    assert "fails its SHA-256 check" in r.stderr and "resumed from" in r.stderr and "step_00000002" in r.stderr


def test_pp2_dp2_all_channels_compressed_resumes(tmp_path):
    sets = ("parallel.pp=2", "parallel.microbatches=2", "compression.grad=quant:bits=4,group=64",
            "compression.act=quant:bits=2,group=64", "compression.act_grad=quant:bits=4,group=64",
            "compression.min_numel=512", "train.checkpoint_every=3", "data.max_bytes=20000")
    run(tmp_path / "full", 4, *sets)
    steps = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "event" not in r]
    last_stage = [r for r in read_metrics(tmp_path / "full" / "metrics_rank2.jsonl") if "event" not in r]
    assert all(r["wire_bytes"]["grad"] > 0 for r in steps)
    assert all(r["wire_bytes"]["act"] > 0 for r in steps) and all(r["wire_bytes"]["act_grad"] > 0 for r in last_stage)
    r = run(tmp_path / "cut", 4, *sets, env={"COMMTRAIN_FAULT_STEP": "4", "COMMTRAIN_FAULT_RANK": "3"}, check=False)
    assert r.returncode != 0
    run(tmp_path / "cut", 4, *sets)
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_hf_checkpoint_fine_tunes_in_a_pipeline(tmp_path):
    """A local Hugging Face checkpoint (made here, nothing downloaded), split into 2 stages."""
    from test_models import _save_tiny

    ckpt, _, _ = _save_tiny(tmp_path, "llama")
    run(tmp_path / "run", 2, f"model.hf_path={ckpt}", "data.tokenizer=hf", "data.max_bytes=30000",
        "train.seq_len=32", "parallel.pp=2", "parallel.microbatches=2",
        "compression.act=quant:bits=4,group=32", "compression.act_grad=quant:bits=8,group=32",
        env={"HF_HUB_OFFLINE": "1"})
    ls = losses(tmp_path / "run")
    assert len(ls) == 6 and ls[-1] < ls[0]
