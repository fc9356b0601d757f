"""The Ray launcher runs the same trainer as torchrun: 2 CPU workers on gloo, same metrics file.

Ray's temp files go under a short directory in /tmp (unix socket paths are limited to ~107
bytes) that the test removes; HOME points to an empty directory that must stay empty (Ray
>= 2.5x would otherwise save an auth token to ~/.ray/auth_token).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
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


def test_ray_launcher_matches_torchrun(tmp_path):
    reason = _trainer_importable()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    home.mkdir()
    real_ray_dir = Path.home() / ".ray"
    had_ray_dir = real_ray_dir.exists()
    overrides = ["train.steps=3", "train.eval_every=0", "train.eval_batches=1", "train.progress=false",
                 "timeout_s=60"]
    sets = [a for o in overrides for a in ("--set", o)]

    torch_out = tmp_path / "torchrun"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", "-m", "commtrain", "train", "--config", "tiny", *sets,
         "--set", f"out_dir={torch_out}"],
        cwd=ROOT, env=_env(home), check=True, timeout=120, capture_output=True,
    )

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    ray_out = tmp_path / "ray"
    try:
        proc = subprocess.run(
            [sys.executable, "launch/ray_launcher.py", "--num-workers", "2", "--config", "tiny", *sets,
             "--set", f"out_dir={ray_out}", "--temp-dir", ray_tmp, "--timeout", "120"],
            cwd=ROOT, env=_env(home), timeout=150, capture_output=True, text=True,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

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

    assert list(home.iterdir()) == [], f"something was written to HOME: {list(home.rglob('*'))}"
    assert real_ray_dir.exists() == had_ray_dir


def test_ray_launcher_rejects_bad_arguments(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch/ray_launcher.py", "--num-workers", "2", "--config", str(tmp_path / "missing.yaml")],
        cwd=ROOT, env=_env(tmp_path), timeout=60, capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "config=" in proc.stderr and "existing YAML file" in proc.stderr
