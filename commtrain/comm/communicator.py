"""Communicator: compressed collectives and point-to-point packets on one process group.

>>> comm = Communicator(link=load_link_profile("1gbit"))
>>> g = comm.all_reduce(grad, build_codec("quant:bits=4"), channel="grad", key="layer0.w")
>>> h = comm.send_packet(payload, dst=1, channel="act", async_op=True); ...; h.wait()
>>> rehearsal = Communicator.loopback(world_size=4, link=link)   # the real collectives, no network

comm moves bytes: collectives take a codec through the one protocol of :mod:`.protocol`;
point to point moves packets of a known size (``send_packet`` / ``recv_packet``), and
``send`` / ``recv`` are the same with a stateless codec applied around them. Whatever keeps
state about what was sent (AC-SGD buffers, error-feedback residuals) lives above comm.

Ranks (``rank``, ``dst``, ``src``) are ranks *within the communicator's group*.
Each call validates its arguments in the caller's thread, then runs on a FIFO worker:
collectives on one, sends on another, receives on a third (see :mod:`.handle`). A sync
call is submit + wait. Issue collectives in the same order on every rank, and do not
make torch.distributed collective calls on the same group from other threads meanwhile.
"""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from . import collectives
from . import protocol as C
from .handle import Handle, Worker
from .link import LinkModel
from .meter import ByteMeter, check_channel
from .wire import LoopbackWire, Wire

OPS = ("mean", "sum")


def _check_tensor(t, what: str = "t") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {t.dtype}")


