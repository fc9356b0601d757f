"""CuPy kernels against the torch reference on the same CUDA inputs (GPU only).

Deterministic rounding: payloads and decodes bit-exact. Stochastic rounding (different
random bits by design): deterministic parts (scales, norms, exponent window) bit-exact,
every code one of the two neighbouring levels, and the same mean (unbiased) and variance as
the reference. Run: ``python -m pytest -q tests/test_cupy_kernels.py``.
"""
from __future__ import annotations

import functools

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: CuPy kernels are tested only on a GPU", allow_module_level=True)
try:
    import cupy  # noqa: F401

    from commtrain.compress.kernels import cupy_ops
except Exception as e:  # ImportError, or a CuPy/driver mismatch
    pytest.skip(f"CuPy not usable ({type(e).__name__}: {e})", allow_module_level=True)

from commtrain.compress import build_codec  # noqa: E402
from commtrain.compress.kernels import backend_name, resolve, torch_ops as T  # noqa: E402
from commtrain.compress.topk import index_dtype  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
C = cupy_ops
BIG = 2**24 + 3


@functools.lru_cache(maxsize=4)
def _data(n, seed, dtype):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))  # mixed magnitudes
    return x.to(DEV, dtype)


def data(n, seed=0, dtype=torch.float32):
    return _data(n, seed, dtype).clone()


def gen(seed=0):
    return torch.Generator(device=DEV).manual_seed(seed)


