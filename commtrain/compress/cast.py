"""``fp16`` and ``bf16``: 2-byte casts. Summable: a plain all-reduce can add them directly."""
from __future__ import annotations

import torch

from .codec import Codec, register_codec
from .kernels.torch_ops import from_bytes, to_bytes


class _Cast(Codec):
    summable = True
    wire_dtype = torch.float16

    def payload_nbytes(self, numel, dtype=None):
        return 2 * numel

    def encode(self, x, gen):
        return to_bytes(x.to(self.wire_dtype))

    def decode(self, payload, numel):
        return from_bytes(payload, self.wire_dtype).float()


@register_codec("fp16")
class FP16(_Cast):
    """Round-to-nearest fp16. Values beyond +-65504 become +-inf (documented overflow)."""

    wire_dtype = torch.float16


@register_codec("bf16")
class BF16(_Cast):
    """Round-to-nearest bf16: fp32's range, 8 mantissa bits."""

    wire_dtype = torch.bfloat16
