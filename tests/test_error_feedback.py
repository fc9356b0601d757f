"""ErrorFeedback: exact residual accounting, checkpoint round trip, convergence with top-k."""
from __future__ import annotations

import pytest
import torch

from commtrain.compress import ErrorFeedback, build_codec


def test_residual_accounting_is_exact():
    ef = ErrorFeedback("topk:ratio=0.05")
    g = torch.Generator().manual_seed(0)
    total_in = torch.zeros(1000, dtype=torch.float64)
    total_out = torch.zeros(1000, dtype=torch.float64)
    for _ in range(30):
        x = torch.randn(1000, generator=g)
        total_in += x.double()
        total_out += ef.decompress(ef.compress(x, "w")).double()
    gap = total_in - (total_out + ef.residuals["w"].double())
    assert gap.abs().max() < 1e-4  # only fp32 rounding of the additions
    assert ef.residuals["w"].abs().max() > 0.1  # something really was held back


@pytest.mark.parametrize("spec", ["quant:bits=2,rounding=nearest", "natural", "fp8", "randomk:k=10,unbiased=false"])
def test_accounting_for_other_codecs_and_shapes(spec):
    ef = ErrorFeedback(spec)
    xs = [torch.randn(4, 25) for _ in range(5)]
    out = sum(ef.decompress(ef.compress(x, "layer.0.weight")) for x in xs)
    assert torch.allclose(out + ef.residuals["layer.0.weight"], sum(xs), atol=1e-5)
    assert ef.residuals["layer.0.weight"].shape == (4, 25) and ef.residuals["layer.0.weight"].dtype == torch.float32


def test_keys_are_independent_and_shapes_checked():
    ef = ErrorFeedback(build_codec("topk:k=1"))
    ef.compress(torch.tensor([1.0, 2.0]), "a")
    ef.compress(torch.tensor([5.0, 0.5, 0.1]), "b")
    assert torch.equal(ef.residuals["a"], torch.tensor([1.0, 0.0]))
    assert torch.equal(ef.residuals["b"], torch.tensor([0.0, 0.5, 0.1]))
    with pytest.raises(ValueError, match="shape"):
        ef.compress(torch.zeros(3), "a")
    with pytest.raises(TypeError, match="key"):
        ef.compress(torch.zeros(2), 0)


def test_half_precision_input():
    ef = ErrorFeedback("topk:k=2")
    x = torch.randn(10).half()
    y = ef.decompress(ef.compress(x, "h"))
    assert y.dtype == torch.float16 and ef.residuals["h"].dtype == torch.float32
    assert torch.allclose(y.float() + ef.residuals["h"], x.float())


def test_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(200, generator=g) for _ in range(6)]
    a = ErrorFeedback("topk:ratio=0.1")
    for x in xs[:3]:
        a.compress(x, "p")
    state = a.state_dict()
    assert set(state) == {"p"} and state["p"].device.type == "cpu"
    b = ErrorFeedback("topk:ratio=0.1")
    b.load_state_dict(state)
    state["p"].zero_()  # the restored copy must not alias the checkpoint
    for x in xs[3:]:
        assert torch.equal(a.decompress(a.compress(x, "p")), b.decompress(b.compress(x, "p")))
    assert torch.equal(a.residuals["p"], b.residuals["p"])
    b.reset()
    assert b.state_dict() == {}


def test_topk_one_percent_with_ef_converges_to_input():
    """Sending the same vector T times with 1% top-k + EF: the mean output tends to x
    (the residual stays bounded, so the error of the mean decays like 1/T)."""
    x = torch.randn(2000, generator=torch.Generator().manual_seed(2))
    ef = ErrorFeedback("topk:ratio=0.01")
    total = torch.zeros_like(x)
    errs = {}
    for t in range(1, 801):
        total += ef.decompress(ef.compress(x, "g"))
        if t in (100, 800):
            errs[t] = float((total / t - x).norm() / x.norm())
    assert errs[800] < 0.1 and errs[800] < errs[100] / 3, errs
    # Without error feedback the mean stays at the top-1% of x, far from x.
    c = build_codec("topk:ratio=0.01")
    assert float((c.decompress(c.compress(x)) - x).norm() / x.norm()) > 0.9


def test_passthrough_properties_and_sizes():
    ef = ErrorFeedback("quant:bits=4,rounding=nearest")
    assert ef.payload_nbytes(1000) == ef.codec.payload_nbytes(1000) == 500 + 64
    assert ef.wire_nbytes((10, 100)) == 564
    assert ef.contractive and not ef.unbiased and ef.properties() == ef.codec.properties()
    assert ef.spec == "quant:bits=4,rounding=nearest"


def test_nonfinite_input_never_poisons_the_residual():
    """One NaN/inf gradient element must not turn the residual (and every later step of the
    tensor) into NaN: the residual keeps its old value there, the event is counted."""
    ef = ErrorFeedback("quant:bits=4,group=16,rounding=nearest")
    g = torch.Generator().manual_seed(0)
    ef.compress(torch.randn(64, generator=g), "w")
    before = ef.residuals["w"].clone()
    bad = torch.randn(64, generator=g)
    bad[3], bad[40] = float("nan"), float("inf")
    ef.compress(bad, "w")
    e = ef.residuals["w"]
    assert bool(torch.isfinite(e).all())
    # the groups holding the bad values keep their old residual; the others moved on
    assert torch.equal(e[0:16], before[0:16]) and torch.equal(e[32:48], before[32:48])
    assert not torch.equal(e[16:32], before[16:32])
    assert ef.take_nonfinite() == 32 and ef.take_nonfinite() == 0  # two 16-element groups, counted once
    for _ in range(3):  # later steps are finite again
        x = torch.randn(64, generator=g)
        assert bool(torch.isfinite(ef.decompress(ef.compress(x, "w"))).all())
    assert bool(torch.isfinite(ef.residuals["w"]).all())


def test_grad_compression_reports_nonfinite_and_stays_finite():
    from commtrain.comm import Communicator, LinkModel
    from commtrain.parallel.buckets import Bucket
    from commtrain.parallel.compression import CompressionConfig, GradCompression

    gc = GradCompression(CompressionConfig(grad="quant:bits=4,group=64", policy="always"),
                         Communicator.loopback(2, LinkModel.parse("1gbit")))
    b = Bucket("bucket0", True, ["w"], [torch.zeros(64, 32)], [0], 2048, 2048)
    x = torch.randn(2048)
    x[5] = float("nan")
    gc.all_reduce(b, x, step=0).wait()
    assert gc.stats()["ef_nonfinite"] > 0
    assert all(bool(torch.isfinite(r).all()) for r in gc.wire.residuals.values())
    out = gc.all_reduce(b, torch.randn(2048), step=1).wait()
    assert bool(torch.isfinite(out).all()) and gc.stats()["ef_nonfinite"] == 0
    gc.comm.close()
