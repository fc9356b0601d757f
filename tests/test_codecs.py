"""Round-trip, payload-size, error-bound, NaN/Inf and validation tests for every codec."""
from __future__ import annotations

import math
import struct

import pytest
import torch

from codec_refs import rotated_groups, rotated_numel, topk_chunk_nbytes
from commtrain.compress import Packet, available_codecs, build_codec, codec_class

# Several parameterisations per codec: every quant bit width, both schemes, both roundings
# (absmax needs bits >= 2: its symmetric grid has an exact zero; bits=1 is refused).
QUANT_SPECS = [
    f"quant:bits={b},scheme={s},rounding={r}"
    for b in range(1, 9) for s in ("minmax", "absmax") for r in ("nearest", "stochastic")
    if not (s == "absmax" and b == 1)
]
OTHER_SPECS = [
    "none", "fp16", "bf16",
    "quant:bits=4,group=7", "quant:bits=3,group=1,rounding=nearest",
    "qsgd", "qsgd:levels=1", "qsgd:levels=127,bucket=64", "qsgd:levels=3,bucket=1",
    "natural",
    "natural_dither", "natural_dither:levels=3,norm=inf", "natural_dither:levels=127,bucket=100",
    "topk", "topk:k=3", "topk:ratio=0.3,value_dtype=fp16", "topk:ratio=1.0,value_dtype=bf16",
    # chunk-wise top-k (SparseLoCo): quantized values, or value_dtype values, packed indices
    "topk:ratio=0.01,chunk=4096,value_bits=2", "topk:ratio=0.02,chunk=64,value_bits=2", "topk:ratio=0.3,chunk=7",
    "topk:k=3,chunk=10,value_bits=1", "topk:ratio=0.1,chunk=300,value_bits=8", "topk:chunk=100,value_dtype=fp16",
    "topk:k=2,chunk=2,value_bits=3",
    # randomized Hadamard rotation before quantization
    "quant:bits=4,group=128,rotate=hadamard", "quant:bits=3,group=8,scheme=absmax,rounding=nearest,rotate=hadamard",
    "quant:bits=8,group=256,rounding=nearest,rotate=hadamard", "quant:bits=2,group=2,rotate=hadamard",
    "randomk", "randomk:k=5,unbiased=false", "randomk:ratio=0.5,value_dtype=fp16",
    "fp8", "fp8:format=e5m2", "fp8:rounding=stochastic,group=32", "fp8:format=e5m2,rounding=stochastic,group=1",
]
SPECS = QUANT_SPECS + OTHER_SPECS
# Valid but deliberately extreme settings (one scale per element, keep everything): exercised
# for correctness, exempt from the "actually compresses" check.
DEGENERATE = {
    "quant:bits=3,group=1,rounding=nearest", "qsgd:levels=3,bucket=1", "topk:ratio=1.0,value_dtype=bf16",
    "fp8:format=e5m2,rounding=stochastic,group=1", "topk:k=2,chunk=2,value_bits=3", "quant:bits=2,group=2,rotate=hadamard",
}
SIZES = [(0,), (1,), (7,), (3, 5, 7), (1000,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def codec_names_with_packets():
    """Every registered codec that is a Tensor -> Packet codec (PowerSGD runs its own collective)."""
    return [n for n in available_codecs() if not getattr(codec_class(n), "needs_own_collective", False)]


# -- payload sizes, written out independently of the implementation --------------------------
def ceil_div(a, b):
    return -(-a // b)


def sparse_k(c, n):
    if c.k is not None:
        return min(n, c.k)
    return min(n, max(1, math.ceil((0.01 if c.ratio is None else c.ratio) * n)))


VBYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def expected_nbytes(c, n, dtype):
    if n == 0:
        return 0
    name = c.name
    if name == "none":
        return n * dtype.itemsize
    if name in ("fp16", "bf16"):
        return 2 * n
    if name == "quant":
        m = rotated_numel(n, c.group) if c.rotate == "hadamard" else n  # codes for the rotated groups
        return ceil_div(m * c.bits, 8) + (8 if c.scheme == "minmax" else 4) * ceil_div(n, c.group)
    if name in ("qsgd", "natural_dither"):
        bits = math.ceil(math.log2(c.levels + 1)) + 1
        return ceil_div(n * bits, 8) + 4 * ceil_div(n, c.bucket)
    if name == "natural":
        return n + 4
    if name == "fp8":
        return n + 4 * ceil_div(n, c.group)
    if name == "topk" and c.chunk:
        return topk_chunk_nbytes(c, n)
    if name == "topk":
        k = sparse_k(c, n)
        return k * VBYTES[c.value_dtype] + k * (2 if n <= 65536 else 4)
    if name == "randomk":
        return 8 + sparse_k(c, n) * VBYTES[c.value_dtype]
    return None  # a codec added elsewhere: its own tests own its formula


def test_payload_formula_examples():
    assert build_codec("quant:bits=4,group=128").payload_nbytes(1000) == 500 + 8 * 8
    assert build_codec("quant:bits=3,group=128,scheme=absmax").payload_nbytes(1000) == 375 + 4 * 8
    assert build_codec("qsgd:levels=7,bucket=512").payload_nbytes(1000) == 500 + 4 * 2
    assert build_codec("topk:ratio=0.01").payload_nbytes(1_000_003) == 10001 * 8


# -- reference error bounds ---------------------------------------------------------------
def groups(x, g):
    n = x.numel()
    return [(i, min(i + g, n)) for i in range(0, n, g)]


def check_bound(c, x, y):
    """Assert the codec's documented error bound for a finite float32 input."""
    name, err = c.name, (y - x).abs()
    if name == "none":
        assert torch.equal(x, y)
    elif name in ("fp16", "bf16"):
        assert torch.equal(y, x.to(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[name])).float())
    elif name == "quant" and c.rotate == "hadamard":
        # L2 per group: x' - x = 2 s * H (y' - y) with H H = m I, so ||x' - x|| = 2 sqrt(m) ||y' - y||
        # and ||y' - y|| <= sqrt(m) * (step_y / 2 | step_y), step_y from the rotated group y.
        L = 2**c.bits - 1 if c.scheme == "minmax" else 2**c.bits - 2
        for (yg, r), (a, b) in zip(rotated_groups(x, c.group, c.seed), groups(x, c.group)):
            m = yg.numel()
            step = (yg.max() - yg.min()) / L if c.scheme == "minmax" else 2 * yg.abs().max() / L
            e = step / 2 if c.rounding == "nearest" else step
            assert (y[a:b] - x[a:b]).double().norm() <= 2 * m * e * (1 + 1e-4) + 1e-5 * x[a:b].abs().max(), (a, b)
    elif name == "quant":
        L = 2**c.bits - 1 if c.scheme == "minmax" else 2**c.bits - 2  # absmax: -h..h, h = L / 2
        for a, b in groups(x, c.group):
            xs = x[a:b]
            step = ((xs.max() - xs.min()) / L) if c.scheme == "minmax" else 2 * xs.abs().max() / L
            bound = step / 2 if c.rounding == "nearest" else step
            assert err[a:b].max() <= bound * (1 + 1e-5) + 1e-6 * xs.abs().max(), (a, b)
    elif name in ("qsgd", "natural_dither"):
        for a, b in groups(x, c.bucket):
            xs, es = x[a:b], err[a:b]
            nrm = xs.norm() if (name == "qsgd" or c.norm == "2") else xs.abs().max()
            if name == "qsgd":
                assert es.max() <= nrm / c.levels * (1 + 1e-5) + 1e-6
            else:  # between neighbouring powers of two, or between 0 and the smallest level
                lim = torch.maximum(xs.abs(), nrm * 2.0 ** (1 - c.levels))
                assert (es <= lim * (1 + 1e-5) + 1e-6).all()
            assert ((y[a:b] == 0) | (torch.sign(y[a:b]) == torch.sign(xs))).all()
    elif name == "natural":
        nz = y != 0
        assert (torch.frexp(y[nz])[0].abs() == 0.5).all(), "outputs are signed powers of two"
        assert (torch.sign(y[nz]) == torch.sign(x[nz])).all()
        assert (err <= x.abs() * (1 + 1e-6)).all()
    elif name == "fp8":
        m, emin, fmax = {"e4m3": (3, -6, 448.0), "e5m2": (2, -14, 57344.0)}[c.format]
        k = 1 if c.rounding == "nearest" else 2
        for a, b in groups(x, c.group):
            xs = x[a:b]
            scale = xs.abs().max() / fmax
            lim = torch.maximum(xs.abs() * 2.0 ** -(m + 1), scale * 2.0 ** (emin - m - 1)) * k
            assert (err[a:b] <= lim * (1 + 1e-5) + 1e-30).all(), (a, b)
    elif name == "topk" and c.chunk:
        check_topk_chunks(c, x, y)
    elif name == "topk":
        kk = sparse_k(c, x.numel())
        kept = y != 0
        assert kept.sum() <= kk
        vdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[c.value_dtype]
        assert torch.equal(y[kept], x[kept].to(vdt).float())
        if (~kept).any() and kept.any():
            assert x[~kept].abs().max() <= x[kept].abs().min()
    elif name == "randomk":
        kk = sparse_k(c, x.numel())
        kept = y != 0
        assert kept.sum() == kk  # random normal inputs are never exactly 0
        scale = x.numel() / kk if (c.unbiased and kk) else 1.0
        vdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[c.value_dtype]
        assert torch.allclose(y[kept], (x[kept] * scale).to(vdt).float(), rtol=0, atol=0)


def check_topk_chunks(c, x, y):
    """Per chunk (vectorised over chunks): exactly k_c kept, none dropped larger than a kept
    one, and the kept values as documented (value dtype cast, or sign + magnitude grid)."""
    C, n = c.chunk, x.numel()
    M = ceil_div(n, C)
    pad = M * C - n
    X = torch.cat([x, x.new_zeros(pad)]).view(M, C)
    Y = torch.cat([y, y.new_zeros(pad)]).view(M, C)
    valid = (torch.arange(M * C) < n).view(M, C)
    lens = valid.sum(1)
    k_row = torch.tensor([chunk_k_ref(c, int(v)) for v in lens])
    kept = Y != 0  # random normal inputs: a kept value never decodes to 0
    assert torch.equal(kept.sum(1), k_row)
    dropped_max = torch.where(~kept & valid, X.abs(), -1.0).amax(1)
    kept_min = torch.where(kept, X.abs(), float("inf")).amin(1)
    assert (dropped_max <= kept_min).all()
    if not c.value_bits:
        vdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[c.value_dtype]
        assert torch.equal(Y[kept], X[kept].to(vdt).float())
        return
    assert torch.equal(torch.sign(Y[kept]), torch.sign(X[kept])), "signs are sent exactly"
    A = X.abs()
    lo = torch.where(kept, A, float("inf")).amin(1, keepdim=True)
    hi = torch.where(kept, A, -1.0).amax(1, keepdim=True)
    L = 2 ** (c.value_bits - 1) - 1
    err = (Y.abs() - A).abs()
    if L == 0:  # scaled sign: every kept magnitude is the mean kept magnitude
        mean = torch.where(kept, A, 0.0).sum(1, keepdim=True) / k_row[:, None]
        assert torch.allclose(torch.where(kept, Y.abs(), mean), mean.expand(M, C), rtol=1e-5, atol=0)
        # contractive in aggregate: ||v - mean sign(v)||^2 = ||v||^2 - k mean^2 < ||v||^2
        assert ((torch.where(kept, err, 0.0) ** 2).sum(1) < (torch.where(kept, A, 0.0) ** 2).sum(1)).all()
    else:
        bound = (hi - lo) / L / 2 * (1 + 1e-5) + 1e-6 * hi
        assert (torch.where(kept, err, 0.0) <= bound).all()
        assert (torch.where(kept, Y.abs(), lo) >= lo * (1 - 1e-6)).all() and (Y.abs() <= hi * (1 + 1e-6)).all()
        assert (torch.where(kept, err, 0.0) <= A * (1 + 1e-6)).all(), "never errs by more than |v| (contractive)"


def chunk_k_ref(c, length):
    from codec_refs import chunk_k

    return chunk_k(c, length)


# -- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", codec_names_with_packets())
def test_every_registered_codec_round_trips(name):
    c = build_codec(name)
    for shape in SIZES:
        for dtype in DTYPES:
            x = torch.randn(shape).to(dtype)
            pkt = c.compress(x)
            assert pkt.payload.dtype == torch.uint8 and pkt.payload.dim() == 1 and pkt.payload.is_contiguous()
            assert pkt.nbytes == c.payload_nbytes(x.numel(), dtype)
            y = c.decompress(pkt)
            assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
            assert torch.isfinite(y).all()


@pytest.mark.parametrize("spec", SPECS)
def test_payload_size_and_error_bound(spec):
    c = build_codec(spec)
    gen = torch.Generator().manual_seed(1)
    for shape in SIZES:
        x = torch.randn(shape, generator=gen)
        pkt = c.compress(x)
        assert pkt.payload.dtype == torch.uint8 and pkt.payload.dim() == 1 and pkt.payload.is_contiguous()
        assert pkt.nbytes == expected_nbytes(c, x.numel(), x.dtype), (shape, pkt.nbytes)
        y = c.decompress(pkt)
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        check_bound(c, x.reshape(-1), y.reshape(-1))


@pytest.mark.parametrize("spec", SPECS)
def test_large_odd_size(spec):
    c = build_codec(spec)
    n = 1_000_003
    x = torch.randn(n, generator=torch.Generator().manual_seed(2))
    pkt = c.compress(x)
    assert pkt.nbytes == expected_nbytes(c, n, x.dtype)
    if not c.lossless and spec not in DEGENERATE:
        assert pkt.nbytes < 0.8 * 4 * n, "a lossy codec must not send nearly 4 bytes per element"
    y = c.decompress(pkt)
    assert y.shape == x.shape and torch.isfinite(y).all()
    if c.name in ("none", "fp16", "bf16", "natural", "topk", "randomk"):
        check_bound(c, x, y)  # elementwise or vectorised checks: cheap at this size
    else:  # per-group checks run in Python: check the last few groups (incl. the partial one)
        g = group_of(c)
        start = max(0, (n - 4096) // g * g)
        check_bound(c, x[start:], y[start:])


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_fp32_path(spec, dtype):
    """fp16/bf16 inputs round-trip to the same dtype, with the same numbers as their fp32 cast."""
    c = build_codec(spec)
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(3)).to(dtype)
    p16 = c.compress(x, torch.Generator().manual_seed(4))
    y = c.decompress(p16)
    assert y.dtype == dtype and y.shape == x.shape
    if c.name == "none":
        assert torch.equal(y, x)
        return
    p32 = c.compress(x.float(), torch.Generator().manual_seed(4))
    assert torch.equal(p16.payload, p32.payload)
    assert torch.equal(y, c.decompress(p32).to(dtype))


def test_none_is_bit_exact():
    c = build_codec("none")
    for dtype in DTYPES:
        x = torch.randn(1001).to(dtype)
        x[3], x[4], x[5] = float("nan"), float("inf"), -0.0
        y = c.decompress(c.compress(x))
        assert torch.equal(y.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           x.view(torch.int16 if dtype != torch.float32 else torch.int32))


# -- byte layouts (the contract the CUDA kernels reproduce) ----------------------------------
def f32(*vals):
    return list(struct.pack("<" + "f" * len(vals), *vals))


def test_quant_minmax_layout():
    c = build_codec("quant:bits=2,group=4,rounding=nearest")
    pkt = c.compress(torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0]))
    # codes 0,1,2,3 | 0 -> byte 0b11100100, byte 0; then (lo, step) per group.
    assert pkt.payload.tolist() == [0xE4, 0x00] + f32(0.0, 1.0) + f32(5.0, 0.0)


