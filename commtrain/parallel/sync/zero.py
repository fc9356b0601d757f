"""ZeRO-style sharding (Rajbhandari et al., 2020) with compressed collectives.

Parameters are laid out in the flat buckets of :func:`build_buckets`, each padded to a
multiple of the data-parallel size ``p``, so bucket ``b`` splits into ``p`` equal chunks and
rank ``r`` owns chunk ``r`` of every bucket. Its *shard* is the concatenation of those
chunks: an fp32 master copy (``master``) that is the only thing its optimizer sees.

* stage 1 -- optimizer state sharded. Gradients are all-reduced at ``step()`` into the full
  ``param.grad`` on every rank (as plain DP: clipping, accumulation and user code see the
  averaged gradient), each rank steps only its shard, updated shards are all-gathered into
  the parameters. The shard's fp32 gradient ``master.grad`` is a copy of 1/p of the
  gradients: the sharded optimizer steps one flat fp32 tensor that spans every bucket, so its
  gradient cannot be a view of the per-bucket results. Stage 1 thus holds 1 + 1/p gradient
  copies and sends an all-reduce plus an all-gather (1.5x plain DP's bytes); it saves only
  optimizer state. Choose stage 2 to save gradient memory and bytes as well.
* stage 2 -- gradients sharded too. Each bucket is *reduce-scattered during backward*, as
  soon as its last gradient has been accumulated: the hook copies each gradient into the
  bucket's staging buffer and frees ``param.grad`` at once, and the staging buffer is freed
  when its reduce-scatter has delivered this rank's chunk into ``master.grad``. At most
  ``buckets_in_flight`` staging buffers are alive (one filling, the others on the wire: the
  hook waits for the oldest reduction before starting another), so the peak gradient memory
  is 1/p of the gradients plus ``buckets_in_flight`` buckets, plus the bucket of small/1-D
  tensors filling alongside (not counted in ``buckets_in_flight``: it is tiny) and the one
  gradient autograd has just produced (it exists before any hook can move it).
  ``buckets_in_flight=1`` gives the smallest peak; 2 (the default, as DeepSpeed's
  double-buffered reduction) lets a bucket's reduction overlap the backward computing the
  next one.

Gradient compression goes through :class:`GradCompression` (EF residuals keyed by bucket,
warm-up, the ``auto`` policy rehearsing the reduce-scatter). PowerSGD cannot be
reduce-scattered (its factors need the whole gradient matrix on every rank) and is refused
at config time. Parameter compression (``compression.param``, ZeRO++ qwZ style, e.g.
``quant:bits=8,group=256,rounding=nearest,scheme=absmax``) applies to the all-gather on the
``param`` channel: all ranks load the *dequantized* gathered values, so they stay identical,
while each owner keeps its exact fp32 master shard -- quantization error never accumulates
in the weights being optimised. Small/1-D tensors and the first ``warmup_steps`` steps are
uncompressed. Params must be identical on all ranks at construction.
"""
from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...compress import build_codec
from ...validate import ConfigError, choice, integer
from ..buckets import build_buckets
from ..compression import CompressionConfig, GradCompression
from . import SYNCS, Veto, clip_, grad_norm

FORMAT = "commtrain.zero/1"


@dataclass
class ZeroConfig:
    """The ``zero`` section: ``stage`` 0 (plain DP), 1 or 2; ``buckets_in_flight`` (stage 2)."""

    stage: int = 0
    buckets_in_flight: int = 2

    def validate(self) -> None:
        choice("zero.stage", self.stage, (0, 1, 2))
        integer(self, "zero", "buckets_in_flight", 1)

    def check_compression(self, cc: CompressionConfig) -> None:
        """Pairings found at config time: PowerSGD gradients, a param codec without sharding."""
        if self.stage and getattr(build_codec(cc.grad), "needs_own_collective", False):
            raise ConfigError(
                f"zero.stage={self.stage} with compression.grad={cc.grad!r} is invalid: ZeRO reduce-scatters each "
                f"gradient bucket so that a rank receives only its shard, but PowerSGD's low-rank factors need the "
                f"whole gradient matrix on every rank; use zero.stage=0 with powersgd, or another codec"
            )
        if self.stage == 0 and cc.param is not None:
            raise ConfigError(f"compression.param={cc.param!r} needs zero.stage 1 or 2 (stage 0 does not gather "
                              f"parameters); allowed with stage 0: null")


