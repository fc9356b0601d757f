"""`commtrain ray` runs the same trainer as torchrun: 2 CPU workers on gloo, same metrics file.

The launcher's Ray temp files go under a fresh short directory in /tmp (unix socket paths are
limited to ~107 bytes) that it removes; HOME points to an empty directory that must stay empty
(Ray >= 2.5x would otherwise save an auth token to ~/.ray/auth_token). While it runs, every
listening TCP socket of the launcher's process tree must be on loopback.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install -e .[ray])"),
]


def _trainer_importable() -> str | None:
    try:
        import commtrain.cli  # noqa: F401
        import commtrain.train  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- any import failure means: nothing to launch yet
        return f"commtrain.cli/commtrain.train not importable yet: {e}"
    return None


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "MASTER_", "RANK", "WORLD_SIZE"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


def _watch_listeners(proc: subprocess.Popen, found: set) -> None:
    """Collect (process, local address) of every listening TCP socket of ``proc``'s tree (via ss)."""
    while proc.poll() is None:
        pids = _descendants(proc.pid)
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            for m in re.finditer(r'\("([^"]+)",pid=(\d+)', line):
                if int(m.group(2)) in pids:
                    found.add((m.group(1), line.split()[3]))
        time.sleep(0.2)


def _loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def test_ray_launcher_matches_torchrun(tmp_path):
    reason = _trainer_importable()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    home.mkdir()
    real_ray_dir = Path.home() / ".ray"
    had_ray_dir = real_ray_dir.exists()
    overrides = ["train.steps=3", "train.eval_every=0", "train.eval_batches=1", "timeout_s=60"]
    sets = [a for o in overrides for a in ("--set", o)]

    torch_out = tmp_path / "torchrun"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", "-m", "commtrain", "train", "--config", "tiny", *sets,
         "--set", "train.progress=false", "--set", f"out_dir={torch_out}"],
        cwd=ROOT, env=_env(home), check=True, timeout=120, capture_output=True,
    )

    def leftovers():
        return {p.name for p in Path("/tmp").iterdir() if p.name.startswith(("ctray-", "commtrain-r"))}

    before = leftovers()
    ray_out = tmp_path / "ray"
    proc = subprocess.Popen(
        [sys.executable, "-m", "commtrain", "ray", "--num-workers", "2", "--config", "tiny", *sets,
         "--set", f"out_dir={ray_out}", "--timeout", "120", "--progress-every", "0"],
        cwd=ROOT, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    listeners: set = set()
    watcher = threading.Thread(target=_watch_listeners, args=(proc, listeners), daemon=True)
    if shutil.which("ss"):
        watcher.start()
    stdout, stderr = proc.communicate(timeout=150)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]

    for name in ("metrics.jsonl", "metrics_rank1.jsonl"):
        a, b = _lines(torch_out / name), _lines(ray_out / name)
        assert [sorted(r) for r in a] == [sorted(r) for r in b]
        assert [r["step"] for r in a] == [r["step"] for r in b]
        steps = [r for r in a if "event" not in r]
        assert [r["step"] for r in steps] == [1, 2, 3]
        # the same training: same data, same gradients, same bytes on the wire
        for x, y in zip(steps, (r for r in b if "event" not in r)):
            assert x["wire_bytes"] == y["wire_bytes"] and x["wire_bytes"]["grad"] > 0
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)

    # clean output: no carriage-return progress bars from the workers, the driver's progress
    # as whole lines, worker lines prefixed by their rank, no colour codes in a pipe
    assert "\r" not in stdout + stderr and "\x1b[" not in stdout
    assert "commtrain ray: step 3/3, loss" in stderr
    assert re.search(r"^\(rank0 pid=\d+\) commtrain: done: 3 steps", stdout, re.M), stdout
    # temp files (Ray's session dir, the workers' config copies) removed; nothing in HOME
    assert leftovers() <= before
    assert list(home.iterdir()) == [], f"something was written to HOME: {list(home.rglob('*'))}"
    assert real_ray_dir.exists() == had_ray_dir
    if watcher.is_alive() or listeners:
        watcher.join(timeout=5)
        assert listeners, "saw no listening sockets at all (ss not permitted?)"
        assert {p for p, addr in listeners if p.startswith("ray::RankWorker")}, listeners
        wide = sorted((p, a) for p, a in listeners if not _loopback(a))
        assert wide == [], f"listening beyond loopback: {wide}"


def test_ray_launcher_rejects_bad_arguments(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch/ray_launcher.py", "--num-workers", "2", "--config", str(tmp_path / "missing.yaml")],
        cwd=ROOT, env=_env(tmp_path), timeout=60, capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "config=" in proc.stderr and "existing YAML file" in proc.stderr


def test_ray_subcommand_validates_the_config_before_starting_ray(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "commtrain", "ray", "--num-workers", "2", "--config", "tiny",
         "--set", "train.steps=0"],
        cwd=ROOT, env=_env(tmp_path), timeout=60, capture_output=True, text=True,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0, err
    assert err.startswith("commtrain ray: config error: train.steps=0 is invalid")
    assert time.monotonic() - t0 < 30  # no Ray cluster was started