def test_quant_absmax_3bit_layout():
    c = build_codec("quant:bits=3,group=8,scheme=absmax,rounding=nearest")
    # h = 3: grid -3..3 times step = amax / 3 = 2; code = q + 3 in 0..6 (7 is never written).
    x = torch.tensor([-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, -0.0])
    want = [0, 1, 2, 3, 4, 5, 6, 3]
    bits = "".join(format(code, "03b")[::-1] for code in want)  # LSB first stream
    codes = [int(bits[i:i + 8][::-1], 2) for i in range(0, 24, 8)]
    assert c.compress(x).payload.tolist() == codes + f32(2.0)
    assert torch.equal(c.decompress(c.compress(x)), x)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quant_absmax_zero_is_exact(bits, rounding):
    """Exact zeros decode to exactly 0 with absmax (issue 9): a zero-initialised LoRA B matrix,
    a tensor that is mostly zeros, and zeros inside groups of large values."""
    c = build_codec(f"quant:bits={bits},group=128,scheme=absmax,rounding={rounding}")
    gen = torch.Generator().manual_seed(bits)
    lora_b = torch.zeros(64, 16)
    sparse = torch.randn(1000, generator=gen) * (torch.rand(1000, generator=gen) < 0.1)
    mixed = torch.randn(3, 129, generator=gen) * 1e3
    mixed[:, ::4] = 0.0
    for x in (lora_b, sparse, mixed, torch.zeros(1), torch.tensor([0.0, -0.0, 5.0])):
        for dtype in DTYPES:
            xd = x.to(dtype)
            y = c.decompress(c.compress(xd, torch.Generator().manual_seed(7)))
            assert y.dtype == dtype and torch.equal(y[xd == 0], torch.zeros_like(y[xd == 0]))
            assert torch.isfinite(y).all()
    # ... while minmax (no zero in its grid unless min or max is 0) does not guarantee it:
    m = build_codec(f"quant:bits={bits},group=128,rounding=nearest")
    y = m.decompress(m.compress(mixed))
    assert bits == 8 or (y[mixed == 0] != 0).any()


