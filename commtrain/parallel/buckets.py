"""Gradient buckets: flat groups of parameters, in the order backward produces them (as DDP).

Shared by every data-parallel sync (the overlapped reducer and ZeRO). A bucket holds only
compressible parameters or only plain ones (small and 1-D tensors: biases, norms -- a
negligible share of the bytes but hurt most by lossy codecs); see
:meth:`commtrain.parallel.compression.GradCompression.eligible`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch


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
