"""Wire: the single place where bytes are handed to torch.distributed.

Every collective and point-to-point transfer of the communication layer calls one of the
methods below, each of which (1) books the modeled link, (2) makes the real
torch.distributed call on uint8 packet bytes (or the summable payload), (3) records in
the ByteMeter the bytes *this rank* sent and the modeled link seconds, and (4) waits
until the modeled completion. What each operation costs -- the bytes this rank sends and
the message rounds -- is the price list of :mod:`.price`, its one copy.

For the ring all-reduce the bytes handed to torch are the whole payload; what a ring
puts on *this rank's* link is the standard 2(p-1)/p of it, and that is what is metered.

Throttling: a collective's modeled transfer starts when the *last* rank has joined it, as on
a real link, where a peer's bytes only leave when that peer arrives: on a throttled link the
ranks first exchange a one-byte token (the join; not metered: a real collective's
handshake), then the link is booked, the real operation runs, and the rank sleeps until the
modeled completion. (Booking at a rank's own arrival instead hides part of the modeled
transfer behind the wait for a slower peer: optimistic against a real ``tc`` link by up to
the skew per collective, as when codec work or a loaded CPU skews the ranks.) A send
first waits for its modeled completion and only then sends, so the receiver sees the data
at the modeled arrival time without sleeping itself.

All-to-all uses ``dist.all_to_all_single`` with split sizes (gloo supports it for uint8
CPU tensors, uneven and empty splits included, checked on torch 2.13), and all-gather of
equal-size packets ``dist.all_gather_single`` (``all_gather_into_tensor`` before torch 2.13); unequal packets (ZeRO's shorter last
shard) go through the same all-to-all, sending the own packet to each peer, so no
padding byte is ever sent or metered.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import price
from .link import LinkModel
from .meter import ByteMeter

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


class Wire:
    def __init__(self, group, link: LinkModel, meter: ByteMeter):
        self.group, self.link, self.meter = group, link, meter
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # Optional: called as observer(nbytes, rounds, seconds) after every collective with the
        # wall time it took (throttle included), so that a link estimate can follow the link.
        self.observer: Optional[Callable[[int, int, float], None]] = None

    def _observe(self, c: price.Cost, t0: float) -> None:
        obs = self.observer
        if obs is not None:
            obs(c.nbytes, c.rounds, time.perf_counter() - t0)

    def global_rank(self, group_rank: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def _reserve(self, c: price.Cost) -> tuple[float, float]:
        return self.link.reserve(c.nbytes, rounds=c.rounds)

    def _join(self, c: price.Cost, device: torch.device) -> tuple[float, float]:
        """Book a collective's link time from the moment every rank has joined it (module
        docstring): a one-element all-reduce first, on a throttled link only."""
        if self.link.throttled:
            dist.all_reduce(torch.zeros(1, dtype=torch.uint8, device=device), group=self.group)
        return self._reserve(c)

    def _finish(self, channel: str, nbytes: int, deadline: float, cost: float, device: torch.device) -> None:
        self.meter.add(channel, nbytes, ops=1, modeled_s=cost)
        if self.link.throttled:
            if device.type == "cuda":  # the modeled time starts once the bytes really moved
                torch.cuda.current_stream(device).synchronize()
            LinkModel.wait_until(deadline)

    # -- collectives ---------------------------------------------------------------------
    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int], channel: str) -> torch.Tensor:
        """Exchange uint8 packets: ``send`` is this rank's packets back to back, ``send_splits[j]``
        bytes for rank j; returns the received bytes, ``recv_splits[i]`` from rank i."""
        c = price.all_to_all(send_splits, self.rank)
        t0 = time.perf_counter()
        deadline, cost = self._join(c, send.device)
        out = torch.empty(sum(recv_splits), dtype=torch.uint8, device=send.device)
        dist.all_to_all_single(out, send, recv_splits, send_splits, group=self.group)
        self._finish(channel, c.nbytes, deadline, cost, send.device)
        self._observe(c, t0)
        return out

    def all_gather(self, payload: torch.Tensor, sizes: list[int], channel: str) -> list[torch.Tensor]:
        """Every rank's uint8 packet (rank i's has ``sizes[i]`` bytes); own entry is ``payload``."""
        p, r = self.world_size, self.rank
        if payload.numel() != sizes[r]:
            raise ValueError(f"all_gather: own packet has {payload.numel()} bytes, sizes[{r}]={sizes[r]}")
        c = price.all_gather(sizes, r)
        t0 = time.perf_counter()
        deadline, cost = self._join(c, payload.device)
        if all(s == sizes[0] for s in sizes):
            out = torch.empty(p * sizes[0], dtype=torch.uint8, device=payload.device)
            getattr(dist, ALL_GATHER)(out, payload, group=self.group)
            parts = list(out.split(sizes))
        else:
            send_splits = [0 if j == r else sizes[r] for j in range(p)]
            recv_splits = [0 if i == r else sizes[i] for i in range(p)]
            out = torch.empty(sum(recv_splits), dtype=torch.uint8, device=payload.device)
            dist.all_to_all_single(out, payload.repeat(p - 1), recv_splits, send_splits, group=self.group)
            parts = list(out.split(recv_splits))
        parts[r] = payload
        self._finish(channel, c.nbytes, deadline, cost, payload.device)
        self._observe(c, t0)
        return parts

    def all_reduce(self, buf: torch.Tensor, channel: str) -> torch.Tensor:
        """In-place SUM of a summable payload (in its wire dtype) over the group."""
        c = price.ring_all_reduce(buf.numel() * buf.element_size(), self.world_size)
        t0 = time.perf_counter()
        deadline, cost = self._join(c, buf.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        self._finish(channel, c.nbytes, deadline, cost, buf.device)
        self._observe(c, t0)
        return buf

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    # -- point to point ------------------------------------------------------------------
    def send(self, payload: torch.Tensor, dst: int, channel: str) -> None:
        c = price.p2p(payload.numel())
        deadline, cost = self._reserve(c)
        if self.link.throttled:
            LinkModel.wait_until(deadline)  # the sender holds the bytes until the link would deliver them
        if c.nbytes:
            dist.send(payload, self.global_rank(dst), group=self.group)
        self.meter.add(channel, c.nbytes, ops=1, modeled_s=cost)

    def recv(self, buf: torch.Tensor, src: int) -> torch.Tensor:
        if buf.numel():
            dist.recv(buf, self.global_rank(src), group=self.group)
        return buf


class LoopbackWire(Wire):
    """A wire whose peers are mirrors of this rank: every message comes back to its sender.

    Rank 0 of a ``world_size``-rank group in which every peer holds the same tensor and the
    same codec state. Each operation is metered (with the same price list) and its modeled
    link seconds recorded, but never slept: it exists to *rehearse* the real collective code
    locally -- its codec work timed, its bytes and link time priced -- without a network.
    Mirroring needs equal packets from every peer, i.e. a tensor whose length divides evenly
    into the chunks (the caller pads to a multiple of ``world_size``). The work and the bytes
    are the real ones; the values are not the group's result, except on the summable path
    (a mirrored peer returns the packet this rank addressed to it, i.e. another chunk).
    """

    def __init__(self, world_size: int, link: LinkModel | None = None, meter: ByteMeter | None = None):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size={world_size!r} is invalid; allowed: an integer >= 1")
        self.group, self.rank, self.world_size = None, 0, world_size
        self.link = link if link is not None else LinkModel(name="unthrottled")
        self.meter = meter if meter is not None else ByteMeter()
        self.observer = None

    def global_rank(self, group_rank: int) -> int:
        return group_rank

    def _reserve(self, c: price.Cost) -> tuple[float, float]:
        return 0.0, self.link.cost_s(c.nbytes, c.rounds)  # priced, never booked or slept

    def _finish(self, channel, nbytes, deadline, cost, device) -> None:
        self.meter.add(channel, nbytes, ops=1, modeled_s=cost)

    def all_to_all(self, send, send_splits, recv_splits, channel):
        mine = [s for j, s in enumerate(send_splits) if j != self.rank]
        theirs = [s for i, s in enumerate(recv_splits) if i != self.rank]
        if mine != theirs:
            raise ValueError(f"LoopbackWire.all_to_all: mirrored peers need equal packets, got {send_splits} / {recv_splits}")
        c = price.all_to_all(send_splits, self.rank)
        self._finish(channel, c.nbytes, *self._reserve(c), send.device)
        return send

    def all_gather(self, payload, sizes, channel):
        if any(s != sizes[self.rank] for s in sizes):
            raise ValueError(f"LoopbackWire.all_gather: mirrored peers need equal packets, got {sizes}")
        c = price.all_gather(sizes, self.rank)
        self._finish(channel, c.nbytes, *self._reserve(c), payload.device)
        return [payload] * self.world_size

    def all_reduce(self, buf, channel):
        c = price.ring_all_reduce(buf.numel() * buf.element_size(), self.world_size)
        self._finish(channel, c.nbytes, *self._reserve(c), buf.device)
        return buf.mul_(self.world_size)  # the sum over identical replicas

    def barrier(self) -> None:
        pass

    def send(self, payload, dst, channel):
        raise NotImplementedError("LoopbackWire rehearses collectives; it has no peer to send to")

    def recv(self, buf, src):
        raise NotImplementedError("LoopbackWire rehearses collectives; it has no peer to receive from")
