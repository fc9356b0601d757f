"""DGC-style density warm-up for sparsifying gradient codecs (compression.density_warmup_steps)."""
import math

import pytest
import torch

from commtrain.comm import Communicator, LinkModel
from commtrain.parallel.buckets import Bucket
from commtrain.parallel.compression import DENSITY_START, CompressionConfig, GradCompression
from commtrain.validate import ConfigError


def _gc(n=10, **kw):
    cfg = CompressionConfig(grad="topk:ratio=0.01", policy="always", density_warmup_steps=n, **kw)
    cfg.validate()
    return GradCompression(cfg, Communicator.loopback(2, LinkModel.parse("1gbit")))


def _bucket():
    return Bucket("bucket0", True, ["w"], [torch.zeros(100, 100)], [0], 10_000, 10_000)


def test_ratio_shrinks_geometrically_to_the_codec_ratio():
    gc, b = _gc(10), _bucket()
    ratios = [gc.codec_for(b, step).codec.ratio for step in range(12)]
    assert ratios[0] == pytest.approx(DENSITY_START)
    assert ratios[5] == pytest.approx(math.sqrt(DENSITY_START * 0.01))  # log-linear midpoint
    assert all(a > c for a, c in zip(ratios[:10], ratios[1:10]))
    assert gc.codec_for(b, 10) is gc.wire and gc.codec_for(b, 11) is gc.wire  # after: the run's codec
    assert gc.bucket_codecs["bucket0"] == gc.wire.spec
    gc.comm.close()


def test_warmup_starts_after_the_uncompressed_warmup():
    gc, b = _gc(4, warmup_steps=3), _bucket()
    assert gc.codec_for(b, 2) is gc.plain
    assert gc.codec_for(b, 3).codec.ratio == pytest.approx(DENSITY_START)
    assert gc.codec_for(b, 7) is gc.wire
    gc.comm.close()


def test_residuals_carry_across_ratio_changes():
    gc, b = _gc(4), _bucket()
    g = torch.Generator().manual_seed(0)
    for step in range(4):  # warm-up steps: each at its own ratio, one set of residuals
        gc.all_reduce(b, torch.randn(10_000, generator=g), step=step).wait()
    held = {k: v.clone() for k, v in gc.wire.residuals.items()}
    assert held and all(float(v.abs().sum()) > 0 for v in held.values())
    # The first step after the warm-up sends the held residuals too: a run without that history
    # (same input, no residuals) sends something else.
    x = torch.randn(10_000, generator=g)
    out = gc.all_reduce(b, x.clone(), step=4).wait()
    fresh = _gc(0)
    assert not torch.equal(out, fresh.all_reduce(b, x.clone(), step=4).wait())
    gc.comm.close()
    fresh.comm.close()


def test_bytes_per_step_shrink_during_warmup():
    gc, b = _gc(4), _bucket()
    sizes = [gc.codec_for(b, s).payload_nbytes(10_000) for s in range(5)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 10 * sizes[4]
    gc.comm.close()


def test_needs_a_sparsifier():
    with pytest.raises(ConfigError, match="density_warmup_steps=5 needs a sparsifying"):
        CompressionConfig(grad="quant:bits=4", density_warmup_steps=5).validate()
    with pytest.raises(ConfigError, match="density_warmup_steps"):
        CompressionConfig(grad="topk:ratio=0.01", density_warmup_steps=-1).validate()
