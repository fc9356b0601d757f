"""Codecs at the edges of the float32 range (issue 13 item 6), and unchanged payloads on
normal inputs.

* ``fp16`` / ``bf16`` saturate finite values beyond their range (counted, warned once);
  NaN and +-inf pass through.
* Every codec whose documentation claims it is finite for finite inputs is, for inputs near
  +-3.4e38; the documented exceptions are pinned (they are exactly as documented).
* Inputs of normal size give the same payloads as before these changes (golden hashes).
"""
from __future__ import annotations

import hashlib
import warnings

import pytest
import torch

from commtrain.compress import available_codecs, build_codec, codec_class

FMAX = torch.finfo(torch.float32).max
F16MAX = 65504.0
BF16MAX = torch.finfo(torch.bfloat16).max


# -- fp16 / bf16 saturation ----------------------------------------------------------------------
def test_fp16_saturates_counts_and_warns_once():
    c = build_codec("fp16")
    x = torch.tensor([1e5, -7e4, 65504.0, 65519.0, 1.5, float("inf"), -float("inf"), float("nan"), 3e38])
    with pytest.warns(RuntimeWarning, match=r"fp16: 4 finite value\(s\) beyond \+-65504 saturated"):
        y = c.decompress(c.compress(x))
    want = torch.tensor([F16MAX, -F16MAX, F16MAX, F16MAX, 1.5, float("inf"), -float("inf"), float("nan"), F16MAX])
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.equal(y[~torch.isnan(y)], want[~torch.isnan(want)])
    # every finite |x| > 65504 is clamped and counted (65519 would round to 65504 anyway)
    assert c.saturated == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning from the same instance would raise
        c.compress(torch.full((10,), -1e6))
    assert c.saturated == 14
    # a fresh instance warns again (once per codec instance); the counter is per instance
    c2 = build_codec("fp16")
    with pytest.warns(RuntimeWarning):
        c2.compress(torch.tensor([7e4]))
    assert c2.saturated == 1 and c.saturated == 14


def test_fp16_in_range_is_a_plain_cast_and_non_finite_pass_through():
    c = build_codec("fp16")
    x = torch.randn(10001) * 1000
    x[::97] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pkt = c.compress(x)
    assert torch.equal(pkt.payload, x.to(torch.float16).view(torch.uint8))
    assert c.saturated == 0
    # NaN/inf alone take the careful path and are not counted: they stay non-finite
    z = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    y = c.decompress(c.compress(z))
    assert torch.isnan(y[0]) and y[1] == float("inf") and y[2] == -float("inf") and y[3] == 1.0
    assert c.saturated == 0
    # spec, equality and rebuild ignore the counter
    assert c.spec == "fp16" and build_codec(c.spec) == c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_casts_saturate_for_every_input_dtype(dtype):
    x = torch.tensor([FMAX if dtype == torch.float32 else 6e4, -1.0, 2.0]).to(dtype)
    c = build_codec("fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = c.decompress(c.compress(x))
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_bf16_saturates_near_fp32_max():
    c = build_codec("bf16")
    x = torch.tensor([FMAX, -FMAX, 3.0e38, 1.0])  # 3.0e38 is inside bf16's range
    with pytest.warns(RuntimeWarning, match="bf16: 2 finite"):
        y = c.decompress(c.compress(x))
    assert y.tolist() == [BF16MAX, -BF16MAX, float(torch.tensor(3.0e38).to(torch.bfloat16)), 1.0]
    assert c.saturated == 2


# -- every codec near the float32 maximum ------------------------------------------------------------
def edge_inputs():
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(1000, generator=g) < 0.5, -1.0, 1.0)
    return {
        "full 3e38": torch.full((1000,), 3e38),
        "full -max": torch.full((1000,), -FMAX),
        "full max": torch.full((1000,), FMAX),
        "mixed +-max": sign * FMAX,
        "spread to max": torch.rand(1000, generator=g) * sign * FMAX,
        "max among small": torch.cat([torch.tensor([FMAX, -3e38]), torch.randn(998, generator=g)]),
    }


