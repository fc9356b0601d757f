"""ByteMeter: the one ledger of what this rank put on the wire, per channel.

Every byte the communication layer hands to torch.distributed is added here by
:class:`commtrain.comm.wire.Wire` (and nowhere else), together with the seconds the
link model says those bytes occupy the link. Counts are *bytes sent by this rank*:
received bytes are the peers' sent bytes and would double-count in a sum over ranks.
"""
from __future__ import annotations

import threading

CHANNELS = ("grad", "act", "act_grad", "param")


def check_channel(channel: str) -> str:
    if channel not in CHANNELS:
        raise ValueError(f"channel={channel!r} is invalid; allowed: {', '.join(CHANNELS)}")
    return channel


class ByteMeter:
    """Thread-safe per-channel counters: bytes, operations and modeled link seconds.

    ``snapshot()`` returns ``{"bytes": {ch: int}, "ops": {ch: int}, "modeled_s": {ch: float},
    "total_bytes": int, "total_modeled_s": float}`` with every channel present.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._lifetime = dict.fromkeys(CHANNELS, 0)  # never reset: for spans that cross a snapshot
        self._reset()

    def _reset(self) -> None:
        self._bytes = dict.fromkeys(CHANNELS, 0)
        self._ops = dict.fromkeys(CHANNELS, 0)
        self._modeled = dict.fromkeys(CHANNELS, 0.0)

    def add(self, channel: str, nbytes: int, ops: int = 1, modeled_s: float = 0.0) -> None:
        check_channel(channel)
        if int(nbytes) != nbytes or nbytes < 0:
            raise ValueError(f"nbytes={nbytes!r} is invalid; allowed: an integer >= 0")
        with self._lock:
            self._bytes[channel] += int(nbytes)
            self._lifetime[channel] += int(nbytes)
            self._ops[channel] += int(ops)
            self._modeled[channel] += float(modeled_s)

    @property
    def bytes(self) -> dict[str, int]:
        with self._lock:
            return dict(self._bytes)

    @property
    def lifetime_bytes(self) -> dict[str, int]:
        """Bytes per channel since the meter was made (``snapshot(reset=True)`` leaves them):
        the bytes of an operation that spans a step boundary are a difference of these."""
        with self._lock:
            return dict(self._lifetime)

    @property
    def ops(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ops)

    @property
    def modeled_s(self) -> dict[str, float]:
        with self._lock:
            return dict(self._modeled)

    def total(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def snapshot(self, reset: bool = False) -> dict:
        with self._lock:
            snap = {
                "bytes": dict(self._bytes),
                "ops": dict(self._ops),
                "modeled_s": dict(self._modeled),
                "total_bytes": sum(self._bytes.values()),
                "total_modeled_s": sum(self._modeled.values()),
            }
            if reset:
                self._reset()
        return snap

    def __repr__(self) -> str:
        return f"ByteMeter({self.bytes})"