def test_quant_absmax_one_bit_is_refused_with_one_line():
    with pytest.raises(ValueError) as ei:
        build_codec("quant:bits=1,scheme=absmax")
    msg = str(ei.value)
    assert "bits=1" in msg and "absmax" in msg and "2..8" in msg and "\n" not in msg
    from commtrain.compress.kernels import torch_ops

    with pytest.raises(ValueError, match="bits=1"):
        torch_ops.quantize_pack(torch.randn(10), 1, 8, "absmax", False, None)


def test_natural_layout():
    c = build_codec("natural")
    pkt = c.compress(torch.tensor([1.0, -0.5, 0.0, float("nan"), float("inf"), -float("inf")]))
    # top = floor(log2 1) + 1 = 1; code k means 2^(k - 125)
    assert pkt.payload.tolist() == [125, 0x80 | 124, 0, 0x80, 0x7F, 0xFF] + list(struct.pack("<i", 1))


def test_qsgd_layout():
    c = build_codec("qsgd:levels=1,bucket=2")
    x = torch.tensor([-3.0, 0.0])  # norm 3: y = (1, 0) -> levels (1, 0), signs (1, 0)
    assert c.compress(x).payload.tolist() == [0b0011] + f32(3.0)


def test_fp8_layout():
    c = build_codec("fp8:group=2")
    x = torch.tensor([448.0 * 2, -1.0 * 2])  # scale 2
    expected = torch.tensor([448.0, -1.0]).to(torch.float8_e4m3fn).view(torch.uint8).tolist()
    assert c.compress(x).payload.tolist() == expected + f32(2.0)


