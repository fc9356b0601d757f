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
    def __init__(self, codec: Codec | str | Mapping):
        self.codec = build_codec(codec)
        self.residuals: dict[str, torch.Tensor] = {}

    def compress(self, x: torch.Tensor, key: str, generator: torch.Generator | None = None) -> Packet:
        if not isinstance(key, str):
            raise TypeError(f"ErrorFeedback: key must be a stable tensor name (str), got {type(key).__name__}")
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
        self.residuals[key] = corrected - self.codec.decompress(pkt).float()
        return pkt

    def decompress(self, pkt: Packet) -> torch.Tensor:
        return self.codec.decompress(pkt)

    # -- passthrough: the wrapper is a drop-in for its codec where a channel needs one ------
    def payload_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return self.codec.payload_nbytes(numel, dtype)

    def wire_nbytes(self, shape_or_numel, dtype: torch.dtype = torch.float32) -> int:
        return self.codec.wire_nbytes(shape_or_numel, dtype)

    def properties(self) -> dict[str, bool]:
        return self.codec.properties()

    def __getattr__(self, name):
        # lossless/unbiased/contractive/summable/needs_shared_seed/name/spec of the codec.
        if name in ("lossless", "unbiased", "contractive", "summable", "needs_shared_seed", "name", "spec", "ops"):
            return getattr(self.codec, name)
        raise AttributeError(name)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.residuals.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore residuals (kept on CPU until each is next used, then moved to its device)."""
        self.residuals = {k: torch.as_tensor(v).to(torch.float32).clone() for k, v in state.items()}

    def reset(self) -> None:
        self.residuals.clear()

    def __repr__(self):
        return f"ErrorFeedback({self.codec!r}, {len(self.residuals)} residuals)"
