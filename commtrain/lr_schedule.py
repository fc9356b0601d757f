"""The learning-rate schedule: linear warm-up, then cosine decay to 10% -- and what a resume
with another ``train.steps`` does to it.

With base rate ``lr``, warm-up ``W`` steps and ``T`` steps in all (0-based step ``s``)::

    s < W:   lr(s) = lr * (s + 1) / W
    s >= W:  lr(s) = floor + (peak - floor) * (1 + cos(pi * (s - a) / max(1, T - a))) / 2,
             floor = 0.1 * lr

with the *anchor* ``a = W`` and ``peak = lr`` as planned. The schedule is part of every
checkpoint (``state_dict``: ``anchor``, ``peak``, ``total``).

Resuming at step ``k`` with a different ``train.steps`` ``T'`` (:meth:`WarmupCosine.retarget`):
the steps already trained keep the rates they had, and from ``k`` on the cosine decays from
the rate at ``k``, ``lr(k)``, to the same floor over the *remaining* steps ``k .. T'``
(anchor ``a = k``, ``peak = lr(k)``). The rate is thus continuous at ``k`` and reaches the
floor at the new end; raising ``T`` never raises the rate again. A resume during warm-up
keeps the warm-up and stretches only the cosine (anchor ``W``, ``peak = lr``, total ``T'``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

FLOOR = 0.1  # the cosine's end, as a fraction of the base lr


class WarmupCosine:
    def __init__(self, lr: float, warmup_steps: int, total_steps: int):
        self.lr, self.warmup = float(lr), int(warmup_steps)
        self.anchor, self.peak, self.total = self.warmup, self.lr, int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.anchor) / max(1, self.total - self.anchor)
        floor = FLOOR * self.lr
        return floor + (self.peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def retarget(self, step: int, total_steps: int) -> bool:
        """Continue from ``step`` towards a new total (see the module docstring); True when
        the schedule changed."""
        total_steps = int(total_steps)
        if total_steps == self.total:
            return False
        if step > self.warmup:  # at step == warmup the cosine has not begun: just stretch it
            self.anchor, self.peak = int(step), self(step)
        self.total = total_steps
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor, "peak": self.peak, "total": self.total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.anchor, self.peak, self.total = int(state["anchor"]), float(state["peak"]), int(state["total"])
