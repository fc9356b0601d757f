"""``qsgd``: QSGD stochastic quantisation (Alistarh et al., "QSGD: Communication-Efficient SGD
via Gradient Quantization and Encoding", NeurIPS 2017).

Math. Per bucket of ``bucket`` consecutive elements with L2 norm ||v||, each element is sent
as sign(v_i) and a level l_i in 0..s (s = ``levels``) with

    l_i = floor(s * |v_i| / ||v|| + u_i),  u_i ~ U[0, 1)

and decodes to ||v|| * sign(v_i) * l_i / s. E[l_i] = s |v_i| / ||v||, so the codec is
unbiased; its variance is bounded by min(n/s^2, sqrt(n)/s) ||v||^2 (Lemma 3.1 of the paper).
The norm is computed as amax * ||v / amax|| so that it does not overflow for large finite
values. A bucket whose ||v|| itself exceeds the fp32 range (finite values within a factor
sqrt(bucket) of the fp32 maximum) uses the largest fp32 norm below the maximum instead: any
norm >= max|v_i| keeps the codec unbiased (and lowers its variance), so the output is finite
for every finite input, and inputs of normal size give the same bytes as before.

Payload: [codes: ceil(n * (w + 1) / 8) bytes][norms: ceil(n / bucket) fp32], where
w = ceil(log2(s + 1)) and code = level | (negative << w) (layout in
``kernels/torch_ops.py``). ``levels`` is limited to 127 so a code fits in one byte.

NaN/Inf: a bucket holding a NaN or Inf stores a NaN norm and decodes entirely as NaN; other
buckets are unaffected.
"""
from __future__ import annotations

from .codec import Codec, check_range, register_codec
from .kernels.torch_ops import level_payload_nbytes


@register_codec("qsgd")
class QSGD(Codec):
    levels: int = 7  # 3 level bits + sign = 4 bits per element
    bucket: int = 512

    unbiased = True

    def validate(self):
        check_range(self, "levels", self.levels, 1, 127)
        check_range(self, "bucket", self.bucket, 1)

    def payload_nbytes(self, numel, dtype=None):
        return level_payload_nbytes(numel, self.levels, self.bucket)

    def encode(self, x, gen):
        return self.ops(x.device).level_encode(x, self.levels, self.bucket, "2", "uniform", gen)

    def decode(self, payload, numel):
        return self.ops(payload.device).level_decode(payload, numel, self.levels, self.bucket, "uniform")
