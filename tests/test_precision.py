"""train.precision (bf16 / fp16 autocast, fp32 master weights, agreed fp16 loss scaling).

* bf16 trains data-parallel with 4-bit gradients + EF and as a pp=2 pipeline; its losses
  track the same run in fp32 within LOSS_TOL per step (tiny model, 6 steps), and the pipeline
  sends its boundary activations in bf16 (the meter counts half of fp32's bytes).
* fp16: an inf in one rank's gradient (a loss-scale overflow) -- hidden from the wire by a
  random-k codec that does not send it -- vetoes the step on every rank: no parameter moves
  anywhere, the scale halves everywhere, error-feedback residuals stay finite, and the next
  step proceeds. End to end (torchrun) the same through the trainer's fault injection.
* Bad input: one ConfigError line at start-up.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from commtrain.config import ConfigError, load_config
from commtrain.metrics import read_metrics
from commtrain.precision import LossScaler, Precision
from tests.dist_utils import run_ranks
from test_train import run

# bf16 vs fp32, same seed/data, 6 steps of the tiny config: per-step loss difference bound.
LOSS_TOL = 0.01  # measured: <= 0.0004 (dp, 4-bit grads) and 0.0003 (pp=2)
GRAD = ("compression.grad=quant:bits=4,group=64", "compression.min_numel=512", "compression.policy=always")
# act_first=none: first visits go in the compute dtype, so the bytes below show bf16's halving.
PP2 = ("parallel.pp=2", "parallel.microbatches=2", "compression.act=quant:bits=4,group=32",
       "compression.act_first=none")


def _rows(run_dir, name="metrics.jsonl"):
    return [r for r in read_metrics(run_dir / name) if "event" not in r]


# -- config --------------------------------------------------------------------------------
def test_bad_precision_is_one_config_line():
    with pytest.raises(ConfigError, match=r"train.precision='fp8' is invalid; allowed: fp32, bf16, fp16") as e:
        load_config("tiny", ["train.precision=fp8"]).validate()
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="train.precision=fp16 with sync.strategy=diloco") as e:
        load_config("tiny", ["train.precision=fp16", "sync.strategy=diloco"]).validate()
    assert "\n" not in str(e.value)
    load_config("tiny", ["train.precision=bf16", "sync.strategy=diloco"]).validate()


def test_precision_the_device_cannot_run_is_one_config_line(monkeypatch):
    import commtrain.config as config

    monkeypatch.setattr(config, "autocast_supported",
                        lambda prec, device: None if prec == "bf16" else "torch.autocast('cpu') has no float16")
    with pytest.raises(ConfigError, match=r"train.precision=fp16 is not available on cpu: .* allowed here: fp32, bf16"):
        load_config("tiny", ["train.precision=fp16"]).validate()
    load_config("tiny", ["train.precision=bf16"]).validate()


def test_loss_scaler_schedule_and_state():
    s = LossScaler(init_scale=8.0, growth_interval=2)
    s.update(True)
    assert s.scale == 4.0 and s.good_steps == 0
    s.update(False), s.update(False)
    assert s.scale == 8.0
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    p = Precision("bf16", torch.device("cpu"))
    assert p.scaler is None and p.loss_scale == 1.0 and p.act_dtype == torch.bfloat16
    with p.autocast():
        assert nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16


# -- codecs take bf16/fp16 tensors -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_codec_takes_half_precision_input(dtype):
    from commtrain.compress import available_codecs, build_codec
    from commtrain.compress.kernels.torch_ops import to_bytes

    x = torch.randn(3, 1000, dtype=dtype)
    for name in available_codecs():
        codec = build_codec(name)
        if getattr(codec, "needs_own_collective", False):  # powersgd: DP gradients only (fp32)
            continue
        pkt = codec.compress(x, key="k")
        assert pkt.payload.numel() == codec.payload_nbytes(x.numel(), dtype), name
        y = codec.decompress(pkt)
        assert y.dtype == dtype and y.shape == x.shape, name
    # a cast to the tensor's own dtype (and none) sends its bytes as they are: no fp32 round trip
    for name in ("none", "bf16" if dtype == torch.bfloat16 else "fp16"):
        pkt = build_codec(name).compress(x)
        assert torch.equal(pkt.payload, to_bytes(x.reshape(-1))) and torch.equal(build_codec(name).decompress(pkt), x)


# -- fp16 overflow on one rank: every rank skips together -------------------------------------
def _fp16_worker(rank, world):
    from commtrain.comm import Communicator
    from commtrain.guard import StepGuard
    from commtrain.parallel.compression import CompressionConfig
    from commtrain.parallel.sync import DataParallel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    poison = {"on": False}

    def inf_hook(p):  # before the reducer's hook: one element of one rank's gradient overflows
        if poison["on"] and rank == 1 and p.dim() == 2 and p.shape[0] == 64:
            p.grad[3, 5] = float("inf")

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(inf_hook)
    cc = CompressionConfig(grad="randomk:ratio=0.05", min_numel=512, policy="always")
    sync = DataParallel(model.named_parameters(), lambda ps: torch.optim.AdamW(ps, lr=1e-2), Communicator(timeout_s=60),
                        compression=cc, bucket_mb=0.01)
    prec = Precision("fp16", torch.device("cpu"))
    prec.scaler.scale = 2.0 ** 8  # no genuine fp16 overflow in this tiny model: only the injected one
    gc = sync.compression
    gc.check_finite = True
    guard = StepGuard(torch.device("cpu"), lambda: False)
    g = torch.Generator().manual_seed(1 + rank)
    out = []
    for step in range(4):
        poison["on"] = step == 2
        x = torch.randn(16, 64, generator=g)
        y = torch.randint(0, 8, (16,), generator=g)
        before = [p.detach().clone() for p in model.parameters()]
        gc.loss_scale = prec.loss_scale
        sync.begin_step(step)
        with prec.autocast():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        prec.scale(loss).backward()
        stats = sync.step(max_grad_norm=1.0, veto=guard.veto(loss.item(), gc.take_overflow))
        sync.zero_grad()
        agreed = guard.outcome()
        overflow = prec.overflowed(agreed.nonfinite, agreed.loss)
        moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        residuals = sync.compression.wire.state_dict()
        out.append(dict(skipped=stats["skipped"], overflow=overflow, moved=moved, scale=prec.loss_scale,
                        grad_norm=stats["grad_norm"], ef_finite=all(bool(torch.isfinite(r).all())
                                                                    for r in residuals.values()),
                        n_residuals=len(residuals)))
    out.append([p.detach().clone() for p in model.parameters()])
    return out


def test_fp16_overflow_on_one_rank_skips_on_every_rank_and_keeps_ef_clean():
    r0, r1 = run_ranks(_fp16_worker, 2)
    for res in (r0, r1):
        steps = res[:4]
        assert [s["skipped"] for s in steps] == [False, False, True, False]
        assert [s["overflow"] for s in steps] == [False, False, True, False]
        assert [s["moved"] for s in steps] == [True, True, False, True]
        assert [s["scale"] for s in steps] == [2.0 ** 8, 2.0 ** 8, 2.0 ** 7, 2.0 ** 7]
        assert all(s["ef_finite"] and s["n_residuals"] > 0 for s in steps)
    for a, b in zip(r0[4], r1[4]):  # replicas identical after the skipped step
        assert torch.equal(a, b)


def test_grad_compression_unscales_and_flags_local_overflow():
    from commtrain.parallel.compression import GradCompression

    gc = GradCompression(None, comm=None)
    gc.check_finite, gc.loss_scale = True, 2.0 ** 10
    flat = torch.full((8,), 2.0 ** 10)
    gc._prepare(flat)
    assert torch.equal(flat, torch.ones(8)) and gc.take_overflow() is False
    flat[3] = float("inf")
    gc._prepare(flat)
    gc._prepare(torch.ones(4))  # a later finite bucket does not clear it
    assert gc.take_overflow() is True and gc.take_overflow() is False  # read once per step


# -- end to end (torchrun, the tiny config) -----------------------------------------------------
@pytest.mark.slow
def test_bf16_dp_and_pp2_track_fp32(tmp_path):
    for name, sets in (("dp", GRAD), ("pp", PP2)):
        run(tmp_path / f"{name}32", 2, *sets, "train.eval_every=0")
        run(tmp_path / f"{name}16", 2, *sets, "train.precision=bf16", "train.eval_every=0")
        a, b = _rows(tmp_path / f"{name}32"), _rows(tmp_path / f"{name}16")
        assert len(a) == len(b) == 6
        diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
        assert max(diffs) < LOSS_TOL, diffs
        assert b[-1]["loss"] < b[0]["loss"] - 0.5  # it trains
        assert any(x["loss"] != y["loss"] for x, y in zip(a, b))  # and really ran in bf16
    # the pipeline's first step sends every activation uncompressed (first visits, act_first=none):
    # in bf16 that is half of fp32's bytes; act_grad (codec none) likewise on every step.
    act = lambda d, name="metrics.jsonl": [r["wire_bytes"]["act"] for r in _rows(tmp_path / d, name)]  # noqa: E731
    mb_elems = 2 * 32 * 64  # microbatch 2 x seq 32 x width 64
    assert act("pp32")[0] == 2 * mb_elems * 4 and act("pp16")[0] == 2 * mb_elems * 2
    grads = [r["wire_bytes"]["act_grad"] for r in _rows(tmp_path / "pp16", "metrics_rank1.jsonl")]
    assert grads == [2 * mb_elems * 2] * 6


@pytest.mark.slow
def test_fp16_end_to_end_overflow_skips_together(tmp_path):
    env = {"COMMTRAIN_NONFINITE_STEPS": "3", "COMMTRAIN_NONFINITE_RANK": "1", "COMMTRAIN_NONFINITE_VALUE": "inf"}
    run(tmp_path, 2, *GRAD, "train.precision=fp16", "train.nonfinite=stop", "train.eval_every=0", env=env)
    for name in ("metrics.jsonl", "metrics_rank1.jsonl"):
        rows = _rows(tmp_path, name)
        assert [r["skipped"] for r in rows] == [False, False, True, False, False, False]
        assert [r["loss_scale"] for r in rows] == [2.0 ** 16] * 3 + [2.0 ** 15] * 3
        # error feedback refused the inf (kept the old residuals) at the skipped step only
        assert all(r["ef_nonfinite"] == 0 for r in rows if r["step"] != 3)
    ck = tmp_path / "checkpoints" / "step_00000006"
    s0, s1 = (torch.load(ck / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in s0["model"].items():
        assert torch.equal(v, s1["model"][k]), k
    for s in (s0, s1):
        assert s["sync"]["reducer"]["ef"] and all(bool(torch.isfinite(v).all()) for v in s["sync"]["reducer"]["ef"].values())
    assert s0["precision"]["scaler"]["scale"] == 2.0 ** 15 and s0["precision"]["scaler"]["overflows"] == 1