def same_floats(a, b):
    """Bit-identical, except that any NaN equals any NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype
    na, nb = torch.isnan(a), torch.isnan(b)
    assert torch.equal(na, nb), "NaN positions differ"
    ia, ib = torch.where(na, 0, a).view(torch.int32), torch.where(nb, 0, b).view(torch.int32)
    bad = (ia != ib).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} values differ, first at {bad[:5].flatten().tolist()}: " \
                             f"{a[bad[:5].flatten()].tolist()} vs {b[bad[:5].flatten()].tolist()}"


def same_bytes(a, b):
    assert a.dtype == torch.uint8 and b.dtype == torch.uint8 and a.shape == b.shape, (a.shape, b.shape)
    bad = (a != b).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} payload bytes differ, first at {bad[:5].flatten().tolist()}"


# -- quant: bit-exact for nearest rounding ------------------------------------------------------
QUANT_CASES = [(n, g) for n in (1, 7, 1000003) for g in (7, 100, 128, 5000)] + [(BIG, 128), (BIG, 100)]
# absmax needs bits >= 2 (its symmetric grid -h..h has an exact zero).
BITS_SCHEMES = [(b, s) for s in ("minmax", "absmax") for b in range(1, 9) if (b, s) != (1, "absmax")]


@pytest.mark.parametrize("n,group", QUANT_CASES)
@pytest.mark.parametrize("bits,scheme", BITS_SCHEMES)
def test_quant_nearest_bit_exact(bits, scheme, n, group):
    x = data(n, seed=n % 13)
    ref = T.quantize_pack(x, bits, group, scheme, False, None)
    out = C.quantize_pack(x, bits, group, scheme, False, None)
    same_bytes(out, ref)
    same_floats(C.unpack_dequantize(ref, n, bits, group, scheme), T.unpack_dequantize(ref, n, bits, group, scheme))
    acc = data(n, seed=99)
    want = T.unpack_dequantize_add(ref, n, bits, group, scheme, acc.clone())
    got = acc.clone()
    assert C.unpack_dequantize_add(ref, n, bits, group, scheme, got) is got
    same_floats(got, want)


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("group", [7, 128])
def test_quant_absmax_zero_exact(bits, group):
    """Exact zeros (and -0) decode to exactly 0 with absmax, nearest and stochastic, and the
    nearest-rounding payload is bit-exact vs the reference on zero-heavy data."""
    x = data(100003, seed=17)
    x[torch.rand(x.numel(), generator=torch.Generator().manual_seed(1)).to(DEV) < 0.7] = 0.0
    x[1::97] = -0.0
    x[: 3 * group] = 0.0  # whole zero groups (scale 0)
    ref = T.quantize_pack(x, bits, group, "absmax", False, None)
    same_bytes(C.quantize_pack(x, bits, group, "absmax", False, None), ref)
    for stoch in (False, True):
        p = C.quantize_pack(x, bits, group, "absmax", stoch, gen(3))
        y = C.unpack_dequantize(p, x.numel(), bits, group, "absmax")
        same_floats(y, T.unpack_dequantize(p, x.numel(), bits, group, "absmax"))
        assert (y[x == 0] == 0).all()
    with pytest.raises(ValueError, match="bits=1"):
        C.quantize_pack(x, 1, group, "absmax", False, None)


def test_empty_inputs_launch_nothing():
    x = torch.empty(0, device=DEV)
    assert C.quantize_pack(x, 4, 128, "minmax", True, gen()).numel() == 0
    assert C.unpack_dequantize(torch.empty(0, dtype=torch.uint8, device=DEV), 0, 4, 128, "minmax").numel() == 0
    assert C.fp8_encode(x, "e4m3", 128, False, None).numel() == 0
    assert C.level_encode(x, 7, 512, "2", "uniform", gen()).numel() == 0
    assert C.natural_encode(x, gen()).numel() == 0
    for spec in ("quant:bits=3", "fp8", "qsgd", "natural", "natural_dither"):
        c = build_codec(spec, kernel="cupy")
        assert c.decompress(c.compress(x)).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [7, 128])
def test_half_inputs_read_directly(dtype, group):
    x = data(100003, seed=3, dtype=dtype)
    for scheme in ("minmax", "absmax"):
        same_bytes(C.quantize_pack(x, 4, group, scheme, False, None),
                   T.quantize_pack(x.float(), 4, group, scheme, False, None))
    for fmt in ("e4m3", "e5m2"):
        same_bytes(C.fp8_encode(x, fmt, group, False, None), T.fp8_encode(x.float(), fmt, group, False, None))
    same_bytes(C.natural_encode(x, gen())[-4:], T.natural_encode(x.float(), gen())[-4:])


def test_misaligned_input_uses_scalar_path():
    base = data(100001, seed=4)
    x = base[1:]  # 4-byte offset: not 16-byte aligned
    assert x.data_ptr() % 16
    same_bytes(C.quantize_pack(x, 3, 128, "minmax", False, None), T.quantize_pack(x, 3, 128, "minmax", False, None))
    p = T.quantize_pack(x, 5, 100, "absmax", False, None)
    out = data(100001, seed=5)[1:]
    want = out + T.unpack_dequantize(p, x.numel(), 5, 100, "absmax")
    same_floats(C.unpack_dequantize_add(p, x.numel(), 5, 100, "absmax", out), want)


def nonfinite_data(n, group):
    x = data(n, seed=11)
    x[3] = float("nan")
    x[group + 1] = float("inf")
    x[3 * group + 2] = -float("inf")
    x[5 * group:6 * group] = 0.0  # an all-zero group: step 0
    return x


@pytest.mark.parametrize("group", [8, 100, 5000])
def test_nonfinite_groups(group):
    n = 10 * group + 3
    x = nonfinite_data(n, group)
    for bits, scheme in ((1, "minmax"), (4, "minmax"), (7, "minmax"), (2, "absmax"), (4, "absmax"), (7, "absmax")):
        ref = T.quantize_pack(x, bits, group, scheme, False, None)
        same_bytes(C.quantize_pack(x, bits, group, scheme, False, None), ref)
        same_floats(C.unpack_dequantize(ref, n, bits, group, scheme), T.unpack_dequantize(ref, n, bits, group, scheme))
    for fmt in ("e4m3", "e5m2"):
        ref = T.fp8_encode(x, fmt, group, False, None)
        same_bytes(C.fp8_encode(x, fmt, group, False, None), ref)
        same_floats(C.fp8_decode(ref, n, fmt, group), T.fp8_decode(ref, n, fmt, group))
    for norm, spacing in (("2", "uniform"), ("inf", "pow2")):
        p = C.level_encode(x, 7, group, norm, spacing, gen())
        y = C.level_decode(p, n, 7, group, spacing).view(-1)
        bad = torch.zeros(T.num_groups(n, group), dtype=torch.bool, device=DEV)
        bad[[0, 1, 3]] = True
        assert torch.isnan(y[: 10 * group].view(10, group)).all(1).equal(bad[:10])
    p = C.natural_encode(x, gen())
    y = C.natural_decode(p, n)
    assert torch.isnan(y[3]) and y[group + 1] == float("inf") and y[3 * group + 2] == -float("inf")
    assert (y[5 * group:6 * group] == 0).all()


# -- stochastic rounding: neighbours, unbiasedness, variance ------------------------------------
def moments(encode, decode, x, R):
    s = torch.zeros_like(x, dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for r in range(R):
        y = decode(encode(x, gen(1000 + r))).double()
        s += y
        s2 += y * y
    mean = s / R
    return mean, (s2 / R - mean * mean).clamp_(min=0)


def check_unbiased_same_variance(enc_c, enc_t, decode, x, R=3000):
    mean_c, var_c = moments(enc_c, decode, x, R)
    mean_t, var_t = moments(enc_t, decode, x, R)
    # Same mean as the (unbiased) reference, element by element and on aggregate.
    v = var_c + var_t
    live = v > 0
    z = (mean_c - mean_t)[live] / (v[live] / R).sqrt()
    assert z.abs().max() < 6.5, f"mean differs from the reference: max |z| = {z.abs().max():.2f}"
    assert abs(z.mean()) < 5 / z.numel() ** 0.5, f"mean differs from the reference: mean z = {z.mean():.3f}"
    assert torch.equal(mean_c[~live], mean_t[~live])  # deterministic in both
    rel = ((mean_c - x.double()).abs().sum() / x.double().abs().sum()).item()
    assert rel < 0.01, f"mean far from x: {rel}"
    ratio = var_c.sum() / var_t.sum()
    assert 0.95 < ratio < 1.05, f"variance ratio cupy/torch = {ratio:.4f}"


@pytest.mark.parametrize("bits,scheme,group", [(1, "minmax", 128), (4, "absmax", 100), (3, "minmax", 7)])
def test_quant_stochastic(bits, scheme, group):
    n = 4099
    x = data(n, seed=21)
    enc_c = lambda x, g: C.quantize_pack(x, bits, group, scheme, True, g)  # noqa: E731
    enc_t = lambda x, g: T.quantize_pack(x, bits, group, scheme, True, g)  # noqa: E731
    p, ref = enc_c(x, gen(1)), T.quantize_pack(x, bits, group, scheme, False, None)
    nb = T.packed_nbytes(n, bits)
    same_bytes(p[nb:], ref[nb:])  # scales are deterministic
    # Every code is floor(v) or floor(v) + 1 of the reference's v (absmax: code = q + h).
    s = T._scalars(ref, nb, (ref.numel() - nb) // 4)
    xg = T._grouped(x, group, "edge")
    if scheme == "minmax":
        s = s.view(-1, 2)
        v, top = (xg - s[:, 0:1]) / s[:, 1:2], (1 << bits) - 1
    else:
        h = T.absmax_half_levels(bits)
        v, top = xg / s.view(-1, 1) + h, 2 * h
    v = v.reshape(-1)[:n]
    code = T.unpack_bits(p[:nb], bits, n).float()
    d = code - torch.floor(v).clamp(0, top)
    assert ((d == 0) | (d == 1)).all()
    assert torch.equal(enc_c(x, gen(5)), enc_c(x, gen(5))), "same generator state must give the same payload"
    assert not torch.equal(enc_c(x, gen(5)), enc_c(x, gen(6)))
    check_unbiased_same_variance(enc_c, enc_t, lambda p: T.unpack_dequantize(p, n, bits, group, scheme), x)


@pytest.mark.parametrize("levels,norm,spacing,bucket", [(7, "2", "uniform", 512), (1, "2", "uniform", 100),
                                                        (7, "2", "pow2", 512), (3, "inf", "pow2", 100),
                                                        (127, "inf", "uniform", 64)])
def test_level_codecs(levels, norm, spacing, bucket):
    n = 3001
    x = data(n, seed=31)
    enc_c = lambda x, g: C.level_encode(x, levels, bucket, norm, spacing, g)  # noqa: E731
    enc_t = lambda x, g: T.level_encode(x, levels, bucket, norm, spacing, g)  # noqa: E731
    p, ref = enc_c(x, gen(1)), enc_t(x, gen(1))
    nb = T.packed_nbytes(n, T.level_bits(levels))
    nc, nt = p[nb:].view(torch.float32), ref[nb:].view(torch.float32)
    if norm == "inf":
        same_bytes(p[nb:], ref[nb:])
    else:  # the L2 reduction order differs from torch's: equal to within an ulp or two
        torch.testing.assert_close(nc, nt, rtol=3e-7, atol=0)
    # decode is bit-exact, and every level is a neighbour of y = |x| / norm
    y_c = C.level_decode(ref, n, levels, bucket, spacing)
    same_floats(y_c, T.level_decode(ref, n, levels, bucket, spacing))
    table = T.level_table(levels, spacing, DEV)
    j = (T.unpack_bits(p[:nb], T.level_bits(levels), n) & ((1 << (T.level_bits(levels) - 1)) - 1)).long()
    yv = (x.abs() / torch.repeat_interleave(nc, bucket)[:n]).clamp(max=1)
    below, above = table[(j - 1).clamp(min=0)], table[(j + 1).clamp(max=levels)]
    assert ((below <= yv * (1 + 1e-6)) & (yv <= above * (1 + 1e-6))).all(), "level is not a neighbour of y"
    check_unbiased_same_variance(enc_c, enc_t, lambda p: T.level_decode(p, n, levels, bucket, spacing), x)


def test_natural():
    n = 5003
    x = data(n, seed=41)
    x[7] = 1e-40  # far below the window: rounds to 0 or 2^(top-125)
    enc_c, enc_t = C.natural_encode, T.natural_encode
    p, ref = enc_c(x, gen(1)), enc_t(x, gen(1))
    same_bytes(p[n:], ref[n:])  # the exponent window
    same_floats(C.natural_decode(ref, n), T.natural_decode(ref, n))
    y = C.natural_decode(p, n)
    a = x.abs()
    lo = torch.exp2(torch.floor(torch.log2(a)))
    ok = (y.abs() == lo) | (y.abs() == 2 * lo) | (a < 2.0 ** -100)
    assert ok.all() and (torch.sign(y) * torch.sign(x) >= 0).all()
    # every byte value decodes like the reference
    allb = torch.cat([torch.arange(256, device=DEV, dtype=torch.uint8), ref[n:]])
    same_floats(C.natural_decode(allb, 256), T.natural_decode(allb, 256))
    check_unbiased_same_variance(enc_c, enc_t, lambda p: T.natural_decode(p, n), x)


# -- fp8 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("n,group", [(1, 128), (7, 3), (1000003, 128), (1000003, 100), (BIG, 128), (9999, 5000)])
def test_fp8_nearest_bit_exact(fmt, n, group):
    x = data(n, seed=51)
    ref = T.fp8_encode(x, fmt, group, False, None)
    same_bytes(C.fp8_encode(x, fmt, group, False, None), ref)
    same_floats(C.fp8_decode(ref, n, fmt, group), T.fp8_decode(ref, n, fmt, group))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_every_code(fmt):
    # all 256 codes decode like torch's cast, and every finite code re-encodes to itself
    codes = torch.arange(256, device=DEV, dtype=torch.uint8)
    payload = torch.cat([codes, T.to_bytes(torch.ones(2, device=DEV))])
    y = C.fp8_decode(payload, 256, fmt, 128)
    same_floats(y, codes.view(T.FP8_FORMATS[fmt][0]).float())
    fin = y[torch.isfinite(y)]
    v = torch.cat([fin, fin * 0.999, fin * 1.0007, fin * 3e-3])  # on and between grid points
    v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0)).to(DEV)]
    same_bytes(C.fp8_encode(v, fmt, 16, False, None), T.fp8_encode(v, fmt, 16, False, None))


@pytest.mark.parametrize("fmt,group", [("e4m3", 128), ("e5m2", 32)])
def test_fp8_stochastic(fmt, group):
    n = 4097
    x = data(n, seed=61)
    x[:group] *= 1e-3  # includes values in the fp8 subnormal range after scaling
    enc_c = lambda x, g: C.fp8_encode(x, fmt, group, True, g)  # noqa: E731
    enc_t = lambda x, g: T.fp8_encode(x, fmt, group, True, g)  # noqa: E731
    p, ref = enc_c(x, gen(1)), T.fp8_encode(x, fmt, group, False, None)
    same_bytes(p[n:], ref[n:])
    # one of the two neighbouring fp8 values: at most one code step from the nearest one
    dc = (p[:n].view(torch.int8).int() - ref[:n].view(torch.int8).int()).abs()
    assert (dc <= 1).all()
    check_unbiased_same_variance(enc_c, enc_t, lambda p: T.fp8_decode(p, n, fmt, group), x)


# -- Philox, sparse packing, streams, dispatch ------------------------------------------------
def test_philox_known_answers():
    # Random123 kat_vectors: philox4x32_10
    cases = [
        ([0, 0, 0, 0, 0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 6, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    k = C._kernel("grouped", "philox_kat", torch.cuda.current_device())
    for inp, want in cases:
        a = cupy.asarray(inp, dtype=cupy.uint32)
        out = cupy.zeros(4, dtype=cupy.uint32)
        k((1,), (1,), (a, out))
        assert [int(v) for v in out.get()] == want


@pytest.mark.parametrize("vdt", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1000, 70001])
def test_sparse_pack_matches_topk_payload(vdt, n):
    x = data(n, seed=71)
    x[5] = float("nan")
    idx = torch.topk(torch.where(torch.isfinite(x), x.abs(), float("inf")), 333, sorted=False).indices
    want = torch.cat([T.to_bytes(x[idx].to(vdt)), T.to_bytes(idx.to(torch.int32).to(index_dtype(n)))])
    same_bytes(C.sparse_pack(x, idx, vdt, index_dtype(n)), want)


def test_runs_on_current_torch_stream():
    x = data(1 << 22, seed=81)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = x * 3  # queued on s; the kernel must see it without a sync
        p = C.quantize_pack(y, 4, 128, "minmax", False, None)
    s.synchronize()
    same_bytes(p, T.quantize_pack(x * 3, 4, 128, "minmax", False, None))


def test_dispatch_and_backend_name():
    assert backend_name("auto", DEV) == "cupy" and backend_name("cupy", DEV) == "cupy"
    assert backend_name("torch", DEV) == "torch" and resolve("torch", DEV) is T
    assert backend_name("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        resolve("cupy", "cpu")
    assert resolve("auto", DEV).quantize_pack is C.quantize_pack
    x = data(10007, seed=91)
    for spec in ("quant:bits=4,rounding=nearest", "quant:bits=3,group=7,scheme=absmax,rounding=nearest",
                 "fp8", "fp8:format=e5m2,group=100"):
        a, b = build_codec(spec, kernel="cupy"), build_codec(spec, kernel="torch")
        pa, pb = a.compress(x), b.compress(x)
        same_bytes(pa.payload, pb.payload)
        same_floats(a.decompress(pa), b.decompress(pb))
    for spec in ("quant:bits=2", "qsgd", "natural", "natural_dither:norm=inf", "fp8:rounding=stochastic"):
        c = build_codec(spec, kernel="cupy")
        pkt = c.compress(x.half())
        assert pkt.payload.numel() == c.payload_nbytes(x.numel()) and c.decompress(pkt).dtype == torch.float16


@pytest.mark.parametrize("spec", ["quant:bits=4,group=128,rounding=nearest,rotate=hadamard",
                                  "quant:bits=3,group=64,scheme=absmax,rounding=nearest,rotate=hadamard"])
def test_rotated_quant_uses_the_fused_quantizer(spec):
    """rotate=hadamard: the rotation runs in torch on the GPU, the quantization in the CuPy
    kernel; with nearest rounding the bytes equal the torch reference on the same device."""
    x = data(100003, seed=93)
    a, b = build_codec(spec, kernel="cupy"), build_codec(spec, kernel="torch")
    pa, pb = a.compress(x), b.compress(x)
    same_bytes(pa.payload, pb.payload)
    same_floats(a.decompress(pa), b.decompress(pb))


def test_bad_arguments_are_named():
    x = data(10)
    with pytest.raises(ValueError, match="bits=9"):
        C.quantize_pack(x, 9, 128, "minmax", False, None)
    with pytest.raises(ValueError, match="scheme='max'"):
        C.quantize_pack(x, 4, 128, "max", False, None)
    with pytest.raises(TypeError, match="CUDA"):
        C.quantize_pack(x.cpu(), 4, 128, "minmax", False, None)
    with pytest.raises(TypeError, match="int32"):
        C.natural_encode(x.int(), None)
    with pytest.raises(ValueError, match="payload"):
        C.unpack_dequantize(torch.zeros(3, dtype=torch.uint8, device=DEV), 10, 4, 128, "minmax")
