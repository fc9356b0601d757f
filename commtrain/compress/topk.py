"""``topk``: keep the k largest-magnitude elements (Aji & Heafield, "Sparse Communication for
Distributed Gradient Descent", EMNLP 2017; Stich et al., "Sparsified SGD with Memory",
NeurIPS 2018), whole-tensor or per chunk with quantized values (SparseLoCo, Sarfi et al.,
2025: chunk-wise top-k + 2-bit values + error feedback on DiLoCo pseudo-gradients).

Math. C(x)_i = x_i for the k indices of largest |x_i|, 0 elsewhere. Biased but contractive:
||C(x) - x||^2 <= (1 - k/n) ||x||^2, the property that makes it converge with
:class:`~commtrain.compress.error_feedback.ErrorFeedback`.

Whole-tensor mode (default, ``chunk`` unset)
--------------------------------------------
Payload: [values: k x value_dtype (fp32 default, or fp16/bf16)][indices: k x index type],
index type uint16 when n <= 65536, else int32 (little endian); k from ``ratio``/``k`` (see
``Sparsifier`` below). Indices are in no particular order.

NaN/Inf: the whole tensor is top-k's group. Non-finite elements rank first, so if any exists
at least one transmitted value is non-finite, and the decoder then returns all NaN (a
dropped NaN/Inf is never silently turned into 0). Finite values beyond the value dtype's
range (fp16: 65504) saturate at +-max instead of becoming inf.

Chunk mode (``chunk=C``, e.g. ``topk:ratio=0.02,chunk=4096,value_bits=2``)
--------------------------------------------------------------------------
x is cut into M = ceil(n / C) chunks of C consecutive elements (the last may be partial,
length r). Each chunk keeps its own top k_c = min(len_c, max(1, ceil(ratio * len_c))) (or
min(len_c, k) with ``k``): selection is local, so a chunk of small values still sends its
largest ones, and each index needs only ib = ceil(log2 C) bits (position within the chunk).

``value_bits=b`` (1..8) quantizes the kept values with a per-chunk scale, sign + magnitude:
the sign is sent exactly (1 bit) and the magnitude |v| on a uniform grid of 2^(b-1) points
spanning the chunk's kept magnitudes, lo = min|v| .. hi = max|v|, step = (hi - lo) / (2^(b-1)
- 1), nearest rounding; for b = 1 the single magnitude is lo = mean|v| (scaled sign, the
L2-optimal magnitude for fixed signs). Why this scheme: top-k values are by construction
the largest of their chunk, so a grid that spends a point on 0 (symmetric absmax) wastes a
quarter of a 2-bit code and rounds the smaller kept values to 0; the sign is the bit error
feedback most needs right; and because every grid point lies in [min|v|, max|v|], nearest
rounding never errs by more than |v| itself (rounding down errs by at most |v| - lo <= |v|;
rounding up to a point q errs by at most step/2 <= |v| - lo), while the chunk's largest
value is reproduced; for b = 1, ||v - mean|v| sign(v)||^2 = ||v||^2 - k mean|v|^2. Hence
||C(x) - x||^2 < ||x||^2 for every x != 0: contractive, the property error feedback relies
on; the quantization is deterministic (biased), so use it with ``error_feedback``.
Code = m | (negative << (b - 1)), m the magnitude index in 0..2^(b-1)-1.

Payload (chunk mode), K = sum_c k_c kept values in chunk order (chunk 0's, then chunk 1's,
...; within a chunk in no particular order), bit streams with the layout of
``kernels/torch_ops.py`` (value i at bits i*w.., LSB first)::

    [values: K x value_dtype, or ceil(K * b / 8) bytes of b-bit codes]
    [indices: ceil(K * ib / 8) bytes, ib-bit position within the chunk]
    [scales: M records (lo, step) of fp32 little endian]        (only with value_bits)

so ``topk:ratio=0.01,chunk=4096,value_bits=2`` costs 41 * (2 + 12) bits + 8 bytes = 79.75
bytes per 4096 elements (0.0195 bytes per element, 205x fewer than fp32).

NaN/Inf (chunk mode): the chunk is the group. A chunk holding a NaN or Inf keeps it (non-
finite elements rank first), stores NaN scales (value_bits) or a non-finite value, and
decodes entirely as NaN; other chunks are unaffected. Finite inputs give finite outputs (the
magnitude grid is clamped to the fp32 maximum; value_dtype values saturate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .codec import Codec, check_choice, check_range, register_codec
from .kernels.torch_ops import from_bytes, pack_bits, pack_uint, packed_nbytes, to_bytes, unpack_bits, unpack_uint

DEFAULT_RATIO = 0.01
VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_MAX = torch.finfo(torch.float32).max


@dataclass
class Sparsifier(Codec):
    """Shared by ``topk`` and ``randomk``: keeps k of n elements. Exactly one of ``ratio``
    (0 < r <= 1; k = max(1, ceil(r n))) and ``k`` (>= 1) may be given; with neither,
    ratio = 0.01. k is capped at n."""

    ratio: Optional[float] = None
    k: Optional[int] = None
    value_dtype: str = "fp32"

    def validate(self):
        if self.ratio is not None and self.k is not None:
            raise ValueError(f"{self.name}: give exactly one of ratio={self.ratio!r} and k={self.k!r}, not both")
        if self.ratio is not None:
            check_range(self, "ratio", self.ratio, 0, 1)
            if self.ratio == 0:
                raise ValueError(f"{self.name}: ratio=0 is invalid; allowed: 0 < ratio <= 1")
        if self.k is not None:
            if not isinstance(self.k, int) or isinstance(self.k, bool):
                raise ValueError(f"{self.name}: k={self.k!r} is invalid; allowed: an integer >= 1")
            check_range(self, "k", self.k, 1)
        check_choice(self, "value_dtype", self.value_dtype, tuple(VALUE_DTYPES))

    def num_kept(self, numel: int) -> int:
        if self.k is not None:
            return min(numel, self.k)
        ratio = DEFAULT_RATIO if self.ratio is None else self.ratio
        return min(numel, max(1, math.ceil(ratio * numel)))

    @property
    def _vdtype(self) -> torch.dtype:
        return VALUE_DTYPES[self.value_dtype]


def index_dtype(numel: int) -> torch.dtype:
    return torch.uint16 if numel <= 65536 else torch.int32


def poison_if_nonfinite(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """All-NaN output when any transmitted value is non-finite (no host sync)."""
    return torch.where(torch.isfinite(values).all(), out, float("nan"))


def saturating_cast(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to ``dtype`` with finite values beyond its range clamped to +-max (not +-inf);
    NaN and +-inf pass through unchanged."""
    if dtype == torch.float32:
        return values.float()
    vmax = torch.finfo(dtype).max
    return torch.where(torch.isfinite(values), values.clamp(-vmax, vmax), values).to(dtype)


