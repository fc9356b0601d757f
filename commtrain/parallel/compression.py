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
(``grad``, ``error_feedback``, ``warmup_steps``, ``density_warmup_steps``, ``min_numel``,
``policy``, ``candidates``, ``decide_after``, ``redecide_every``) are read here, ``param`` by
ZeRO's parameter all-gather, and the ``act*`` keys (``act``, ``act_first``, ``act_grad``,
``act_delta``, ``act_buffer*``) by the pipeline's activation channels
(:mod:`commtrain.parallel.pipeline.acsgd`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from ..comm.price import chunk_bounds
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

    grad: str = "none"  # data-parallel gradients: the user's codec (policy=always: the pin)
    act: str = "none"  # pipeline forward activations ("auto": chosen per boundary, as the gradients)
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
    # "auto" (with a lossy compression.grad): per bucket, the candidate with the least exposed
    # step time on the measured link (parallel/policy.py); "always": compression.grad on every
    # eligible bucket. compression.grad=none sends raw bytes under either policy.
    policy: str = "auto"
    # auto: the codecs it may choose from (none and compression.grad are always among them);
    # null: policy.DEFAULT_CANDIDATES
    candidates: Optional[list[str]] = None
    decide_after: int = 3  # auto: measured steps (with compression.grad) before the first decision
    redecide_every: int = 25  # auto: decide again every N steps from the current timings (0: never)
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
            if key == "act" and spec == "auto":
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
        if self.candidates is not None:
            if not isinstance(self.candidates, list) or not self.candidates:
                raise ConfigError(f"compression.candidates={self.candidates!r} is invalid; allowed: a non-empty list "
                                  f"of codec specs, e.g. [none, fp16, 'quant:bits=8'], or null (the default list)")
            for i, spec in enumerate(self.candidates):
                try:
                    build_codec(spec)
                except (ValueError, TypeError) as e:
                    raise ConfigError(f"compression.candidates[{i}]={spec!r}: {e}") from None
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
        integer(self, "compression", "decide_after", 0)
        integer(self, "compression", "redecide_every", 0)
        choice("compression.policy", self.policy, POLICIES)
        choice("compression.act_buffer", self.act_buffer, available_storages())
        choice("compression.act_buffer_dtype", self.act_buffer_dtype, PRECISIONS)

    def candidate_specs(self) -> list[str]:
        """The canonical specs ``auto`` chooses from: ``none``, ``grad``, then the candidates."""
        from .policy import DEFAULT_CANDIDATES

        out: list[str] = []
        for s in ["none", self.grad, *(self.candidates if self.candidates is not None else DEFAULT_CANDIDATES)]:
            spec = build_codec(s).spec
            if spec not in out:
                out.append(spec)
        return out


class _Done:
    """A finished 'handle' (PowerSGD runs its collectives synchronously)."""

    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


@dataclass
class _Option:
    """One codec a bucket may be reduced with: the codec, what the wire carries (the codec
    behind error feedback, when lossy and EF is on) and PowerSGD's reducer (own collective)."""

    spec: str
    codec: Any
    wire: Any
    powersgd: Optional[PowerSGDReducer] = None
    lossless: bool = field(init=False)

    def __post_init__(self):
        self.lossless = bool(self.codec.lossless)


class GradCompression:
    """Codec, error feedback, warm-up, small/1-D exclusion, PowerSGD and the policy's
    per-bucket decision, for the gradient buckets reduced over ``comm`` (the dp group).

    Build one per sync object; it is stateful (EF residuals, PowerSGD factors, codec RNG,
    policy decisions) and its state is part of the checkpoint.

    ``policy=auto`` with a lossy ``grad``: the sync calls :meth:`decide` once with its
    buckets (measures the link: a collective), :meth:`begin_step` at every step (the first
    decision after ``decide_after`` measured steps, then every ``redecide_every``; a
    collective at those steps), :meth:`note_launch` when a bucket's reduction starts from
    backward and :meth:`note_backward_end` when backward is over (how much of each bucket's
    reduction can hide). Until the first decision every bucket uses ``grad``.
    """

    def __init__(self, cfg: CompressionConfig | None, comm):
        self.cfg = cfg = cfg if cfg is not None else CompressionConfig()
        self.comm = comm
        self.plain = build_codec("none")
        self._use_ef = cfg.error_feedback
        self.options: dict[str, _Option] = {"none": _Option("none", self.plain, self.plain)}
        pref = self.option(build_codec(cfg.grad).spec)
        self.preferred = pref.spec
        self.codec, self.wire, self.powersgd = pref.codec, pref.wire, pref.powersgd
        self.own_collective = pref.powersgd is not None
        # The first compressed step: the configured warm-up, or the codec's own (PowerSGD's start_iter).
        self.start_step = max(cfg.warmup_steps, int(getattr(self.codec, "start_iter", 0)))
        self.auto = cfg.policy == "auto" and not self.codec.lossless
        self.candidates = cfg.candidate_specs() if self.auto else [self.preferred]
        self.choice: dict[str, str] = {}  # bucket key -> spec decided by the policy
        self.last_spec: dict[str, str] = {}  # bucket key -> spec of its last reduction (EF flush on change)
        self.decisions: list[dict[str, Any]] = []  # the policy's last decision table
        self.decision_step: Optional[int] = None
        self.decision_count = 0
        self.link = None  # policy.LinkTracker once measured
        self.link_estimate = None  # the group's agreed policy.LinkEstimate of the last decision
        self.bucket_codecs: dict[str, str] = {}  # key -> codec spec of its last reduction (for logs)
        self._buckets: list[Bucket] = []
        self._collective = "all_reduce"
        self._codec_s: dict[tuple, dict[str, float]] = {}  # bucket layout -> spec -> agreed codec seconds
        self._ops: dict[tuple, dict[str, list]] = {}  # bucket layout -> spec -> wire ops (bytes, rounds)
        self._slack: dict[str, float] = {}  # key -> EMA of seconds its reduction started before backward ended
        self._launch_t: dict[str, float] = {}
        self.next_decision = self.start_step + cfg.decide_after
        self._stale = False
        self._warned_nonfinite = False
        self._warm = None  # (step, wire codec) of the density warm-up, rebuilt once per step
        # Mixed precision (train.precision=fp16): the loss was multiplied by ``loss_scale``;
        # every flat gradient is divided by it here, before any codec, error feedback, norm or
        # clip sees it, and checked for non-finite values first (``take_overflow``).
        self.loss_scale = 1.0
        self.check_finite = False
        self._overflow: torch.Tensor | None = None

    def option(self, spec: str) -> _Option:
        """The codec option of canonical ``spec`` (built on first use)."""
        if spec not in self.options:
            codec = build_codec(spec)
            use_ef = self._use_ef and not codec.lossless
            if getattr(codec, "needs_own_collective", False):
                ps = PowerSGDReducer(codec, self.comm, error_feedback=use_ef, min_numel=self.cfg.min_numel)
                self.options[spec] = _Option(spec, codec, codec, ps)
            else:
                self.options[spec] = _Option(spec, codec, ErrorFeedback(codec) if use_ef else codec)
        return self.options[spec]

    @property
    def raw_buckets(self) -> set[str]:
        """Keys the policy decided to send uncompressed."""
        return {k for k, s in self.choice.items() if s == "none"}

    # -- the per-bucket decision -------------------------------------------------------------
    def eligible(self, p: torch.Tensor) -> bool:
        """May this parameter's gradient be compressed at all (not small, not 1-D)?"""
        return compressible(p, self.cfg.min_numel)

    def spec_for(self, bucket: Bucket, step: int) -> str:
        """The codec spec ``bucket`` is reduced with in ``step``."""
        if not bucket.compress or step < self.start_step or self.codec.lossless:
            return "none"
        return self.choice.get(bucket.key, self.preferred)

    def compressing(self, bucket: Bucket, step: int) -> bool:
        return self.spec_for(bucket, step) != "none"

    def codec_for(self, bucket: Bucket, step: int):
        """The wire codec of ``bucket`` in ``step`` (records it in ``bucket_codecs``)."""
        spec = self.spec_for(bucket, step)
        self.bucket_codecs[bucket.key] = spec
        return self._wire(self.option(spec), step)

    def _wire(self, opt: _Option, step: int):
        """What the wire carries for option ``opt`` in ``step``: its codec (behind error
        feedback), or during ``density_warmup_steps`` the preferred sparsifier at this step's
        ratio."""
        return (self._density_warmup(step) if opt.spec == self.preferred else None) or opt.wire

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
        self._prepare(flat)
        opt = self._prepare_reduction(bucket, flat, step, "all_reduce")
        if opt.powersgd is not None:
            return _Done(opt.powersgd.reduce(bucket.key, bucket.views(flat)))
        return self.comm.all_reduce(flat, self._wire(opt, step), channel="grad", op="mean", key=bucket.key,
                                    async_op=async_op)

    def reduce_scatter(self, bucket: Bucket, flat: torch.Tensor, step: int, async_op: bool = True):
        """This rank's chunk of the bucket's mean (ZeRO)."""
        if self.own_collective:
            raise ValueError(f"compression.grad={self.codec.spec!r} cannot be reduce-scattered (see ZeroConfig)")
        self._prepare(flat)
        opt = self._prepare_reduction(bucket, flat, step, "reduce_scatter")
        return self.comm.reduce_scatter(flat, self._wire(opt, step), channel="grad", op="mean", key=bucket.key,
                                        async_op=async_op)

    def _prepare_reduction(self, bucket: Bucket, flat: torch.Tensor, step: int, collective: str) -> _Option:
        spec = self.spec_for(bucket, step)
        self.bucket_codecs[bucket.key] = spec
        prev = self.last_spec.get(bucket.key)
        if prev is not None and prev != spec:
            self._flush(self.options[prev], bucket, flat, collective)
        self.last_spec[bucket.key] = spec
        return self.option(spec)

    def _flush(self, opt: _Option, bucket: Bucket, flat: torch.Tensor, collective: str) -> None:
        """A bucket's codec changed: hand the old codec's error-feedback residuals back to the
        gradient being reduced now, in gradient units, and drop them. Residuals hold what this
        rank has not yet delivered: a reduce-scatter chunk ``j`` residual is this rank's own
        contribution to chunk j (added as is); an all-gather (``ag``, of the chunk this rank
        owns) or summable (``ar``, pre-divided by p) residual is of the group's *mean*, so it
        is added p times (the reduction divides by p). Nothing is lost across the switch."""
        key, p, r = bucket.key, self.comm.world_size, self.comm.rank
        if opt.powersgd is not None:
            res = opt.powersgd.residuals.get(key)
            if res:
                with torch.no_grad():
                    for v, e in zip(bucket.views(flat), res):
                        if e is not None:
                            v.add_(e.reshape(v.shape).to(device=v.device, dtype=v.dtype))
                opt.powersgd.residuals[key] = [None] * len(res)
            return
        if not isinstance(opt.wire, ErrorFeedback):
            return
        res = opt.wire.residuals
        bounds = chunk_bounds(flat.numel(), p)
        with torch.no_grad():
            for j, (lo, hi) in enumerate(bounds):
                e = res.pop(f"{key}/rs/{j}", None)
                if e is not None:
                    flat[lo:hi].add_(e.to(device=flat.device, dtype=flat.dtype))
            e = res.pop(f"{key}/ag", None)
            if e is not None:
                lo, hi = bounds[r]
                flat[lo:hi].add_(e.to(device=flat.device, dtype=flat.dtype), alpha=p)
            e = res.pop(f"{key}/ar", None)
            if e is not None:
                flat.add_(e.reshape(flat.shape).to(device=flat.device, dtype=flat.dtype), alpha=p)

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
        for opt in self.options.values():
            if isinstance(opt.wire, ErrorFeedback):
                opt.wire.forget(key)
        self.choice.pop(key, None)
        self.last_spec.pop(key, None)
        self._slack.pop(key, None)
        self._buckets = [b for b in self._buckets if b.key != key]
        self.decisions = [r for r in self.decisions if r["bucket"] != key]
        self._stale = True  # decide again at the next step allowed (the layout changed)

    # -- the policy ------------------------------------------------------------------------------
    def decide(self, buckets: list[Bucket], collective: str = "all_reduce") -> None:
        """Register the sync's buckets (in launch order) for ``policy=auto`` and measure the
        group's link the first time (a collective: every rank calls it with the same buckets).
        The decisions themselves come in :meth:`begin_step`."""
        if not self.auto:
            return
        self._collective = collective
        known = {b.key for b in self._buckets}
        self._buckets += [b for b in buckets if b.compress and b.key not in known]
        if self.link is None and getattr(self.comm, "world_size", 1) > 1:
            from .policy import LinkTracker, measure_link

            est = measure_link(self.comm)
            if est is not None:
                self.link = LinkTracker(est)
                wire = getattr(self.comm, "wire", None)
                if wire is not None:
                    wire.observer = self.link.observe

    def begin_step(self, step: int) -> bool:
        """Called by the sync at the start of every step on every rank: decides (a collective)
        when ``step`` is a decision step. True when a decision was taken."""
        first = self.start_step + self.cfg.decide_after
        due = step >= self.next_decision or (self._stale and step >= first)
        if not self.auto or self.link is None or not self._buckets or not due:
            return False
        self._stale = False
        self.decide_now(step)
        every = self.cfg.redecide_every
        self.next_decision = step + every if every > 0 else 10**18  # never again
        return True

    def note_launch(self, key: str) -> None:
        """A bucket's reduction starts now (from a backward hook)."""
        self._launch_t[key] = time.perf_counter()

    def note_backward_end(self) -> None:
        """Backward is over: fold each launched bucket's lead into its slack EMA."""
        from .policy import EMA_ALPHA

        now = time.perf_counter()
        for b in self._buckets:  # a bucket launched after backward (at finish) hides nothing
            key = b.key
            t = self._launch_t.get(key)
            s = max(now - t, 0.0) if t is not None else 0.0
            old = self._slack.get(key)
            self._slack[key] = s if old is None else (1 - EMA_ALPHA) * old + EMA_ALPHA * s
        self._launch_t.clear()

    def decide_now(self, step: int) -> list[dict[str, Any]]:
        """Take a decision from the current measurements (a collective over the group)."""
        from . import policy

        specs = [s for s in self.candidates if self._serves(s)]
        p = self.comm.world_size
        new = []
        for b in self._buckets:
            k = policy.layout(b)
            if k not in self._codec_s and k not in [policy.layout(x) for x in new]:
                new.append(b)
        if new:
            local = []
            for b in new:
                rec = {s: policy.rehearse(self.cfg, s, b, p, self._collective) for s in specs}
                self._ops[policy.layout(b)] = {s: r["ops"] for s, r in rec.items()}
                local.append([rec[s]["codec_s"] for s in specs])
            agreed = self.comm.agree_max(torch.tensor(local, dtype=torch.float64)).tolist()
            for b, row in zip(new, agreed):
                self._codec_s[policy.layout(b)] = dict(zip(specs, row))
        est = self.link.agree(self.comm)
        slack = torch.tensor([self._slack.get(b.key, 0.0) for b in self._buckets], dtype=torch.float64)
        slack = (-self.comm.agree_max(-slack)).tolist()  # the group's least slack
        rows = []
        for b, s in zip(self._buckets, slack):
            k = policy.layout(b)
            times = {spec: (self._codec_s[k][spec], sum(est.cost_s(n, r) for n, r in self._ops[k][spec]))
                     for spec in specs}
            rows.append({"bucket": b.key, "numel": b.numel, "slack_s": s, "times": times})
        cpu_shared = self._buckets[0].device.type == "cpu"
        policy.plan(rows, specs, self.preferred, cpu_shared)
        self.choice = {r["bucket"]: r["chosen"] for r in rows}
        self.decisions = rows
        self.decision_step = step
        self.decision_count += 1
        self.link_estimate = est
        policy.log_table(rows, est, step)
        return rows

    def _serves(self, spec: str) -> bool:
        """Can ``spec`` reduce this sync's buckets? PowerSGD needs whole gradient matrices and
        its own pair of all-reduces: not with ZeRO's reduce-scatter, nor (unless it is
        compression.grad) with the DDP hook's gathered runs."""
        if self.option(spec).powersgd is None:
            return True
        return self._collective == "all_reduce" and (self.own_collective or not getattr(self, "gathered_runs", False))

    def decision_record(self) -> dict[str, Any]:
        """The last decision, JSON-ready (for the metrics file)."""
        from . import policy

        raw_ms, chosen_ms = (self.decisions[0].get("_step_exposed_ms", (None, None)) if self.decisions
                             else (None, None))
        return {"step": self.decision_step, "link": self.link_estimate.as_dict(),
                "exposed_ms": chosen_ms, "exposed_raw_ms": raw_ms, "summary": policy.summary(self.decisions),
                "table": policy.public_rows(self.decisions)}

    # -- reports and checkpoint -------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters since the last call: ``ef_nonfinite`` (gradient elements whose error-feedback
        residual kept its old value because the new one was not finite)."""
        n = sum(o.wire.take_nonfinite() for o in self.options.values() if isinstance(o.wire, ErrorFeedback))
        if self._warm is not None and isinstance(self._warm[1], ErrorFeedback):
            n += self._warm[1].take_nonfinite()
        if n and not self._warned_nonfinite:
            self._warned_nonfinite = True
            log.warning("non-finite gradient values reached error feedback (%d elements); their residuals were kept, "
                        "not poisoned (reported as ef_nonfinite in the metrics)", n)
        return {"ef_nonfinite": n}

    def state_dict(self) -> dict[str, Any]:
        """EF residuals (per bucket key and phase), PowerSGD factors, codec RNG, the policy's
        choices (and the other candidates' state under ``auto``)."""
        sd: dict[str, Any] = {"codec_rng": self.codec.state_dict(), "raw_buckets": sorted(self.raw_buckets)}
        if isinstance(self.wire, ErrorFeedback):
            sd["ef"] = self.wire.state_dict()
        if self.powersgd is not None:
            sd["powersgd"] = self.powersgd.state_dict()
        if self.auto:
            others = {}
            for spec, o in self.options.items():
                if spec in (self.preferred, "none"):
                    continue
                others[spec] = {"codec_rng": o.codec.state_dict(),
                                "ef": o.wire.state_dict() if isinstance(o.wire, ErrorFeedback) else None,
                                "powersgd": o.powersgd.state_dict() if o.powersgd is not None else None}
            sd["auto"] = {"choice": dict(self.choice), "last_spec": dict(self.last_spec), "options": others,
                          "next_decision": self.next_decision}
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
        auto = state.get("auto")
        if auto is not None and self.auto:
            self.choice = dict(auto["choice"])
            self.last_spec = dict(auto["last_spec"])
            self.next_decision = auto["next_decision"]
            for spec, o in auto["options"].items():
                opt = self.option(spec)
                opt.codec.load_state_dict(o["codec_rng"])
                if o["ef"] is not None and isinstance(opt.wire, ErrorFeedback):
                    opt.wire.load_state_dict(o["ef"])
                if o["powersgd"] is not None and opt.powersgd is not None:
                    opt.powersgd.load_state_dict(o["powersgd"])
        elif "raw_buckets" in state:
            self.choice = {k: "none" for k in state["raw_buckets"]}