# Registry specs beyond the defaults: the parameters that change the arithmetic at the edges.
EXTRA_SPECS = [
    "quant:scheme=absmax", "quant:scheme=absmax,rounding=nearest,bits=2", "quant:rounding=nearest",
    "quant:bits=4,rotate=hadamard", "quant:bits=2,scheme=absmax,rotate=hadamard", "quant:bits=8,group=256,rotate=hadamard",
    "qsgd:levels=127,bucket=64", "qsgd:levels=1,bucket=1000", "natural_dither:norm=inf", "natural_dither:levels=3",
    "randomk:unbiased=false", "randomk:k=1", "randomk:ratio=0.5,value_dtype=fp16", "randomk:value_dtype=bf16",
    "topk:value_dtype=fp16", "topk:value_dtype=bf16", "topk:chunk=64,value_bits=2", "topk:chunk=100,value_bits=1",
    "topk:chunk=100,value_dtype=fp16", "fp8:format=e5m2", "fp8:rounding=stochastic",
]
# Documented exceptions (quant.py): minmax cannot store a group whose range max - min exceeds the
# fp32 maximum (values of both signs beyond half of it); the group then decodes non-finite.
KNOWN_NONFINITE = {
    (spec, inp) for spec in ("quant", "quant:rounding=nearest") for inp in ("mixed +-max", "spread to max",
                                                                           "max among small")
}


def edge_specs():
    names = [n for n in available_codecs() if not getattr(codec_class(n), "needs_own_collective", False)]
    return names + EXTRA_SPECS


@pytest.mark.parametrize("spec", edge_specs())
def test_finite_inputs_near_fp32_max_decode_finite(spec):
    c = build_codec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the casts' saturation warning
        for name, x in edge_inputs().items():
            for dtype in (torch.float32,):
                y = c.decompress(c.compress(x.to(dtype), torch.Generator().manual_seed(1)))
                if (spec, name) in KNOWN_NONFINITE:
                    assert not torch.isfinite(y).all(), f"{spec} on {name}: documented as non-finite, update the docs"
                else:
                    assert torch.isfinite(y).all(), f"{spec}: finite input '{name}' decoded to inf/NaN"


@pytest.mark.parametrize("spec", ["qsgd:levels=7,bucket=64", "natural_dither:levels=5,bucket=64",
                                  "randomk:k=32,unbiased=false"])
def test_edge_values_are_close_not_just_finite(spec):
    """Near the maximum the codecs keep their meaning: a constant bucket of 3e38 decodes to
    values of the right sign and size (the norm is capped just below the fp32 maximum)."""
    c = build_codec(spec)
    x = torch.full((64,), 3e38)
    x[::2] *= -1
    y = c.decompress(c.compress(x, torch.Generator().manual_seed(0)))
    kept = y != 0
    assert kept.any() and (torch.sign(y[kept]) == torch.sign(x[kept])).all()
    assert (y.abs() <= FMAX).all()
    if spec.startswith("randomk"):
        assert torch.equal(y[kept], x[kept])


@pytest.mark.parametrize("spec", ["qsgd:levels=3,bucket=128", "natural_dither:levels=4,bucket=128"])
def test_capped_norm_keeps_the_codec_unbiased(spec):
    """A bucket whose L2 norm exceeds the fp32 range (128 values of ~1e38: ||v|| ~ 1.1e39) still
    decodes unbiased: mean over many draws ~ x (any norm >= max|v| keeps y in [0, 1])."""
    R = 2000
    g = torch.Generator().manual_seed(3)
    base = (torch.rand(128, generator=g) * 0.9 + 0.1) * 3e38 * torch.where(torch.rand(128, generator=g) < 0.5, -1, 1)
    c = build_codec(spec)
    y = c.decompress(c.compress(base.repeat(R), torch.Generator().manual_seed(4))).view(R, -1).double()
    assert torch.isfinite(y).all()
    # Bernoulli rounding between levels <= FMAX apart: sd <= FMAX / 2 per draw
    se = FMAX / 2 / R**0.5
    assert ((y.mean(0) - base.double()).abs() <= 5 * se).all()