class Communicator:
    def __init__(self, group=None, link: LinkModel | None = None, meter: ByteMeter | None = None, timeout_s: float = 300,
                 wire: Wire | None = None):
        if wire is None and (not dist.is_available() or not dist.is_initialized()):
            raise RuntimeError("Communicator needs torch.distributed initialised: call dist.init_process_group first")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s={timeout_s!r} is invalid; allowed: a number > 0")
        self.group = group
        self.link = link if link is not None else LinkModel(name="unthrottled")
        self.meter = meter if meter is not None else ByteMeter()
        self.timeout_s = float(timeout_s)
        self.wire = wire if wire is not None else Wire(group, self.link, self.meter)
        self.rank, self.world_size = self.wire.rank, self.wire.world_size
        self._coll = Worker(f"commtrain-coll-r{self.rank}")
        self._send = Worker(f"commtrain-send-r{self.rank}")
        self._recv = Worker(f"commtrain-recv-r{self.rank}")
        self.wait_s = 0.0  # seconds callers spent blocked in wait(): communication not hidden by compute
        self._wait_lock = threading.Lock()

    @classmethod
    def loopback(cls, world_size: int, link: LinkModel | None = None) -> "Communicator":
        """A Communicator over a :class:`LoopbackWire`: rank 0 of ``world_size`` mirrored
        replicas. Runs the real collective code with its codec work, meters it with the price
        list and records modeled link seconds (``meter.modeled_s``), but sends nothing."""
        meter = ByteMeter()
        return cls(link=link, meter=meter, wire=LoopbackWire(world_size, link, meter))

    def add_wait(self, seconds: float) -> None:
        """Book ``seconds`` of exposed communication (time a caller was blocked on this
        group's traffic): the handles do it themselves; a layer that waits through its own
        worker (the pipeline's decode thread) books its compute thread's wait here."""
        with self._wait_lock:
            self.wait_s += seconds

    def _run(self, worker: Worker, fn, what: str, async_op: bool):
        handle = Handle(worker.submit(fn), what, self.timeout_s, on_wait=self.add_wait)
        return handle if async_op else handle.wait()

    def _check(self, codec, channel: str, op: str | None = None) -> None:
        C.check_codec(codec)
        check_channel(channel)
        if op is not None and op not in OPS:
            raise ValueError(f"op={op!r} is invalid; allowed: {', '.join(OPS)}")

    def _check_peer(self, peer, what: str) -> None:
        if not isinstance(peer, int) or not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(
                f"{what}={peer!r} is invalid; allowed: a group rank in 0..{self.world_size - 1} other than this rank ({self.rank})"
            )

    # -- collectives -----------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, codec, channel: str = "grad", op: str = "mean", key: str | None = None, async_op: bool = False):
        """Sum or mean of ``t`` over the group; a new tensor like ``t`` (or a Handle)."""
        _check_tensor(t)
        self._check(codec, channel, op)

        def job():
            if self.world_size == 1 or t.numel() == 0:
                return t.clone()  # nothing crosses a wire, so nothing is compressed
            return collectives.all_reduce(self.wire, t, codec, channel, op, key)

        return self._run(self._coll, job, f"all_reduce[{channel}]", async_op)

    def reduce_scatter(self, t: torch.Tensor, codec, channel: str = "grad", op: str = "mean", key: str | None = None, async_op: bool = False):
        """This rank's reduced chunk of flattened ``t`` (chunks of ceil(n/p); the last may be shorter or empty)."""
        _check_tensor(t)
        self._check(codec, channel, op)

        def job():
            flat = t.reshape(-1)
            if self.world_size == 1:
                return flat.clone()
            return collectives.reduce_scatter(self.wire, flat, codec, channel, op, key).to(t.dtype)

        return self._run(self._coll, job, f"reduce_scatter[{channel}]", async_op)

    def all_gather(self, t: torch.Tensor, codec, channel: str = "param", key: str | None = None, async_op: bool = False):
        """List of every rank's ``t`` (same shape on all ranks): peers' decompressed, own entry ``t`` itself."""
        _check_tensor(t)
        self._check(codec, channel)

        def job():
            if self.world_size == 1:
                return [t]
            parts = collectives.all_gather_packets(self.wire, t.reshape(-1), [t.numel()] * self.world_size, codec, channel, key)
            out = [x.reshape(t.shape) for x in parts]
            out[self.rank] = t
            return out

        return self._run(self._coll, job, f"all_gather[{channel}]", async_op)

    def all_gather_flat(self, shard: torch.Tensor, codec, channel: str = "param", numels: list[int] | None = None, key: str | None = None, async_op: bool = False):
        """Concatenation of every rank's flat ``shard`` (rank i's has ``numels[i]`` elements).

        Unlike :meth:`all_gather`, the own shard is also the decompressed one, so every rank
        holds bit-identical parameters after a compressed (ZeRO++ qwZ-style) gather.
        """
        _check_tensor(shard, "shard")
        self._check(codec, channel)
        numels = [shard.numel()] * self.world_size if numels is None else [int(n) for n in numels]
        if len(numels) != self.world_size or any(n < 0 for n in numels) or numels[self.rank] != shard.numel():
            raise ValueError(
                f"numels={numels!r} is invalid; allowed: {self.world_size} non-negative counts with "
                f"numels[{self.rank}] == shard.numel() == {shard.numel()}"
            )

        def job():
            if self.world_size == 1:
                return shard.reshape(-1).clone()
            return torch.cat(collectives.all_gather_packets(self.wire, shard.reshape(-1), numels, codec, channel, key))

        return self._run(self._coll, job, f"all_gather_flat[{channel}]", async_op)

    def barrier(self) -> None:
        self._run(self._coll, self.wire.barrier, "barrier", async_op=False)

    def agree_max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise max of a small float tensor over the group (a control message, so that
        every rank takes the same decision; it is metered on no channel). Runs on the
        collective worker, in order with the data collectives."""
        _check_tensor(t)

        def job():
            out = t.clone()
            if self.world_size > 1 and not isinstance(self.wire, LoopbackWire):
                dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
            return out

        return self._run(self._coll, job, "agree_max", async_op=False)

    # -- point to point ----------------------------------------------------------------------
    def send_packet(self, payload: torch.Tensor, dst: int, channel: str = "act", async_op: bool = False):
        """Send the uint8 ``payload`` to ``dst``; the receiver knows its size in advance."""
        check_channel(channel)
        self._check_peer(dst, "dst")
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
            raise TypeError(f"payload must be a 1-D torch.uint8 tensor (packed bytes), got {getattr(payload, 'dtype', type(payload))}")
        return self._run(self._send, lambda: self.wire.send(payload, dst, channel), f"send[{channel}]->{dst}", async_op)

    def recv_packet(self, nbytes: int, src: int, channel: str = "act", device=None, async_op: bool = False):
        """Receive ``nbytes`` packed bytes sent by ``src`` (a 1-D uint8 tensor)."""
        check_channel(channel)
        self._check_peer(src, "src")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes={nbytes!r} is invalid; allowed: an integer >= 0")
        device = torch.device(device) if device is not None else torch.device("cpu")

        def job():
            return self.wire.recv(torch.empty(nbytes, dtype=torch.uint8, device=device), src)

        return self._run(self._recv, job, f"recv[{channel}]<-{src}", async_op)

    def send(self, t: torch.Tensor, dst: int, codec, channel: str = "act", async_op: bool = False):
        """``send_packet`` of ``t`` compressed with a stateless ``codec``. Compression happens
        now, in the caller's thread, so ``t`` may be reused at once."""
        _check_tensor(t)
        self._check(codec, channel)
        return self.send_packet(C.compress(codec, t, None, "p2p"), dst, channel, async_op)

    def recv(self, shape, dtype: torch.dtype, src: int, codec, channel: str = "act", device=None, async_op: bool = False):
        """Receive a tensor of ``shape``/``dtype`` sent by ``src`` with ``send`` and the same
        stateless codec (decoded on the receive worker)."""
        self._check(codec, channel)
        self._check_peer(src, "src")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype={dtype!r} is invalid; allowed: a floating-point torch.dtype")
        shape = torch.Size(shape)
        nbytes = codec.payload_nbytes(shape.numel(), dtype)
        device = torch.device(device) if device is not None else torch.device("cpu")

        def job():
            buf = self.wire.recv(torch.empty(nbytes, dtype=torch.uint8, device=device), src)
            return C.decompress(codec, buf, shape, dtype)

        return self._run(self._recv, job, f"recv[{channel}]<-{src}", async_op)

    def close(self) -> None:
        """Stop the worker threads (pending work finishes first); the process group stays."""
        for w in (self._coll, self._send, self._recv):
            w.close(timeout=self.timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, world_size={self.world_size}, link={self.link.describe()})"
