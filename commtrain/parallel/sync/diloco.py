"""Communication-avoiding data parallelism: a DiLoCo-class outer loop (``sync.strategy=diloco``).

DiLoCo (Douillard et al., 2023): every replica runs ``H`` inner optimizer steps (AdamW) on its
own data with no communication at all; then the replicas average their *pseudo-gradients*
and an outer optimizer moves the shared global weights::

    inner:  theta_i <- inner_opt(theta_i, grad_i)            H times, per replica, no traffic
    outer:  delta_i  = theta_global - theta_i                 the replica's pseudo-gradient
            delta    = mean_i C(delta_i + e_i)                compressed all-reduce, error feedback
            m        = mu * m + delta                         outer momentum
            theta_global <- theta_global - lr * (delta + mu * m)   (Nesterov; plain SGD: - lr * delta)
            theta_i  <- theta_global                          every replica restarts from it

With ``outer_optimizer=sgd`` and ``outer_lr=1`` the outer step is plain parameter averaging.
The inner optimizer's state stays per replica (it is never averaged), as in DiLoCo.

Streaming DiLoCo (2025): with ``fragments=F`` the parameters are split into F contiguous
fragments of about equal size, and fragment ``f`` syncs after inner steps
``n = (f + 1) * H / F (mod H)`` -- one fragment every H/F steps, so the link carries 1/F of the
model at a time instead of all of it every H steps (lower peak bandwidth, same bytes).

Overlap (``overlap=true``, Streaming DiLoCo / PCCL / DiLoCoX style): the pseudo-gradient
all-reduce starts right after inner step ``n`` and runs on the communicator's worker thread
while the next ``overlap_steps`` (tau) inner steps compute; its result is applied after inner
step ``n + tau``. By then replica i has moved on by its own tau inner steps, ``d_i``. The update
applied is the one the synchronous loop would apply -- the move from this replica's
parameters at the sync, ``theta_i(n) = theta_global - delta_i``, to the new global weights --
added to the current parameters::

    theta_i <- theta_i(n + tau) + (theta_global_new - theta_i(n))
             = theta_global_new + d_i

so the tau inner steps taken meanwhile are kept, not thrown away (replicas then differ by
their own d_i, as they would after tau inner steps of the next round; the next
pseudo-gradient is taken against ``theta_global_new`` and carries d_i to the others).
Without overlap (tau = 0) this is exactly ``theta_i <- theta_global_new``, bit-identical on
every replica. The bytes sent are the same with overlap on or off; only when they are
waited for changes.

Pseudo-gradients go through :class:`GradCompression` (``sync.codec``, ``sync.error_feedback``;
small and 1-D tensors are sent raw as everywhere, ``compression.min_numel``). The checkpoint
holds the global weights, the outer momentum, the error-feedback residuals, the step (which
fixes the fragment phase) and any sync still in flight, so a resumed run reproduces the
uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Mapping

import torch

from ..buckets import Bucket, build_buckets
from ..compression import CompressionConfig, GradCompression
from . import SYNCS, SyncConfig, Veto, clip_, grad_norm

FORMAT = "commtrain.diloco/1"


@SYNCS.register("diloco")
class DiLoCo:
    """The outer loop over ``comm`` (the data-parallel group; a pipeline stage's replicas)."""

    def __init__(self, named_params, optimizer_factory, comm, compression: CompressionConfig | None = None,
                 bucket_mb: float = 4.0, overlap: bool = True, config: SyncConfig | None = None):
        cfg = self.cfg = config if config is not None else SyncConfig(strategy="diloco")
        cc = compression if compression is not None else CompressionConfig()
        named = [(n, p) for n, p in named_params if p.requires_grad]
        if cfg.fragments > len(named):
            raise ValueError(f"sync.fragments={cfg.fragments} is invalid for this model: it has {len(named)} "
                             f"parameter tensors (on this pipeline stage); allowed: 1..{len(named)}")
        self.comm = comm
        self.params = [p for _, p in named]
        self.optimizer = optimizer_factory(self.params)
        # The pseudo-gradient's compression: its own codec, EF, no warm-up (the first sync is
        # already H steps in), compressed as asked on any link.
        self.compression = GradCompression(
            dataclasses.replace(cc, grad=cfg.codec, error_feedback=cfg.error_feedback, warmup_steps=0, policy="always"),
            comm)
        self.fragments = self._split(named, cfg.fragments, bucket_mb, cc.min_numel)
        # Global weights and outer momentum, flat fp32 per bucket (identical on every replica).
        self.global_ = [[self._flat(b).clone() for b in frag] for frag in self.fragments]
        self.momentum = [[torch.zeros_like(g) for g in frag] for frag in self.global_]
        self.tau = cfg.overlap_steps if overlap and cfg.overlap else 0
        self.inner_steps = 0  # inner optimizer steps taken (fixes the fragment phase)
        self._inflight: list[dict[str, Any]] = []  # started syncs: fragment, due step, deltas, handles
        self._last_sync = [0] * len(self.fragments)  # inner step after which each fragment last synced

    # -- the GradSync interface ---------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def begin_step(self, step: int) -> None:
        pass  # the outer schedule counts inner steps taken (a vetoed step is none)

    def no_sync(self):
        return contextlib.nullcontext()  # inner steps never communicate

    def step(self, max_grad_norm: float = 0.0, veto: Veto | None = None) -> dict[str, Any]:
        """One inner step (local clip + inner optimizer), then the outer-loop work due now:
        apply syncs whose delay has passed, start the sync of the fragment whose turn it is.
        A vetoed step (the caller's agreed non-finite guard) changes nothing, the outer
        schedule included: it does not count as an inner step."""
        norm = grad_norm((p.grad for p in self.params if p.grad is not None), self.params[0].device)
        if veto is not None and veto(norm):
            return {"grad_norm": float(norm), "skipped": True, **self.compression.stats()}
        clip_([p.grad for p in self.params if p.grad is not None], norm, max_grad_norm)
        self.optimizer.step()
        self.inner_steps += 1
        events = []
        for sync in [s for s in self._inflight if s["due"] <= self.inner_steps]:
            events.append(self._finish(sync))
        f = self._fragment_due(self.inner_steps)
        if f is not None:
            self._start(f)
            if self.tau == 0:
                events.append(self._finish(self._inflight[-1]))
        stats: dict[str, Any] = {"grad_norm": float(norm), "skipped": False, **self.compression.stats()}
        if events:
            stats["outer_syncs"] = events
        return stats

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def finalize(self) -> dict[str, Any]:
        """After the last step: apply the syncs still in flight, then sync every fragment that
        took inner steps since its last sync, synchronously, so that every replica ends holding
        the same final global weights (what is evaluated, saved and exported)."""
        events = [self._finish(s) for s in list(self._inflight)]
        tau, self.tau = self.tau, 0
        try:
            for f in range(len(self.fragments)):
                if self._steps_since_sync(f):
                    self._start(f)
                    events.append(self._finish(self._inflight[-1]))
        finally:
            self.tau = tau
        return {"outer_syncs": events} if events else {}

    def memory_report(self) -> dict[str, int]:
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        flat = [t for frag in self.global_ for t in frag]
        return {"grad_bytes": nbytes(p.grad for p in self.params if p.grad is not None),
                "peak_grad_bytes": nbytes(self.params), "optimizer_state_bytes": _state_bytes(self.optimizer),
                "outer_state_bytes": 2 * nbytes(flat), "param_bytes": nbytes(self.params)}

    def close(self) -> None:
        pass

    # -- the outer loop ---------------------------------------------------------------------------
    def _fragment_due(self, n: int) -> int | None:
        """The fragment whose sync starts after inner step ``n``, if any."""
        H, F = self.cfg.inner_steps, len(self.fragments)
        for f in range(F):
            if n % H == ((f + 1) * H // F) % H:
                return f
        return None

    def _steps_since_sync(self, f: int) -> int:
        """Inner steps fragment ``f`` has taken since its last sync started."""
        return self.inner_steps - self._last_sync[f]

    def _start(self, f: int) -> None:
        sent = self._sent_bytes()  # before the worker can meter any of this sync's bytes
        deltas, handles = [], []
        for b, g in zip(self.fragments[f], self.global_[f]):
            delta = g - self._flat(b)  # theta_global - theta_i, in fp32
            deltas.append(delta)
            # Round = the outer round of this fragment; GradCompression only needs it >= 0.
            handles.append(self.compression.all_reduce(b, delta, step=self.inner_steps))
        self._last_sync[f] = self.inner_steps
        self._inflight.append(dict(fragment=f, started=self.inner_steps, due=self.inner_steps + self.tau,
                                   deltas=deltas, handles=handles, mean=None, sent=sent))

    def _finish(self, sync: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        means = sync["mean"] if sync["mean"] is not None else [self._result(b, h) for b, h in
                                                                 zip(self.fragments[sync["fragment"]], sync["handles"])]
        exposed = time.perf_counter() - t0
        f = sync["fragment"]
        mu, lr = self.cfg.outer_momentum, self.cfg.outer_lr
        with torch.no_grad():
            for b, g, m, delta, mean in zip(self.fragments[f], self.global_[f], self.momentum[f], sync["deltas"], means):
                if self.cfg.outer_optimizer == "nesterov":
                    m.mul_(mu).add_(mean)
                    update = mean + mu * m
                else:
                    update = mean
                new = g - lr * update
                if self.tau == 0:
                    self._assign(b, new)  # every replica restarts from the new global weights
                else:  # keep the tau inner steps taken since the sync started (module docstring)
                    self._assign(b, self._flat(b) + (new - g) + delta)
                g.copy_(new)
        self._inflight.remove(sync)
        return {"fragment": f, "started_after_step": sync["started"], "applied_after_step": self.inner_steps,
                "bytes": self._sent_bytes() - sync["sent"], "exposed_s": exposed}

    @staticmethod
    def _result(b: Bucket, handle) -> torch.Tensor:
        out = handle.wait()
        return torch.cat([v.reshape(-1) for v in out]) if isinstance(out, list) else out.reshape(-1)

    def _sent_bytes(self) -> int:
        # lifetime bytes: the trainer resets the meter's per-step counts between start and finish
        meter = getattr(self.comm, "meter", None)
        return int(meter.lifetime_bytes["grad"]) if meter is not None else 0

    # -- layout ------------------------------------------------------------------------------------
    @staticmethod
    def _split(named, n_fragments: int, bucket_mb: float, min_numel: int) -> list[list[Bucket]]:
        """F contiguous fragments of about equal numel (each at least one tensor), each laid
        out in buckets as the per-step reducer would (compressible / small-and-1-D streams)."""
        total = sum(p.numel() for _, p in named)
        groups: list[list] = [[] for _ in range(n_fragments)]
        f, cum = 0, 0
        for i, (n, p) in enumerate(named):
            must_move = len(named) - i <= n_fragments - f - 1  # leave one tensor per later fragment
            if groups[f] and f < n_fragments - 1 and (cum >= total * (f + 1) / n_fragments or must_move):
                f += 1
            groups[f].append((n, p))
            cum += p.numel()
        out = []
        for f, group in enumerate(groups):
            buckets = build_buckets(group, bucket_mb, min_numel)
            for b in buckets:
                b.key = f"frag{f}/{b.key}"
            out.append(buckets)
        return out

    @staticmethod
    def _flat(b: Bucket) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).float() for p in b.params])

    @staticmethod
    def _assign(b: Bucket, flat: torch.Tensor) -> None:
        for p, v in zip(b.params, b.views(flat)):
            p.copy_(v)

    # -- checkpoint --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Inner optimizer state, global weights, outer momentum, EF residuals, the step (the
        fragment phase) and every sync in flight (its own delta and the reduced mean: waiting
        for it here changes nothing, the update is still applied at its due step)."""
        inflight = []
        for s in self._inflight:
            if s["mean"] is None:
                s["mean"] = [self._result(b, h) for b, h in zip(self.fragments[s["fragment"]], s["handles"])]
            inflight.append({k: s[k] for k in ("fragment", "started", "due", "deltas", "mean")})
        return {"format": FORMAT, "optimizer": self.optimizer.state_dict(), "inner_steps": self.inner_steps,
                "last_sync": list(self._last_sync),
                "global": self.global_, "momentum": self.momentum, "inflight": inflight,
                "compression": self.compression.state_dict(), "layout": self._layout()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != FORMAT:
            raise ValueError(f"DiLoCo.load_state_dict: format={state.get('format')!r}, expected {FORMAT!r} "
                             f"(a checkpoint of another sync strategy)")
        if state["layout"] != self._layout():
            raise ValueError("DiLoCo.load_state_dict: the checkpoint's fragments/buckets differ from this run's "
                             "(sync.fragments, parallel.bucket_mb or the model changed)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.inner_steps = int(state["inner_steps"])
        self._last_sync = [int(n) for n in state["last_sync"]]
        with torch.no_grad():
            for mine, theirs in ((self.global_, state["global"]), (self.momentum, state["momentum"])):
                for a, b in zip(mine, theirs):
                    for x, y in zip(a, b):
                        x.copy_(y)
        self.compression.load_state_dict(state["compression"])
        self._inflight = [dict(s, handles=None, sent=self._sent_bytes()) for s in state["inflight"]]

    def _layout(self):
        return [[[b.key, b.numel, [p.numel() for p in b.params]] for b in frag] for frag in self.fragments]


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
