"""``fp8``: 8-bit floating point (OCP FP8: E4M3 or E5M2) with a per-group fp32 scale.

Math. Each group of ``group`` consecutive elements (default 128, the granularity of
DeepSeek-V3 / Transformer-Engine block scaling; the last group may be partial) is divided by
scale = max|x_g| / FMAX (FMAX = 448 for e4m3, 57344 for e5m2) so that it spans the format's
whole range, then cast to fp8:

* ``rounding="nearest"``: round-to-nearest-even; relative error <= 2^-(m+1) (m = 3 or 2
  mantissa bits) for normal values, absolute error <= scale * 2^(emin - m - 1) in the
  subnormal range.
* ``rounding="stochastic"``: each value goes to one of its two neighbouring fp8 values with
  probability proportional to proximity (equivalent to adding uniform random bits below
  the kept mantissa and truncating, as in Wang et al., "Training Deep Neural Networks with
  8-bit Floating Point Numbers", NeurIPS 2018), subnormals included: unbiased.

Payload: [codes: n bytes of float8][scales: ceil(n / group) fp32]; x' = float(code) * scale.

NaN/Inf: a group holding a NaN or Inf stores a NaN scale and decodes entirely as NaN (e4m3fn
cannot represent inf at all); other groups are unaffected.
"""
from __future__ import annotations

from .codec import Codec, check_choice, check_range, register_codec
from .kernels.torch_ops import FP8_FORMATS, num_groups

ROUNDINGS = ("nearest", "stochastic")


@register_codec("fp8")
class FP8(Codec):
    format: str = "e4m3"
    rounding: str = "nearest"
    group: int = 128

    @property
    def unbiased(self) -> bool:
        return self.rounding == "stochastic"

    @property
    def contractive(self) -> bool:
        # Relative error <= 2^-(m+1) per normal value, and the group max is always normal.
        return self.rounding == "nearest"

    def validate(self):
        check_choice(self, "format", self.format, tuple(FP8_FORMATS))
        check_choice(self, "rounding", self.rounding, ROUNDINGS)
        check_range(self, "group", self.group, 1)

    def payload_nbytes(self, numel, dtype=None):
        return numel + 4 * num_groups(numel, self.group)

    def encode(self, x, gen):
        return self.ops(x.device).fp8_encode(x, self.format, self.group, self.rounding == "stochastic", gen)

    def decode(self, payload, numel):
        return self.ops(payload.device).fp8_decode(payload, numel, self.format, self.group)
