"""``randomk``: keep k elements chosen uniformly at random (Stich et al., "Sparsified SGD with
Memory", NeurIPS 2018; Wangni et al., "Gradient Sparsification for Communication-Efficient
Distributed Optimization", NeurIPS 2018).

Math. S is a uniformly random k-subset of {0..n-1}; C(x)_i = (n/k) x_i for i in S when
``unbiased=True`` (E[C(x)] = x, variance (n/k - 1) ||x||^2), or x_i without scaling when
``unbiased=False`` (contractive: E||C(x) - x||^2 = (1 - k/n) ||x||^2).

Payload: [seed: int64][values: k x value_dtype]. Only the 8-byte seed crosses the wire for
the indices: both ends regenerate S = randperm(n, generator=CPU Generator(seed))[:k], so the
pairing is exact across devices (hence ``needs_shared_seed``). The seed is drawn from the
codec's own generator, so successive calls pick fresh subsets.

NaN/Inf: the whole tensor is the group. If any element is non-finite, the encoder sends NaN
values and the whole tensor decodes as NaN (a non-sampled NaN/Inf is never silently 0).
Finite inputs give finite outputs: a sent value (n/k) x_i beyond the value dtype's range
(fp32 near its maximum, or fp16 beyond 65504) saturates at +-max of that dtype instead of
becoming inf (biased for those elements only; unscaled values never exceed fp32's range).
"""
from __future__ import annotations

import torch

from .codec import register_codec
from .kernels.torch_ops import from_bytes, to_bytes
from .topk import Sparsifier, poison_if_nonfinite


def shared_indices(seed: int, numel: int, k: int, device) -> torch.Tensor:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return torch.randperm(numel, generator=g)[:k].to(device)


@register_codec("randomk")
class RandomK(Sparsifier):
    unbiased: bool = True
    needs_shared_seed = True

    @property
    def contractive(self) -> bool:
        return not self.unbiased

    def validate(self):
        super().validate()
        if not isinstance(self.unbiased, bool):
            raise ValueError(f"{self.name}: unbiased={self.unbiased!r} is invalid; allowed: true, false")

    def payload_nbytes(self, numel, dtype=None):
        return 8 + self.num_kept(numel) * self._vdtype.itemsize if numel else 0

    def _scale(self, numel, k):
        return numel / k if self.unbiased else 1.0

    def encode(self, x, gen):
        n, k = x.numel(), self.num_kept(x.numel())
        seed = torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).cpu()
        values = x[shared_indices(int(seed), n, k, x.device)] * self._scale(n, k)
        vmax = torch.finfo(self._vdtype).max  # saturate: finite x never becomes inf
        values = torch.where(torch.isfinite(x).all(), values.clamp(-vmax, vmax), float("nan")).to(self._vdtype)
        return torch.cat([to_bytes(seed.to(torch.int64)).to(x.device), to_bytes(values)])

    def decode(self, payload, numel):
        k = self.num_kept(numel)
        seed = int(from_bytes(payload[:8].cpu(), torch.int64))
        values = from_bytes(payload[8:], self._vdtype).float()
        out = torch.zeros(numel, dtype=torch.float32, device=payload.device)
        out[shared_indices(seed, numel, k, payload.device)] = values
        return poison_if_nonfinite(values, out)
