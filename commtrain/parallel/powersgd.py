"""PowerSGD all-reduce (Vogels, Karimireddy & Jaggi, 2019): rank-r power iteration with EF.

For each matrix-shaped gradient ``M`` (conv/linear weights reshaped to rows x rest), one
step on every rank is::

    M += e                     # error feedback: what earlier steps failed to send
    P = M Q                    # Q: n_cols x r, warm-started from the previous step
    P = all_reduce_mean(P)     # = mean(M) Q, because Q is identical on all ranks
    P = orthogonalize(P)       # identical on all ranks (identical input)
    Q = M^T P
    Q = all_reduce_mean(Q)     # = mean(M)^T P
    M_hat = P Q^T              # = P P^T mean(M): projection of the average onto span(P)
    e = M - M_hat              # local residual, kept for the next step

Only P and Q (r*(n+m) floats) cross the wire. Both are plain fp32 sums, so each phase is
*one* all-reduce for the whole bucket: all P factors (and the tensors too small or 1-D to
be worth compressing) are concatenated into one flat buffer, then all Q factors into
another. When ``r >= rank(mean M)`` the result is exact.
"""
from __future__ import annotations

import zlib
from typing import Any, Mapping

import torch

from ..compress import build_codec
from ..compress.powersgd import PowerSGD


def orthogonalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span(columns of p) via reduced QR (deterministic, stable)."""
    return torch.linalg.qr(p, mode="reduced").Q


class PowerSGDReducer:
    """Averages groups of gradients ("buckets", by ``key``) across ``comm`` with PowerSGD.

    ``reduce(key, grads)`` returns the averaged gradients (same shapes and dtypes). State
    per key: the EF residual and the warm-start Q of each compressed matrix.
    ``state_dict()`` holds both (they are part of the checkpoint: losing Q restarts the
    power iteration, losing e drops gradient mass).
    """

    def __init__(self, codec: PowerSGD | str, comm, error_feedback: bool = True, channel: str = "grad",
                 min_numel: int = 0):
        codec = build_codec(codec) if not isinstance(codec, PowerSGD) else codec
        if not isinstance(codec, PowerSGD):
            raise TypeError(f"PowerSGDReducer: codec must be a powersgd spec, got {codec!r}")
        self.codec = codec
        self.comm = comm
        self.error_feedback = error_feedback
        self.channel = channel
        self.min_numel = min_numel  # smaller tensors are sent raw (in the P all-reduce)
        self._none = build_codec("none")
        self.residuals: dict[str, list[torch.Tensor | None]] = {}
        self.qs: dict[str, list[torch.Tensor | None]] = {}
        self.calls: dict[str, int] = {}
        self._layouts: dict[str, list[tuple[int, ...]]] = {}

    # -- the step --------------------------------------------------------------------------
    def reduce(self, key: str, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        shapes = [self._matrix_shape(g) for g in grads]
        compressed = [s is not None for s in shapes]
        self._reset_if_layout_changed(key, grads, shapes)
        res, qs = self.residuals[key], self.qs[key]
        call = self.calls[key] = self.calls.get(key, 0) + 1

        mats: dict[int, torch.Tensor] = {}
        for i, g in enumerate(grads):
            if compressed[i]:
                m = g.detach().reshape(shapes[i]).float()
                if self.error_feedback and res[i] is not None:
                    m = m + res[i]
                mats[i] = m
                if qs[i] is None or not self.codec.warm_start:
                    qs[i] = self._fresh_q(key, i, shapes[i][1], call, g.device)

        # Phase 1: P = M Q for every matrix; one all-reduce with the uncompressed tensors.
        ps = {i: m @ qs[i] for i, m in mats.items()}
        raw = [grads[i].detach().reshape(-1).float() for i in range(len(grads)) if not compressed[i]]
        flat = self._all_reduce(torch.cat([p.reshape(-1) for p in ps.values()] + raw), key)
        out: list[torch.Tensor | None] = [None] * len(grads)
        off = 0
        for i, p in ps.items():
            ps[i] = orthogonalize(flat[off:off + p.numel()].view_as(p))
            off += p.numel()
        for i in range(len(grads)):
            if not compressed[i]:
                n = grads[i].numel()
                out[i] = flat[off:off + n].view(grads[i].shape)
                off += n

        # Phase 2: Q = M^T P, one all-reduce.
        if mats:
            new_q = {i: m.t() @ ps[i] for i, m in mats.items()}
            flat_q = self._all_reduce(torch.cat([q.reshape(-1) for q in new_q.values()]), key + ".q")
            off = 0
            for i, q in new_q.items():
                qs[i] = flat_q[off:off + q.numel()].view_as(q).clone()
                off += q.numel()
                approx = ps[i] @ qs[i].t()
                if self.error_feedback:
                    res[i] = mats[i] - approx
                out[i] = approx.view(grads[i].shape)
        return [o.to(g.dtype) for o, g in zip(out, grads)]

    # -- helpers -----------------------------------------------------------------------------
    def _matrix_shape(self, g: torch.Tensor) -> tuple[int, int] | None:
        if g.dim() < 2 or g.numel() == 0 or g.numel() < self.min_numel:
            return None
        n, m = g.shape[0], g.numel() // g.shape[0]
        return (n, m) if self.codec.compresses(n, m) else None

    def _reset_if_layout_changed(self, key, grads, shapes) -> None:
        # A DDP bucket index may be re-used for a different set of tensors after DDP rebuilds
        # its buckets (first iteration); stale state of another shape is dropped, not misapplied.
        layout = [tuple(g.shape) for g in grads]
        if self._layouts.get(key) != layout:
            self.residuals[key] = [None] * len(grads)
            self.qs[key] = [None] * len(grads)
            self._layouts[key] = layout

    def _fresh_q(self, key: str, i: int, cols: int, call: int, device) -> torch.Tensor:
        # Identical on every rank: seeded by (codec seed, bucket key, tensor index[, call]).
        seed = zlib.crc32(f"{self.codec.seed}/{key}/{i}".encode())
        if not self.codec.warm_start:
            seed = (seed + 1_000_003 * call) % (2**63)
        g = torch.Generator().manual_seed(seed)
        r = min(self.codec.rank, cols)
        return torch.randn(cols, r, generator=g).to(device)

    def _all_reduce(self, flat: torch.Tensor, key: str) -> torch.Tensor:
        return self.comm.all_reduce(flat, self._none, channel=self.channel, op="mean")

    # -- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {k: list(v) for k, v in self.residuals.items()},
                "q": {k: list(v) for k, v in self.qs.items()},
                "layouts": dict(self._layouts),
                "calls": dict(self.calls)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.residuals = {k: list(v) for k, v in state["residuals"].items()}
        self.qs = {k: list(v) for k, v in state["q"].items()}
        self._layouts = {k: list(v) for k, v in state.get("layouts", {}).items()}
        self.calls = dict(state.get("calls", {}))
