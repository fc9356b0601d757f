"""Per-step metrics as JSON lines, TensorBoard scalars, and the end-of-run summary line.

Rank 0 writes ``<out_dir>/metrics.jsonl``; every other rank writes
``<out_dir>/metrics_rank<r>.jsonl`` (in a pipeline each stage sends different channels,
so every rank's own bytes are kept). One object per step: ``step``, ``loss``,
``step_time_s``, ``tokens_per_s``, ``wire_bytes`` (bytes *this rank* sent in this step,
by channel), ``compute_s``, ``comm_s``, ``grad_norm``, ``skipped`` (true: some rank saw a
non-finite loss or gradient norm, so no rank updated; ``loss`` may then be NaN) and
``skipped_total`` (skipped steps so far in this process); evaluation lines carry
``"event": "eval"`` (none with ``data.eval_fraction=0``).

When ``tensorboard`` is installed (``pip install commtrain[dashboards]``), rank 0 also
writes TensorBoard event files into ``<out_dir>`` beside ``metrics.jsonl`` (``tensorboard
--logdir runs/`` then shows every run): ``train/loss``, ``train/lr``, ``time/step_s``,
``time/comm_s``, ``time/compute_s``, ``throughput/tokens_per_s``,
``wire_bytes/<channel>`` (rank 0's bytes), ``train/skipped`` and ``eval/loss``. ``COMMTRAIN_TENSORBOARD=0``
turns them off.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any



def metrics_path(out_dir: str | os.PathLike, rank: int) -> Path:
    return Path(out_dir) / ("metrics.jsonl" if rank == 0 else f"metrics_rank{rank}.jsonl")


def tensorboard_available() -> bool:
    """``torch.utils.tensorboard`` works only with the ``tensorboard`` package installed."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class MetricsLogger:
    def __init__(self, out_dir: str | os.PathLike, rank: int, resume_step: int | None = None,
                 tensorboard: bool | None = None):
        self.path = metrics_path(out_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate_after(resume_step)
        self._f = open(self.path, "a")
        if tensorboard is None:  # auto: rank 0, when installed, unless switched off
            tensorboard = rank == 0 and os.environ.get("COMMTRAIN_TENSORBOARD", "1") != "0" and tensorboard_available()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: on resume, TensorBoard hides the interrupted run's events after the
            # checkpoint (as _truncate_after does for the JSON lines).
            self.tb = SummaryWriter(log_dir=str(self.path.parent), flush_secs=10,
                                    purge_step=None if resume_step is None else resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines the interrupted run wrote after the checkpoint we resume from."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:  # a torn last line from a killed process
                continue
        self.path.write_text("".join(k + "\n" for k in keep))

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self.tb is not None:
            self._log_tensorboard(record)

    def _log_tensorboard(self, r: dict[str, Any]) -> None:
        step = r.get("step", 0)
        if r.get("event") == "eval":
            if r.get("eval_loss") is not None:
                self.tb.add_scalar("eval/loss", r["eval_loss"], step)
            return
        for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("step_time_s", "time/step_s"),
                         ("comm_s", "time/comm_s"), ("compute_s", "time/compute_s"),
                         ("tokens_per_s", "throughput/tokens_per_s")):
            if isinstance(r.get(key), (int, float)):
                self.tb.add_scalar(tag, r[key], step)
        if "skipped" in r:
            self.tb.add_scalar("train/skipped", float(bool(r["skipped"])), step)
        for channel, nbytes in (r.get("wire_bytes") or {}).items():
            self.tb.add_scalar(f"wire_bytes/{channel}", nbytes, step)

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rank_metric_files(out_dir) -> list[Path]:
    """``metrics.jsonl`` and every ``metrics_rank<r>.jsonl`` of a run, rank order."""
    out = Path(out_dir)
    others = sorted(out.glob("metrics_rank*.jsonl"), key=lambda p: int(p.stem.removeprefix("metrics_rank") or 0))
    return [p for p in [out / "metrics.jsonl", *others] if p.is_file()]


def wire_bytes_by_step(out_dir) -> dict[int, dict[str, int]]:
    """Bytes *all ranks together* sent in each step, by channel (the sum of every rank's file)."""
    total: dict[int, dict[str, int]] = {}
    for path in rank_metric_files(out_dir):
        for r in read_metrics(path):
            if "event" in r:
                continue
            acc = total.setdefault(r["step"], {})
            for ch, n in (r.get("wire_bytes") or {}).items():
                acc[ch] = acc.get(ch, 0) + int(n)
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # unreachable


def summary_line(rows: list[dict[str, Any]], out_dir) -> str:
    """One line at the end of a run, from rank 0's metric ``rows`` and the run directory.

    ``steps`` trained; ``tokens/s`` = all tokens / all step time; ``wire/step``: the bytes
    all ranks together sent per step, by channel (mean over steps; channels that never
    carried a byte are left out); skipped (non-finite) steps, if any; the final eval loss;
    where the newest checkpoint (the weights) is and how to export it.
    """
    steps = [r for r in rows if "event" not in r]
    if not steps:
        return f"commtrain: no training steps recorded in {out_dir}"
    time_s = sum(r["step_time_s"] for r in steps)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steps)
    parts = [f"{steps[-1]['step']} steps", f"{tokens / time_s:,.0f} tokens/s" if time_s > 0 else "tokens/s n/a"]
    wire = wire_bytes_by_step(out_dir)
    if wire:
        chans: dict[str, float] = {}
        for per in wire.values():
            for ch, n in per.items():
                chans[ch] = chans.get(ch, 0) + n
        used = {ch: n / len(wire) for ch, n in chans.items() if n}
        parts.append("wire/step " + (", ".join(f"{ch} {human_bytes(n)}" for ch, n in used.items()) or "0 B"))
    decisions = [r for r in rows if r.get("event") == "compression_decision"]
    if decisions:
        d = decisions[-1]
        parts.append(f"compression auto (step {d['step']}, {len(decisions)} decision(s)): {d['summary']}")
    skipped = sum(bool(r.get("skipped")) for r in steps)
    if skipped:
        parts.append(f"{skipped} step(s) skipped (non-finite loss or gradient norm)")
    evals = [r for r in rows if r.get("event") == "eval" and r.get("eval_loss") is not None]
    if evals:
        parts.append(f"final eval loss {evals[-1]['eval_loss']:.4f}")
    parts.append(_weights(out_dir, steps[-1]["step"]))
    return "commtrain: done: " + "; ".join(parts)


def _weights(out_dir, last_step: int) -> str:
    root = Path(out_dir) / "checkpoints"
    ckpts = sorted(root.glob("step_*")) if root.is_dir() else []
    ckpts = [c for c in ckpts if (c / "manifest.json").is_file()]
    if not ckpts:
        return "weights: not saved (set train.checkpoint_every to keep checkpoints)"
    newest = ckpts[-1]
    stale = "" if int(newest.name.removeprefix("step_")) >= last_step else f" (older than step {last_step})"
    return f"weights: {newest}{stale} (commtrain export {out_dir} OUT_DIR)"
