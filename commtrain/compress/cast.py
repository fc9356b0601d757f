"""``fp16`` and ``bf16``: 2-byte casts. Summable: a plain all-reduce can add them directly.

Math. C(x) = round_to_nearest_even(x) in the wire format (fp16: 10 mantissa bits, largest
finite value 65504; bf16: 7 mantissa bits, fp32's exponent range, largest finite value
(2 - 2^-7) * 2^127 ~ 3.39e38).

Range: finite values beyond the wire format's largest finite value ``fmax`` *saturate*: they
are sent as +-fmax instead of overflowing to +-inf. A gradient or activation that is large
but finite should stay finite (an inf poisons error-feedback residuals, optimizer state and
every later sum), and saturation is the smallest error the format allows for it; refusing
would stop a run for one outlier. Saturation is not silent: ``codec.saturated`` counts the
finite elements clamped so far, and the first time it happens a ``RuntimeWarning`` is
issued (once per codec instance). NaN stays NaN and +-inf inputs stay +-inf (only finite
values saturate), so a genuinely non-finite tensor is still reported as such downstream.

Cost: one read-only min/max pass over the input decides whether any finite value is out of
range (a host sync on CUDA); only then is the clamp applied. In-range inputs give the same
bytes as a plain cast.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .codec import Codec, register_codec
from .kernels.torch_ops import from_bytes, to_bytes


@dataclass
class _Cast(Codec):
    summable = True
    wire_dtype = torch.float16

    # Finite elements clamped to +-fmax so far (not a parameter: excluded from the spec).
    saturated: int = field(default=0, init=False, repr=False, compare=False)
    _warned: bool = field(default=False, init=False, repr=False, compare=False)

    def payload_nbytes(self, numel, dtype=None):
        return 2 * numel

    def encode(self, x, gen):
        fmax = torch.finfo(self.wire_dtype).max
        lo, hi = torch.aminmax(x)
        # NaN propagates through aminmax and fails both tests: it takes the careful path too.
        if not bool((hi <= fmax) & (lo >= -fmax)):
            big = torch.isfinite(x) & (x.abs() > fmax)
            n_big = int(big.sum())
            if n_big:
                x = torch.where(big, torch.copysign(torch.tensor(fmax, device=x.device), x), x)
                self._count_saturated(n_big, fmax)
        return to_bytes(x.to(self.wire_dtype))

    def _count_saturated(self, n: int, fmax: float) -> None:
        self.saturated += n
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.name}: {n} finite value(s) beyond +-{fmax:.6g} saturated to +-{fmax:.6g} "
                f"(counted in codec.saturated; further saturation is counted without a warning)",
                RuntimeWarning, stacklevel=4,
            )

    def decode(self, payload, numel):
        return from_bytes(payload, self.wire_dtype).float()


@register_codec("fp16")
class FP16(_Cast):
    """Round-to-nearest fp16; finite values beyond +-65504 saturate (counted, warned once)."""

    wire_dtype = torch.float16


@register_codec("bf16")
class BF16(_Cast):
    """Round-to-nearest bf16: fp32's range, 8 mantissa bits; finite values beyond bf16's
    largest finite value (~3.39e38, within 0.4% of fp32's) saturate like fp16's."""

    wire_dtype = torch.bfloat16
