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
