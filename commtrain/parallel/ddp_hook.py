"""A DDP communication hook: stock ``torch.nn.parallel.DistributedDataParallel`` with any
commtrain codec (quantization, top-k, casts, PowerSGD), error feedback and the ``auto``
policy -- the same :class:`GradCompression` the trainer's reducer and ZeRO use.

    state = CommtrainHookState(CompressionConfig(grad="quant:bits=4,group=128"))
    ddp.register_comm_hook(state, commtrain_hook)

DDP calls the hook with each ready gradient bucket (a flat buffer of several parameters'
gradients) and expects a ``torch.futures.Future`` of the *averaged* buffer (a comm hook
replaces DDP's own division by the world size). Elements of small (``numel < min_numel``)
and 1-D parameters are all-reduced exactly, the rest through the compression object, and
every bucket is exact during the warm-up. State is keyed by bucket index (``"bucket{i}"``).
DDP rebuilds its buckets after the first iteration, so an index may then name a different
layout: the per-layout split is recomputed and the key's error-feedback residuals and
policy decision are dropped (a residual belongs to a layout); PowerSGD drops state whose
shapes changed.

The collective runs on the Communicator's worker thread; the returned future completes
from there, so backward keeps computing while the bucket is on the wire.
"""
# No `from __future__ import annotations`: DDP checks the hook's return annotation object.
from typing import Any

import torch
import torch.distributed as dist

from .buckets import Bucket
from .compression import CompressionConfig, GradCompression


class CommtrainHookState:
    """Hook state: the gradient compression (EF residuals, PowerSGD factors, policy decisions)
    and the iteration count. ``comm`` may be given directly; otherwise one is built from
    ``group``/``link``/``meter``."""

    def __init__(self, compression: CompressionConfig | None = None, *, comm=None, group=None, link=None,
                 meter=None):
        if comm is None:
            from ..comm import Communicator

            comm = Communicator(group=group, link=link, meter=meter)
        self.comm = comm
        self.meter = getattr(comm, "meter", None)
        self.compression = GradCompression(compression, comm)
        if self.compression.own_collective:  # its buckets hold every gradient: PowerSGD or raw
            self.compression.candidates = ["none", self.compression.preferred]
        else:  # buckets are gathered runs of compressible elements: no whole matrices for PowerSGD
            self.compression.gathered_runs = True
        self.iteration = 0
        self._splits: dict[tuple, tuple[list, list]] = {}
        self._layouts: dict[str, tuple] = {}

    @property
    def bucket_codecs(self) -> dict[str, str]:
        return self.compression.bucket_codecs

    def split(self, key: str, buf: torch.Tensor, grads: list[torch.Tensor], params) -> tuple[list, list]:
        """([lo, hi) runs of compressible elements, [lo, hi) runs of exact ones) in ``buf``.

        Also drops the state of ``key`` when the bucket's layout changed (DDP's rebuild)."""
        layout = tuple((_offset(buf, g), g.numel(), self.compression.eligible(p)) for g, p in zip(grads, params))
        if self._layouts.get(key, layout) != layout:
            self.compression.forget(key)
        self._layouts[key] = layout
        if layout not in self._splits:
            runs: tuple[list, list] = ([], [])
            end = 0
            for lo, n, comp in sorted(layout):
                if lo > end:  # a gap DDP left between gradients: carry it exactly
                    self._append(runs[1], end, lo)
                self._append(runs[0] if comp else runs[1], lo, lo + n)
                end = max(end, lo + n)
            if end < buf.numel():
                self._append(runs[1], end, buf.numel())
            self._splits[layout] = runs
        return self._splits[layout]

    @staticmethod
    def _append(runs: list, lo: int, hi: int) -> None:
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)  # merge adjacent runs: fewer copies
        else:
            runs.append((lo, hi))

    def bucket(self, key: str, buf: torch.Tensor, grads: list[torch.Tensor], comp_runs) -> Bucket:
        """The compressible part of DDP's bucket as a :class:`Bucket` (PowerSGD: all its
        gradients, which it splits itself; else: the gathered compressible runs)."""
        if self.compression.own_collective:
            offsets = [_offset(buf, g) for g in grads]
            return Bucket(key, True, [str(i) for i in range(len(grads))], list(grads), offsets, buf.numel(), buf.numel())
        n = sum(hi - lo for lo, hi in comp_runs)
        return Bucket(key, bool(comp_runs), ["runs"], [buf.new_empty(n)], [0], n, n)

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, **self.compression.state_dict()}

    def load_state_dict(self, state) -> None:
        self.iteration = int(state["iteration"])
        self.compression.load_state_dict(state)


