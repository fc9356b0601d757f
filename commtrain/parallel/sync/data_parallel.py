"""Plain data parallelism: the overlapped compressed reducer + a ``torch.optim`` optimizer.

Gradients are grouped into flat buckets in reverse registration order (the order backward
produces them, as in DDP). Each bucket is reduced (op mean, on the ``grad`` channel) through
:class:`~commtrain.parallel.compression.GradCompression` as soon as all its gradients exist,
while backward keeps computing earlier layers. The compression decision per bucket -- codec,
error feedback, warm-up, small/1-D exclusion, PowerSGD, the ``auto`` policy -- is that
object's, not this module's.

Use the reducer alone (e.g. around your own optimizer)::

    reducer = GradReducer(model.named_parameters(), GradCompression(cfg, comm), bucket_mb=4)
    for step in ...:
        reducer.begin_step(step)                 # arms the hooks (overlap)
        for mb in microbatches[:-1]:
            with reducer.no_sync():              # accumulate locally, no communication
                loss(mb).backward()
        loss(microbatches[-1]).backward()        # buckets launch as their grads complete
        reducer.finish()                         # wait; param.grad now holds the average
        opt.step()

or, as the trainer does, :class:`DataParallel`, which adds the optimizer and clipping behind
the :class:`~commtrain.parallel.sync.GradSync` interface.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch

from ..buckets import Bucket, build_buckets
from ..compression import CompressionConfig, GradCompression
from . import SYNCS, Veto, clip_, grad_norm


class GradReducer:
    """Averages the gradients of ``named_params`` with ``compression`` (over its comm, the dp group).

    Public state: ``buckets`` (list of :class:`Bucket`), ``bucket_codecs`` (key -> codec spec
    used in the last reduction, for logs), ``launched_in_backward`` (buckets whose reduction
    started from a backward hook in the last step), ``step`` and ``policy_report`` (the
    ``policy="auto"`` decision table; empty when no decision was needed).
    """

    def __init__(self, named_params, compression: GradCompression, bucket_mb: float = 4.0, overlap: bool = True):
        self.compression = compression
        self.overlap = bool(overlap)
        self.buckets = build_buckets(named_params, bucket_mb, compression.cfg.min_numel)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}
        self._buffers = [torch.empty(b.numel, dtype=b.dtype, device=b.device) for b in self.buckets]
        # policy="auto": the buckets and the link are measured here, on every rank together (a
        # collective); decisions follow in begin_step.
        compression.decide(self.buckets, "all_reduce")
        self.step = -1
        self.launched_in_backward = 0
        self._armed = False
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b.params]

    @property
    def bucket_codecs(self) -> dict[str, str]:
        return self.compression.bucket_codecs

    @property
    def policy_report(self) -> list[dict[str, Any]]:
        return self.compression.decisions

    # -- public API ------------------------------------------------------------------------
    def begin_step(self, step: int | None = None, overlap: bool | None = None) -> None:
        """Call before the step's backward(s). ``step`` drives warm-up (default: last + 1).
        ``overlap`` (default: as built): launch buckets from backward hooks."""
        if self._handles:
            raise RuntimeError("GradReducer.begin_step: the previous step was not finished (call finish())")
        self.step = self.step + 1 if step is None else int(step)
        self.compression.begin_step(self.step)  # policy=auto: a decision at its steps (collective)
        self._reset()
        self._armed = self.overlap if overlap is None else bool(overlap)

    @contextlib.contextmanager
    def no_sync(self):
        """Backwards inside only accumulate into ``param.grad`` (gradient accumulation)."""
        armed, self._armed = self._armed, False
        try:
            yield
        finally:
            self._armed = armed

    def finish(self) -> None:
        """Reduce every bucket not yet launched, wait for all, write averages to ``param.grad``."""
        if self.step < 0:
            self.step = 0
        self._armed = False
        self.compression.note_backward_end()
        # For logs/tests: how many buckets were already on the wire when backward ended.
        self.launched_in_backward = len(self._handles)
        self._launch_ready(force=True)
        for b, h in zip(self.buckets, self._handles):
            out = h.wait()
            views = out if isinstance(out, list) else b.views(out)
            for p, v in zip(b.params, views):
                if p.grad is None:
                    p.grad = v.detach().clone()
                else:
                    p.grad.copy_(v)
        self._reset()

    def comm_buffer_bytes(self) -> int:
        """Bytes of the flat bucket buffers the reductions read (a second copy of the gradients)."""
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def state_dict(self) -> dict[str, Any]:
        """The step and the gradient-compression state (EF residuals per bucket key, PowerSGD
        factors, codec RNG, policy decisions)."""
        return {"step": self.step, **self.compression.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.compression.load_state_dict(state)

    def close(self) -> None:
        """Remove the gradient hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- internals ---------------------------------------------------------------------------
    def _reset(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._handles: list = []

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        i = self._bucket_of[id(p)]
        if i < len(self._handles):
            raise RuntimeError(
                f"GradReducer: a gradient of {self.buckets[i].key} arrived after the bucket was reduced; "
                f"wrap accumulation backwards in no_sync()"
            )
        self._ready[i] += 1
        self._launch_ready(force=False)

    def _launch_ready(self, force: bool) -> None:
        # Strictly in bucket order: every rank must issue the same collectives in the same order.
        while len(self._handles) < len(self.buckets):
            i = len(self._handles)
            b = self.buckets[i]
            if not force and self._ready[i] < len(b.params):
                return
            self._handles.append(self._launch(b, self._buffers[i]))

    def _launch(self, b: Bucket, buf: torch.Tensor):
        if self._armed:
            self.compression.note_launch(b.key)
        return self.compression.all_reduce(b, b.flatten_grads(buf), self.step)


@SYNCS.register("data_parallel")
class DataParallel:
    """:class:`GradReducer` + the wrapped ``torch.optim`` optimizer: every replica holds the
    full model, gradients and optimizer state (the baseline strategy; ``zero.stage=0``)."""

    def __init__(self, named_params, optimizer_factory, comm, compression: CompressionConfig | None = None,
                 bucket_mb: float = 4.0, overlap: bool = True):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.params = [p for _, p in named]
        self.compression = GradCompression(compression, comm)
        self.reducer = GradReducer(named, self.compression, bucket_mb=bucket_mb, overlap=overlap)
        self.optimizer = optimizer_factory(self.params)
        self._peak_grad_bytes = 0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def buckets(self) -> list[Bucket]:
        return self.reducer.buckets

    def begin_step(self, step: int) -> None:
        self.reducer.begin_step(step)

    def no_sync(self):
        return self.reducer.no_sync()

    def step(self, max_grad_norm: float = 0.0, veto: Veto | None = None) -> dict[str, Any]:
        self.reducer.finish()  # wait for the buckets still in flight; .grad is now the mean
        # Peak gradient memory of this strategy: full gradients + the reducer's flat copy.
        self._peak_grad_bytes = max(self._peak_grad_bytes, self._grad_bytes() + self.reducer.comm_buffer_bytes())
        grads = [p.grad for p in self.params if p.grad is not None]
        # The norm first and the clip after (clip_grad_norm_ in two halves), so that a veto
        # sees the norm before any gradient or state changes.
        norm = _total_norm(grads, self.params[0].device) if max_grad_norm > 0 else \
            grad_norm(grads, self.params[0].device)
        skipped = bool(veto(norm)) if veto is not None else False
        if not skipped:
            _clip(self.params, grads, norm, max_grad_norm)
            self.optimizer.step()
        return {"grad_norm": float(norm), "skipped": skipped, **self.compression.stats()}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def finalize(self) -> dict[str, Any]:
        return {}  # every step already left the replicas in sync

    def memory_report(self) -> dict[str, int]:
        """Bytes per rank: ``grad_bytes`` (``param.grad`` now), ``peak_grad_bytes`` (gradients
        plus the reducer's bucket buffers, the most held during any step so far),
        ``optimizer_state_bytes``, ``param_bytes``."""
        return {"stage": 0, "grad_bytes": self._grad_bytes(), "peak_grad_bytes": self._peak_grad_bytes,
                "optimizer_state_bytes": _state_bytes(self.optimizer), "master_bytes": 0,
                "param_bytes": sum(p.numel() * p.element_size() for p in self.params)}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "reducer": self.reducer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.reducer.load_state_dict(state["reducer"])

    def close(self) -> None:
        self.reducer.close()

    def _grad_bytes(self) -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)


def _total_norm(grads: list[torch.Tensor], device) -> torch.Tensor:
    """``clip_grad_norm_``'s norm (torch >= 2.6 exposes it alone; else our fp32 one)."""
    get = getattr(torch.nn.utils, "get_total_norm", None)
    return get(grads) if get is not None else grad_norm(grads, device)


def _clip(params, grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """``clip_grad_norm_``'s scaling with a norm computed before (bit-identical to it)."""
    if max_norm <= 0:
        return
    clip = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
    if clip is not None:
        clip(params, max_norm, norm)
    else:
        clip_(grads, norm, max_norm)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
