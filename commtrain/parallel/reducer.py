"""Data-parallel gradient reduction with per-bucket compression, overlapped with backward.

Gradients are grouped into flat *buckets* in reverse registration order (the order
backward produces them, as in DDP). Each bucket is reduced with one compressed
all-reduce (op mean) on the ``grad`` channel as soon as all its gradients exist, while
backward keeps computing earlier layers.

Compression policy (why: small and 1-D tensors -- biases, norms -- are a negligible share
of the bytes but are hurt most by lossy codecs, and scale badly with per-group scales):

* tensors with ``numel < min_numel`` or ``dim <= 1`` go to *plain* buckets (codec ``none``);
* during the first ``warmup_steps`` steps every bucket is plain;
* codecs with ``needs_own_collective`` (PowerSGD) run :class:`PowerSGDReducer` on the
  bucket's tensors instead of a compressed all-reduce;
* ``policy="auto"`` (the default) also leaves a bucket uncompressed where compressing it
  would be *slower* than sending it raw over the configured link (see :mod:`.policy`):
  quantizing 13 MB of gradients costs ~50-100 ms on a CPU core, while a 10 Gbit/s link
  moves them in ~10 ms. ``policy="always"`` compresses every eligible bucket.

Use::

    reducer = GradReducer(model.named_parameters(), comm, ReduceConfig(codec="quant:bits=4"))
    for step in ...:
        reducer.begin_step(step)                 # arms the hooks (overlap)
        for mb in microbatches[:-1]:
            with reducer.no_sync():              # accumulate locally, no communication
                loss(mb).backward()
        loss(microbatches[-1]).backward()        # buckets launch as their grads complete
        reducer.finish()                         # wait; param.grad now holds the average
        opt.step()

Pipelines, whose microbatch backwards interleave with p2p, call
``begin_step(step, overlap=False)``, run all backwards, then ``finish()`` (reduces all).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from ..compress import ErrorFeedback, build_codec
from .policy import POLICIES, choose_compressed_buckets
from .powersgd import PowerSGDReducer


@dataclass
class ReduceConfig:
    codec: str = "none"
    error_feedback: bool = True
    warmup_steps: int = 0
    min_numel: int = 4096
    bucket_mb: float = 4.0
    overlap: bool = True
    policy: str = "auto"  # "auto": compress a bucket only where it pays on this link; "always"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"ReduceConfig: policy={self.policy!r} is invalid; allowed: {', '.join(POLICIES)}")
        for name in ("warmup_steps", "min_numel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"ReduceConfig: {name}={v!r} is invalid; allowed: an integer >= 0")
        if not isinstance(self.bucket_mb, (int, float)) or self.bucket_mb <= 0:
            raise ValueError(f"ReduceConfig: bucket_mb={self.bucket_mb!r} is invalid; allowed: a number > 0")


# -- bucketing (shared with zero.py) ----------------------------------------------------------
@dataclass
class Bucket:
    """A flat group of parameters. ``offsets[i]`` is where ``params[i]`` starts in the flat
    buffer; ``numel`` includes padding (to a multiple of ``pad_to``) at the end."""

    key: str
    compress: bool
    names: list[str] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    used: int = 0  # elements before padding
    numel: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views of a flat tensor laid out like this bucket."""
        return [flat[o:o + p.numel()].view_as(p) for o, p in zip(self.offsets, self.params)]

    def flatten_grads(self, out: torch.Tensor) -> torch.Tensor:
        """Copy the grads into ``out`` (zeros for params without a grad and for padding)."""
        if self.used != self.numel or any(p.grad is None for p in self.params):
            out.zero_()
        for o, p in zip(self.offsets, self.params):
            if p.grad is not None:
                out[o:o + p.numel()].copy_(p.grad.reshape(-1))
        return out


def compressible(p: torch.Tensor, min_numel: int) -> bool:
    return p.dim() > 1 and p.numel() >= min_numel