def _offset(buf: torch.Tensor, g: torch.Tensor) -> int:
    return (g.data_ptr() - buf.data_ptr()) // buf.element_size()


def _gather(buf: torch.Tensor, runs) -> torch.Tensor:
    return torch.cat([buf[lo:hi] for lo, hi in runs]) if runs else buf.new_empty(0)


def _scatter(out: torch.Tensor, flat: torch.Tensor, runs) -> None:
    off = 0
    for lo, hi in runs:
        out[lo:hi].copy_(flat[off:off + hi - lo])
        off += hi - lo


def _future_of(handles: list, combine) -> torch.futures.Future:
    """A torch Future completed (from the comm worker thread) with ``combine(results)`` once
    every handle is done. The worker runs FIFO, so the last handle finishes last."""
    fut: torch.futures.Future = torch.futures.Future()

    def done():
        try:
            fut.set_result(combine([h.wait() for h in handles]))
        except BaseException as e:  # surface comm errors in DDP's wait()
            fut.set_exception(e)

    handles[-1].add_done_callback(done)
    return fut


def commtrain_hook(state: CommtrainHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the averaged bucket, compressed as ``state.compression`` decides."""
    buf = bucket.buffer()
    key = f"bucket{bucket.index()}"
    step = state.iteration
    if bucket.is_last():
        state.iteration += 1
    gc, comm = state.compression, state.comm
    grads, params = bucket.gradients(), bucket.parameters()
    comp_runs, plain_runs = state.split(key, buf, grads, params)
    b = state.bucket(key, buf, grads, comp_runs)
    if gc.auto and b.compress:
        gc.decide([b], "all_reduce")  # policy=auto: registers the bucket (the first call measures the link)
    if bucket.index() == 0 and step >= 2:  # after DDP's bucket rebuild (iteration 1) every bucket is known
        gc.begin_step(step)  # policy=auto: a decision at its steps (a collective, in bucket order)
    if gc.auto:
        gc.note_launch(key)
        if bucket.is_last():
            gc.note_backward_end()  # DDP calls the last bucket's hook when backward's gradients are all done
    if not gc.compressing(b, step) and gc.last_spec.get(key, "none") == "none":
        gc.codec_for(b, step)  # records "none" for this bucket
        h = comm.all_reduce(buf, gc.plain, channel="grad", op="mean", key=key, async_op=True)
        return _future_of([h], lambda rs: rs[0])
    if gc.own_collective and not gc.compressing(b, step):
        # left PowerSGD for raw (policy=auto): its residuals flush into the whole buffer, reduced raw
        h = gc.all_reduce(b, buf.clone(), step)
        return _future_of([h], lambda rs: rs[0])
    if gc.option(gc.spec_for(b, step)).powersgd is not None:  # PowerSGD: its two phases run synchronously
        out = torch.empty_like(buf)
        for g, r in zip(grads, gc.all_reduce(b, buf, step).wait()):
            o = _offset(buf, g)
            out[o:o + g.numel()].copy_(r.reshape(-1))
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(out)
        return fut
    handles = [gc.all_reduce(b, _gather(buf, comp_runs), step)]
    if plain_runs:
        handles.append(comm.all_reduce(_gather(buf, plain_runs), gc.plain, channel="grad", op="mean",
                                       key=key + ".plain", async_op=True))

    def combine(results):
        out = torch.empty_like(buf)
        _scatter(out, results[0], comp_runs)
        if plain_runs:
            _scatter(out, results[1], plain_runs)
        return out

    return _future_of(handles, combine)