@SYNCS.register("zero")
class ZeroSync:
    """Sharded optimizer state (stage 1) and gradients (stage 2); see the module docstring.

    Loop::

        zero.begin_step(step); loss.backward(); zero.step(max_grad_norm=1.0); zero.zero_grad()
    """

    def __init__(self, named_params, optimizer_factory, comm, compression: CompressionConfig | None = None,
                 stage: int = 1, bucket_mb: float = 4.0, overlap: bool = True, buckets_in_flight: int = 2):
        if stage not in (1, 2):
            raise ValueError(f"ZeroSync: zero.stage={stage!r} is invalid; allowed: 1, 2 "
                             f"(stage 0 is plain data parallelism: the data_parallel sync)")
        cfg = compression if compression is not None else CompressionConfig()
        ZeroConfig(stage, buckets_in_flight).check_compression(cfg)
        self.comm, self.stage, self.overlap = comm, stage, bool(overlap)
        self.world, self.rank = comm.world_size, comm.rank
        self.buckets_in_flight = int(buckets_in_flight)
        self.compression = GradCompression(cfg, comm)
        self.plain = self.compression.plain
        self.param_codec = build_codec(cfg.param) if cfg.param is not None else self.plain
        self.buckets = build_buckets(named_params, bucket_mb, cfg.min_numel, pad_to=self.world)
        self.params = [p for b in self.buckets for p in b.params]
        self.chunks = [b.numel // self.world for b in self.buckets]
        self.offsets = [sum(self.chunks[:i]) for i in range(len(self.chunks))]
        shard = [self._flat_params(b)[self.rank * c:(self.rank + 1) * c] for b, c in zip(self.buckets, self.chunks)]
        self.master = torch.nn.Parameter(torch.cat(shard))
        self.master.grad = torch.zeros_like(self.master)
        self.optimizer = optimizer_factory([self.master])
        self.compression.decide(self.buckets, "reduce_scatter" if stage == 2 else "all_reduce")
        self.step_count = 0
        self.launched_in_backward = 0
        self._peak = 0
        self._armed = False
        self._where = {id(p): (i, j) for i, b in enumerate(self.buckets) for j, p in enumerate(b.params)}
        self._reset()
        self._hooks = ([p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
                       if stage == 2 else [])

    # -- the GradSync interface --------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def begin_step(self, step: int) -> None:
        """Set the step number (drives warm-up) and, at stage 2, arm the backward hooks."""
        self.step_count = int(step)
        self.compression.begin_step(self.step_count)  # policy=auto: a decision at its steps (collective)
        self._reset()
        self._armed = self.stage == 2 and self.overlap

    @contextlib.contextmanager
    def no_sync(self):
        """Backwards inside only accumulate into ``param.grad`` (gradient accumulation)."""
        armed, self._armed = self._armed, False
        try:
            yield
        finally:
            self._armed = armed

    def step(self, max_grad_norm: float = 0.0, veto: Veto | None = None) -> dict[str, Any]:
        """Reduce the gradients still pending, (clip,) update the shard, gather parameters.
        Returns ``grad_norm`` (of the averaged gradient, before clipping), ``skipped`` and
        compression stats. ``veto(norm)`` True: no clip, no update, no gather (the master
        shard, optimizer state and parameters stay as they were)."""
        self._armed = False
        self.compression.note_backward_end()
        self.launched_in_backward = self._launched  # buckets already reduce-scattering when backward ended
        if self.stage == 2:
            self._launch_ready(force=True)
            while self._inflight:
                self._complete_oldest()
        else:
            self._all_reduce_full()
        norm = self._grad_norm()
        skipped = bool(veto(norm)) if veto is not None else False
        if not skipped:
            clip_(self._own_grads(), norm, max_grad_norm)
            self.optimizer.step()
            self._gather_params(self.step_count >= self.compression.cfg.warmup_steps)
        self.step_count += 1
        return {"grad_norm": float(norm), "skipped": skipped, **self.compression.stats()}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self.master.grad.zero_()

    def finalize(self) -> dict[str, Any]:
        return {}  # every step already left the replicas in sync

    def sync_params(self) -> None:
        """All-gather the master shards into the parameters (collective; e.g. after loading
        a sharded checkpoint without the model's own weights)."""
        self._gather_params(self.step_count - 1 >= self.compression.cfg.warmup_steps)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- stage 2: reduce-scatter during backward -------------------------------------------------
    def _reset(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._staging: list[torch.Tensor | None] = [None] * len(self.buckets)
        self._launched = 0
        self._inflight: deque = deque()
        self._held: int | None = None  # gradient bytes in param.grad (counted at the step's first hook)
        self._held_ids: set[int] = set()

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        i, j = self._where[id(p)]
        if i < self._launched:
            raise RuntimeError(f"ZeroSync: a gradient of {self.buckets[i].key} arrived after the bucket was reduced; "
                               f"wrap accumulation backwards in no_sync()")
        b, nbytes = self.buckets[i], self._nbytes(p.grad)
        if self._held is None:  # first hook of the step: gradients accumulated so far (no_sync)
            self._held_ids = {id(q) for q in self.params if q.grad is not None}
            self._held = sum(self._nbytes(q.grad) for q in self.params if q.grad is not None)
        accumulated = id(p) in self._held_ids
        buf = self._stage_buffer(i, transient=0 if accumulated else nbytes)
        buf[b.offsets[j]:b.offsets[j] + p.numel()].copy_(p.grad.reshape(-1))
        p.grad = None  # its bytes now live in the staging buffer only
        if accumulated:
            self._held -= nbytes
        self._ready[i] += 1
        self._launch_ready(force=False)

    def _stage_buffer(self, i: int, transient: int = 0) -> torch.Tensor:
        """Bucket ``i``'s staging buffer, allocated on first use. ``transient``: bytes of a
        gradient alive right now that no other count holds (the one autograd just produced)."""
        if self._staging[i] is None:
            # Bounded memory: wait for the oldest reduction before allocating another bucket.
            while self._alive() >= self.buckets_in_flight and self._inflight:
                self._complete_oldest()
            b = self.buckets[i]
            self._staging[i] = torch.zeros(b.numel, dtype=torch.float32, device=b.device)
        staged = sum(self._nbytes(s) for s in self._staging if s is not None)
        held = self._held if self._held is not None else self._grad_bytes()
        self._peak = max(self._peak, staged + held + transient + self._nbytes(self.master.grad))
        return self._staging[i]

    def _launch_ready(self, force: bool) -> None:
        # Strictly in bucket order: every rank must issue the same collectives in the same order.
        while self._launched < len(self.buckets):
            i, b = self._launched, self.buckets[self._launched]
            if not force and self._ready[i] < len(b.params):
                return
            if self._ready[i] < len(b.params):  # not filled by hooks (overlap off, or unused params)
                self._held = None  # recount: these gradients are held in param.grad until copied
                buf = self._stage_buffer(i)
                for j, q in enumerate(b.params):
                    if q.grad is not None:
                        buf[b.offsets[j]:b.offsets[j] + q.numel()].copy_(q.grad.reshape(-1))
                        q.grad = None
            if self._armed:
                self.compression.note_launch(b.key)
            h = self.compression.reduce_scatter(b, self._stage_buffer(i), self.step_count)
            self._inflight.append((i, h))
            self._launched += 1

    def _complete_oldest(self) -> None:
        i, h = self._inflight.popleft()
        o, c = self.offsets[i], self.chunks[i]
        self.master.grad[o:o + c].copy_(h.wait())
        self._staging[i] = None  # the bucket's full gradient is gone; its shard is in master.grad

    def _alive(self) -> int:
        # The small/1-D stream's bucket (biases, norms: plain, tiny) fills alongside the big one
        # through the whole backward; counting it would halve the overlap for nothing.
        return sum(s is not None and b.compress for s, b in zip(self._staging, self.buckets))

    # -- stage 1: all-reduce at step() ---------------------------------------------------------------
    def _all_reduce_full(self) -> None:
        flats = [b.flatten_grads(torch.empty(b.numel, dtype=torch.float32, device=b.device)) for b in self.buckets]
        handles = [self.compression.all_reduce(b, flat, self.step_count) for b, flat in zip(self.buckets, flats)]
        self._peak = max(self._peak, self._grad_bytes() + sum(map(self._nbytes, flats)) + self._nbytes(self.master.grad))
        for b, c, o, h in zip(self.buckets, self.chunks, self.offsets, handles):
            out = h.wait()
            for p, v in zip(b.params, b.views(out)):
                if p.grad is None:
                    p.grad = v.to(p.dtype).clone()
                else:
                    p.grad.copy_(v)
            self.master.grad[o:o + c].copy_(out[self.rank * c:(self.rank + 1) * c])

    # -- reports / checkpoint ---------------------------------------------------------------------
    def memory_report(self) -> dict[str, int]:
        """Bytes per rank: ``grad_bytes`` (gradients held now: ``param.grad`` + the shard's
        ``master.grad``), ``peak_grad_bytes`` (the most gradient bytes held at any moment of
        any step so far: gradients, staging buffers and the shard), ``optimizer_state_bytes``
        (the wrapped optimizer's state), ``master_bytes`` (fp32 master shard), ``param_bytes``."""
        return {"stage": self.stage, "optimizer_state_bytes": _state_bytes(self.optimizer),
                "grad_bytes": self._grad_bytes() + self._nbytes(self.master.grad), "peak_grad_bytes": self._peak,
                "master_bytes": self._nbytes(self.master),
                "param_bytes": sum(self._nbytes(p) for p in self.params)}

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard. Format ``commtrain.zero/1``: ``stage``, ``rank``, ``world_size``,
        ``layout`` (per bucket: key, padded numel, param numels -- a resume must match it),
        ``master`` (fp32 shard = chunk ``rank`` of every bucket, concatenated), ``optimizer``
        (the wrapped optimizer's state_dict over ``[master]``), ``ef`` (gradient EF residuals
        by bucket key, or None), ``compression`` (the rest of the gradient-compression state),
        ``codec_rng`` of the param codec, ``step``. The model's weights are saved separately."""
        comp = self.compression.state_dict()
        return {"format": FORMAT, "stage": self.stage, "rank": self.rank, "world_size": self.world,
                "layout": self._layout(), "step": self.step_count, "master": self.master.detach().clone(),
                "optimizer": self.optimizer.state_dict(), "ef": comp.pop("ef", None), "compression": comp,
                "codec_rng": {"param": self.param_codec.state_dict()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != FORMAT:
            raise ValueError(f"ZeroSync.load_state_dict: format={state.get('format')!r}, expected {FORMAT!r}")
        for k, mine in (("stage", self.stage), ("rank", self.rank), ("world_size", self.world),
                        ("layout", self._layout())):
            if state[k] != mine:
                raise ValueError(f"ZeroSync.load_state_dict: checkpoint {k}={state[k]!r} but this run has "
                                 f"{k}={mine!r} (a sharded checkpoint resumes only on the same layout)")
        with torch.no_grad():
            self.master.copy_(state["master"])
        self.optimizer.load_state_dict(state["optimizer"])
        comp = dict(state["compression"])
        if state["ef"] is not None:
            comp["ef"] = state["ef"]
        self.compression.load_state_dict(comp)
        self.param_codec.load_state_dict(state["codec_rng"]["param"])
        self.step_count = int(state["step"])

    # -- internals ---------------------------------------------------------------------------
    def _layout(self):
        return [[b.key, b.numel, [p.numel() for p in b.params]] for b in self.buckets]

    @staticmethod
    def _nbytes(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.numel() * t.element_size()

    def _grad_bytes(self) -> int:
        return sum(self._nbytes(p.grad) for p in self.params)

    @staticmethod
    def _flat_params(b) -> torch.Tensor:
        flat = torch.zeros(b.numel, dtype=torch.float32, device=b.device)
        for o, p in zip(b.offsets, b.params):
            flat[o:o + p.numel()].copy_(p.detach().reshape(-1))
        return flat

    def _own_grads(self) -> list[torch.Tensor]:
        return [self.master.grad]

    def _grad_norm(self) -> torch.Tensor:
        # Stage 1 keeps the full averaged gradient in param.grad on every rank; stage 2 has
        # disjoint shards, so their squared norms are summed across ranks (one scalar).
        if self.stage == 1:
            return grad_norm((p.grad for p in self.params if p.grad is not None), self.master.device)
        sq = grad_norm([self.master.grad], self.master.device).pow(2)
        return self.comm.all_reduce(sq.reshape(1), self.plain, channel="grad", op="sum")[0].sqrt()

    @torch.no_grad()
    def _gather_params(self, compress: bool) -> None:
        handles = []
        for b, c, o in zip(self.buckets, self.chunks, self.offsets):
            codec = self.param_codec if compress and b.compress else self.plain
            handles.append(self.comm.all_gather_flat(self.master[o:o + c].detach(), codec, channel="param",
                                                     key=b.key + ".param", async_op=True))
        for b, h in zip(self.buckets, handles):
            for p, v in zip(b.params, b.views(h.wait())):
                p.copy_(v)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