def build_buckets(named_params: Iterable[tuple[str, torch.Tensor]], bucket_mb: float, min_numel: int,
                  pad_to: int = 1) -> list[Bucket]:
    """Buckets in reverse registration order, one stream per (policy, dtype, device).

    A bucket closes once it holds ``bucket_mb`` MiB. Buckets are numbered by the position
    of their *last* parameter in backward order, i.e. by when they are expected to become
    ready, so launching them strictly in index order (required: collectives must be
    issued in the same order on every rank) rarely waits on a slow-filling bucket.
    """
    params = [(n, p) for n, p in named_params if p.requires_grad]
    if not params:
        raise ValueError("build_buckets: no parameters with requires_grad=True")
    seen = set()
    for n, p in params:
        if id(p) in seen:
            raise ValueError(f"build_buckets: parameter {n!r} is listed twice (tied weights must appear once)")
        seen.add(id(p))
    cap = int(bucket_mb * 2**20)
    open_: dict[tuple, Bucket] = {}
    closed: list[tuple[int, Bucket]] = []
    for pos, (name, p) in enumerate(reversed(params)):
        cls = (compressible(p, min_numel), p.dtype, p.device)
        b = open_.setdefault(cls, Bucket(key="", compress=cls[0]))
        b.names.append(name)
        b.params.append(p)
        b.offsets.append(b.used)
        b.used += p.numel()
        if b.used * p.element_size() >= cap:
            closed.append((pos, open_.pop(cls)))
    closed += [(len(params), b) for b in open_.values()]  # stable: insertion order breaks ties
    closed.sort(key=lambda t: t[0])
    buckets = [b for _, b in closed]
    for i, b in enumerate(buckets):
        b.key = f"bucket{i}"
        b.numel = -(-b.used // pad_to) * pad_to
    return buckets


class _Done:
    """A finished 'handle' (for PowerSGD, which runs its collectives synchronously)."""

    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


class GradReducer:
    """Averages the gradients of ``named_params`` over ``comm`` (build ``comm`` on the dp group).

    Public state: ``buckets`` (list of :class:`Bucket`), ``bucket_codecs`` (key -> codec
    spec used in the last reduction, for logs), ``launched_in_backward`` (buckets whose
    reduction started from a backward hook in the last step), ``step``, and
    ``policy_report`` (the ``policy="auto"`` decision per compressible bucket: measured
    codec seconds, modeled raw/compressed link seconds, and whether it compresses; empty
    when no decision was needed).
    """

    def __init__(self, named_params, comm, cfg: ReduceConfig | None = None):
        self.cfg = cfg = cfg if cfg is not None else ReduceConfig()
        self.comm = comm
        self.codec = build_codec(cfg.codec)
        self.plain = build_codec("none")
        self.own_collective = bool(getattr(self.codec, "needs_own_collective", False))
        use_ef = cfg.error_feedback and not self.codec.lossless
        self.powersgd = PowerSGDReducer(self.codec, comm, error_feedback=use_ef) if self.own_collective else None
        self.wire_codec = ErrorFeedback(self.codec) if use_ef and not self.own_collective else self.codec
        self.buckets = build_buckets(named_params, cfg.bucket_mb, cfg.min_numel)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}
        self._buffers = [torch.empty(b.numel, dtype=b.dtype, device=b.device) for b in self.buckets]
        # policy="auto": buckets where compressing does not pay on this link are sent raw.
        # Decided once, here, on every rank together (a collective: all ranks build the reducer).
        self.policy_report: list[dict[str, Any]] = []
        self._auto_plain: set[str] = set()
        if cfg.policy == "auto" and not self.codec.lossless:
            eligible = [b for b in self.buckets if b.compress]
            self.policy_report = choose_compressed_buckets(
                eligible, comm, cfg.codec, use_ef=use_ef, own_collective=self.own_collective
            )
            self._auto_plain = {r["bucket"] for r in self.policy_report if not r["compress"]}
        self.bucket_codecs: dict[str, str] = {}
        self.step = -1
        self.launched_in_backward = 0
        self._armed = False
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for b in self.buckets for p in b.params]

    # -- public API ------------------------------------------------------------------------
    def begin_step(self, step: int | None = None, overlap: bool | None = None) -> None:
        """Call before the step's backward(s). ``step`` drives warm-up (default: last + 1).
        ``overlap`` (default ``cfg.overlap``): launch buckets from backward hooks."""
        if self._handles_started():
            raise RuntimeError("GradReducer.begin_step: the previous step was not finished (call finish())")
        self.step = self.step + 1 if step is None else int(step)
        self._reset()
        self._armed = self.cfg.overlap if overlap is None else bool(overlap)

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

    reduce_all = finish

    def compressing(self, bucket: Bucket) -> bool:
        return (bucket.compress and self.step >= self.cfg.warmup_steps and not self.codec.lossless
                and bucket.key not in self._auto_plain)

    def state_dict(self) -> dict[str, Any]:
        """EF residuals (per bucket key), PowerSGD factors, codec RNG state, step."""
        sd: dict[str, Any] = {"step": self.step, "codec_rng": self.codec.state_dict()}
        if self.wire_codec is not self.codec:
            sd["ef"] = self.wire_codec.state_dict()
        if self.powersgd is not None:
            sd["powersgd"] = self.powersgd.state_dict()
        return sd

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.codec.load_state_dict(state.get("codec_rng", {}))
        if "ef" in state:
            if self.wire_codec is self.codec:
                raise ValueError("GradReducer.load_state_dict: checkpoint has EF residuals but error_feedback is off")
            self.wire_codec.load_state_dict(state["ef"])
        if "powersgd" in state and self.powersgd is not None:
            self.powersgd.load_state_dict(state["powersgd"])

    def close(self) -> None:
        """Remove the gradient hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- internals ---------------------------------------------------------------------------
    def _reset(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._handles: list = []

    def _handles_started(self) -> bool:
        return bool(self._handles)

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        i = self._bucket_of[id(p)]
        if i < len(self._handles):
            raise RuntimeError(
                f"GradReducer: a gradient of {self.buckets[i].key} arrived after the bucket was reduced; "
                f"wrap accumulation backwards in reducer.no_sync()"
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
        if not self.compressing(b):
            self.bucket_codecs[b.key] = self.plain.spec
            return self.comm.all_reduce(b.flatten_grads(buf), self.plain, channel="grad", op="mean",
                                        key=b.key, async_op=True)
        self.bucket_codecs[b.key] = self.codec.spec
        if self.own_collective:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
            return _Done(self.powersgd.reduce(b.key, grads))
        return self.comm.all_reduce(b.flatten_grads(buf), self.wire_codec, channel="grad", op="mean",
                                    key=b.key, async_op=True)
