"""Reference kernels: vectorised torch ops, CPU and CUDA. No Python loops over elements.

Bit layout (shared with the CuPy kernels, which must match it bit for bit): element ``i``
of a ``bits``-wide code stream occupies global bit positions ``i*bits .. i*bits+bits-1``,
least significant bit first; global bit ``k`` lives in byte ``k // 8`` at bit ``k % 8``.
A stream of ``n`` codes takes exactly ``ceil(n * bits / 8)`` bytes.
"""
from __future__ import annotations

import functools

import torch


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of codes < 2**bits into ceil(n*bits/8) bytes."""
    n = codes.numel()
    codes = codes.to(torch.uint8).reshape(-1)
    if bits == 8:
        return codes.contiguous()
    # 8 codes always fill exactly `bits` bytes: pad to a multiple of 8 codes, pack, trim.
    pad = (-n) % 8
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    if 8 % bits == 0:
        # A whole number of codes per byte (1, 2, 4 bits): OR strided slices, no widening.
        per = 8 // bits
        out = codes[0::per].clone()
        for j in range(1, per):
            out |= codes[j::per] << (j * bits)
    else:
        # 3, 5, 6, 7 bits: gather each run of 8 codes into one 64-bit word (8*bits <= 56
        # bits), then split the word into its `bits` little-endian bytes.
        c = codes.view(-1, 8).to(torch.int64)
        word = c[:, 0].clone()
        for j in range(1, 8):
            word |= c[:, j] << (j * bits)
        shifts = torch.arange(0, 8 * bits, 8, device=codes.device, dtype=torch.int64)
        out = ((word[:, None] >> shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as a uint8 tensor."""
    if bits == 8:
        return packed[:n]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        return ((packed[:, None] >> shifts) & mask).reshape(-1)[:n]
    # Reassemble each group of `bits` bytes into the 64-bit word holding 8 codes.
    full = packed_nbytes(-(-n // 8) * 8, bits)
    if packed.numel() < full:
        packed = torch.cat([packed, packed.new_zeros(full - packed.numel())])
    b = packed.view(-1, bits).to(torch.int64)
    word = b[:, 0].clone()
    for k in range(1, bits):
        word |= b[:, k] << (8 * k)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device, dtype=torch.int64)
    return ((word[:, None] >> shifts) & mask).to(torch.uint8).reshape(-1)[:n]


def pack_uint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) (``bits`` 1..31, e.g. top-k indices within a chunk) into
    ceil(n*bits/8) bytes with the bit layout above. Widths up to 8 are :func:`pack_bits`;
    wider values are split into their bit planes (LSB first), and :func:`pack_bits` at 1 bit
    lays those out as exactly the same global bit stream (value i at bits i*bits..)."""
    if bits <= 8:
        return pack_bits(values, bits)
    v = values.reshape(-1).to(torch.int32)
    planes = (v[:, None] >> torch.arange(bits, device=v.device, dtype=torch.int32)) & 1
    return pack_bits(planes.to(torch.uint8).reshape(-1), 1)


def unpack_uint(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: the first ``n`` values as int64."""
    if bits <= 8:
        return unpack_bits(packed, bits, n).to(torch.int64)
    planes = unpack_bits(packed, 1, n * bits).view(n, bits).to(torch.int64)
    return (planes << torch.arange(bits, device=packed.device, dtype=torch.int64)).sum(1)


