"""Units of bandwidth and latency, parsed in one place (link profiles, ``link.*`` config keys,
hardware and interconnect profiles all read them here).

Units are decimal, as in ``tc``: ``kbit``/``mbit``/``gbit``/``tbit`` are 10^3/6/9/12 bits per
second; ``KB``/``MB``/``GB``/``TB`` (optionally ``/s``) are 10^3.. bytes per second and
``KiB``/``MiB``/``GiB``/``TiB`` binary bytes per second. A bare number is bits per second
(bandwidth) or seconds (latency). ``"100mb"`` and ``"1gbps"`` are refused: ``tc`` reads
``mbps`` as megaBYTES per second, so the spelling is ambiguous.

>>> parse_bandwidth("100mbit"), parse_bandwidth("25GB/s"), parse_latency("2ms")
(100000000.0, 200000000000.0, 0.002)
"""
from __future__ import annotations

import re

__all__ = ["parse_bandwidth", "parse_latency"]

_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BIN_PREFIX = {"ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}
_LAT_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
_NUM = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"
_BW_UNITS_HELP = "bit, kbit, mbit, gbit, tbit (bits/s) or B, KB, MB, GB, TB, KiB, MiB, GiB (bytes/s, '/s' optional)"


def parse_bandwidth(text: str | float | int) -> float:
    """``"100mbit"`` -> 1e8 bits/s; ``"25GB/s"`` -> 2e11 bits/s. Numbers are bits/s."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"bandwidth={text!r} is invalid; allowed: a positive rate")
        return float(text)
    m = re.fullmatch(_NUM + r"([A-Za-z]*)(/s)?\s*", str(text))
    if not m:
        raise ValueError(f"bandwidth={text!r} is invalid; expected a number with a unit: {_BW_UNITS_HELP}")
    value, unit = float(m.group(1)), m.group(2)
    if unit.lower().endswith("bit") and unit.lower()[:-3] in _PREFIX:
        bps = value * _PREFIX[unit.lower()[:-3]]
    elif unit.endswith("B") and unit[:-1].lower() in _BIN_PREFIX:
        bps = 8 * value * _BIN_PREFIX[unit[:-1].lower()]
    elif unit.endswith("B") and unit[:-1].lower() in _PREFIX:
        bps = 8 * value * _PREFIX[unit[:-1].lower()]
    else:
        # "100mb", "1gbps" are ambiguous (tc reads "mbps" as megaBYTES): refuse them.
        raise ValueError(f"bandwidth={text!r}: unknown unit {unit!r}; allowed: {_BW_UNITS_HELP}")
    if bps <= 0:
        raise ValueError(f"bandwidth={text!r} is invalid; allowed: a positive rate")
    return bps


def parse_latency(text: str | float | int) -> float:
    """``"50us"`` -> 5e-5 s. Plain numbers are seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(_NUM + r"([a-zµ]*)\s*", str(text))
        if not m or m.group(2) not in _LAT_UNITS:
            raise ValueError(f"latency={text!r} is invalid; expected a number with a unit: {', '.join(_LAT_UNITS)}")
        value = float(m.group(1)) * _LAT_UNITS[m.group(2)]
    if value < 0:
        raise ValueError(f"latency={text!r} is invalid; allowed: >= 0")
    return value
