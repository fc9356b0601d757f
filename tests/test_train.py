"""End-to-end trainer runs on gloo/loopback (ranks forked with torchrun's environment, or torchrun itself): equivalence, resume, recovery, pp x dp."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commtrain.config import CONFIG_DIR
from commtrain.metrics import read_metrics
from dist_utils import launch as launch_ranks

TINY = CONFIG_DIR / "tiny.yaml"
pytestmark = pytest.mark.slow


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp, nproc, *sets, env=None, extra=(), check=True, timeout=240, torchrun=False):
    """``commtrain train`` on ``nproc`` ranks: through torchrun itself when asked (``torchrun``, or
    torchrun arguments in ``extra``), else forked from the preloaded server (dist_utils.launch:
    the same entry point and environment protocol, ~5 s less per run)."""
    out = Path(tmp)
    argv = ["train", "--config", str(TINY), "--set", f"out_dir={out}", "--set", "train.progress=false",
            "--set", "timeout_s=60"]
    for s in sets:
        argv += ["--set", s]
    if not (torchrun or extra):
        r = launch_ranks(nproc, argv, env=env, timeout=timeout)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_port()}", *extra, "-m", "commtrain", *argv]
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
    # pinned: auto's decisions follow measured timings, so two runs need not pick alike (issue 11)
    sets = ("compression.grad=quant:bits=4,group=64", "compression.min_numel=512", "train.checkpoint_every=3",
            "compression.policy=always")
    run(tmp_path / "full", 2, *sets)
    # Same config, killed after step 4 (checkpoint at 3), then restarted by hand.
    r = run(tmp_path / "cut", 2, *sets, env={"COMMTRAIN_FAULT_STEP": "4", "COMMTRAIN_FAULT_RANK": "1"}, check=False)
    assert r.returncode != 0
    run(tmp_path / "cut", 2, *sets)
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_torchrun_max_restarts_recovers_from_a_killed_rank(tmp_path):
    sets = ("compression.grad=quant:bits=4,group=64", "compression.min_numel=512", "train.checkpoint_every=2",
            "compression.policy=always")  # pinned: see above
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
            "compression.min_numel=512", "train.checkpoint_every=3", "data.max_bytes=20000",
            "compression.policy=always")  # pinned: auto's timing-driven decisions differ between runs
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


# -- issue 13: never lose or mix up a run --------------------------------------------------------
def launch(tmp, nproc, *sets, env=None, extra=(), timeout=240):
    """``commtrain train --nproc N`` (torchrun in-process, its own failure report left out)."""
    cmd = [sys.executable, "-m", "commtrain", "train", "--nproc", str(nproc), *extra, "--config", str(TINY),
           "--set", f"out_dir={tmp}", "--set", "train.progress=false", "--set", "timeout_s=60"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def stderr_lines(r):
    return [line for line in r.stderr.splitlines() if line.strip()]


def snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def ckpt_steps(d):
    return sorted(int(p.name[5:]) for p in (Path(d) / "checkpoints").glob("step_*"))


def shard(d, step, rank=0):
    return torch.load(Path(d) / "checkpoints" / f"step_{step:08d}" / f"rank{rank}.pt", weights_only=True)


def all_finite(state):
    if torch.is_tensor(state):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return True


def test_end_checkpoint_other_run_refused_steps_may_grow(tmp_path):
    """25 steps with checkpoint_every=10 leave step 25; a second run with another lr (or
    lr=inf) into the same out_dir is refused in one line, the first run's files untouched;
    raising train.steps resumes, the lr decaying from its value at the resume point."""
    sets = ("train.steps=25", "train.checkpoint_every=10", "train.eval_every=0")
    run(tmp_path, 2, *sets)
    assert ckpt_steps(tmp_path) == [10, 20, 25]
    assert shard(tmp_path, 25)["step"] == 25
    before = snapshot(tmp_path)
    for other, needle in (("train.lr=1e-3", "train.lr: 0.003 -> 0.001"),
                          ("train.lr=inf", "train.lr=inf is invalid; allowed: a finite number > 0")):
        r = launch(tmp_path, 2, *sets, other)
        assert r.returncode == 2 and len(stderr_lines(r)) == 1 and needle in r.stderr, r.stderr
        assert snapshot(tmp_path) == before  # refused before anything was written
    assert all(all_finite(shard(tmp_path, s, r)) for s in ckpt_steps(tmp_path) for r in (0, 1))
    # Allowed change: more steps. The cosine had reached its floor at 25, so it stays there.
    r = run(tmp_path, 2, "train.steps=28", "train.checkpoint_every=10", "train.eval_every=0")
    assert "resumed from" in r.stderr and "step_00000025" in r.stderr and "train.steps" in r.stderr
    rows = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "event" not in m]
    assert [m["step"] for m in rows] == list(range(1, 29))
    assert [m["lr"] for m in rows[25:]] == pytest.approx([0.1 * 3e-3] * 3)
    assert ckpt_steps(tmp_path)[-1] == 28


def test_nonfinite_gradients_in_one_pipeline_stage_skip_every_rank_then_stop(tmp_path):
    """NaN gradients on stage 0 only (rank 0) at steps 3 and 5, 6: every rank skips those
    updates (stage 1's finite gradients too), step 4 trains; the second run of skips hits
    max_nonfinite_steps=2 and stops with one line; every checkpoint on disk is finite."""
    sets = ("parallel.pp=2", "parallel.microbatches=2", "data.max_bytes=20000", "train.steps=10",
            "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.max_nonfinite_steps=2",
            "train.eval_every=0")
    r = launch(tmp_path, 2, *sets, env={"COMMTRAIN_NONFINITE_STEPS": "3,5-", "COMMTRAIN_NONFINITE_RANK": "0"})
    assert r.returncode == 2, r.stderr
    errors = [line for line in stderr_lines(r) if line.startswith("commtrain:")]
    assert len(errors) == 1 and "train.nonfinite=skip: stopped after step 6" in errors[0], r.stderr
    assert "max_nonfinite_steps=2" in errors[0] and "step_00000006" in errors[0]
    for name in ("metrics.jsonl", "metrics_rank1.jsonl"):
        rows = [m for m in read_metrics(tmp_path / name) if "event" not in m]
        assert [m["skipped"] for m in rows] == [False, False, True, False, True, True], name
        assert [m["skipped_total"] for m in rows] == [0, 0, 1, 1, 2, 3]
    assert ckpt_steps(tmp_path) == [2, 4, 6]
    for rank in (0, 1):  # both stages: step 5 and 6 left the weights and optimizer state as step 4 did
        s4, s6 = shard(tmp_path, 4, rank), shard(tmp_path, 6, rank)
        assert all_finite(s4) and all_finite(s6)
        assert all(torch.equal(s4["model"][k], s6["model"][k]) for k in s4["model"])
        assert repr(s4["sync"]["optimizer"]["state"]) == repr(s6["sync"]["optimizer"]["state"])


def test_sigterm_to_one_rank_saves_at_a_step_boundary_and_resumes(tmp_path):
    import signal
    import time

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_port()}", "-m", "commtrain", "train", "--config", str(TINY), "--set", f"out_dir={tmp_path}",
           "--set", "train.progress=false", "--set", "timeout_s=60", "--set", "train.steps=2000",
           "--set", "train.eval_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.2)
        rank1 = next(pid for pid in _children(proc.pid) if _env(pid).get("RANK") == "1")
        os.kill(rank1, signal.SIGTERM)  # one rank only: the ranks must agree to stop
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    rows = [m for m in read_metrics(metrics) if "event" not in m]
    stop = rows[-1]["step"]
    assert 3 <= stop < 2000 and f"stopped by a signal on another rank after step {stop}" in out
    assert ckpt_steps(tmp_path) == [stop]
    r = run(tmp_path, 2, "resume=must", f"train.steps={stop + 2}", "train.eval_every=0")
    assert f"step_{stop:08d}" in r.stderr and "resumed from" in r.stderr
    assert [m["step"] for m in read_metrics(metrics) if "event" not in m] == list(range(1, stop + 3))


def _children(pid):
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _env(pid):
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def single(tmp, *sets, env=None, extra=()):
    """One process, no torchrun."""
    cmd = [sys.executable, "-m", "commtrain", "train", *extra, "--config", str(TINY), "--set", f"out_dir={tmp}",
           "--set", "train.progress=false"]
    for s in sets:
        cmd += ["--set", s]
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**base, **(env or {})})


def test_unverifiable_checkpoints_refuse_a_fresh_start(tmp_path):
    r = single(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    assert r.returncode == 0, r.stderr
    for s in ckpt_steps(tmp_path):
        p = tmp_path / "checkpoints" / f"step_{s:08d}" / "rank0.pt"
        p.write_bytes(p.read_bytes()[:-10])  # truncated
    before = snapshot(tmp_path / "checkpoints")
    r = single(tmp_path, "train.steps=6")
    assert r.returncode == 2
    err = [line for line in stderr_lines(r) if line.startswith("commtrain:")]
    assert len(err) == 1 and "none of the 2 checkpoint(s)" in err[0] and "step_00000004/rank0.pt is truncated" in err[0]
    assert "--overwrite" in err[0] and snapshot(tmp_path / "checkpoints") == before
    assert "CheckpointError" in (tmp_path / "error.log").read_text()  # the full traceback is kept
    # The way out the message names: the damaged run is moved aside, not deleted.
    r = single(tmp_path, "train.steps=2", "resume=never", extra=["--overwrite"])
    assert r.returncode == 0, r.stderr
    aside = [p for p in tmp_path.parent.iterdir() if p.name.startswith(tmp_path.name + ".old-")]
    assert len(aside) == 1 and snapshot(aside[0] / "checkpoints") == before


def test_nonfinite_stop_policy_and_eval_off(tmp_path):
    r = single(tmp_path / "stop", "train.nonfinite=stop", "train.steps=5",
               env={"COMMTRAIN_NONFINITE_STEPS": "2"})
    assert r.returncode == 2 and "train.nonfinite=stop: stopped after step 2" in r.stderr
    assert ckpt_steps(tmp_path / "stop") == [2] and all_finite(shard(tmp_path / "stop", 2))
    r = single(tmp_path / "off", "data.eval_fraction=0", "train.steps=3", "train.eval_every=1")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "off" / "metrics.jsonl").read_text()
    assert "eval" not in text and "NaN" not in text and "eval loss" not in r.stdout


def test_pipeline_eval_split_is_checked_at_start_up(tmp_path):
    r = launch(tmp_path, 2, "parallel.pp=2", "parallel.microbatches=2", "data.max_bytes=20000",
               "data.eval_fraction=0.001")
    assert r.returncode == 2 and len(stderr_lines(r)) == 1, r.stderr
    assert "data.eval_fraction=0.001 gives a held-out split of 1 sequence(s)" in r.stderr
    assert not (tmp_path / "metrics.jsonl").exists()  # found before the first step


def test_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    assert single(tmp_path, "train.steps=4", "train.eval_every=0").returncode == 0
    r = single(tmp_path, "train.steps=2")
    assert r.returncode == 2 and "train.steps=2 is below the step of the checkpoint to resume (4" in r.stderr
    r = single(tmp_path, "train.steps=4", "resume=must")  # the finished run: nothing to train, nothing rewritten
    assert r.returncode == 0 and "resumed from" in r.stderr and "done: 4 steps" in r.stdout