def to_bytes(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret a tensor's memory as a flat uint8 tensor (no copy when contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a flat uint8 tensor as ``dtype`` (copies only if misaligned)."""
    b = b.contiguous()
    if b.data_ptr() % torch.empty((), dtype=dtype).element_size():
        b = b.clone()
    return b.view(dtype)


# =========================================================================================
# Numeric cores of the lossy codecs. A CuPy back-end replaces exactly these functions (same
# names, same arguments, same payload bytes); the layouts below are the contract.
#
# Common conventions
# * ``x`` is a flat contiguous float32 tensor of ``n >= 1`` elements.
# * Groups/buckets are consecutive runs of ``group`` elements; the last one may be partial
#   (G = ceil(n / group) groups). Per-group scalars are float32, little endian, appended
#   after the packed code stream (which starts at byte 0 and takes ceil(n*bits/8) bytes, see
#   the bit layout at the top of this file). Scalars are therefore not necessarily 4-byte
#   aligned; readers must use unaligned loads (``from_bytes`` copies when needed).
# * Stochastic rounding draws one uniform u in [0, 1) per element (``torch.rand`` here,
#   Philox in the CUDA kernels): tests compare statistics, not bits.
# * Non-finite inputs: a group holding any NaN/Inf gets NaN as its per-group scalar, and its
#   codes are those of v = 0 (quant: code 0 for minmax, h for absmax; level codecs: 0), so
#   the whole group decodes as NaN; other groups are unaffected.
# =========================================================================================

_NAN = float("nan")


def num_groups(n: int, group: int) -> int:
    return -(-n // group)


def _grouped(x: torch.Tensor, group: int, fill: str) -> torch.Tensor:
    """View ``x`` as (G, group); a partial last group is padded (a copy) with zeros
    (``fill="zero"``: neutral for abs-max and L2 norms) or with its own last element
    (``fill="edge"``: neutral for min and max)."""
    n = x.numel()
    pad = num_groups(n, group) * group - n
    if pad:
        tail = x[-1:].expand(pad) if fill == "edge" else x.new_zeros(pad)
        x = torch.cat([x, tail])
    return x.view(-1, group)


def _ungroup(y: torch.Tensor, n: int) -> torch.Tensor:
    return y.reshape(-1)[:n]


def _grouped_codes(codes: torch.Tensor, group: int) -> torch.Tensor:
    return _grouped(codes, group, "zero")


def _uniform(shape, like: torch.Tensor, gen) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=like.device, dtype=torch.float32)


def _scalars(payload: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    return from_bytes(payload[offset: offset + 4 * count], torch.float32)


# -- quant: uniform b-bit quantisation with per-group scales ---------------------------------
# Payload:  [codes: ceil(n*bits/8) bytes, bit layout above][scales: G records, fp32 LE]
#   scheme "minmax": record g = (lo_g, step_g)  8 bytes; lo = min, step = (max - min) / L,
#     L = 2**bits - 1; code c in 0..L decodes as lo + step * c.
#   scheme "absmax" (bits >= 2): record g = (scale_g,) 4 bytes; a symmetric grid with an
#     exact zero, as int8 symmetric quantisation (-127..127): h = 2**(bits-1) - 1,
#     scale = amax * fl32(1/h) (a multiplication by the fp32 reciprocal), signed level
#     q in -h..h stored as code = q + h in 0..2h (code 2**bits - 1 is never written) and
#     decoded as (code - h) * scale, so x = 0 round-trips to exactly 0.
# Encoding (fp32 arithmetic, in this order):
#   minmax: v = (x - lo) / step; absmax: v = x / scale   (v = 0 when the group is constant
#     or all zero (step or scale 0), or non-finite)
#   q = round_half_even(v)   rounding="nearest"
#   q = floor(v + u)          rounding="stochastic" (E[q] = v)
#   code = clamp(q, 0, L) (minmax) | clamp(q, -h, h) + h (absmax)
# Decoding: minmax x' = lo + step * code; absmax x' = (code - h) * scale (fp32, no FMA).
def quant_levels(bits: int) -> int:
    """Steps of the minmax grid: L = 2**bits - 1 (L + 1 points)."""
    return (1 << bits) - 1


def absmax_half_levels(bits: int) -> int:
    """h of the absmax grid -h..h (2h + 1 points, one of them 0): 2**(bits-1) - 1."""
    if bits < 2:
        raise ValueError(f"quant: bits={bits} with scheme=absmax is invalid; allowed: 2..8 (a symmetric grid "
                         "with an exact zero needs 3 points; use scheme=minmax for 1 bit)")
    return (1 << (bits - 1)) - 1


def quant_scale_nbytes(scheme: str) -> int:
    return 8 if scheme == "minmax" else 4


def quant_payload_nbytes(n: int, bits: int, group: int, scheme: str) -> int:
    return packed_nbytes(n, bits) + quant_scale_nbytes(scheme) * num_groups(n, group)


def quantize_pack(x: torch.Tensor, bits: int, group: int, scheme: str, stochastic: bool, gen) -> torch.Tensor:
    """b-bit quantise ``x`` per group and pack codes + scales into one uint8 payload."""
    n = x.numel()
    xg = _grouped(x, group, "edge")
    if scheme == "minmax":
        L = quant_levels(bits)
        lo, hi = xg.amin(1, keepdim=True), xg.amax(1, keepdim=True)  # both propagate NaN
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        lo = torch.where(finite, lo, _NAN)
        step = torch.where(finite, (hi - lo) / L, _NAN)
        scales = torch.cat([lo, step], 1)
        qmin, qmax, offset = 0, L, 0
    elif scheme == "absmax":
        h = absmax_half_levels(bits)
        amax = xg.abs().amax(1, keepdim=True)
        finite = torch.isfinite(amax)
        lo = 0.0
        step = scales = torch.where(finite, amax * (1.0 / h), _NAN)
        qmin, qmax, offset = -h, h, h
    else:
        raise ValueError(f"quantize_pack: scheme={scheme!r} is invalid; allowed: minmax, absmax")
    # Constant/all-zero groups (step 0) and non-finite groups get v = 0: dividing by inf
    # gives 0 for finite x, and the NaNs of non-finite x are zeroed below.
    ok = finite & (step > 0)
    v = xg.sub(torch.where(ok, lo, 0.0)) if scheme == "minmax" else xg.clone()
    v.div_(torch.where(ok, step, float("inf")))
    if stochastic:
        v.add_(_uniform(v.shape, v, gen)).floor_()
    else:
        v.round_()
    v.nan_to_num_(nan=0.0).clamp_(qmin, qmax)
    if offset:
        v.add_(offset)
    codes = _ungroup(v.to(torch.uint8), n)
    return torch.cat([pack_bits(codes, bits), to_bytes(scales)])


def _dequantize_grouped(payload, n, bits, group, scheme):
    nb = packed_nbytes(n, bits)
    G = num_groups(n, group)
    codes = _grouped_codes(unpack_bits(payload[:nb], bits, n), group).float()
    s = _scalars(payload, nb, G * quant_scale_nbytes(scheme) // 4)
    if scheme == "minmax":
        s = s.view(-1, 2)
        return s[:, 0:1] + s[:, 1:2] * codes
    return (codes - absmax_half_levels(bits)) * s.view(-1, 1)


def unpack_dequantize(payload: torch.Tensor, n: int, bits: int, group: int, scheme: str) -> torch.Tensor:
    """Inverse of :func:`quantize_pack`: ``n`` float32 values."""
    return _ungroup(_dequantize_grouped(payload, n, bits, group, scheme), n)


def unpack_dequantize_add(payload, n: int, bits: int, group: int, scheme: str, out: torch.Tensor) -> torch.Tensor:
    """``out += unpack_dequantize(...)`` (the decompress-and-sum step of a compressed
    reduce-scatter); returns ``out``."""
    return out.add_(unpack_dequantize(payload, n, bits, group, scheme))


# -- randomized Hadamard rotation (quant rotate="hadamard") ---------------------------------------
# Rotating a group before quantizing it spreads a few large outliers over the whole group, so
# the per-group scale is set by the group's RMS rather than its largest element (QuaRot,
# Ashkboos et al. 2024; TAH-Quant 2025). Per group of m elements (m = group, a power of two):
#
#   forward:  y = H_m (s * x) / (2 m)        inverse:  x = 2 m s * (H_m (y / m))
#
# with H_m the (unnormalised, symmetric, +-1) Sylvester-Hadamard matrix (H_m H_m = m I) and
# s in {-1, +1}^m random signs. The scalings are powers of two (exact; only values below
# ~2^-126 * 2m, far under any quantization step of their group, lose bits) placed so that
# nothing overflows: every forward value is half an average of inputs (|y| <= max|x| / 2, so
# even minmax's range max(y) - min(y) fits fp32), the inverse butterflies run on y / m (stage
# t is bounded by 2^t max|y| / m <= max|y|), and the result is clamped to +-fp32max / (2m)
# before the final scaling: a finite group decodes to finite values for every finite input,
# however coarse the quantization. H_m is applied by log2(m) butterfly stages over reshaped
# views: O(n log m).
#
# Signs: s[j] for position j within a group (the same vector for every group, as QuaRot's
# diagonal), drawn as 1 - 2 * torch.randint(0, 2, (group,)) from a CPU torch.Generator seeded
# with (codec seed XOR HADAMARD_SALT): sender and receiver derive them from the codec's seed
# alone (nothing is sent), on any device, and the salt keeps them independent of the
# stochastic-rounding stream that the same seed starts.
#
# Layout: the G - 1 full groups are rotated as they are; a partial last group of r elements is
# zero-padded to p = the next power of two >= r (p <= group) and rotated with H_p (its signs:
# s[:p]), because all p rotated values are needed to invert it. The rotated vector therefore
# has hadamard_numel(n, group) = (G - 1) * group + p elements (= n when group divides n), and
# is quantized as usual: codes for those elements, one scale record per group (G of them).
HADAMARD_SALT = 0x2545F4914F6CDD1D


def hadamard_numel(n: int, group: int) -> int:
    """Rotated length: full groups as they are, a partial last group padded to a power of two."""
    full, r = divmod(n, group)
    return full * group + (1 << (r - 1).bit_length() if r else 0)


@functools.lru_cache(maxsize=64)
def hadamard_signs(seed: int, group: int, device: str) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(int(seed) ^ HADAMARD_SALT)
    s = 1.0 - 2.0 * torch.randint(0, 2, (group,), generator=gen, dtype=torch.int64).to(torch.float32)
    return s.to(device)


def _fwht(y: torch.Tensor) -> torch.Tensor:
    """H_m applied along dim 1 of a contiguous (R, m) tensor, m a power of two; ``y`` is used
    as scratch (overwritten). Stage h combines the pairs (i, i + h) of every 2h-block."""
    R, m = y.shape
    src, dst = y, torch.empty_like(y)
    h = 1
    while h < m:
        s, d = src.view(R, m // (2 * h), 2, h), dst.view(R, m // (2 * h), 2, h)
        torch.add(s[:, :, 0], s[:, :, 1], out=d[:, :, 0])
        torch.sub(s[:, :, 0], s[:, :, 1], out=d[:, :, 1])
        src, dst = dst, src
        h *= 2
    return src


def _hadamard_blocks(n: int, group: int):
    """(start, rows, width m, real elements per row) of the full groups and the padded tail."""
    full, r = divmod(n, group)
    blocks = [(0, full, group, group)] if full else []
    if r:
        blocks.append((full * group, 1, 1 << (r - 1).bit_length(), r))
    return blocks


def hadamard_rotate(x: torch.Tensor, group: int, seed: int) -> torch.Tensor:
    """Flat float32 ``x`` -> its rotated groups, flat, ``hadamard_numel(n, group)`` elements."""
    signs = hadamard_signs(seed, group, str(x.device))
    out = []
    for start, rows, m, real in _hadamard_blocks(x.numel(), group):
        xb = x[start: start + rows * real].view(rows, real)
        if real < m:  # the partial last group: zero-pad to m
            xb = torch.cat([xb, xb.new_zeros(rows, m - real)], 1)
        out.append(_fwht(xb * (signs[:m] / (2 * m))).reshape(-1))
    return torch.cat(out) if len(out) > 1 else out[0]


def hadamard_unrotate(y: torch.Tensor, n: int, group: int, seed: int) -> torch.Tensor:
    """Inverse of :func:`hadamard_rotate` (``y`` is overwritten): ``n`` float32 values."""
    signs = hadamard_signs(seed, group, str(y.device))
    out = []
    for start, rows, m, real in _hadamard_blocks(n, group):
        pos = start if real == m else y.numel() - m  # rotated offset (the tail follows the full groups)
        lim = torch.finfo(torch.float32).max / (2 * m)
        z = _fwht(y[pos: pos + rows * m].view(rows, m).mul_(1.0 / m)).clamp_(-lim, lim).mul_(2 * m * signs[:m])
        out.append(z[:, :real].reshape(-1))
    return torch.cat(out) if len(out) > 1 else out[0]


# -- bucketed sign + level codecs (QSGD, natural dithering) ----------------------------------
# Payload: [codes: ceil(n*(w+1)/8) bytes][norms: G fp32], w = bit_length(s) level bits.
# code = level | (negative << w); level j in 0..s. A value decodes as
#   x' = (-1)^negative * (norm_g * table[j])
# with table[j] = float32(j / s) ("uniform", QSGD) or 0 for j = 0 and 2**(j - s) for j >= 1
# ("pow2", natural dithering). The bucket norm is the L2 norm, computed as amax * r with
# r = ||x / amax||_2 so that the sum of squares cannot overflow, or the max norm (r = 1).
# An L2 norm beyond the fp32 range (possible for finite buckets within a factor
# sqrt(bucket) of the fp32 maximum) cannot be stored: r is capped at NORM_CAP / amax
# (NORM_CAP = the largest fp32 below the maximum, so amax * r <= the fp32 maximum; proof:
# fl(NORM_CAP / amax) errs by at most 2^-24 relative, and NORM_CAP * (1 + 2^-24) is below
# the fp32 maximum). Any norm >= max|x| keeps y in [0, 1], so the codec stays unbiased (its
# variance only shrinks); inputs of normal size are unaffected bit for bit.
# y = |x| / norm in [0, 1] is rounded stochastically to one of its two neighbouring levels
# with P(up) = (y - lower) / (upper - lower), so E[x'] = x.
NORM_CAP = 3.4028232635611926e38  # fp32 0x7f7ffffe: one ulp below torch.finfo(float32).max


def level_bits(levels: int) -> int:
    return int(levels).bit_length() + 1


def level_table(levels: int, spacing: str, device) -> torch.Tensor:
    j = torch.arange(levels + 1, dtype=torch.float64)
    if spacing == "uniform":
        t = j / levels
    else:
        t = torch.where(j == 0, 0.0, torch.exp2(j - levels))
    return t.to(torch.float32).to(device)


def level_payload_nbytes(n: int, levels: int, bucket: int) -> int:
    return packed_nbytes(n, level_bits(levels)) + 4 * num_groups(n, bucket)


def level_encode(x: torch.Tensor, levels: int, bucket: int, norm: str, spacing: str, gen) -> torch.Tensor:
    n, s = x.numel(), levels
    w = level_bits(s) - 1
    xg = _grouped(x, bucket, "zero")
    a = xg.abs()
    amax = a.amax(1, keepdim=True)
    finite = torch.isfinite(amax)  # amax propagates NaN and Inf
    ok = finite & (amax > 0)
    y = a / torch.where(ok, amax, 1.0)
    if norm == "2":
        r = torch.linalg.vector_norm(y, dim=1, keepdim=True)  # in [1, sqrt(bucket)] where ok
        # Tensor / tensor (IEEE division on every device, as in the CUDA kernel); amax = 0
        # gives inf, which leaves r alone.
        r = torch.minimum(r, torch.full_like(amax, NORM_CAP) / amax)
        y = y / torch.where(ok, r, 1.0)
        nrm = amax * r
    else:
        nrm = amax
    y = torch.where(ok, y, 0.0).clamp_(max=1.0)
    nrm = torch.where(finite, nrm, _NAN)
    u = _uniform(y.shape, y, gen)
    if spacing == "uniform":
        level = torch.floor(y * s + u)
    else:
        # y in [2^(e-1), 2^e): lower level 2^(e-1) has index e-1+s, P(up) = y/2^(e-1) - 1.
        m, e = torch.frexp(y)
        below = (e <= 1 - s) | (y == 0)  # under the smallest non-zero level 2^(1-s)
        p_up = torch.where(below, y * 2.0 ** (s - 1), 2.0 * m - 1.0)
        lower = torch.where(below, 0, e + (s - 1)).float()
        level = lower + (u < p_up).float()
    level = level.clamp_(0, s).to(torch.uint8)
    code = level | ((xg < 0).to(torch.uint8) << w)
    return torch.cat([pack_bits(_ungroup(code, n), w + 1), to_bytes(nrm)])


def _level_decode_grouped(payload, n, levels, bucket, spacing):
    bits = level_bits(levels)
    nb = packed_nbytes(n, bits)
    code = _grouped_codes(unpack_bits(payload[:nb], bits, n), bucket)
    nrm = _scalars(payload, nb, num_groups(n, bucket)).view(-1, 1)
    w = bits - 1
    table = level_table(levels, spacing, payload.device)
    val = nrm * table[(code & ((1 << w) - 1)).long()]
    return torch.where((code >> w).bool(), -val, val)


def level_decode(payload: torch.Tensor, n: int, levels: int, bucket: int, spacing: str) -> torch.Tensor:
    return _ungroup(_level_decode_grouped(payload, n, levels, bucket, spacing), n)


# -- natural compression: sign + power-of-two exponent in one byte --------------------------
# Payload: [codes: n bytes][top: int32 LE]. ``top`` = min(floor(log2 amax) + 1, 127) over
# the finite |x| (0 if there are none); the 126 representable magnitudes are 2^E for
# E = top-125 .. top (code k in 1..126 means 2^(top - 126 + k)). Byte = (sign << 7) | k with
# special values 0x00 = 0, 0x80 = NaN, 0x7F = +inf, 0xFF = -inf.
NATURAL_WINDOW = 126


def natural_encode(x: torch.Tensor, gen) -> torch.Tensor:
    a = x.abs()
    finite = torch.isfinite(x)
    amax = torch.where(finite, a, 0.0).amax()
    top = torch.frexp(amax)[1].clamp(max=127)  # floor(log2 amax) + 1; 0 for amax == 0
    e_lo = top - (NATURAL_WINDOW - 1)
    m, e = torch.frexp(a)  # a = m * 2^e, m in [0.5, 1): 2^(e-1) <= a < 2^e
    below = (e - 1) < e_lo
    # In the window: round 2^(e-1) up to 2^e with P = a/2^(e-1) - 1 = 2m - 1.
    # Below it: round 0 up to 2^e_lo with P = a / 2^e_lo = m * 2^(e - e_lo).
    p_up = torch.where(below, m * torch.exp2((e - e_lo).clamp(min=-200).float()), 2.0 * m - 1.0)
    k = torch.where(below, 0, e - e_lo) + (_uniform(a.shape, a, gen) < p_up).int()
    k = torch.where(a == 0, 0, k.clamp_(max=NATURAL_WINDOW))
    code = torch.where(k > 0, k | ((x < 0).int() << 7), 0)
    code = torch.where(torch.isnan(x), 0x80, code)
    code = torch.where(torch.isinf(x), torch.where(x > 0, 0x7F, 0xFF), code)
    return torch.cat([code.to(torch.uint8), to_bytes(top.reshape(1).to(torch.int32))])


def natural_decode(payload: torch.Tensor, n: int) -> torch.Tensor:
    top = from_bytes(payload[n: n + 4], torch.int32)
    k = torch.arange(NATURAL_WINDOW + 2, device=payload.device, dtype=torch.int32)
    mag = torch.exp2((top - NATURAL_WINDOW + k).float())
    mag[0], mag[-1] = 0.0, float("inf")
    table = torch.cat([mag, -mag])
    table[128] = _NAN
    return table[payload[:n].long()]


# -- fp8 with per-group absmax scaling --------------------------------------------------------
# Payload: [codes: n bytes of float8][scales: G fp32]. scale_g = amax_g / FMAX (FMAX = 448 for
# e4m3, 57344 for e5m2); the byte is float8(x / scale_g) and x' = float(byte) * scale_g.
# scale_g = 0 (all-zero group) encodes zeros; a non-finite group stores scale NaN.
FP8_FORMATS = {
    # name: (torch dtype, max finite, min normal exponent, mantissa bits)
    "e4m3": (torch.float8_e4m3fn, 448.0, -6, 3),
    "e5m2": (torch.float8_e5m2, 57344.0, -14, 2),
}


def fp8_stochastic_round(y: torch.Tensor, fmt: str, gen) -> torch.Tensor:
    """Round |y| <= FMAX to one of its two neighbouring fp8 values with probability
    proportional to proximity (unbiased, subnormals included); result is exactly
    representable, so the following cast is exact."""
    _, fmax, emin, mbits = FP8_FORMATS[fmt]
    a = y.abs()
    e = torch.frexp(a)[1] - 1  # floor(log2 a); -1 for a == 0, harmless below
    ulp = torch.exp2((e.clamp(min=emin) - mbits).float())  # grid spacing at a (subnormals: fixed)
    lower = torch.floor(a / ulp) * ulp
    up = _uniform(a.shape, a, gen) < (a - lower) / ulp
    r = torch.minimum(lower + ulp * up, torch.tensor(fmax, device=a.device))
    return torch.copysign(r, y)


def fp8_encode(x: torch.Tensor, fmt: str, group: int, stochastic: bool, gen) -> torch.Tensor:
    dtype, fmax, _, _ = FP8_FORMATS[fmt]
    n = x.numel()
    xg = _grouped(x, group, "zero")
    scale = xg.abs().amax(1, keepdim=True) / fmax
    finite = torch.isfinite(scale)  # amax propagates NaN and Inf
    ok = finite & (scale > 0)
    y = torch.where(ok, xg / torch.where(ok, scale, 1.0), 0.0).clamp_(-fmax, fmax)
    if stochastic:
        y = fp8_stochastic_round(y, fmt, gen)
    codes = _ungroup(y.to(dtype), n).view(torch.uint8)
    return torch.cat([codes, to_bytes(torch.where(finite, scale, _NAN))])


def fp8_decode(payload: torch.Tensor, n: int, fmt: str, group: int) -> torch.Tensor:
    dtype = FP8_FORMATS[fmt][0]
    G = num_groups(n, group)
    y = _grouped_codes(payload[:n], group).view(dtype).float()
    return _ungroup(y * _scalars(payload, n, G).view(-1, 1), n)
