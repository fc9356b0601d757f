"""Per-step metrics as JSON lines.

Rank 0 writes ``<out_dir>/metrics.jsonl``; every other rank writes
``<out_dir>/metrics_rank<r>.jsonl`` (in a pipeline each stage sends different channels,
so every rank's own bytes are kept). One object per step: ``step``, ``loss``,
``step_time_s``, ``tokens_per_s``, ``wire_bytes`` (bytes *this rank* sent in this step,
by channel), ``compute_s``, ``comm_s``; evaluation lines carry ``"event": "eval"``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def metrics_path(out_dir: str | os.PathLike, rank: int) -> Path:
    return Path(out_dir) / ("metrics.jsonl" if rank == 0 else f"metrics_rank{rank}.jsonl")


class MetricsLogger:
    def __init__(self, out_dir: str | os.PathLike, rank: int, resume_step: int | None = None):
        self.path = metrics_path(out_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate_after(resume_step)
        self._f = open(self.path, "a")

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

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
