"""How the wire talks to a codec, duck-typed: a Codec or an ErrorFeedback wrapper.

Collectives never look inside a codec. They need four things from it: ``compress``
(an ErrorFeedback wrapper's also takes ``key=``: its residual is kept per tensor *and per
phase*, so we pass ``f"{key}/{phase}"``), ``decompress``, ``payload_nbytes`` (both ends
compute every packet size from the element count, so no size exchange is needed), and
whether the payload may be summed by a plain all-reduce.
"""
from __future__ import annotations

import functools
import inspect

import torch

from commtrain.compress import Packet


def check_codec(codec) -> None:
    for attr in ("compress", "decompress"):
        if not callable(getattr(codec, attr, None)):
            raise TypeError(
                f"codec={codec!r} is invalid: it has no {attr}(); pass a Codec from "
                f"commtrain.compress.build_codec(...) or an ErrorFeedback wrapper"
            )


@functools.lru_cache(maxsize=None)
def _compress_takes_key(cls: type) -> bool:
    try:
        return "key" in inspect.signature(cls.compress).parameters
    except (TypeError, ValueError):
        return False


def _inner(codec):
    """The wrapped codec of an ErrorFeedback-style wrapper (or the codec itself)."""
    for attr in ("codec", "inner", "base"):
        inner = getattr(codec, attr, None)
        if inner is not None and callable(getattr(inner, "compress", None)):
            return inner
    return codec


def compress(codec, x: torch.Tensor, key: str | None, phase: str) -> Packet:
    if _compress_takes_key(type(codec)):
        if key is None:
            raise ValueError(
                f"key=None is invalid with {type(codec).__name__}: error feedback keeps a residual "
                f"per tensor, so every call needs a stable key (e.g. the parameter/bucket name)"
            )
        return codec.compress(x, key=f"{key}/{phase}")
    return codec.compress(x)


def decompress(codec, payload: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    return codec.decompress(Packet(payload, torch.Size(shape), dtype))


def payload_nbytes(codec, numel: int, dtype: torch.dtype) -> int:
    fn = getattr(codec, "payload_nbytes", None) or getattr(_inner(codec), "payload_nbytes")
    return int(fn(int(numel), dtype))


def summable_dtype(codec, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype in which this codec's payload can be summed by ``dist.all_reduce``, or None.

    ``none`` (lossless, carries the input's own dtype) sums in the input dtype; the casts
    declare ``wire_dtype``. A codec that says ``summable`` but whose payload is not a plain
    array of one float dtype (checked via its size) takes the compressed path instead.
    """
    if not getattr(codec, "summable", getattr(_inner(codec), "summable", False)):
        return None
    base = _inner(codec)
    if getattr(base, "lossless", False) and getattr(base, "native_dtype", False):
        wd = dtype
    else:
        wd = getattr(codec, "wire_dtype", None) or getattr(base, "wire_dtype", None)
    if not isinstance(wd, torch.dtype) or not wd.is_floating_point:
        return None
    if payload_nbytes(codec, 7, dtype) != 7 * wd.itemsize:
        return None
    return wd


def is_lossless(codec) -> bool:
    return bool(getattr(codec, "lossless", getattr(_inner(codec), "lossless", False)))