def test_randomk_unbiased_saturates_scaled_values():
    """(n/k) x beyond fp32 saturates at +-max (documented bias on those elements only)."""
    c = build_codec("randomk:k=10")
    x = torch.full((1000,), 1e37)
    x[::2] = -1e37
    y = c.decompress(c.compress(x))
    kept = y != 0
    assert kept.sum() == 10 and torch.equal(y[kept].abs(), torch.full((10,), FMAX))
    assert (torch.sign(y[kept]) == torch.sign(x[kept])).all()
    # ...and a tensor that fits keeps the exact unbiased scaling
    x = torch.full((1000,), 1e30)
    y = c.decompress(c.compress(x))
    assert torch.equal(y[y != 0], torch.full((10,), 1e30) * 100.0)


# -- unchanged payloads on normal inputs ------------------------------------------------------------
# sha256 (first 16 hex digits) of payloads + decodes for exact, integer-derived inputs, computed
# with the code *before* the edge/absmax/rotate/chunk changes (commit e5bc2e9): the defaults and
# the codecs made finite at the edges give the same bytes on normal inputs. (qsgd and norm-2
# natural_dither are left out: their L2 reduction order may differ between CPUs.)
GOLDEN = {
    "quant:bits=4,group=128": "24e9ecd01e8b6dd5",
    "quant:bits=3,group=100,rounding=nearest": "a2b8cb965ac299db",
    "quant:bits=8,group=256,rounding=nearest": "fc02e5f32dfb7f69",
    "topk": "ca28ca998b3af543",
    "topk:ratio=0.05,value_dtype=fp16": "8e47af2986b1073d",
    "topk:k=7,value_dtype=bf16": "5fce79d479d737d9",
    "natural_dither:levels=3,norm=inf": "b1bbb40898909a05",
    "randomk": "8cb829b672ab2593",
    "randomk:k=5,unbiased=false,value_dtype=fp16": "ae609aa3b6dc5427",
    "fp16": "7dc9338cc01ab2ce",
    "bf16": "b2f187aa731c0cd5",
    "natural": "43006dc75a05c64c",
    "fp8": "c57797426e556bb2",
}


def exact_input(n):
    g = torch.Generator().manual_seed(n)
    m = torch.randint(-2**10, 2**10, (n,), generator=g).float()
    e = torch.randint(-30, 5, (n,), generator=g).float()
    return m * torch.exp2(e)  # exactly representable values within fp16's range, no transcendentals


@pytest.mark.parametrize("spec", sorted(GOLDEN))
def test_payloads_unchanged_on_normal_inputs(spec):
    c = build_codec(spec)
    h = hashlib.sha256()
    for n in (1, 7, 1000, 70001):
        p = c.compress(exact_input(n), torch.Generator().manual_seed(5))
        h.update(bytes(p.payload.numpy()))
        h.update(c.decompress(p).numpy().tobytes())
    assert h.hexdigest()[:16] == GOLDEN[spec]


def test_rotate_none_and_no_chunk_are_the_old_codecs():
    """The new parameters at their defaults are the old codecs (same bytes, same spec)."""
    x = exact_input(70001)
    for old, new in (("quant:bits=4,group=128", "quant:bits=4,group=128,rotate=none"), ("topk", "topk:chunk=none")):
        a, b = build_codec(old), build_codec(new)
        assert a == b and a.spec == b.spec
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.equal(a.compress(x, g1).payload, b.compress(x, g2).payload)
