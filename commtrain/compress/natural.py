"""``natural``: natural compression (Horváth et al., "Natural Compression for Distributed
Deep Learning", 2019, Sec. 3): every element becomes a signed power of two.

Math. For 2^e <= |x| < 2^(e+1), C(x) = sign(x) * 2^(e+1) with probability
p = (|x| - 2^e) / 2^e and sign(x) * 2^e otherwise, so E[C(x)] = x and
E[C(x)^2] <= 9/8 x^2 (Theorem 1 of the paper): the variance costs at most 1/8 of x^2,
while the mantissa (23 bits) is dropped entirely.

Payload: [codes: n bytes][top: int32] -- 8 bits per element instead of the paper's 9, by
clipping the exponent to a per-tensor window of 126 exponents 2^(top-125) .. 2^top, with
top = floor(log2 max|x|) + 1 over the finite elements (at most 127). Byte = (sign << 7) | k,
k in 1..126 meaning 2^(top - 126 + k); 0x00 is zero, 0x80 NaN, 0x7F +inf, 0xFF -inf.

* Values below the window (|x| < 2^(top-125), i.e. 2^-125 times the largest one) are
  rounded stochastically to 0 or 2^(top-125), still unbiased; for them the 9/8 second
  moment bound is replaced by E[C(x)^2] = |x| 2^(top-125) (a variance <= 2^-250 max|x|^2).
* Values >= 2^127 (the top binade of fp32) saturate at 2^127 instead of rounding up to an
  unrepresentable 2^128: biased, but only within a factor 2 of fp32's maximum. Likewise
  fp16 inputs within a factor 2 of 65504 may round up to 65536, which is inf in fp16.

NaN/Inf: elementwise -- NaN decodes as NaN, +-inf as +-inf, and the window is computed over
finite values only, so other elements are unaffected.
"""
from __future__ import annotations

from .codec import Codec, register_codec


@register_codec("natural")
class Natural(Codec):
    unbiased = True

    def payload_nbytes(self, numel, dtype=None):
        return numel + 4 if numel else 0  # the base sends nothing for an empty tensor

    def encode(self, x, gen):
        return self.ops(x.device).natural_encode(x, gen)

    def decode(self, payload, numel):
        return self.ops(payload.device).natural_decode(payload, numel)
