"""ZeRO-style sharded optimizer (Rajbhandari et al., 2020) with compressed collectives.

Parameters are laid out in the flat buckets of :func:`build_buckets`, each padded to a
multiple of the data-parallel size ``p``, so bucket ``b`` splits into ``p`` equal chunks
and rank ``r`` owns chunk ``r`` of every bucket. Its *shard* is the concatenation of those
chunks: an fp32 master copy (``master``) that is the only thing its optimizer sees.

* stage 0 -- plain data parallelism: gradients all-reduced into ``param.grad``, the
  wrapped optimizer updates the full parameters on every rank (the baseline).
* stage 1 -- optimizer state sharded: gradients all-reduced (full ``param.grad`` kept),
  each rank steps only its shard, updated shards are all-gathered into the parameters.
* stage 2 -- gradients sharded too: each bucket is *reduce-scattered*, so a rank receives
  (and keeps) only the averaged gradient of its own chunk; ``param.grad`` is freed.

Gradient compression (``grad_codec``) applies to the all-reduce / reduce-scatter, with
error feedback on the local pre-compression gradient (keyed by bucket). Parameter
compression (``param_codec``, ZeRO++ qwZ style, e.g. ``quant:bits=8,group=256,
rounding=nearest,scheme=absmax``) applies to the all-gather on the ``param`` channel: all
ranks load the *dequantized* gathered values, so they stay identical, while each owner
keeps its exact fp32 master shard -- quantization error never accumulates in the weights
being optimised. Small/1-D tensors and the first ``warmup_steps`` steps are uncompressed.

Params must be identical on all ranks at construction (same seed / loaded checkpoint).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..compress import ErrorFeedback, build_codec
from .reducer import build_buckets

FORMAT = "commtrain.zero/1"


class ZeroOptimizer:
    """Wraps ``optimizer_factory(params) -> torch.optim.Optimizer``; see module docstring.

    Loop::

        zero.begin_step(step); loss.backward(); zero.step(max_grad_norm=1.0); zero.zero_grad()
    """

    def __init__(self, named_params, optimizer_factory: Callable, comm, stage: int = 1,
                 grad_codec: str = "none", param_codec: str | None = None, error_feedback: bool = True,
                 warmup_steps: int = 0, min_numel: int = 4096, bucket_mb: float = 4.0):
        if stage not in (0, 1, 2):
            raise ValueError(f"ZeroOptimizer: stage={stage!r} is invalid; allowed: 0, 1, 2")
        if stage == 0 and param_codec is not None:
            raise ValueError(f"ZeroOptimizer: param_codec={param_codec!r} needs stage 1 or 2 "
                             f"(stage 0 does not gather parameters)")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"ZeroOptimizer: warmup_steps={warmup_steps!r} is invalid; allowed: an integer >= 0")
        self.comm, self.stage, self.warmup_steps = comm, stage, warmup_steps
        self.world, self.rank = comm.world_size, comm.rank
        self.plain = build_codec("none")
        self.grad_codec = build_codec(grad_codec)
        if getattr(self.grad_codec, "needs_own_collective", False):
            raise ValueError(f"ZeroOptimizer: grad_codec={grad_codec!r} runs its own collective and cannot be "
                             f"reduce-scattered; use it with GradReducer (stage 0 via the reducer)")
        self.grad_wire = (ErrorFeedback(self.grad_codec) if error_feedback and not self.grad_codec.lossless
                          else self.grad_codec)
        self.param_codec = build_codec(param_codec) if param_codec is not None else self.plain
        self.buckets = build_buckets(named_params, bucket_mb, min_numel, pad_to=self.world)
        self.params = [p for b in self.buckets for p in b.params]
        self.chunks = [b.numel // self.world for b in self.buckets]
        self.step_count = 0
        if stage == 0:
            self.master = None
            self.optimizer = optimizer_factory(self.params)
        else:
            shard = [self._flat_params(b)[self.rank * c:(self.rank + 1) * c] for b, c in zip(self.buckets, self.chunks)]
            self.master = torch.nn.Parameter(torch.cat(shard))
            self.master.grad = torch.zeros_like(self.master)
            self.optimizer = optimizer_factory([self.master])

    # -- the loop -----------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Set the step number (drives warm-up); optional if steps are consecutive from 0."""
        self.step_count = int(step)

    def step(self, max_grad_norm: float = 0.0) -> torch.Tensor:
        """Reduce gradients, (clip,) update the shard, gather parameters. Returns the global
        gradient norm before clipping (of the averaged gradient; ``max_grad_norm=0``: no clip)."""
        compress = self.step_count >= self.warmup_steps
        handles = []
        for b in self.buckets:
            flat = b.flatten_grads(torch.empty(b.numel, dtype=torch.float32, device=b.device))
            codec = self.grad_wire if compress and b.compress else self.plain
            if self.stage == 2:
                handles.append(self.comm.reduce_scatter(flat, codec, channel="grad", op="mean", key=b.key, async_op=True))
                for p in b.params:  # stage 2 keeps only the reduced shard
                    p.grad = None
            else:
                handles.append(self.comm.all_reduce(flat, codec, channel="grad", op="mean", key=b.key, async_op=True))
        off = 0
        for b, c, h in zip(self.buckets, self.chunks, handles):
            out = h.wait()
            if self.stage < 2:
                for p, v in zip(b.params, b.views(out)):
                    if p.grad is None:
                        p.grad = v.to(p.dtype).clone()
                    else:
                        p.grad.copy_(v)
                out = out[self.rank * c:(self.rank + 1) * c] if self.stage == 1 else None
            if out is not None:
                self.master.grad[off:off + c].copy_(out)
            off += c
        norm = self._grad_norm()
        if max_grad_norm > 0:
            scale = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in self._own_grads():
                g.mul_(scale)
        self.optimizer.step()
        if self.stage > 0:
            self._gather_params(compress)
        self.step_count += 1
        return norm

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.master is not None:
            self.master.grad.zero_()

    def sync_params(self) -> None:
        """All-gather the master shards into the parameters (collective; e.g. after loading
        a sharded checkpoint without the model's own weights)."""
        if self.stage > 0:
            self._gather_params(self.step_count - 1 >= self.warmup_steps)

    # -- lr schedule ------------------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = value

    # -- reports / checkpoint ---------------------------------------------------------------------
    def memory_report(self) -> dict[str, int]:
        """Bytes held per rank right now: ``optimizer_state_bytes`` (wrapped optimizer's
        state tensors), ``grad_bytes`` (``param.grad`` + the reduced shard gradient),
        ``master_bytes`` (fp32 master shard), ``param_bytes`` (model parameters)."""
        opt = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                  for t in s.values() if torch.is_tensor(t))
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        master = 0
        if self.master is not None:
            master = self.master.numel() * self.master.element_size()
            grads += self.master.grad.numel() * self.master.grad.element_size()
        return {"stage": self.stage, "optimizer_state_bytes": opt, "grad_bytes": grads, "master_bytes": master,
                "param_bytes": sum(p.numel() * p.element_size() for p in self.params)}

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard. Format ``commtrain.zero/1``: ``stage``, ``rank``, ``world_size``,
        ``layout`` (per bucket: key, padded numel, param numels -- a resume must match it),
        ``master`` (fp32 shard = chunk ``rank`` of every bucket, concatenated; None at stage
        0), ``optimizer`` (wrapped optimizer's state_dict over ``[master]``, or over the
        params at stage 0), ``ef`` (gradient EF residuals by bucket key), ``codec_rng``,
        ``step``. One file per rank; the model's weights are saved separately."""
        return {"format": FORMAT, "stage": self.stage, "rank": self.rank, "world_size": self.world,
                "layout": self._layout(), "step": self.step_count,
                "master": None if self.master is None else self.master.detach().clone(),
                "optimizer": self.optimizer.state_dict(),
                "ef": self.grad_wire.state_dict() if self.grad_wire is not self.grad_codec else None,
                "codec_rng": {"grad": self.grad_codec.state_dict(), "param": self.param_codec.state_dict()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != FORMAT:
            raise ValueError(f"ZeroOptimizer.load_state_dict: format={state.get('format')!r}, expected {FORMAT!r}")
        for k, mine in (("stage", self.stage), ("rank", self.rank), ("world_size", self.world),
                        ("layout", self._layout())):
            if state[k] != mine:
                raise ValueError(f"ZeroOptimizer.load_state_dict: checkpoint {k}={state[k]!r} but this run has "
                                 f"{k}={mine!r} (a sharded checkpoint resumes only on the same layout)")
        if self.master is not None:
            with torch.no_grad():
                self.master.copy_(state["master"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["ef"] is not None and self.grad_wire is not self.grad_codec:
            self.grad_wire.load_state_dict(state["ef"])
        self.grad_codec.load_state_dict(state["codec_rng"]["grad"])
        self.param_codec.load_state_dict(state["codec_rng"]["param"])
        self.step_count = int(state["step"])

    # -- internals ---------------------------------------------------------------------------
    def _layout(self):
        return [[b.key, b.numel, [p.numel() for p in b.params]] for b in self.buckets]

    @staticmethod
    def _flat_params(b) -> torch.Tensor:
        flat = torch.zeros(b.numel, dtype=torch.float32, device=b.device)
        for o, p in zip(b.offsets, b.params):
            flat[o:o + p.numel()].copy_(p.detach().reshape(-1))
        return flat

    def _own_grads(self) -> list[torch.Tensor]:
        if self.master is None:
            return [p.grad for p in self.params if p.grad is not None]
        return [self.master.grad]

    def _grad_norm(self) -> torch.Tensor:
        # Stage 1 keeps the full averaged gradient in param.grad on every rank; stage 2 has
        # disjoint shards, so their squared norms are summed across ranks (one scalar).
        grads = [p.grad for p in self.params if p.grad is not None] if self.stage < 2 else [self.master.grad]
        sq = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for g in grads:
            sq += g.float().pow(2).sum()
        if self.stage == 2:
            sq = self.comm.all_reduce(sq.reshape(1), self.plain, channel="grad", op="sum")[0]
        return sq.sqrt()

    @torch.no_grad()
    def _gather_params(self, compress: bool) -> None:
        handles, off = [], 0
        for b, c in zip(self.buckets, self.chunks):
            codec = self.param_codec if compress and b.compress else self.plain
            handles.append(self.comm.all_gather_flat(self.master[off:off + c].detach(), codec, channel="param",
                                                     key=b.key + ".param", async_op=True))
            off += c
        for b, h in zip(self.buckets, handles):
            for p, v in zip(b.params, b.views(h.wait())):
                p.copy_(v)