def test_randomk_decoder_regenerates_indices():
    c = build_codec("randomk:k=4,unbiased=false")
    x = torch.arange(1.0, 101.0)
    pkt = c.compress(x)
    seed = struct.unpack("<q", bytes(pkt.payload[:8].tolist()))[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(100, generator=g)[:4]
    assert torch.equal(torch.tensor(struct.unpack("<4f", bytes(pkt.payload[8:].tolist()))), x[idx])
    assert c.compress(x).payload[:8].tolist() != pkt.payload[:8].tolist(), "fresh subset each call"


# -- NaN / Inf -----------------------------------------------------------------------------
GROUP_PARAM = {"quant": "group", "fp8": "group", "qsgd": "bucket", "natural_dither": "bucket", "topk": "chunk"}
ELEMENTWISE = ("none", "fp16", "bf16", "natural")
WHOLE_TENSOR = ("topk", "randomk")  # topk without chunk


def group_of(c):
    """The codec's NaN/Inf group size (quant/fp8 groups, buckets, top-k chunks), or None."""
    return getattr(c, GROUP_PARAM[c.name]) if c.name in GROUP_PARAM else None


@pytest.mark.parametrize("spec", SPECS + [n for n in codec_names_with_packets() if n not in SPECS])
def test_nan_inf_contract(spec):
    c = build_codec(spec)
    n = 1000
    clean = torch.randn(n, generator=torch.Generator().manual_seed(5))
    bad_pos = torch.tensor([300, 301, 700, 999])
    clean[bad_pos] = 0.0
    x = clean.clone()
    x[bad_pos] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])
    y = c.decompress(c.compress(x, torch.Generator().manual_seed(6)))
    y_clean = c.decompress(c.compress(clean, torch.Generator().manual_seed(6)))
    assert not torch.isfinite(y[bad_pos]).any(), "a non-finite input was silently made finite"
    if group_of(c):
        g = group_of(c)
        gid = torch.arange(n) // g
        hit = torch.isin(gid, bad_pos // g)
        assert torch.isnan(y[hit]).all()
        assert torch.equal(y[~hit], y_clean[~hit]), "other groups must be unaffected"
    elif c.name in ELEMENTWISE:
        assert torch.isnan(y[[300, 999]]).all()
        assert y[301] == float("inf") and y[700] == -float("inf")
        ok = torch.ones(n, dtype=torch.bool)
        ok[bad_pos] = False
        assert torch.equal(y[ok], y_clean[ok])
    elif c.name in WHOLE_TENSOR:
        assert torch.isnan(y).all()


@pytest.mark.parametrize("spec", ["quant:bits=4", "qsgd", "natural", "fp8", "topk:k=1", "randomk:k=1",
                                  "topk:chunk=64,value_bits=2", "topk:chunk=100", "quant:bits=4,rotate=hadamard"])
def test_all_nonfinite_and_all_zero_inputs(spec):
    c = build_codec(spec)
    for x in (torch.full((300,), float("nan")), torch.full((300,), float("inf")), torch.zeros(300)):
        y = c.decompress(c.compress(x))
        if torch.isfinite(x).all():
            assert torch.equal(y, x)
        else:
            assert not torch.isfinite(y).any()


# -- corrupt payloads and bad parameters -------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
def test_corrupt_payload_size_raises(spec):
    c = build_codec(spec)
    pkt = c.compress(torch.randn(50))
    for payload in (pkt.payload[:-1], torch.cat([pkt.payload, pkt.payload[:1]])):
        with pytest.raises(ValueError, match="bytes"):
            c.decompress(Packet(payload.contiguous(), pkt.shape, pkt.dtype))


@pytest.mark.parametrize(
    "spec, param, allowed",
    [
        ("quant:bits=0", "bits", "1..8"),
        ("quant:bits=9", "bits", "1..8"),
        ("quant:group=0", "group", ">= 1"),
        ("quant:scheme=foo", "scheme", "minmax, absmax"),
        ("quant:rounding=up", "rounding", "stochastic, nearest"),
        ("qsgd:levels=0", "levels", "1..127"),
        ("qsgd:levels=128", "levels", "1..127"),
        ("qsgd:bucket=0", "bucket", ">= 1"),
        ("natural_dither:norm=1", "norm", "2, inf"),
        ("natural_dither:levels=200", "levels", "1..127"),
        ("topk:ratio=0", "ratio", "0 < ratio <= 1"),
        ("topk:ratio=1.5", "ratio", "0..1"),
        ("topk:k=0", "k", ">= 1"),
        ("topk:value_dtype=int8", "value_dtype", "fp32, fp16, bf16"),
        ("randomk:ratio=0", "ratio", "0 < ratio <= 1"),
        ("fp8:format=e3m4", "format", "e4m3, e5m2"),
        ("fp8:rounding=down", "rounding", "nearest, stochastic"),
        ("fp8:group=0", "group", ">= 1"),
        ("topk:chunk=1", "chunk", ">= 2"),
        ({"name": "topk", "chunk": 2.5}, "chunk", "an integer >= 2"),
        ("topk:value_bits=2", "value_bits", "needs chunk"),
        ("topk:chunk=64,value_bits=9", "value_bits", "1..8"),
        ("topk:chunk=64,value_bits=0", "value_bits", "1..8"),
        ("topk:chunk=64,value_bits=2,value_dtype=fp16", "value_bits", "one of them"),
        ("quant:group=100,rotate=hadamard", "group", "power of two"),
        ("quant:group=1,rotate=hadamard", "group", "power of two"),
        ("quant:rotate=fft", "rotate", "none, hadamard"),
    ],
)
def test_bad_params_name_parameter_and_allowed_values(spec, param, allowed):
    with pytest.raises(ValueError) as ei:
        build_codec(spec)
    msg = str(ei.value)
    assert param in msg and allowed in msg, msg


def test_bad_names_and_combinations():
    with pytest.raises(ValueError, match="valid codecs: .*quant"):
        build_codec("quantum:bits=4")
    with pytest.raises(ValueError, match="valid parameters: .*bits"):
        build_codec("quant:bitz=4")
    with pytest.raises(ValueError, match="not a valid int"):
        build_codec("quant:bits=four")
    with pytest.raises(ValueError, match="exactly one of ratio"):
        build_codec("topk:ratio=0.1,k=3")


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trip(spec):
    c = build_codec(spec)
    assert build_codec(c.spec) == c
    assert build_codec(c.spec).spec == c.spec


def test_properties_are_truthful_flags():
    assert build_codec("quant:rounding=stochastic").unbiased and not build_codec("quant:rounding=stochastic").contractive
    assert build_codec("quant:bits=4,rounding=nearest").contractive
    assert not build_codec("quant:bits=1,rounding=nearest").contractive  # group 128 >= 2 * 1^2
    assert build_codec("topk").contractive and not build_codec("topk").unbiased
    assert build_codec("topk:chunk=4096,value_bits=2").contractive
    assert build_codec("quant:bits=4,rounding=nearest,rotate=hadamard").contractive
    assert build_codec("quant:bits=4,rotate=hadamard").unbiased
    assert build_codec("randomk").unbiased and build_codec("randomk").needs_shared_seed
    r = build_codec("randomk:unbiased=false")
    assert r.contractive and not r.unbiased
    assert build_codec("qsgd").unbiased and build_codec("natural").unbiased and build_codec("natural_dither").unbiased
    assert build_codec("fp8:rounding=stochastic").unbiased and build_codec("fp8").contractive


def test_unpack_dequantize_add_accumulates():
    from commtrain.compress.kernels import torch_ops

    x = torch.randn(1001)
    c = build_codec("quant:bits=5,group=64,scheme=absmax", kernel="torch")
    pkt = c.compress(x)
    out = torch.ones(1001)
    res = torch_ops.unpack_dequantize_add(pkt.payload, 1001, 5, 64, "absmax", out)
    assert res is out
    assert torch.equal(out, 1.0 + c.decompress(pkt))
