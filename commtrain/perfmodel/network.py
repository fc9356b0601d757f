"""Where the bytes go: the per-rank transfers of every collective, and what a network makes of them.

**Bytes and rounds come from the price list.** Every function below asks
:mod:`commtrain.comm.price` -- the same pure functions the :class:`~commtrain.comm.Wire` meters
with -- for what each rank sends and in how many message rounds; nothing here re-derives a
payload size or a round count. What the perf model adds is *topology*: which ranks share a
node, and so how many bytes leave a rank's node through the NICs (``node_bytes``):

* ring operations (ring all-reduce, all-gather): a ring's edge out of a node carries what one
  rank sends, so ``node_bytes = nbytes`` when the group spans nodes;
* the reduce-scatter's all-to-all (chunk ``j`` goes to rank ``j``): every member of a node
  sends its chunks for off-node ranks through the node's NICs, so ``node_bytes`` of rank
  ``r`` is the sum of those over the members of ``r``'s node;
* point-to-point: all of it, if source and destination are on different nodes.

**Networks.** :class:`LinkNetwork`: one link per rank, exactly as the throttled trainer
(:class:`commtrain.comm.LinkModel`: ``latency * rounds + 8 * bytes / bandwidth``).
:class:`NodeNetwork`: a rank's bytes cross its own intra-node link (PCIe or NVLink, per GPU)
and the bytes that leave its node share the node's NICs; an operation takes
``latency * rounds + max(bytes / intra_bw, node_bytes / nic_bw)``, with the inter-node
latency if it leaves the node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..comm import price
from ..compress import build_codec
from .checks import check_non_negative, check_pos
from .hardware import HardwareProfile, Interconnect


@dataclass(frozen=True)
class Transfer:
    """One operation as the comm layer performs it, seen from one rank."""

    channel: str
    nbytes: int  # bytes this rank sends (ByteMeter convention)
    rounds: int  # sequential message rounds (each pays the latency)
    node_bytes: int = 0  # bytes leaving this rank's node through the NICs (0: stays inside)


# -- networks ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkNetwork:
    """One link per rank, as :class:`commtrain.comm.LinkModel`: ``bandwidth_bps`` None = infinite."""

    bandwidth_bps: float | None
    latency_s: float
    name: str = "link"
    framing: str = "none"  # the per-segment overhead the link charges (commtrain.comm.price.FRAMINGS)

    def time_s(self, t: Transfer) -> float:
        return price.link_seconds(t.nbytes, t.rounds, self.bandwidth_bps, self.latency_s, self.framing)

    def describe(self) -> str:
        bw = "inf" if self.bandwidth_bps is None else f"{self.bandwidth_bps / 1e9:g} Gbit/s"
        return f"{self.name} ({bw}, {self.latency_s * 1e6:g} us)"


@dataclass(frozen=True)
class NodeNetwork:
    """GPUs in nodes: a per-GPU intra-node link and shared NICs per node."""

    hardware: HardwareProfile
    interconnect: Interconnect
    ports: int

    @property
    def gpus_per_node(self) -> int:
        return self.hardware.gpus_per_node

    def time_s(self, t: Transfer) -> float:
        hw = self.hardware
        if t.node_bytes:
            lat = self.interconnect.latency_s
            nic = self.interconnect.bandwidth_bps * self.ports
            return lat * t.rounds + max(8.0 * t.nbytes / hw.intra_bandwidth_bps, 8.0 * t.node_bytes / nic)
        return hw.intra_latency_s * t.rounds + 8.0 * t.nbytes / hw.intra_bandwidth_bps

    def describe(self) -> str:
        return f"{self.hardware.name} ({self.ports}x {self.interconnect.name} per node)"


def as_link_network(link) -> LinkNetwork:
    """A :class:`LinkNetwork` from a LinkModel (anything with ``bandwidth_bps``/``latency_s``),
    a link profile name or a spec such as ``"1gbit,50us"``."""
    if isinstance(link, LinkNetwork):
        return link
    if isinstance(link, str):
        from ..comm.link import resolve_link

        link = resolve_link(link)
    if not hasattr(link, "latency_s") or not hasattr(link, "bandwidth_bps"):
        raise TypeError(f"link={link!r} is invalid; allowed: a LinkModel (bandwidth_bps, latency_s), a profile name "
                        f"or a spec such as '1gbit,50us'")
    bw = link.bandwidth_bps
    if bw is not None:
        check_pos("link.bandwidth_bps", bw)
    check_non_negative("link.latency_s", link.latency_s)
    return LinkNetwork(None if bw is None else float(bw), float(link.latency_s), getattr(link, "name", "") or "link",
                       getattr(link, "framing", "none"))


# -- topology ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """Global ranks of one process group, and how many GPUs share a node (0: one link per rank)."""

    ranks: tuple[int, ...]
    gpus_per_node: int = 0

    @property
    def size(self) -> int:
        return len(self.ranks)

    def node(self, r: int) -> int:
        return self.ranks[r] // self.gpus_per_node if self.gpus_per_node else self.ranks[r]

    def spans_nodes(self) -> bool:
        return self.gpus_per_node > 0 and len({self.node(r) for r in range(self.size)}) > 1

    def off_node(self, r: int, j: int) -> bool:
        return self.gpus_per_node > 0 and self.node(r) != self.node(j)


def _ring(channel: str, g: Group, op: Sequence[price.Cost]) -> list[Transfer]:
    """A ring operation: its edge out of a node carries what one rank sends."""
    span = g.spans_nodes()
    return [Transfer(channel, c.nbytes, c.rounds, c.nbytes if span else 0) for c in op]


def _exchange(channel: str, g: Group, op: Sequence[price.Cost], sizes: Sequence[int]) -> list[Transfer]:
    """An all-to-all in which every rank sends ``sizes[j]`` bytes to each rank ``j`` but itself:
    every member of a node sends its off-node chunks through the node's NICs."""
    p = g.size
    out = []
    for r, c in enumerate(op):
        node = 0
        if g.gpus_per_node:
            node = sum(sizes[j] for q in range(p) if g.node(q) == g.node(r) for j in range(p) if g.off_node(q, j))
        out.append(Transfer(channel, c.nbytes, c.rounds, node))
    return out