@register_codec("topk")
class TopK(Sparsifier):
    contractive = True

    chunk: Optional[int] = None
    value_bits: Optional[int] = None

    def validate(self):
        super().validate()
        if self.chunk is not None:
            if not isinstance(self.chunk, int) or isinstance(self.chunk, bool):
                raise ValueError(f"{self.name}: chunk={self.chunk!r} is invalid; allowed: an integer >= 2")
            check_range(self, "chunk", self.chunk, 2)
        if self.value_bits is not None:
            if not isinstance(self.value_bits, int) or isinstance(self.value_bits, bool):
                raise ValueError(f"{self.name}: value_bits={self.value_bits!r} is invalid; allowed: 1..8")
            check_range(self, "value_bits", self.value_bits, 1, 8)
            if self.chunk is None:
                raise ValueError(f"{self.name}: value_bits={self.value_bits} needs chunk (the scales are per "
                                 "chunk); allowed: set chunk (e.g. chunk=4096), or drop value_bits")
            if self.value_dtype != "fp32":
                raise ValueError(f"{self.name}: value_dtype={self.value_dtype} and value_bits={self.value_bits} "
                                 "both set the value format; allowed: one of them")

    # -- layout ------------------------------------------------------------------------------
    def _blocks(self, numel: int) -> list[tuple[int, int, int, int]]:
        """(first element, rows, row length, kept per row) for the full chunks and then a
        partial last chunk: at most two blocks, each selected with one batched top-k."""
        C = self.chunk
        full, r = divmod(numel, C)
        blocks = [(0, full, C, self.num_kept(C))] if full else []
        if r:
            blocks.append((full * C, 1, r, self.num_kept(r)))
        return blocks

    def _index_bits(self) -> int:
        return (self.chunk - 1).bit_length()  # ceil(log2 C)

    def payload_nbytes(self, numel, dtype=None):
        if self.chunk is None:
            k = self.num_kept(numel)
            return k * self._vdtype.itemsize + k * index_dtype(numel).itemsize
        if numel == 0:
            return 0
        K = sum(rows * k for _, rows, _, k in self._blocks(numel))
        nv = packed_nbytes(K, self.value_bits) if self.value_bits else K * self._vdtype.itemsize
        scales = 8 * -(-numel // self.chunk) if self.value_bits else 0
        return nv + packed_nbytes(K, self._index_bits()) + scales

    # -- whole-tensor mode ------------------------------------------------------------------
    def encode(self, x, gen):
        if self.chunk is not None:
            return self._encode_chunks(x)
        n, k = x.numel(), self.num_kept(x.numel())
        key = torch.where(torch.isfinite(x), x.abs(), float("inf"))
        idx = torch.topk(key, k, sorted=False).indices
        values = saturating_cast(x[idx], self._vdtype)
        return torch.cat([to_bytes(values), to_bytes(idx.to(torch.int32).to(index_dtype(n)))])

    def decode(self, payload, numel):
        if self.chunk is not None:
            return self._decode_chunks(payload, numel)
        k = self.num_kept(numel)
        nv = k * self._vdtype.itemsize
        values = from_bytes(payload[:nv], self._vdtype).float()
        idx = from_bytes(payload[nv:], index_dtype(numel)).to(torch.int64)
        out = torch.zeros(numel, dtype=torch.float32, device=payload.device)
        out[idx] = values
        return poison_if_nonfinite(values, out)

    # -- chunk mode -------------------------------------------------------------------------
    def _encode_chunks(self, x):
        key = torch.where(torch.isfinite(x), x.abs(), float("inf"))
        values, locs, codes, scales = [], [], [], []
        for start, rows, length, k in self._blocks(x.numel()):
            seg = slice(start, start + rows * length)
            loc = torch.topk(key[seg].view(rows, length), k, dim=1, sorted=False).indices
            v = x[seg].view(rows, length).gather(1, loc)
            locs.append(loc.reshape(-1))
            if self.value_bits:
                c, s = self._quantize_values(v)
                codes.append(c.reshape(-1))
                scales.append(s)
            else:
                values.append(v.reshape(-1))
        idx = pack_uint(torch.cat(locs), self._index_bits())
        if self.value_bits:
            return torch.cat([pack_bits(torch.cat(codes), self.value_bits), idx, to_bytes(torch.cat(scales))])
        return torch.cat([to_bytes(saturating_cast(torch.cat(values), self._vdtype)), idx])

    def _quantize_values(self, v: torch.Tensor):
        """(rows, k) kept values -> (rows, k) uint8 sign+magnitude codes and (rows, 2) fp32
        records (lo, step); a row with a non-finite value gets NaN records."""
        b = self.value_bits
        L = (1 << (b - 1)) - 1
        a = v.abs()
        finite = torch.isfinite(a).all(1, keepdim=True)
        hi = a.amax(1, keepdim=True)
        if L == 0:  # 1 bit: scaled sign, magnitude mean|v| (computed as hi * mean(a / hi): no overflow)
            safe = torch.where(hi > 0, hi, 1.0)
            lo, step = (a / safe).mean(1, keepdim=True) * hi, torch.zeros_like(hi)
        else:
            lo = a.amin(1, keepdim=True)
            step = (hi - lo) / L
        lo = torch.where(finite, lo, float("nan"))
        step = torch.where(finite, step, float("nan"))
        ok = finite & (step > 0)
        m = (a - torch.where(ok, lo, 0.0)).div_(torch.where(ok, step, float("inf")))
        m = m.round_().nan_to_num_(nan=0.0).clamp_(0, L).to(torch.uint8)
        return m | ((v < 0).to(torch.uint8) << (b - 1)), torch.cat([lo, step], 1)

    def _decode_chunks(self, payload, numel):
        C, dev = self.chunk, payload.device
        M = -(-numel // C)
        blocks = self._blocks(numel)
        K = sum(rows * k for _, rows, _, k in blocks)
        # Chunk (row) of each kept value: full chunks hold k_full each, the partial one the rest.
        k_full = blocks[0][3] if blocks[0][2] == C else 1
        n_full = blocks[0][1] * k_full if blocks[0][2] == C else 0
        pos = torch.arange(K, device=dev)
        row = torch.where(pos < n_full, pos // k_full, M - 1)
        if self.value_bits:
            b = self.value_bits
            nv = packed_nbytes(K, b)
            ni = packed_nbytes(K, self._index_bits())
            code = unpack_bits(payload[:nv], b, K)
            rec = from_bytes(payload[nv + ni: nv + ni + 8 * M], torch.float32).view(M, 2)
            mag = rec[row, 0] + rec[row, 1] * (code & ((1 << (b - 1)) - 1)).float()
            mag = mag.clamp_(max=FP32_MAX)  # lo + step * L may round past hi = the fp32 max
            values = torch.where((code >> (b - 1)).bool(), -mag, mag)
            bad_row = torch.isnan(rec[:, 0])
        else:
            nv = K * self._vdtype.itemsize
            ni = packed_nbytes(K, self._index_bits())
            values = from_bytes(payload[:nv], self._vdtype).float()
            bad = (~torch.isfinite(values)).float()
            bad_row = torch.zeros(M, device=dev).index_add_(0, row, bad) > 0
        loc = unpack_uint(payload[nv: nv + ni], self._index_bits(), K)
        out = torch.zeros(M * C, dtype=torch.float32, device=dev)
        out[row * C + loc] = values
        out.view(M, C).masked_fill_(bad_row[:, None], float("nan"))  # in place, no host sync
        return out[:numel]
