"""``topk``: keep the k largest-magnitude elements (Aji & Heafield, "Sparse Communication for
Distributed Gradient Descent", EMNLP 2017; Stich et al., "Sparsified SGD with Memory",
NeurIPS 2018).

Math. C(x)_i = x_i for the k indices of largest |x_i|, 0 elsewhere. Biased but contractive:
||C(x) - x||^2 <= (1 - k/n) ||x||^2, the property that makes it converge with
:class:`~commtrain.compress.error_feedback.ErrorFeedback`.

Payload: [values: k x value_dtype (fp32 default, or fp16/bf16)][indices: k x index type],
index type uint16 when n <= 65536, else int32 (little endian); k from ``ratio``/``k`` (see
``Sparsifier`` below). Indices are in no particular order.

NaN/Inf: the whole tensor is top-k's group. Non-finite elements rank first, so if any exists
at least one transmitted value is non-finite, and the decoder then returns all NaN (a
dropped NaN/Inf is never silently turned into 0). value_dtype fp16 overflows beyond 65504
(which then also decodes as all NaN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .codec import Codec, check_choice, check_range, register_codec
from .kernels.torch_ops import from_bytes, to_bytes

DEFAULT_RATIO = 0.01
VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Sparsifier(Codec):
    """Shared by ``topk`` and ``randomk``: keeps k of n elements. Exactly one of ``ratio``
    (0 < r <= 1; k = max(1, ceil(r n))) and ``k`` (>= 1) may be given; with neither,
    ratio = 0.01. k is capped at n."""

    ratio: Optional[float] = None
    k: Optional[int] = None
    value_dtype: str = "fp32"

    def validate(self):
        if self.ratio is not None and self.k is not None:
            raise ValueError(f"{self.name}: give exactly one of ratio={self.ratio!r} and k={self.k!r}, not both")
        if self.ratio is not None:
            check_range(self, "ratio", self.ratio, 0, 1)
            if self.ratio == 0:
                raise ValueError(f"{self.name}: ratio=0 is invalid; allowed: 0 < ratio <= 1")
        if self.k is not None:
            if not isinstance(self.k, int) or isinstance(self.k, bool):
                raise ValueError(f"{self.name}: k={self.k!r} is invalid; allowed: an integer >= 1")
            check_range(self, "k", self.k, 1)
        check_choice(self, "value_dtype", self.value_dtype, tuple(VALUE_DTYPES))

    def num_kept(self, numel: int) -> int:
        if self.k is not None:
            return min(numel, self.k)
        ratio = DEFAULT_RATIO if self.ratio is None else self.ratio
        return min(numel, max(1, math.ceil(ratio * numel)))

    @property
    def _vdtype(self) -> torch.dtype:
        return VALUE_DTYPES[self.value_dtype]


def index_dtype(numel: int) -> torch.dtype:
    return torch.uint16 if numel <= 65536 else torch.int32


def poison_if_nonfinite(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """All-NaN output when any transmitted value is non-finite (no host sync)."""
    return torch.where(torch.isfinite(values).all(), out, float("nan"))


@register_codec("topk")
class TopK(Sparsifier):
    contractive = True

    def payload_nbytes(self, numel, dtype=None):
        k = self.num_kept(numel)
        return k * self._vdtype.itemsize + k * index_dtype(numel).itemsize

    def encode(self, x, gen):
        n, k = x.numel(), self.num_kept(x.numel())
        key = torch.where(torch.isfinite(x), x.abs(), float("inf"))
        idx = torch.topk(key, k, sorted=False).indices
        values = x[idx].to(self._vdtype)
        return torch.cat([to_bytes(values), to_bytes(idx.to(torch.int32).to(index_dtype(n)))])

    def decode(self, payload, numel):
        k = self.num_kept(numel)
        nv = k * self._vdtype.itemsize
        values = from_bytes(payload[:nv], self._vdtype).float()
        idx = from_bytes(payload[nv:], index_dtype(numel)).to(torch.int64)
        out = torch.zeros(numel, dtype=torch.float32, device=payload.device)
        out[idx] = values
        return poison_if_nonfinite(values, out)
