"""The one codec protocol of the wire: what a collective needs of whatever it carries.

A :class:`commtrain.compress.Codec` and an :class:`commtrain.compress.ErrorFeedback` wrapper
both satisfy it; comm never asks which one it holds. ``compress`` is always called with a
``key`` (``f"{tensor key}/{phase}"`` inside a collective, or None for a one-off tensor):
stateless codecs ignore it, error feedback keeps one residual per key. Both ends compute
every packet size from the element count with ``payload_nbytes``, so no size is exchanged.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from commtrain.compress import Packet


@runtime_checkable
class WireCodec(Protocol):
    @property
    def spec(self) -> str: ...

    @property
    def lossless(self) -> bool: ...

    def payload_nbytes(self, numel: int, dtype: torch.dtype) -> int: ...

    def summable_dtype(self, dtype: torch.dtype) -> torch.dtype | None: ...

    def compress(self, x: torch.Tensor, *, key: str | None = None) -> Packet: ...

    def decompress(self, pkt: Packet) -> torch.Tensor: ...


def check_codec(codec) -> None:
    if not isinstance(codec, WireCodec):
        raise TypeError(
            f"codec={codec!r} is invalid: the wire carries a Codec from commtrain.compress.build_codec(...) "
            f"or an ErrorFeedback wrapper (compress/decompress/payload_nbytes/summable_dtype)"
        )


def compress(codec: WireCodec, x: torch.Tensor, key: str | None, phase: str) -> torch.Tensor:
    """The payload bytes of ``x``; the key a stateful codec sees is ``f"{key}/{phase}"``."""
    pkt = codec.compress(x, key=None if key is None else f"{key}/{phase}")
    return pkt.payload


def decompress(codec: WireCodec, payload: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    return codec.decompress(Packet(payload, torch.Size(shape), dtype))
