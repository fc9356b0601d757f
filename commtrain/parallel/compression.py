"""How data-parallel gradients are compressed: one object for every sync strategy.

The plain DP reducer, ZeRO and the DDP comm hook all reduce gradient *buckets* through one
:class:`GradCompression`. For one bucket in one step the whole decision is::

    codec = compression.codec_for(bucket, step)     # "none" during warm-up, for small/1-D
                                                    # tensors and for buckets the policy left
                                                    # raw; else the codec wrapped in error feedback
    comm.all_reduce(flat, codec, key=bucket.key)    # or reduce_scatter (ZeRO), or PowerSGD's
                                                    # own two all-reduces (compression.all_reduce)

so a feature added here (a codec, error feedback, warm-up, the adaptive policy) works in
every strategy at once.

``CompressionConfig`` is the ``compression`` section of the config tree. The gradient keys
(``grad``, ``error_feedback``, ``warmup_steps``, ``min_numel``, ``policy``) are read here,
``param`` by ZeRO's parameter all-gather, and the ``act*`` keys (``act``, ``act_first``,
``act_grad``, ``act_delta``, ``act_buffer*``) by the pipeline's activation channels (:mod:`commtrain.parallel.pipeline.acsgd`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from ..compress import ErrorFeedback, available_codecs, build_codec
from ..validate import ConfigError, choice, integer
from .buckets import Bucket, compressible
from .powersgd import PowerSGDReducer

log = logging.getLogger(__name__)

POLICIES = ("auto", "always")
DENSITY_START = 0.25  # kept fraction at the first compressed step of a density warm-up
CHANNEL_KEYS = ("grad", "act", "act_grad", "param")
# compression.act_first: the codec of an AC-SGD sample's first visit (a cheap 8-bit one).
DEFAULT_ACT_FIRST = "quant:bits=8"


@dataclass
class CompressionConfig:
    """The ``compression`` section: codec specs per channel and how they are applied."""

    grad: str = "none"  # data-parallel gradients
    act: str = "none"  # pipeline forward activations
    act_grad: str = "none"  # pipeline backward activation gradients
    # AC-SGD (act_delta): a sample's first visit, which fills both ends' buffer row with the
    # decoded value ("none": fp32, as before this option)
    act_first: str = DEFAULT_ACT_FIRST
    param: Optional[str] = None  # ZeRO parameter all-gather (None: exact)
    error_feedback: bool = True  # on lossy gradient codecs (and powersgd's own residuals)
    warmup_steps: int = 0  # uncompressed steps at the start (all channels)
    # Sparsifiers (topk/randomk with a ratio): over the first N compressed steps the kept
    # fraction shrinks geometrically from DENSITY_START to the codec's ratio (DGC's warm-up).
    density_warmup_steps: int = 0
    min_numel: int = 4096  # gradients smaller than this, and all 1-D ones, go uncompressed
    # "auto": a gradient bucket is compressed only where that makes the step faster on the
    # link (needs a link with a known bandwidth; otherwise it compresses as configured);
    # "always": every eligible bucket is compressed.
    policy: str = "auto"
    act_delta: bool = True  # AC-SGD: send Q(a - m[id]) rather than Q(a)
    act_buffer: str = "cpu"  # where AC-SGD per-sample buffers live (a buffer storage)
    act_buffer_dtype: str = "fp32"  # their precision
    act_prefetch: bool = True  # read the next microbatch's AC-SGD rows in the background

    def validate(self) -> None:
        from .pipeline.buffers import PRECISIONS, available_storages

        for key in CHANNEL_KEYS + ("act_first",):
            spec = getattr(self, key)
            if spec is None and key == "param":
                continue
            try:
                codec = build_codec(spec)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"compression.{key}={spec!r}: {e}") from None
            if getattr(codec, "needs_own_collective", False) and key != "grad":
                raise ConfigError(
                    f"compression.{key}={spec!r} is invalid: {codec.name} runs its own pair of all-reduces over "
                    f"whole gradient matrices, so it can only serve compression.grad; allowed here: "
                    f"{', '.join(n for n in available_codecs() if n != codec.name)}"
                )
        for key in ("error_feedback", "act_delta", "act_prefetch"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"compression.{key}={getattr(self, key)!r} is invalid; allowed: true, false")
        integer(self, "compression", "warmup_steps", 0)
        integer(self, "compression", "density_warmup_steps", 0)
        if self.density_warmup_steps and getattr(build_codec(self.grad), "ratio", None) is None:
            raise ConfigError(
                f"compression.density_warmup_steps={self.density_warmup_steps} needs a sparsifying gradient codec "
                f"with a ratio (e.g. topk:ratio=0.01); compression.grad={self.grad!r} has none")
        integer(self, "compression", "min_numel", 0)
        choice("compression.policy", self.policy, POLICIES)
        choice("compression.act_buffer", self.act_buffer, available_storages())
        choice("compression.act_buffer_dtype", self.act_buffer_dtype, PRECISIONS)


class _Done:
    """A finished 'handle' (PowerSGD runs its collectives synchronously)."""

    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


class GradCompression:
    """Codec, error feedback, warm-up, small/1-D exclusion, PowerSGD and the policy's
    per-bucket decision, for the gradient buckets reduced over ``comm`` (the dp group).

    Build one per sync object; it is stateful (EF residuals, PowerSGD factors, codec RNG,
    policy decisions) and its state is part of the checkpoint.
    """

    def __init__(self, cfg: CompressionConfig | None, comm):
        self.cfg = cfg = cfg if cfg is not None else CompressionConfig()
        self.comm = comm
        self.codec = build_codec(cfg.grad)
        self.plain = build_codec("none")
        self.own_collective = bool(getattr(self.codec, "needs_own_collective", False))
        use_ef = cfg.error_feedback and not self.codec.lossless
        self.powersgd = (PowerSGDReducer(self.codec, comm, error_feedback=use_ef, min_numel=cfg.min_numel)
                         if self.own_collective else None)
        # What the wire carries for a compressed bucket: the codec behind error feedback.
        self.wire = ErrorFeedback(self.codec) if use_ef and not self.own_collective else self.codec
        # The first compressed step: the configured warm-up, or the codec's own (PowerSGD's start_iter).
        self.start_step = max(cfg.warmup_steps, int(getattr(self.codec, "start_iter", 0)))
        self.raw_buckets: set[str] = set()  # keys the policy decided to send uncompressed
        self.decisions: list[dict[str, Any]] = []  # the policy's last decision table
        self.bucket_codecs: dict[str, str] = {}  # key -> codec spec of its last reduction (for logs)
        self._warned_nonfinite = False
        self._warm = None  # (step, wire codec) of the density warm-up, rebuilt once per step
        # Mixed precision (train.precision=fp16): the loss was multiplied by ``loss_scale``;
        # every flat gradient is divided by it here, before any codec, error feedback, norm or
        # clip sees it, and checked for non-finite values first (``take_overflow``).
        self.loss_scale = 1.0
        self.check_finite = False
        self._overflow: torch.Tensor | None = None

    # -- the per-bucket decision -------------------------------------------------------------
    def eligible(self, p: torch.Tensor) -> bool:
        """May this parameter's gradient be compressed at all (not small, not 1-D)?"""
        return compressible(p, self.cfg.min_numel)

    def compressing(self, bucket: Bucket, step: int) -> bool:
        return (bucket.compress and step >= self.start_step and not self.codec.lossless
                and bucket.key not in self.raw_buckets)

    def codec_for(self, bucket: Bucket, step: int):
        """The wire codec of ``bucket`` in ``step`` (records it in ``bucket_codecs``)."""
        if not self.compressing(bucket, step):
            self.bucket_codecs[bucket.key] = self.plain.spec
            return self.plain
        wire = self._density_warmup(step) or self.wire
        self.bucket_codecs[bucket.key] = wire.spec
        return wire

    def _density_warmup(self, step: int):
        """During ``density_warmup_steps``: the sparsifier at this step's ratio, behind error
        feedback that shares the run's residuals (so nothing is lost when the ratio shrinks).
        Every rank computes the same ratio from the step, so payload sizes agree."""
        t, n = step - self.start_step, self.cfg.density_warmup_steps
        if not n or t >= n or self.own_collective:
            return None
        if self._warm is None or self._warm[0] != step:
            ratio = DENSITY_START ** (1 - t / n) * self.codec.ratio ** (t / n)
            codec = build_codec(self.codec, ratio=max(ratio, self.codec.ratio))
            if isinstance(self.wire, ErrorFeedback):
                ef = ErrorFeedback(codec)
                ef.residuals = self.wire.residuals  # one residual per bucket, whatever the ratio
                codec = ef
            self._warm = (step, codec)
        return self._warm[1]

    # -- reductions ---------------------------------------------------------------------------
    def all_reduce(self, bucket: Bucket, flat: torch.Tensor, step: int, async_op: bool = True):
        """Mean of the bucket's flat gradients over the group: a handle whose ``wait()`` gives
        the flat mean, or (PowerSGD) the list of per-parameter means."""
        codec = self.codec_for(bucket, step)
        self._prepare(flat)
        if codec is not self.plain and self.own_collective:
            return _Done(self.powersgd.reduce(bucket.key, bucket.views(flat)))
        return self.comm.all_reduce(flat, codec, channel="grad", op="mean", key=bucket.key, async_op=async_op)

    def reduce_scatter(self, bucket: Bucket, flat: torch.Tensor, step: int, async_op: bool = True):
        """This rank's chunk of the bucket's mean (ZeRO)."""
        if self.own_collective:
            raise ValueError(f"compression.grad={self.codec.spec!r} cannot be reduce-scattered (see ZeroConfig)")
        self._prepare(flat)
        return self.comm.reduce_scatter(flat, self.codec_for(bucket, step), channel="grad", op="mean",
                                        key=bucket.key, async_op=async_op)

    def _prepare(self, flat: torch.Tensor) -> None:
        """Unscale (fp16 loss scaling) and note non-finite local values, in place, before the
        collective: what compression and error feedback see is the true gradient."""
        if self.check_finite:
            bad = ~torch.isfinite(flat).all()
            self._overflow = bad if self._overflow is None else self._overflow | bad
        if self.loss_scale != 1.0:
            flat.mul_(1.0 / self.loss_scale)  # a power of two: exact

    def take_overflow(self) -> bool:
        """Did any gradient this rank reduced since the last call hold a non-finite value
        (before compression; with ``check_finite``)? Resets the flag."""
        bad, self._overflow = self._overflow, None
        return bool(bad) if bad is not None else False

    def forget(self, key: str) -> None:
        """Drop the error-feedback residuals and the policy decision kept for bucket ``key`` (its
        layout changed: DDP rebuilt its buckets; a residual belongs to a layout, not to a key)."""
        if isinstance(self.wire, ErrorFeedback):
            self.wire.forget(key)
        self.raw_buckets.discard(key)
        self.decisions = [r for r in self.decisions if r["bucket"] != key]

    # -- the policy ------------------------------------------------------------------------------
    def decide(self, buckets: list[Bucket], collective: str = "all_reduce") -> None:
        """``policy="auto"``: choose, per eligible bucket, between the codec and raw bytes (a
        collective: every rank calls it with the same buckets, and all take the same decision)."""
        if self.cfg.policy != "auto" or self.codec.lossless:
            return
        from .policy import decide

        report = decide(self, [b for b in buckets if b.compress], collective)
        decided = {r["bucket"] for r in report}
        self.decisions = [r for r in self.decisions if r["bucket"] not in decided] + report
        self.raw_buckets = (self.raw_buckets - decided) | {r["bucket"] for r in report if not r["compress"]}

    # -- reports and checkpoint -------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters since the last call: ``ef_nonfinite`` (gradient elements whose error-feedback
        residual kept its old value because the new one was not finite)."""
        n = self.wire.take_nonfinite() if isinstance(self.wire, ErrorFeedback) else 0
        if self._warm is not None and isinstance(self._warm[1], ErrorFeedback):
            n += self._warm[1].take_nonfinite()
        if n and not self._warned_nonfinite:
            self._warned_nonfinite = True
            log.warning("non-finite gradient values reached error feedback (%d elements); their residuals were kept, "
                        "not poisoned (reported as ef_nonfinite in the metrics)", n)
        return {"ef_nonfinite": n}

    def state_dict(self) -> dict[str, Any]:
        """EF residuals (per bucket key and phase), PowerSGD factors, codec RNG, raw buckets."""
        sd: dict[str, Any] = {"codec_rng": self.codec.state_dict(), "raw_buckets": sorted(self.raw_buckets)}
        if isinstance(self.wire, ErrorFeedback):
            sd["ef"] = self.wire.state_dict()
        if self.powersgd is not None:
            sd["powersgd"] = self.powersgd.state_dict()
        return sd

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "ef" in state and not isinstance(self.wire, ErrorFeedback):
            raise ValueError("checkpoint has error-feedback residuals but compression.error_feedback is off "
                             "(or the gradient codec is lossless) in this run")
        self.codec.load_state_dict(state.get("codec_rng", {}))
        if "ef" in state:
            self.wire.load_state_dict(state["ef"])
        if "powersgd" in state and self.powersgd is not None:
            self.powersgd.load_state_dict(state["powersgd"])
        self.raw_buckets = set(state.get("raw_buckets", self.raw_buckets))
