"""Codecs: Tensor -> Packet (packed uint8 bytes) -> Tensor, built by name from one registry.

>>> from commtrain.compress import build_codec
>>> codec = build_codec("quant:bits=4,group=128")
>>> pkt = codec.compress(x); y = codec.decompress(pkt)
"""
from .codec import Codec, available_codecs, build_codec, codec_class, parse_spec, register_codec
from .packet import Packet

# Importing a codec module registers it (one algorithm per small file).
from . import identity, cast  # noqa: E402,F401
from . import quant, qsgd, natural, natural_dither, topk, randomk, fp8, powersgd  # noqa: E402,F401
from .error_feedback import ErrorFeedback  # noqa: E402

__all__ = [
    "Codec", "ErrorFeedback", "Packet", "available_codecs", "build_codec", "codec_class", "parse_spec",
    "register_codec",
]
