"""Config errors and the small checks every config section uses.

Each component owns its config section (a dataclass beside its code, with a ``validate()``
that only reads); :mod:`commtrain.config` assembles the tree. The messages name the key, the
bad value and what is allowed, on one line.
"""
from __future__ import annotations

import math


class ConfigError(ValueError):
    """An invalid configuration. The message names the key, the bad value and what is allowed."""


def _name(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive(obj, section: str, *keys: str) -> None:
    for k in keys:
        v = getattr(obj, k)
        if not _is_number(v) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{_name(section, k)}={v!r} is invalid; allowed: a finite number > 0")


def non_negative(obj, section: str, *keys: str) -> None:
    for k in keys:
        v = getattr(obj, k)
        if not _is_number(v) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{_name(section, k)}={v!r} is invalid; allowed: a finite number >= 0")


def integer(obj, section: str, key: str, lo: int) -> None:
    v = getattr(obj, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{_name(section, key)}={v!r} is invalid; allowed: an integer >= {lo}")


def choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {', '.join(map(str, allowed))}")
