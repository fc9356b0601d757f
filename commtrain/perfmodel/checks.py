"""Argument checks of the perf model's public functions: one line naming the argument, its
value and what is allowed."""
from __future__ import annotations


def check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}={v!r} is invalid; allowed: an integer >= {lo}")
    return v


def check_pos(name: str, v, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or (hi is not None and v > hi):
        raise ValueError(f"{name}={v!r} is invalid; allowed: a number > 0" + (f" and <= {hi}" if hi else ""))
    return float(v)


def check_non_negative(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"{name}={v!r} is invalid; allowed: a number >= 0")
    return float(v)
