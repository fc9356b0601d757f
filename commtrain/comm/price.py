"""One price list: the bytes a rank sends and the message rounds of every wire operation.

Pure functions, used by the three places that must agree on them: the :class:`Wire`
(metering and throttling what really crossed), the adaptive compression policy (through a
rehearsal of the real collective over :class:`LoopbackWire`, which meters with these same
functions) and the perf model (which adds node topology on top). A change to a collective
changes its price here, once.

==================  ==============================================  ===============
operation           bytes this rank sends                            message rounds
==================  ==============================================  ===============
all_to_all          sum of packet sizes addressed to other ranks    p - 1
all_gather          (p - 1) * own packet bytes (ring)               p - 1
all_reduce (ring)   floor(2 (p - 1) / p * payload bytes)            2 (p - 1)
p2p send            packet bytes                                    1
==================  ==============================================  ===============

What a link charges is not only these bytes: a TCP stream is cut into segments of at most
MSS payload bytes, and every segment carries protocol headers that the shaper (a ``tc``
qdisc, a NIC) counts against the rate. :data:`FRAMINGS` prices that per link
(:func:`framed_bytes`), and :func:`link_seconds` is the one formula every link model uses
(the simulated :class:`commtrain.comm.LinkModel` and the perf model's links).

Composite collectives (what :mod:`.collectives` does, one list of per-rank costs per wire
operation): a summable codec's all-reduce is one ring all-reduce of its payload; any other
codec's is a reduce-scatter (all-to-all of compressed chunks) then an all-gather of the
re-compressed reduced chunks. Chunk ``j`` of ``n`` elements over ``p`` ranks is
``[min(j c, n), min((j + 1) c, n))`` with ``c = ceil(n / p)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Cost:
    """One wire operation seen from one rank: bytes it sends, sequential message rounds."""

    nbytes: int
    rounds: int

    def seconds(self, link) -> float:
        """Link seconds on a :class:`commtrain.comm.LinkModel` (``cost_s(nbytes, rounds)``)."""
        return link.cost_s(self.nbytes, self.rounds)


# -- framing: the bytes a link charges for a payload ------------------------------------------------
@dataclass(frozen=True)
class Framing:
    """A stream cut into segments of at most ``mss`` payload bytes, each charged
    ``header_bytes`` more (``mss`` 0: no framing, the payload is what the link charges)."""

    name: str
    mss: int = 0
    header_bytes: int = 0

    def wire_bytes(self, nbytes: int) -> int:
        if self.mss <= 0 or nbytes <= 0:
            return int(nbytes)
        return int(nbytes) + -(-int(nbytes) // self.mss) * self.header_bytes

    @property
    def efficiency(self) -> float:
        """Payload share of what the link carries for a long stream (goodput / rate)."""
        return self.mss / (self.mss + self.header_bytes) if self.mss > 0 else 1.0


# ``tcp``: TCP over IPv4 over Ethernet at MTU 1500 with Linux's default TCP timestamps: MSS =
# 1500 - 20 (IPv4) - 20 (TCP) - 12 (timestamp option) = 1448 payload bytes per segment, which
# a qdisc (``tc tbf``, also on GSO super-packets: the kernel charges each segment's headers)
# counts as a 1514-byte frame (+ 14 Ethernet header): goodput = 95.6% of the shaped rate, as
# launch/netns.py --measure finds (95.6 Mbit/s on a 100mbit tbf). A physical NIC also spends
# preamble, FCS and inter-frame gap (24 bytes more per frame, another 1.6%), not modeled.
FRAMINGS = {
    "none": Framing("none"),
    "tcp": Framing("tcp", mss=1448, header_bytes=66),
}


def framing(name: "str | Framing | None") -> Framing:
    if name is None:
        return FRAMINGS["none"]
    if isinstance(name, Framing):
        return name
    if name not in FRAMINGS:
        raise ValueError(f"link framing={name!r} is invalid; allowed: {', '.join(FRAMINGS)}")
    return FRAMINGS[name]


def framed_bytes(nbytes: int, framing_name: "str | Framing | None" = None) -> int:
    """Bytes a link charges to carry ``nbytes`` of payload."""
    return framing(framing_name).wire_bytes(nbytes)


def link_seconds(nbytes: int, rounds: int, bandwidth_bps: float | None, latency_s: float,
                 framing_name: "str | Framing | None" = None) -> float:
    """Seconds of a wire operation of ``nbytes`` payload in ``rounds`` message rounds on a link
    of ``bandwidth_bps`` (None: infinite), ``latency_s`` per round and the given framing."""
    t = latency_s * rounds
    if bandwidth_bps is not None:
        t += 8.0 * framed_bytes(nbytes, framing_name) / bandwidth_bps
    return t


# -- primitive operations ------------------------------------------------------------------------
def all_to_all(send_splits: Sequence[int], rank: int) -> Cost:
    return Cost(int(sum(send_splits) - send_splits[rank]), len(send_splits) - 1)


def all_gather(sizes: Sequence[int], rank: int) -> Cost:
    p = len(sizes)
    return Cost((p - 1) * int(sizes[rank]), p - 1)


def ring_all_reduce(payload_bytes: int, p: int) -> Cost:
    return Cost(2 * (p - 1) * int(payload_bytes) // p, 2 * (p - 1))


def p2p(nbytes: int) -> Cost:
    return Cost(int(nbytes), 1)


# -- composite collectives ---------------------------------------------------------------------
def chunk_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) of each of ``parts`` contiguous chunks of ``ceil(numel / parts)`` elements."""
    c = -(-numel // parts)
    return [(min(j * c, numel), min((j + 1) * c, numel)) for j in range(parts)]


def chunk_payloads(codec, numel: int, dtype: torch.dtype, p: int) -> list[int]:
    """Payload bytes of each rank's chunk of a ``numel``-element tensor."""
    return [codec.payload_nbytes(hi - lo, dtype) for lo, hi in chunk_bounds(numel, p)]


def reduce_scatter(codec, numel: int, dtype: torch.dtype, p: int) -> list[list[Cost]]:
    """Compressed reduce-scatter: rank r sends chunk j's packet to every j != r."""
    if p == 1:
        return []
    sizes = chunk_payloads(codec, numel, dtype, p)
    sends = [[0 if j == r else sizes[j] for j in range(p)] for r in range(p)]
    return [[all_to_all(sends[r], r) for r in range(p)]]


def all_gather_flat(codec, numels: Sequence[int], dtype: torch.dtype) -> list[list[Cost]]:
    """Every rank's packet of its ``numels[r]`` elements to all others."""
    p = len(numels)
    if p == 1:
        return []
    sizes = [codec.payload_nbytes(int(n), dtype) for n in numels]
    return [[all_gather(sizes, r) for r in range(p)]]


def all_reduce(codec, numel: int, dtype: torch.dtype, p: int) -> list[list[Cost]]:
    """``Communicator.all_reduce``: one list of per-rank costs per wire operation."""
    if p == 1 or numel == 0:
        return []
    if codec.summable_dtype(dtype) is not None:
        return [[ring_all_reduce(codec.payload_nbytes(numel, dtype), p)] * p]
    numels = [hi - lo for lo, hi in chunk_bounds(numel, p)]
    return reduce_scatter(codec, numel, dtype, p) + all_gather_flat(codec, numels, dtype)


def rank_total(ops: list[list[Cost]], rank: int) -> Cost:
    """Bytes and rounds of a sequence of operations, for one rank."""
    return Cost(sum(op[rank].nbytes for op in ops), sum(op[rank].rounds for op in ops))


def seconds(ops: list[list[Cost]], link) -> float:
    """Link seconds of a sequence of operations on ``link``: each operation lasts as long as
    its slowest rank's part, and they run one after the other (FIFO on each rank's link)."""
    return sum(max(c.seconds(link) for c in op) for op in ops)
