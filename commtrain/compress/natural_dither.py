"""``natural_dither``: natural dithering (Horváth, Ho, Horváth, Sahu, Canini, Richtárik,
"Natural Compression for Distributed Deep Learning", 2019, Sec. 4).

Math. Like QSGD, but the levels are powers of two instead of uniform: per bucket with
p-norm ||v||_p (p = 2 or inf, ``norm``), y_i = |v_i| / ||v||_p in [0, 1] is rounded to one
of its neighbouring levels among {0} U {2^-k : k = 0..s-1} (s = ``levels``) with

    P(up) = (y_i - lower) / (upper - lower)

so E[C(v)] = v (unbiased). Geometric levels spend resolution where the small coordinates of
a gradient are, and give a variance bound exponentially better in s than QSGD's uniform
levels for the same number of bits. As in ``qsgd``, an L2 norm beyond the fp32 range is
capped just below the fp32 maximum (still >= max|v_i|, so still unbiased): the output is
finite for every finite input.

Payload: [codes: ceil(n * (w + 1) / 8) bytes][norms: ceil(n / bucket) fp32], where
w = ceil(log2(s + 1)), code = j | (negative << w) and level j decodes as 0 (j = 0) or
2^(j - s) (j >= 1). ``levels`` <= 127 (one byte per code; 2^-126 is the smallest level).

NaN/Inf: a bucket holding a NaN or Inf stores a NaN norm and decodes entirely as NaN; other
buckets are unaffected.
"""
from __future__ import annotations

from .codec import Codec, check_choice, check_range, register_codec
from .kernels.torch_ops import level_payload_nbytes

NORMS = ("2", "inf")


@register_codec("natural_dither")
class NaturalDither(Codec):
    levels: int = 7  # 3 level bits + sign = 4 bits per element
    norm: str = "2"
    bucket: int = 512

    unbiased = True

    def validate(self):
        if not isinstance(self.norm, str):  # accept norm=2 / norm=float("inf") from dicts
            self.norm = {2: "2", float("inf"): "inf"}.get(self.norm, self.norm)
        check_range(self, "levels", self.levels, 1, 127)
        check_choice(self, "norm", self.norm, NORMS)
        check_range(self, "bucket", self.bucket, 1)

    def payload_nbytes(self, numel, dtype=None):
        return level_payload_nbytes(numel, self.levels, self.bucket)

    def encode(self, x, gen):
        return self.ops(x.device).level_encode(x, self.levels, self.bucket, self.norm, "pow2", gen)

    def decode(self, payload, numel):
        return self.ops(payload.device).level_decode(payload, numel, self.levels, self.bucket, "pow2")
