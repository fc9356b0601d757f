"""TensorBoard scalars beside metrics.jsonl, the end-of-run summary line, `commtrain plot`."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from commtrain.cli import main
from commtrain.metrics import MetricsLogger, summary_line, tensorboard_available, read_metrics
from commtrain.plot import N_PANELS, plot_runs


def _step(step, loss, grad, act=0, time_s=0.5, tokens=1000):
    return {"step": step, "loss": loss, "lr": 1e-3 * step, "step_time_s": time_s, "tokens_per_s": tokens / time_s,
            "wire_bytes": {"grad": grad, "act": act, "act_grad": 0, "param": 0}, "compute_s": time_s * 0.8,
            "comm_s": time_s * 0.2}


def _fake_run(d: Path, steps=4, ckpt_step=4, scale=1.0):
    """Rank 0 and rank 1 metric files as the trainer writes them, and a checkpoint manifest."""
    r0 = MetricsLogger(d, 0, tensorboard=False)
    r1 = MetricsLogger(d, 1, tensorboard=False)
    for s in range(1, steps + 1):
        r0.log(_step(s, 5.0 / s * scale, grad=1000 * s, act=4096))
        r1.log(_step(s, 5.0 / s * scale, grad=1000 * s, act=0))
        if s == 2:
            r0.log({"event": "eval", "step": 2, "eval_loss": 3.0})
    r0.log({"event": "eval", "step": steps, "eval_loss": 3.21, "final": True})
    r0.close()
    r1.close()
    if ckpt_step:
        ck = d / "checkpoints" / f"step_{ckpt_step:08d}"
        ck.mkdir(parents=True)
        (ck / "manifest.json").write_text(json.dumps({"step": ckpt_step, "world_size": 2, "shards": []}))
    return d


def test_summary_line(tmp_path):
    d = _fake_run(tmp_path / "run")
    line = summary_line(read_metrics(d / "metrics.jsonl"), d)
    assert "\n" not in line and line.startswith("commtrain: done: 4 steps")
    assert "2,000 tokens/s" in line  # 1000 tokens per 0.5 s step
    # grad: both ranks, steps 1..4: 2 * 1000 * (1+2+3+4) / 4 = 5000 B; act: rank 0 only, 4096 B = 4.0 KiB
    assert "wire/step grad 4.9 KiB, act 4.0 KiB;" in line and "act_grad" not in line
    assert "final eval loss 3.2100" in line
    assert f"weights: {d / 'checkpoints' / 'step_00000004'} (commtrain export {d} OUT_DIR)" in line
    stale = _fake_run(tmp_path / "stale", ckpt_step=2)
    assert "(older than step 4)" in summary_line(read_metrics(stale / "metrics.jsonl"), stale)
    none = _fake_run(tmp_path / "none", ckpt_step=0)
    assert "weights: not saved (set train.checkpoint_every" in summary_line(read_metrics(none / "metrics.jsonl"), none)
    assert "no training steps" in summary_line([], tmp_path)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_with_three_panels(tmp_path, capsys):
    a = _fake_run(tmp_path / "a")
    b = _fake_run(tmp_path / "b", scale=1.3)
    png = tmp_path / "out" / "cmp.png"
    assert main(["plot", str(a), str(b), "--out", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.stat().st_size > 10_000 and _png_size(png) == (800, 1000)  # figsize 8x10 in at 100 dpi
    fig = plot_runs([str(a)], str(tmp_path / "one.png"))
    assert len(fig.axes) == N_PANELS == 3
    loss_ax, _, wire_ax = fig.axes
    assert [ln.get_label() for ln in loss_ax.get_lines()] == ["a train", "a eval"]
    assert sorted(ln.get_label() for ln in wire_ax.get_lines()) == ["a act", "a grad"]  # channels that carried bytes
    assert main(["plot", str(a)]) == 0 and (a / "metrics.png").stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed (pip install commtrain[dashboards])")
def test_tensorboard_scalars_beside_metrics_and_purged_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = tmp_path / "run"
    m = MetricsLogger(d, 0)
    assert m.tb is not None and MetricsLogger(d, 1).tb is None  # rank 0 only
    for s in (1, 2, 3, 4):
        m.log(_step(s, 10.0 + s, grad=100 * s))
    m.log({"event": "eval", "step": 4, "eval_loss": 2.5})
    m.close()
    # resumed from a checkpoint at step 2: steps 3 and 4 are redone with other values
    m = MetricsLogger(d, 0, resume_step=2)
    for s in (3, 4):
        m.log(_step(s, 20.0 + s, grad=100 * s))
    m.close()
    assert list(d.glob("events.out.tfevents.*")), "no event files beside metrics.jsonl"
    acc = EventAccumulator(str(d))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "time/step_s", "time/comm_s", "throughput/tokens_per_s",
            "wire_bytes/grad", "wire_bytes/act"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    assert [e.value for e in acc.Scalars("wire_bytes/grad")] == [100, 200, 300, 400]
    # the eval at step 4 belonged to the purged part of the first run
    assert "eval/loss" not in tags or not acc.Scalars("eval/loss")
    assert [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "event" not in r] == [11.0, 12.0, 23.0, 24.0]
