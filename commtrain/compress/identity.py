"""``none``: the raw tensor bytes in the input's own dtype, bit-exact.

The uncompressed baseline, carried on the same code path as every other codec.
"""
from __future__ import annotations

from .codec import Codec, register_codec
from .kernels.torch_ops import from_bytes, to_bytes


@register_codec("none")
class Identity(Codec):
    lossless = True
    summable = True
    native_dtype = True

    def payload_nbytes(self, numel, dtype=None):
        return numel * (dtype.itemsize if dtype is not None else 4)

    def encode(self, x, gen):
        return to_bytes(x)

    def decode(self, payload, numel, dtype):
        return from_bytes(payload, dtype)
