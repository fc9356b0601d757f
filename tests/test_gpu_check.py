"""benchmarks/gpu_check.sh and its Python pieces, in their CPU dry-run mode (no GPU here)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_script_parses_and_rejects_bad_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT), "--device", "tpu"], capture_output=True, text=True)
    assert r.returncode == 2 and "allowed: cuda, cpu" in r.stderr
    sc = shutil.which("shellcheck")
    if sc:
        r = subprocess.run([sc, str(SCRIPT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_python_pieces_run_on_cpu(tmp_path, capsys):
    assert gpu_check.main(["env", "--device", "cpu", "--json", str(tmp_path / "env.json")]) == 0
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["dry_run"] and env["torch"]

    assert gpu_check.main(["codecs", "--device", "cpu", "--sizes", "64K", "--runs", "2",
                           "--json", str(tmp_path / "codecs.json")]) == 0
    c = json.loads((tmp_path / "codecs.json").read_text())
    rows = {r["kernel"]: r for r in c["tables"][0]["rows"]}
    assert set(gpu_check.FUSED) <= set(rows) and "topk:ratio=0.01 compress" in rows
    n = 64 * 1024
    # bytes moved: fp32 in, the exact 4-bit payload (codes + per-group scales) out
    from commtrain.compress.kernels.torch_ops import quant_payload_nbytes

    assert rows[gpu_check.FUSED[0]]["bytes"] == 4 * n + quant_payload_nbytes(n, 4, 128, "minmax")
    assert c["dry_run"] and c["pass"] is False  # torch reference kernels on CPU never count as the target
    assert "dry run on CPU" in capsys.readouterr().out

    assert gpu_check.main(["streams", "--device", "cpu", "--n", "64K", "--runs", "2",
                           "--json", str(tmp_path / "streams.json")]) == 0
    s = json.loads((tmp_path / "streams.json").read_text())
    assert [a["name"] for a in s["arrangements"]] == ["serial (one stream)", "thread, default stream (Communicator today)"]

    capsys.readouterr()
    assert gpu_check.main(["precision-flag"]) == 0
    flag = capsys.readouterr().out.strip()
    from commtrain.config import load_config

    accepts = "precision" in {f for f in load_config(None, []).train.__dataclass_fields__}
    assert flag == ("train.precision=bf16" if accepts else "")


@pytest.mark.slow
def test_dry_run_of_the_whole_script(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_BUDGET_S": "300"}
    r = subprocess.run(["bash", str(SCRIPT), "--device", "cpu"], capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert summary == r.stdout.split("\n\n", 1)[1].rsplit("gpu_check: outputs", 1)[0]
    lines = summary.strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("gpu_check on CPU")
    assert lines[1].startswith("[SKIPPED: dry run") and "[ok" in lines[2] and "(dry run)" in lines[2]
    # train.precision exists, so the check trains in bf16 (autocast works on CPU too)
    assert "1-rank train (gloo, bf16" in lines[3] and "6 steps" in lines[3]
    assert (out / "train" / "metrics.jsonl").is_file() and not (out / "train" / "checkpoints").exists()
    status = dict(line.split("\t")[:2] for line in (out / "status.tsv").read_text().splitlines())
    assert status == {"env": "0", "cupy": "skip", "cupy_tests": "5", "codecs": "0", "train": "0", "streams": "0"}