# -- collectives: the price list's operations, placed on the nodes --------------------------------
def all_to_all(channel: str, g: Group, sizes: Sequence[int]) -> list[Transfer]:
    """Rank r sends ``sizes[j]`` bytes to every j != r (the compressed reduce-scatter's exchange)."""
    p = g.size
    op = [price.all_to_all([0 if j == r else sizes[j] for j in range(p)], r) for r in range(p)]
    return _exchange(channel, g, op, sizes)


def all_gather(channel: str, g: Group, sizes: Sequence[int]) -> list[Transfer]:
    """Rank r's packet of ``sizes[r]`` bytes to all others."""
    return _ring(channel, g, [price.all_gather(sizes, r) for r in range(g.size)])


def ring_all_reduce(channel: str, g: Group, payload: int) -> list[Transfer]:
    return _ring(channel, g, [price.ring_all_reduce(payload, g.size)] * g.size)


def reduce_scatter(channel: str, g: Group, numel: int, codec, dtype: torch.dtype) -> list[list[Transfer]]:
    """``Communicator.reduce_scatter`` (ZeRO-2's gradient buckets): one all-to-all, chunk j to rank j."""
    sizes = price.chunk_payloads(codec, numel, dtype, g.size)
    return [_exchange(channel, g, op, sizes) for op in price.reduce_scatter(codec, numel, dtype, g.size)]


def all_reduce(channel: str, g: Group, numel: int, codec, dtype: torch.dtype) -> list[list[Transfer]]:
    """``Communicator.all_reduce``: one list of per-rank transfers per wire operation."""
    ops = price.all_reduce(codec, numel, dtype, g.size)
    if len(ops) <= 1:  # nothing to send, or one ring all-reduce of a summable payload
        return [_ring(channel, g, op) for op in ops]
    if len(ops) != 2:
        raise NotImplementedError(f"price.all_reduce returned {len(ops)} operations; the perf model places a ring "
                                  f"all-reduce or a reduce-scatter + all-gather")
    rs, ag = ops  # compressed: the reduce-scatter's all-to-all, then the all-gather of reduced chunks
    return [_exchange(channel, g, rs, price.chunk_payloads(codec, numel, dtype, g.size)), _ring(channel, g, ag)]


def all_gather_flat(channel: str, g: Group, numels: Sequence[int], codec, dtype: torch.dtype) -> list[list[Transfer]]:
    """``Communicator.all_gather_flat`` (ZeRO's parameter gather): rank r's ``numels[r]`` elements to all."""
    return [_ring(channel, g, op) for op in price.all_gather_flat(codec, numels, dtype)]


def powersgd_all_reduces(g: Group, codec, params: Sequence[torch.Tensor]) -> list[list[Transfer]]:
    """:class:`~commtrain.parallel.powersgd.PowerSGDReducer` on one bucket: a plain fp32
    all-reduce of [P factors + uncompressed tensors], then one of the Q factors."""
    none = build_codec("none")
    p_numel = q_numel = 0
    for t in params:
        n = t.shape[0] if t.dim() >= 2 else 0
        m = t.numel() // n if n else 0
        if t.dim() >= 2 and t.numel() > 0 and codec.compresses(n, m):
            r = min(codec.rank, n, m)
            p_numel, q_numel = p_numel + n * r, q_numel + m * r
        else:
            p_numel += t.numel()
    ops = all_reduce("grad", g, p_numel, none, torch.float32)
    if q_numel:
        ops += all_reduce("grad", g, q_numel, none, torch.float32)
    return ops


def p2p(channel: str, nbytes: int, src: int, dst: int, gpus_per_node: int) -> Transfer:
    """A point-to-point send of ``nbytes`` from global rank ``src`` to ``dst``."""
    c = price.p2p(nbytes)
    off = bool(gpus_per_node) and src // gpus_per_node != dst // gpus_per_node
    return Transfer(channel, c.nbytes, c.rounds, c.nbytes if off else 0)
