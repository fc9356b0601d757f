"""Error feedback (Seide et al., "1-bit SGD", 2014; Karimireddy et al., "Error Feedback Fixes
SignSGD", ICML 2019): a wrapper around *any* codec, not a special case inside top-k.

Per tensor, keyed by a stable name (a parameter or bucket name), it keeps the residual e of
what compression dropped and adds it back before the next compression:

    corrected = x + e
    packet    = C(corrected)
    e         = corrected - D(packet)

so that over T steps  sum_t D(packet_t) + e_T == sum_t x_t  exactly (up to fp32 rounding of
the subtraction): nothing is lost, only delayed. This is what lets biased contractive
codecs (top-k, nearest rounding) converge. Residuals live in fp32 on the input's device
and are part of the checkpoint (``state_dict``).
"""
from __future__ import annotations

from typing import Mapping

import torch

from .codec import Codec, build_codec
from .packet import Packet


class ErrorFeedback:
    """Error feedback around ``codec``. It is a codec to the wire (the same protocol:
    ``compress(x, key=...)``, ``decompress``, ``payload_nbytes``, ``summable_dtype``, ``spec``,
    ``lossless``) whose ``compress`` needs the stable ``key`` of the tensor it carries.

    Non-finite input: where ``x + e`` (or its decoded packet) is not finite, the residual keeps
    its previous value instead of becoming NaN/inf, so one bad gradient does not poison every
    later step of that tensor. Such elements are counted (``nonfinite``, ``take_nonfinite()``)
    for the caller to report; the packet itself carries the non-finite values (the caller's
    non-finite guard decides what to do with the step).
    """

    def __init__(self, codec: Codec | str | Mapping):
        self.codec = build_codec(codec)
        self.residuals: dict[str, torch.Tensor] = {}
        self._nonfinite = 0  # elements whose residual update was refused

    # -- what the wire needs (the codec protocol) -------------------------------------------
    @property
    def spec(self) -> str:
        return self.codec.spec

    @property
    def lossless(self) -> bool:
        return self.codec.lossless

    def payload_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return self.codec.payload_nbytes(numel, dtype)

    def wire_nbytes(self, shape_or_numel, dtype: torch.dtype = torch.float32) -> int:
        return self.codec.wire_nbytes(shape_or_numel, dtype)

    # The wrapped codec's mathematical properties (EF changes what is sent over time, not these).
    @property
    def unbiased(self) -> bool:
        return self.codec.unbiased

    @property
    def contractive(self) -> bool:
        return self.codec.contractive

    def properties(self) -> dict[str, bool]:
        return self.codec.properties()

    def summable_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        return self.codec.summable_dtype(dtype)

    def compress(self, x: torch.Tensor, key: str | None = None, generator: torch.Generator | None = None) -> Packet:
        if key is None:
            raise ValueError(
                "ErrorFeedback: key=None is invalid: error feedback keeps a residual per tensor, so every "
                "call needs a stable key (e.g. the parameter/bucket name)"
            )
        if not isinstance(key, str):
            raise TypeError(
                f"ErrorFeedback: key must be a stable tensor name (str), got {type(key).__name__}: error feedback "
                f"keeps a residual per tensor, so every call needs the same key for the same tensor"
            )
        e = self.residuals.get(key)
        if e is not None and e.shape != x.shape:
            raise ValueError(
                f"ErrorFeedback: key {key!r} holds a residual of shape {tuple(e.shape)}, got a "
                f"tensor of shape {tuple(x.shape)} (a key must name one tensor)"
            )
        if e is not None and e.device != x.device:  # e.g. just loaded from a CPU checkpoint
            e = e.to(x.device)
        corrected = x.detach().float() if e is None else x.detach().float() + e
        pkt = self.codec.compress(corrected.to(x.dtype), generator)
        new = corrected - self.codec.decompress(pkt).float()
        # One cheap pass in the common case: the sum is finite iff every element is (a finite
        # sum that overflows only sends us down the exact path below, which then changes nothing).
        if not torch.isfinite(new.sum()):
            finite = torch.isfinite(new)  # keep the old residual (or 0) wherever the update is not finite
            new = torch.where(finite, new, e if e is not None else torch.zeros_like(new))
            self._nonfinite += int((~finite).sum())
        self.residuals[key] = new
        return pkt

    def decompress(self, pkt: Packet) -> torch.Tensor:
        return self.codec.decompress(pkt)

    # -- bookkeeping --------------------------------------------------------------------------
    def take_nonfinite(self) -> int:
        """Elements whose residual update was refused (non-finite) since the last call."""
        n, self._nonfinite = self._nonfinite, 0
        return n

    def forget(self, key: str) -> None:
        """Drop the residuals of tensor ``key`` (every phase ``key/...`` of a collective too),
        e.g. when the layout behind a key changed and its residual no longer applies."""
        for k in [k for k in self.residuals if k == key or k.startswith(key + "/")]:
            del self.residuals[k]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.residuals.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore residuals (kept on CPU until each is next used, then moved to its device)."""
        self.residuals = {k: torch.as_tensor(v).to(torch.float32).clone() for k, v in state.items()}

    def reset(self) -> None:
        self.residuals.clear()

    def __repr__(self):
        return f"ErrorFeedback({self.codec!r}, {len(self.residuals)} residuals)"
