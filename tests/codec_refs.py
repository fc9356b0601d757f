"""Reference formulas for codec tests, written from the documented layouts (not from the
implementation): payload sizes of chunked top-k and the randomized Hadamard rotation."""
from __future__ import annotations

import functools
import math

import torch

HADAMARD_SALT = 0x2545F4914F6CDD1D  # documented in kernels/torch_ops.py


def chunk_k(c, length):
    """Kept elements of a chunk of ``length`` elements: min(len, k) or min(len, max(1, ceil(r len)))."""
    if c.k is not None:
        return min(length, c.k)
    return min(length, max(1, math.ceil((0.01 if c.ratio is None else c.ratio) * length)))


def topk_chunk_nbytes(c, n):
    if n == 0:
        return 0
    C = c.chunk
    full, r = divmod(n, C)
    K = full * chunk_k(c, C) + (chunk_k(c, r) if r else 0)
    ib = math.ceil(math.log2(C))
    values = math.ceil(K * c.value_bits / 8) if c.value_bits else K * {"fp32": 4, "fp16": 2, "bf16": 2}[c.value_dtype]
    scales = 8 * math.ceil(n / C) if c.value_bits else 0
    return values + math.ceil(K * ib / 8) + scales


@functools.lru_cache(maxsize=None)
def hadamard_matrix(m):
    """Sylvester's +-1 Hadamard matrix, entry (i, j) = (-1)^popcount(i & j)."""
    i = torch.arange(m)
    bits = (i[:, None] & i[None, :])
    pc = torch.zeros_like(bits)
    for k in range(max(1, m.bit_length())):
        pc += (bits >> k) & 1
    return (1 - 2 * (pc % 2)).double()


def hadamard_signs(seed, group):
    g = torch.Generator().manual_seed(seed ^ HADAMARD_SALT)
    return (1 - 2 * torch.randint(0, 2, (group,), generator=g)).double()


def rotated_groups(x, group, seed):
    """[(rotated y_g (float64), real length)] per group: y = H_m (s[:m] * x_g) / (2m), with a
    partial last group zero-padded to m = the next power of two."""
    x = x.reshape(-1).double()
    s = hadamard_signs(seed, group)
    out = []
    for a in range(0, x.numel(), group):
        xg = x[a:a + group]
        r = xg.numel()
        m = group if r == group else 1 << (r - 1).bit_length()
        xp = torch.cat([xg, xg.new_zeros(m - r)])
        out.append((hadamard_matrix(m) @ (s[:m] * xp) / (2 * m), r))
    return out


def rotated_numel(n, group):
    full, r = divmod(n, group)
    return full * group + (1 << (r - 1).bit_length() if r else 0)
