"""Real throttling with network namespaces + tc tbf (skipped unless root and netns work here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "netns.py"
PREFIX = "ctt"


def _netns_works() -> bool:
    if os.geteuid() != 0:
        return False
    name = f"ctprobe{uuid.uuid4().hex[:6]}"
    try:
        ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


pytestmark = pytest.mark.skipif(not _netns_works(), reason="needs root and permission for `ip netns add`")


def _leftovers() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return [n for n in out if n.startswith(PREFIX)]


def _run(*args, timeout=90):
    return subprocess.run([sys.executable, str(SCRIPT), "--prefix", PREFIX, *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_measured_bandwidth_matches_tbf_rate_and_cleans_up():
    r = _run("--nproc", "2", "--rate", "100mbit", "--measure", "--seconds", "3")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["mbit_s"] == pytest.approx(100, rel=0.15), res
    assert _leftovers() == []


def test_failing_rank_stops_the_run_and_cleans_up():
    r = _run("--nproc", "3", "--", "sh", "-c", 'echo "$RANK/$WORLD_SIZE@$MASTER_ADDR"; [ "$RANK" != 1 ] || exit 3; sleep 60')
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "rank 1 exited with status 3" in r.stderr
    assert sorted(r.stdout.split()) == ["0/3@192.168.77.1", "1/3@192.168.77.1", "2/3@192.168.77.1"]
    assert _leftovers() == []


GLOO_P2P = """
import datetime, time, torch, torch.distributed as dist
from commtrain.comm import Communicator
from commtrain.compress import build_codec
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
comm, none, x = Communicator(timeout_s=30), build_codec("none"), torch.zeros(2_000_000)
dist.barrier(); t = time.time()
if dist.get_rank() == 0:
    comm.send(x, 1, none, "act")
else:
    comm.recv(x.shape, x.dtype, 0, none, "act"); print("ELAPSED", time.time() - t, flush=True)
comm.close(); dist.destroy_process_group()
"""


def test_gloo_over_shaped_link_matches_the_link_model():
    """8 MB at a real 100 Mbit/s: the LinkModel says 0.64 s; TCP/IP headers add ~4 %."""
    r = _run("--nproc", "2", "--rate", "100mbit", "--timeout", "60", "--", sys.executable, "-c", GLOO_P2P)
    assert r.returncode == 0, r.stderr[-2000:]
    elapsed = float(r.stdout.split("ELAPSED")[1].split()[0])
    assert elapsed == pytest.approx(0.64, rel=0.15)
    assert _leftovers() == []


def _host_veths() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip() for line in out.splitlines() if line.split(":")[1].strip().startswith(PREFIX)]


def test_training_across_namespaces_completes_over_the_shaped_link_and_cleans_up(tmp_path):
    """2 ranks of the trainer (gpt-nano, 3 steps), no simulated throttle: the only link is the
    real 100 Mbit/s tbf veth. Rendezvous and gloo use the namespace addresses, so every
    gradient byte crosses eth0 (its kernel tx counter must cover the metered bytes)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "commtrain", "train", "--config", "tiny",
           *[a for s in (f"out_dir={out}", "resume=false", "train.steps=3", "train.eval_every=0", "train.eval_batches=1",
                         "train.progress=false", "timeout_s=30") for a in ("--set", s)]]
    r = _run("--nproc", "2", "--rate", "100mbit", "--timeout", "45", "--master-port", "29531", "--", *cmd, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if "event" not in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    assert all(x["modeled_comm_s"]["grad"] == 0.0 for x in steps)  # no simulated link
    grad_bytes = sum(x["wire_bytes"]["grad"] for x in steps)
    assert grad_bytes > 0
    stats = json.loads(r.stderr.split("netns-stats ")[1].splitlines()[0])
    assert stats["rate_bps"] == 1e8
    assert min(stats["tx_bytes"].values()) >= grad_bytes  # gradients + rendezvous + headers
    assert _leftovers() == [] and _host_veths() == []
