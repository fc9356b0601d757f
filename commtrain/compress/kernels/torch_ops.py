"""Reference kernels: vectorised torch ops, CPU and CUDA. No Python loops over elements.

Bit layout (shared with the CuPy kernels, which must match it bit for bit): element ``i``
of a ``bits``-wide code stream occupies global bit positions ``i*bits .. i*bits+bits-1``,
least significant bit first; global bit ``k`` lives in byte ``k // 8`` at bit ``k % 8``.
A stream of ``n`` codes takes exactly ``ceil(n * bits / 8)`` bytes.
"""
from __future__ import annotations

import torch


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of codes < 2**bits into ceil(n*bits/8) bytes."""
    n = codes.numel()
    out_n = packed_nbytes(n, bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    codes = codes.to(torch.uint8).reshape(-1)
    if 8 % bits == 0:
        # Fast path: a whole number of codes per byte (1, 2, 4 bits).
        per = 8 // bits
        pad = (-n) % per
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad)])
        shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
        return (codes.view(-1, per) << shifts).sum(1, dtype=torch.int32).to(torch.uint8)
    # General path (3, 5, 6, 7 bits): spread codes into single bits, regroup by 8.
    bit_idx = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes[:, None] >> bit_idx) & 1).reshape(-1)
    pad = out_n * 8 - stream.numel()
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.arange(8, device=codes.device, dtype=torch.uint8)
    return (stream.view(-1, 8) << weights).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as a uint8 tensor."""
    if bits == 8:
        return packed[:n]
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        mask = (1 << bits) - 1
        return ((packed[:, None] >> shifts) & mask).reshape(-1)[:n]
    weights = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed[:, None] >> weights) & 1).reshape(-1)[: n * bits]
    bit_idx = torch.arange(bits, device=packed.device, dtype=torch.uint8)
    return (stream.view(n, bits) << bit_idx).sum(1, dtype=torch.int32).to(torch.uint8)


def to_bytes(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret a tensor's memory as a flat uint8 tensor (no copy when contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a flat uint8 tensor as ``dtype`` (copies only if misaligned)."""
    b = b.contiguous()
    if b.data_ptr() % torch.empty((), dtype=dtype).element_size():
        b = b.clone()
    return b.view(dtype)
