"""Statistical tests: unbiasedness of the stochastic codecs and the natural-compression
second-moment bound. Vectorised (one tensor repeating the same group many times) and seeded,
so they are fast and deterministic; tolerances are a few standard errors."""
from __future__ import annotations

import pytest
import torch

from commtrain.compress import build_codec

R = 2000  # repeats = independent draws per element


def repeated_draws(spec, base, seed=0):
    """Compress ``base`` repeated R times in one tensor; return the (R, len(base)) decodes.
    ``len(base)`` equals the codec's group/bucket, so every repeat is an identical group."""
    c = build_codec(spec)
    x = base.repeat(R)
    y = c.decompress(c.compress(x, torch.Generator().manual_seed(seed)))
    return y.view(R, -1)


def assert_unbiased(draws, base, sd_per_draw, z=5.0):
    """|mean - x| <= z standard errors (+ fp32 rounding slack)."""
    se = sd_per_draw / R**0.5
    dev = (draws.double().mean(0) - base.double()).abs()
    tol = z * se + 1e-6 * base.abs().max()
    assert (dev <= tol).all(), f"max deviation {(dev - tol).max():.3g} beyond tolerance; worst at {int((dev - tol).argmax())}"


def base_vector(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))


@pytest.mark.parametrize("bits, scheme", [(b, s) for s in ("minmax", "absmax") for b in (1, 2, 4, 7)
                                          if (b, s) != (1, "absmax")])  # absmax needs bits >= 2
def test_quant_stochastic_unbiased(bits, scheme):
    base = base_vector(128)
    draws = repeated_draws(f"quant:bits={bits},group=128,scheme={scheme},rounding=stochastic", base)
    L = 2**bits - 1 if scheme == "minmax" else 2**bits - 2
    step = (base.max() - base.min()) / L if scheme == "minmax" else 2 * base.abs().max() / L
    assert_unbiased(draws, base, step / 2)  # Bernoulli over one step: sd <= step/2


def test_the_check_detects_bias():
    """Nearest rounding is biased for fixed x; the same check must reject it."""
    base = base_vector(128)
    draws = repeated_draws("quant:bits=2,group=128,rounding=nearest", base)
    step = (base.max() - base.min()) / 3
    with pytest.raises(AssertionError):
        assert_unbiased(draws, base, step / 2)


@pytest.mark.parametrize("levels", [1, 7])
def test_qsgd_unbiased(levels):
    base = base_vector(512)
    draws = repeated_draws(f"qsgd:levels={levels},bucket=512", base)
    assert_unbiased(draws, base, base.norm() / levels / 2)


@pytest.mark.parametrize("levels, norm", [(3, "2"), (7, "inf"), (7, "2")])
def test_natural_dither_unbiased(levels, norm):
    base = base_vector(256)
    draws = repeated_draws(f"natural_dither:levels={levels},norm={norm},bucket=256", base)
    nrm = base.norm() if norm == "2" else base.abs().max()
    # The gap between neighbouring levels is <= max(|x|, norm * 2^(1-s)).
    sd = torch.maximum(base.abs(), nrm * 2.0 ** (1 - levels)) / 2
    assert_unbiased(draws, base, sd)


def test_natural_unbiased_and_second_moment():
    base = base_vector(100)
    draws = repeated_draws("natural", base)
    # Var = E[C^2] - x^2 <= x^2 / 8.
    assert_unbiased(draws, base, base.abs() / 8**0.5)
    r = draws.double() ** 2 / base.double() ** 2
    se = r.std(0) / R**0.5
    assert (r.mean(0) <= 9 / 8 + 5 * se).all()


def test_natural_second_moment_bound_is_tight():
    """x = 4/3 * 2^e is the worst case: E[C^2] / x^2 = 9/8 exactly."""
    base = (4.0 / 3.0) * torch.exp2(torch.arange(-20.0, 20.0)) * torch.tensor([1.0, -1.0]).repeat(20)
    draws = repeated_draws("natural", base)
    r = draws.double() ** 2 / base.double() ** 2  # same distribution for every element
    assert abs(r.mean() - 9 / 8) < 5 * r.std() / r.numel() ** 0.5


def test_natural_below_window_unbiased():
    """Values 2^-140 times the largest fall under the 126-exponent window: still unbiased."""
    base = torch.cat([torch.tensor([1.0]), torch.exp2(torch.tensor([-130.0, -126.0])) * 1.3])
    draws = repeated_draws("natural", base)
    e_lo = 2.0 ** (1 - 125)  # top = 1 -> smallest magnitude 2^(1-125)
    assert_unbiased(draws[:, 1:], base[1:], torch.full((2,), e_lo / 2))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_stochastic_unbiased_including_subnormals(fmt):
    m, emin, fmax = {"e4m3": (3, -6, 448.0), "e5m2": (2, -14, 57344.0)}[fmt]
    # One element pins the scale to 1, others span normals and the format's subnormals.
    mags = torch.exp2(torch.linspace(emin - m - 1, 7, 127))
    base = torch.cat([torch.tensor([fmax]), mags * torch.tensor([1.0, -1.0]).repeat(64)[:127] * 1.37])
    draws = repeated_draws(f"fp8:format={fmt},rounding=stochastic,group=128", base)
    ulp = torch.exp2((torch.frexp(base.abs())[1] - 1).clamp(min=emin).float() - m)
    assert_unbiased(draws, base, ulp / 2)


@pytest.mark.parametrize("spec", ["randomk:k=5", "randomk:ratio=0.25,value_dtype=fp32"])
def test_randomk_unbiased(spec):
    c = build_codec(spec)
    base = base_vector(20)
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([c.decompress(c.compress(base, gen)) for _ in range(R)])
    assert_unbiased(draws, base, base.abs() * (20 / 5 - 1) ** 0.5)


def test_randomk_biased_variant_is_not_unbiased():
    c = build_codec("randomk:k=5,unbiased=false")
    base = base_vector(20)
    gen = torch.Generator().manual_seed(3)
    mean = torch.stack([c.decompress(c.compress(base, gen)) for _ in range(R)]).mean(0)
    assert torch.allclose(mean, base * 5 / 20, rtol=0.2, atol=0.05)  # E[C(x)] = (k/n) x
