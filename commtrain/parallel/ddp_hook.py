"""A DDP communication hook: stock ``torch.nn.parallel.DistributedDataParallel`` with any
commtrain codec (quantization, top-k, casts, PowerSGD) and error feedback.

    state = CommtrainHookState(codec="quant:bits=4", error_feedback=True)
    ddp.register_comm_hook(state, commtrain_hook)

DDP calls the hook with each ready gradient bucket (a flat buffer of several parameters'
gradients) and expects a ``torch.futures.Future`` of the *averaged* buffer (a comm hook
replaces DDP's own division by the world size). The policy matches :class:`GradReducer`:
elements of small (``numel < min_numel``) and 1-D parameters are all-reduced exactly, the
rest with the codec, and every bucket is exact during the first ``warmup_steps``
iterations. EF residuals are keyed by bucket index (``"bucket{i}"``). DDP rebuilds its
buckets after the first iteration, so an index may then name a different layout; the
per-layout split is recomputed, and PowerSGD drops state whose shapes changed.

The collective runs on the Communicator's worker thread; the returned future completes
from there, so backward keeps computing while the bucket is on the wire.
"""
# No `from __future__ import annotations`: DDP checks the hook's return annotation object.
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..compress import ErrorFeedback, build_codec
from .powersgd import PowerSGDReducer
from .reducer import compressible


@dataclass
class CommtrainHookState:
    """Hook configuration and state (EF residuals, PowerSGD factors, iteration count).

    ``comm`` may be given directly; otherwise one is built from ``group``/``link``/``meter``."""

    codec: str = "none"
    error_feedback: bool = True
    group: Any = None
    link: Any = None
    meter: Any = None
    min_numel: int = 4096
    warmup_steps: int = 0
    comm: Any = None
    iteration: int = field(default=0, init=False)
    bucket_codecs: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        from ..comm import Communicator

        self.codec_obj = build_codec(self.codec)
        self.plain = build_codec("none")
        if self.comm is None:
            self.comm = Communicator(group=self.group, link=self.link, meter=self.meter)
        self.meter = self.comm.meter
        use_ef = self.error_feedback and not self.codec_obj.lossless
        self.own_collective = bool(getattr(self.codec_obj, "needs_own_collective", False))
        self.powersgd = (PowerSGDReducer(self.codec_obj, self.comm, error_feedback=use_ef, min_numel=self.min_numel)
                         if self.own_collective else None)
        self.wire_codec = ErrorFeedback(self.codec_obj) if use_ef and not self.own_collective else self.codec_obj
        self._splits: dict[tuple, tuple[list, list]] = {}
        self._layouts: dict[str, tuple] = {}

    def split(self, key: str, buf: torch.Tensor, grads: list[torch.Tensor], params) -> tuple[list, list]:
        """([lo, hi) runs of compressible elements, [lo, hi) runs of exact ones) in ``buf``.

        Also drops the EF residuals of ``key`` when the bucket's layout changed (DDP's
        bucket rebuild): a residual belongs to a layout, not to an index."""
        layout = tuple((_offset(buf, g), g.numel(), compressible(p, self.min_numel)) for g, p in zip(grads, params))
        if self._layouts.get(key, layout) != layout and self.wire_codec is not self.codec_obj:
            for k in [k for k in self.wire_codec.residuals if k.startswith(key + "/")]:
                del self.wire_codec.residuals[k]
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

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"iteration": self.iteration, "codec_rng": self.codec_obj.state_dict()}
        if self.wire_codec is not self.codec_obj:
            sd["ef"] = self.wire_codec.state_dict()
        if self.powersgd is not None:
            sd["powersgd"] = self.powersgd.state_dict()
        return sd

    def load_state_dict(self, state) -> None:
        self.iteration = int(state["iteration"])
        self.codec_obj.load_state_dict(state.get("codec_rng", {}))
        if "ef" in state and self.wire_codec is not self.codec_obj:
            self.wire_codec.load_state_dict(state["ef"])
        if "powersgd" in state and self.powersgd is not None:
            self.powersgd.load_state_dict(state["powersgd"])


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

    def done(_=None):
        try:
            fut.set_result(combine([h.wait() for h in handles]))
        except BaseException as e:  # surface comm errors in DDP's wait()
            fut.set_exception(e)

    last = handles[-1]
    inner = getattr(last, "_future", None)  # Handle wraps a concurrent.futures.Future
    if inner is not None and hasattr(inner, "add_done_callback"):
        inner.add_done_callback(done)
    else:
        done()
    return fut


def commtrain_hook(state: CommtrainHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the averaged bucket, compressed per ``state``'s policy."""
    buf = bucket.buffer()
    key = f"bucket{bucket.index()}"
    compress = state.iteration >= state.warmup_steps and not state.codec_obj.lossless
    if bucket.is_last():
        state.iteration += 1
    comm = state.comm
    grads, params = bucket.gradients(), bucket.parameters()
    comp_runs, plain_runs = state.split(key, buf, grads, params)
    if not compress or not comp_runs:
        state.bucket_codecs[key] = state.plain.spec
        h = comm.all_reduce(buf, state.plain, channel="grad", op="mean", key=key, async_op=True)
        return _future_of([h], lambda rs: rs[0])
    state.bucket_codecs[key] = state.codec_obj.spec
    if state.own_collective:  # PowerSGD: its two phases run synchronously through comm
        out = torch.empty_like(buf)
        for g, r in zip(grads, state.powersgd.reduce(key, [g.detach() for g in grads])):
            o = _offset(buf, g)
            out[o:o + g.numel()].copy_(r.reshape(-1))
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(out)
        return fut
    handles = [comm.all_reduce(_gather(buf, comp_runs), state.wire_codec, channel="grad", op="mean", key=key,
                               async_op=True)]
    if plain_runs:
        handles.append(comm.all_reduce(_gather(buf, plain_runs), state.plain, channel="grad", op="mean",
                                       key=key + ".plain", async_op=True))

    def combine(results):
        out = torch.empty_like(buf)
        _scatter(out, results[0], comp_runs)
        if plain_runs:
            _scatter(out, results[1], plain_runs)
        return out

    return _future_of(handles, combine)
