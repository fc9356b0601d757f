"""GradReducer: exact DP equivalence (overlap / accumulation / non-overlap), compression
policy (warm-up, small and 1-D tensors) seen in the byte meter, EF state round trip,
PowerSGD (exact on low rank, trains, replicas identical)."""
from contextlib import nullcontext

import pytest
import torch

from commtrain.compress import build_codec
from commtrain.parallel.powersgd import PowerSGDReducer
from commtrain.parallel import ParallelConfig, build_buckets
from commtrain.parallel.compression import CompressionConfig, GradCompression
from commtrain.parallel.sync import GradReducer
from tests.dist_utils import run_ranks

STEPS = 4


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 4))


def batch(step, n=16):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, 16, generator=g)
    teacher = torch.Generator().manual_seed(1)
    w = torch.randn(16, 4, generator=teacher)
    return x, torch.tanh(x @ w)  # learnable targets: loss curves mean something


def make_reducer(model, comm, codec="none", bucket_mb=4.0, overlap=True, **compression):
    """A GradReducer over ``comm`` compressing with ``codec`` (the ``compression.*`` keys in ``compression``)."""
    gc = GradCompression(CompressionConfig(grad=codec, **compression), comm)
    return GradReducer(model.named_parameters(), gc, bucket_mb=bucket_mb, overlap=overlap)


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def reference_params(steps=STEPS, lr=0.1):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for s in range(steps):
        x, y = batch(s)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _dp_worker(rank, world, mode, cfg_kwargs):
    from commtrain.comm import Communicator

    model = make_model()
    comm = Communicator(timeout_s=60)
    red = make_reducer(model, comm, **cfg_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    per_step_bytes, codecs, losses, launched = [], [], [], []
    for s in range(STEPS):
        x, y = batch(s)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        before = comm.meter.bytes["grad"]
        red.begin_step(s, overlap=(mode != "no_overlap"))
        micro = list(zip(xs.chunk(2), ys.chunk(2)))
        for i, (xm, ym) in enumerate(micro):
            # overlap: the first microbatch accumulates under no_sync, the last one's hooks launch.
            ctx = red.no_sync() if (mode == "overlap" and i < len(micro) - 1) else nullcontext()
            with ctx:
                loss = loss_fn(model, xm, ym) / len(micro)
                loss.backward()
        red.finish()
        launched.append(red.launched_in_backward)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        per_step_bytes.append(comm.meter.bytes["grad"] - before)
        codecs.append(dict(red.bucket_codecs))
    sd = red.state_dict()
    comm.close()
    return dict(params=[p.detach().clone() for p in model.parameters()], bytes=per_step_bytes, codecs=codecs,
                launched=launched,
                state=sd, buckets=[(b.key, b.compress, b.numel, b.names) for b in red.buckets])


# bucket_mb ~ 1500 floats: buckets close mid-model, at uneven boundaries.
RUNS = {
    "overlap": ("overlap", dict(codec="none", bucket_mb=0.006, min_numel=512)),
    "no_overlap": ("no_overlap", dict(codec="none", bucket_mb=0.006, min_numel=512)),
    "policy": ("overlap", dict(codec="fp16", warmup_steps=2, min_numel=512, bucket_mb=0.006, error_feedback=True)),
}


def _all_runs_worker(rank, world):
    # One process spawn for every configuration keeps this file fast on a 2-core machine.
    out = {name: _dp_worker(rank, world, mode, cfg) for name, (mode, cfg) in RUNS.items()}
    out["powersgd"] = _powersgd_worker(rank, world)
    return out


@pytest.fixture(scope="module")
def dp_runs():
    ranks = run_ranks(_all_runs_worker, 2, timeout=120)
    return {name: [r[name] for r in ranks] for name in ranks[0]}


@pytest.mark.parametrize("mode", ["overlap", "no_overlap"])
def test_dp_none_matches_single_process(mode, dp_runs):
    out = dp_runs[mode]
    ref = reference_params()
    assert len(out[0]["buckets"]) >= 3
    # Overlap really launched every bucket from the backward hooks; the other mode none.
    n = len(out[0]["buckets"])
    assert out[0]["launched"] == ([n] * STEPS if mode == "overlap" else [0] * STEPS)
    for o in out:
        for p, r in zip(o["params"], ref):
            torch.testing.assert_close(p, r, atol=1e-5, rtol=0)


def test_policy_warmup_and_small_tensors_uncompressed(dp_runs):
    out = dp_runs["policy"]
    o = out[0]
    buckets = o["buckets"]
    comp = {k for k, c, _, _ in buckets if c}
    # 1-D biases and the 4x64 weight (256 < min_numel) are in plain buckets, 64x16 / 64x64 compressed.
    names_comp = {n for k, c, _, names in buckets if c for n in names}
    assert names_comp == {"0.weight", "2.weight"}
    numel_comp = sum(n for k, c, n, _ in buckets if c)
    numel_plain = sum(n for k, c, n, _ in buckets if not c)
    # Ring all-reduce, p=2: each rank sends 2(p-1)/p = 1x the payload.
    assert o["bytes"][:2] == [4 * (numel_comp + numel_plain)] * 2
    assert o["bytes"][2:] == [2 * numel_comp + 4 * numel_plain] * 2
    for s, codecs in enumerate(o["codecs"]):
        for key, c, _, _ in buckets:
            assert codecs[key] == ("fp16" if (c and s >= 2) else "none")
    # EF residuals exist exactly for the compressed buckets, and replicas stay identical.
    assert {k.split("/")[0] for k in o["state"]["ef"]} == comp
    for a, b in zip(out[0]["params"], out[1]["params"]):
        assert torch.equal(a, b)


def test_ef_state_dict_round_trip():
    model = make_model()
    red = make_reducer(model, _FakeComm(), codec="fp16", min_numel=512)
    red.compression.wire.residuals["bucket0/ar"] = torch.randn(10)
    sd = red.state_dict()
    red2 = make_reducer(make_model(), _FakeComm(), codec="fp16", min_numel=512)
    red2.load_state_dict(sd)
    assert torch.equal(red2.compression.wire.residuals["bucket0/ar"], sd["ef"]["bucket0/ar"])
    red3 = make_reducer(make_model(), _FakeComm(), codec="fp16", error_feedback=False)
    with pytest.raises(ValueError, match="error_feedback"):
        red3.load_state_dict(sd)


def test_bucketing_reverse_order_and_config_errors():
    model = make_model()
    bs = build_buckets(model.named_parameters(), bucket_mb=1.0, min_numel=512)
    # One plain and one compressible stream, each in reverse registration order.
    by = {b.compress: b.names for b in bs}
    assert by[True] == ["2.weight", "0.weight"]
    assert by[False] == ["4.bias", "4.weight", "2.bias", "0.bias"]
    with pytest.raises(ValueError, match="bucket_mb"):
        ParallelConfig(bucket_mb=0).validate()
    with pytest.raises(ValueError, match="min_numel"):
        CompressionConfig(min_numel=-1).validate()


class _FakeComm:
    """Single replica: the mean over one rank is the input itself."""

    world_size, rank = 1, 0

    def all_reduce(self, t, codec, channel="grad", op="mean", key=None, async_op=False):
        return t.clone()


def test_powersgd_exact_on_low_rank_and_approximate_below():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    conv = torch.randn(8, 4, 3, 3, generator=g)  # reshaped to 8 x 36
    bias = torch.randn(40, generator=g)
    red = PowerSGDReducer(build_codec("powersgd:rank=3,min_compression=1"), _FakeComm())
    out = red.reduce("b", [m, bias, conv])
    torch.testing.assert_close(out[0], m, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[1], bias)  # 1-D: sent raw
    assert out[2].shape == conv.shape
    low = PowerSGDReducer(build_codec("powersgd:rank=1"), _FakeComm()).reduce("b", [m])[0]
    err = (low - m).norm() / m.norm()
    assert 0.05 < err < 1.0  # a rank-1 approximation of a rank-3 matrix: lossy, not garbage


def test_powersgd_refuses_plain_use():
    c = build_codec("powersgd:rank=2")
    assert c.needs_own_collective
    with pytest.raises(TypeError, match="only inside the data-parallel reducer"):
        c.compress(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="rank"):
        build_codec("powersgd:rank=0")


def _powersgd_worker(rank, world):
    from commtrain.comm import Communicator

    # 1) Exactness across ranks: mean of per-rank low-rank matrices sharing a column space.
    comm = Communicator(timeout_s=60)
    g = torch.Generator().manual_seed(7)
    u, v = torch.randn(30, 2, generator=g), torch.randn(2, 20, generator=g)
    mine = u @ (v * (rank + 1))  # rank(mean) = 2
    red = PowerSGDReducer(build_codec("powersgd:rank=2,min_compression=1"), comm)
    got = red.reduce("m", [mine])[0]
    exact_err = (got - u @ v * 1.5).abs().max().item()
    # 2) Training a model: loss decreases, replicas identical, bytes = P and Q factors only.
    model = make_model()
    # pinned (policy=always): under auto, the fast loopback link would (rightly) send raw bytes
    red = make_reducer(model, comm, codec="powersgd:rank=2", min_numel=512, bucket_mb=0.006, policy="always")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = batch(0, 64)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    losses = []
    for s in range(30):
        red.begin_step(s)
        loss = loss_fn(model, xs, ys)
        loss.backward()
        red.finish()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    b0 = comm.meter.bytes["grad"]
    red.begin_step(30)
    loss_fn(model, xs, ys).backward()
    red.finish()
    step_bytes = comm.meter.bytes["grad"] - b0
    comm.close()
    return dict(exact_err=exact_err, losses=losses, params=[p.detach() for p in model.parameters()],
                step_bytes=step_bytes, codecs=red.bucket_codecs)


def test_powersgd_dp_trains_and_replicas_identical(dp_runs):
    out = dp_runs["powersgd"]
    assert out[0]["exact_err"] < 1e-4
    losses = out[0]["losses"]
    assert losses[-1] < 0.5 * losses[0], losses
    for a, b in zip(out[0]["params"], out[1]["params"]):
        assert torch.equal(a, b)
    # Per step: P (64x2 + 64x2) and Q (16x2 + 64x2) fp32 factors + raw biases and 4x64 weight.
    expected = 4 * ((64 * 2 + 64 * 2) + (16 * 2 + 64 * 2) + (64 + 64 + 4 + 4 * 64))
    assert out[0]["step_bytes"] == expected
    assert "powersgd:rank=2" in set(out[0]["codecs"].values())


# -- compression.policy: "auto" prices each bucket on the measured link, "always" compresses ---------
# (issue 11: auto decides at begin_step after compression.decide_after steps, from the measured
# link -- a configured link model is measured like any other, and "no model" is the real link; the
# runs decide at step 0 between none and the configured codec)
POLICY_RUNS = {
    # name: (link, codec, policy)
    "fast_auto": ("1000gbit", "quant:bits=4", "auto"),     # raw 16 KB takes ~0.1 us: never pays
    "fast_always": ("1000gbit", "quant:bits=4", "always"),
    "slow_auto": ("1mbit", "quant:bits=4", "auto"),        # raw 16 KB takes ~130 ms: always pays
    "slow_auto_powersgd": ("1mbit", "powersgd:rank=2,start_iter=0", "auto"),
    "unknown_bw_auto": (None, "quant:bits=4", "auto"),     # no link model: the real (loopback) link is measured
}


def _policy_worker(rank, world):
    from commtrain.comm import Communicator, LinkModel

    out = {}
    for name, (link, codec, policy) in POLICY_RUNS.items():
        model = make_model()
        comm = Communicator(link=LinkModel.parse(link) if link else None, timeout_s=60)
        red = make_reducer(model, comm, codec=codec, policy=policy, min_numel=512, bucket_mb=0.006,
                           candidates=["none"], decide_after=0)
        x, y = batch(0)
        red.begin_step(0)
        loss_fn(model, x.chunk(world)[rank], y.chunk(world)[rank]).backward()
        red.finish()
        out[name] = dict(report=red.policy_report, codecs=dict(red.bucket_codecs), bytes=comm.meter.bytes["grad"],
                         raw_bytes=sum(b.numel * 4 for b in red.buckets),
                         compressible={b.key for b in red.buckets if b.compress})
        red.close()
        comm.close()
    return out


@pytest.fixture(scope="module")
def policy_runs():
    ranks = run_ranks(_policy_worker, 2, timeout=120)
    return {name: [r[name] for r in ranks] for name in ranks[0]}


def test_policy_auto_decisions_agree_across_ranks(policy_runs):
    for name in ("fast_auto", "slow_auto", "slow_auto_powersgd", "unknown_bw_auto"):
        r0, r1 = (o["report"] for o in policy_runs[name])
        assert r0 and len(r0) == len(policy_runs[name][0]["compressible"])
        # The measured codec times are the group's max, so the inputs (not just the outcome) agree.
        assert r0 == r1, name
        assert policy_runs[name][0]["codecs"] == policy_runs[name][1]["codecs"]


def test_policy_auto_fast_link_sends_raw(policy_runs):
    o = policy_runs["fast_auto"][0]
    # The decision follows the measured exposed times (a codec must save > 0.5 ms). On a quiet
    # machine the 1000 Gbit/s link leaves every bucket raw; under heavy CPU load the measured
    # per-message latency grows and can make a codec with fewer rounds worth it, so the test
    # checks the rule against the measurements rather than a fixed outcome.
    # checks that the wire did what the table says (the rule itself: tests/test_adaptive.py,
    # with injected timings).
    for r in o["report"]:
        assert o["codecs"][r["bucket"]] == r["chosen"], r
        if r["compress"]:  # a codec is only chosen where it lowers the modeled exposed time
            assert r["exposed_ms"][r["chosen"]] < r["exposed_ms"]["none"], r
    if not any(r["compress"] for r in o["report"]):
        assert set(o["codecs"].values()) == {"none"}
        assert o["bytes"] == o["raw_bytes"]  # ring, p=2: each rank sends the payload once


def test_policy_auto_slow_link_compresses(policy_runs):
    for name, spec in (("slow_auto", "quant:bits=4"), ("slow_auto_powersgd", "powersgd:rank=2,start_iter=0")):
        o = policy_runs[name][0]
        assert all(r["compress"] for r in o["report"]), o["report"]
        assert all(r["times"][spec][1] < r["times"]["none"][1] / 2 for r in o["report"])
        assert {o["codecs"][k] for k in o["compressible"]} == {spec}
        assert o["bytes"] < o["raw_bytes"] / 2


def test_policy_always_compresses_and_no_link_model_is_measured(policy_runs):
    o = policy_runs["fast_always"][0]
    assert o["report"] == []  # no decision taken
    assert {o["codecs"][k] for k in o["compressible"]} == {"quant:bits=4"}
    assert o["bytes"] < o["raw_bytes"] / 2
    # No link model: auto still decides, from the measured real link (no special case).
    o = policy_runs["unknown_bw_auto"][0]
    assert len(o["report"]) == len(o["compressible"])
    assert all(r["times"]["none"][1] > 0 for r in o["report"])
