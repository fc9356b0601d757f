"""benchmarks/finetune.py: the row table, the statistics of the fidelity table, a tiny end-to-end run."""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from commtrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("finetune_bench", ROOT / "benchmarks" / "finetune.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_every_row_is_a_valid_config(bench):
    assert bench.REFERENCE in bench.ROWS and bench.ROWS[bench.REFERENCE].target is None
    for name, row in bench.ROWS.items():
        cfg = load_config(None, [*row.sets, f"parallel.pp={row.pp}"]).validate(world_size=2)
        assert cfg.parallel.pp == row.pp, name


def test_yaml_float_reads_back_as_a_float(bench):
    for x in (1e-5, 2e-3, 1.0, 3e-12, 0.5):
        text = bench._yaml_float(x)
        assert isinstance(yaml.safe_load(text), float) and yaml.safe_load(text) == x, text


def _seed(loss, wire=1e6):
    return {"final_eval_loss": loss, "wire_bytes_per_step": wire, "wall_s": 10.0, "eval": [(5, loss)], "loss": [loss]}


def test_summary_statistics_and_verdicts(bench):
    data = {"rows": {
        "fp32": {"target": None, "seeds": {"0": _seed(2.00), "1": _seed(2.10), "2": _seed(1.90)}},
        "quant 4-bit + EF": {"target": 0.01, "seeds": {"0": _seed(2.01), "1": _seed(2.121), "2": _seed(1.919)}},
        "later row": {"target": 0.01, "seeds": {"0": _seed(2.10), "1": _seed(2.20)}},
    }}
    by = {s["name"]: s for s in bench.summarize(data)}
    q = by["quant 4-bit + EF"]
    assert q["mean"] == pytest.approx((2.01 + 2.121 + 1.919) / 3)
    assert q["std"] == pytest.approx(statistics.stdev([2.01, 2.121, 1.919]))
    assert (q["min"], q["max"]) == (1.919, 2.121)
    assert q["rel"] == pytest.approx(q["mean"] / 2.0 - 1)
    # Paired per seed: seed s of the row against seed s of fp32.
    assert q["paired"] == pytest.approx([0.005, 0.01, 0.01])
    assert q["verdict"] == "met"
    # A row outside ROWS (e.g. from an older JSON) is still listed; its 5% miss is reported.
    later = by["later row"]
    assert later["paired"] == pytest.approx([0.05, 2.2 / 2.1 - 1]) and later["verdict"] == "MISSED"
    # A row may name its own reference (pipeline rows against the uncompressed pipeline).
    data["rows"]["pp2 fp32"] = {"seeds": {"0": _seed(2.2), "1": _seed(2.2)}}
    data["rows"]["pp2 codec"] = {"target": 0.02, "ref": "pp2 fp32", "seeds": {"0": _seed(2.2 * 1.03), "1": _seed(2.2)}}
    by = {s["name"]: s for s in bench.summarize(data)}
    assert by["pp2 codec"]["rel"] == pytest.approx(0.015) and by["pp2 codec"]["paired"] == pytest.approx([0.03, 0.0])
    assert by["pp2 codec"]["verdict"] == "met" and by["fp32"]["rel"] is None
    table = bench.format_table(data)
    assert "+1.50% (vs pp2 fp32)" in table and "| fp32 | 3 | 2.0000 |" in table
    assert "| quant 4-bit + EF | 3 |" in table and "<= +1%: met" in table and "<= +1%: MISSED" in table
    # ROWS' order first (pp2 fp32 is a ROWS row), then rows outside ROWS, sorted.
    assert [s["name"] for s in bench.summarize(data)] == ["fp32", "quant 4-bit + EF", "pp2 fp32", "later row",
                                                         "pp2 codec"]


def test_unknown_row_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["finetune", "--rows", "nope"])
    assert "unknown ['nope']" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_end_to_end(bench, tmp_path, capsys):
    """Pretrain a few steps, cache, fine-tune 2 rows x 1 seed, table + PNG + JSON."""
    args = ["--preset", "gpt-nano", "--pretrain-steps", "6", "--pretrain-max-bytes", "200000", "--steps", "4",
            "--eval-every", "2", "--eval-batches", "2", "--seq-len", "32", "--seeds", "0",
            "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "runs"), "--json", str(tmp_path / "f.json"),
            "--png", str(tmp_path / "f.png")]
    assert bench.main(["finetune", *args]) == 0
    data = json.loads((tmp_path / "f.json").read_text())
    assert set(data["rows"]) == {"fp32", "quant 4-bit + EF"}
    assert data["base"]["ft_eval_before"] > 0 and (tmp_path / "f.png").stat().st_size > 0
    model_dir = Path(data["base"]["model_dir"])
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    # The base is cached: a second call reuses it (same key, same bytes).
    before = (model_dir / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert bench.main(["pretrain", *args]) == 0
    assert f"base model: cached {model_dir.parent}" in capsys.readouterr().out
    assert (model_dir / "model.safetensors").read_bytes() == before
    # Other settings in the same JSON are refused rather than mixed into one table.
    with pytest.raises(SystemExit):
        bench.main(["finetune", *args, "--lr", "0.5"])

