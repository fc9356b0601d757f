"""The unit that crosses the wire: one contiguous uint8 payload plus the metadata both ends agree on."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packet:
    """A compressed tensor.

    ``payload`` holds *everything* the receiver needs besides the metadata below, already
    packed: quantized codes, per-group scales, indices, random seeds. ``shape`` and
    ``dtype`` are not sent: in every commtrain channel both ends know them in advance
    (gradient buckets and pipeline activations have static shapes), exactly as
    torch.distributed's own send/recv require. So ``nbytes`` -- what the byte meter
    counts -- is the payload size plus ``header_nbytes`` (0 unless a codec really sends a
    header of its own).
    """

    payload: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    header_nbytes: int = 0

    def __post_init__(self):
        p = self.payload
        if p.dtype != torch.uint8 or p.dim() != 1 or not p.is_contiguous():
            raise TypeError(
                f"Packet payload must be a 1-D contiguous torch.uint8 tensor, got "
                f"dtype={p.dtype}, dim={p.dim()}, contiguous={p.is_contiguous()}"
            )
        object.__setattr__(self, "shape", torch.Size(self.shape))

    @property
    def nbytes(self) -> int:
        """Exact bytes that cross the wire for this packet."""
        return int(self.payload.numel()) + int(self.header_nbytes)

    @property
    def numel(self) -> int:
        return int(self.shape.numel())

    @property
    def device(self) -> torch.device:
        return self.payload.device
