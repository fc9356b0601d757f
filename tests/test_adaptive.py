"""compression.policy=auto (issue 11): exposed-time decisions from measured timings.

Pure logic with injected timings (the plan, the link fit and its EMA, config errors) and
2-rank gloo runs (ranks with different local timings agree; error feedback stays exact
across a bucket's codec switch; the reducer decides after its measured steps)."""
import pytest
import torch

from commtrain.config import ConfigError, load_config
from commtrain.parallel import policy
from commtrain.parallel.buckets import Bucket
from commtrain.parallel.compression import CompressionConfig, GradCompression
from tests.dist_utils import run_ranks

MS = 1e-3


def _rows(*buckets):
    """buckets: (slack_ms, {spec: (codec_ms, link_ms)})"""
    return [{"bucket": f"bucket{i}", "numel": 1000, "slack_s": s * MS,
             "times": {k: (c * MS, l * MS) for k, (c, l) in t.items()}} for i, (s, t) in enumerate(buckets)]


# -- the plan: lowest exposed time, hidden buckets raw ---------------------------------------------
def test_plan_picks_the_candidate_with_the_lowest_exposed_time():
    times = {"none": (0.1, 40.0), "fp16": (2.0, 20.0), "quant:bits=8": (4.0, 10.0), "quant:bits=4": (6.0, 5.0),
             "powersgd:rank=4": (30.0, 1.0)}
    rows = policy.plan(_rows((0.0, times)), list(times), "quant:bits=8", cpu_shared=False)
    # exposed = codec + link (nothing hides): 40.1, 22, 14, 11, 31 -> quant:bits=4
    assert rows[0]["chosen"] == "quant:bits=4"
    ex = rows[0]["exposed_ms"]
    assert min(ex, key=ex.get) == "quant:bits=4"
    assert ex["quant:bits=4"] == pytest.approx(11.0)
    assert ex["none"] == pytest.approx(40.1)
    assert "exposed 11.0 ms vs raw 40.1 ms" in rows[0]["why"]


def test_plan_cpu_codec_time_counts_even_while_backward_runs():
    # 10 ms of slack: on a GPU the codec hides in it; on a CPU it takes backward's cores.
    times = {"none": (0.0, 12.0), "quant:bits=4": (9.0, 1.0)}
    gpu = policy.plan(_rows((10.0, times)), list(times), "quant:bits=4", cpu_shared=False)
    cpu = policy.plan(_rows((10.0, times)), list(times), "quant:bits=4", cpu_shared=True)
    assert gpu[0]["chosen"] == "quant:bits=4"  # exposed 0 vs 2 ms
    assert cpu[0]["chosen"] == "none"  # 9 ms of codec delay the step more than 2 ms of link


def test_plan_hidden_buckets_stay_raw():
    times = {"none": (0.1, 20.0), "quant:bits=4": (1.0, 2.0)}
    # bucket0 ready 100 ms before backward ends: its raw reduction hides; bucket1 is ready at the end.
    rows = policy.plan(_rows((100.0, times), (0.0, times)), list(times), "quant:bits=4", cpu_shared=False)
    assert [r["chosen"] for r in rows] == ["none", "quant:bits=4"]
    assert rows[0]["why"].startswith("hidden")
    # Everything hides: nothing is compressed, whatever the codec would save in bytes.
    rows = policy.plan(_rows((100.0, times), (60.0, times)), list(times), "quant:bits=4", cpu_shared=False)
    assert [r["chosen"] for r in rows] == ["none", "none"]
    assert all(r["why"].startswith("hidden") for r in rows)


def test_plan_between_codecs_exposing_alike_prefers_the_one_busy_for_less():
    # Raw (400 ms of link) cannot hide in 250 ms of slack; fp16 (200 ms) and powersgd (20 ms)
    # both hide, so both expose 0: the plan takes powersgd, which still hides if the slack was
    # measured 10x too large (sim 100 Mbit/s: a predicted-hidden fp16 bucket exposed 150 ms).
    times = {"none": (1.0, 400.0), "fp16": (5.0, 200.0), "powersgd:rank=4": (12.0, 8.0)}
    rows = policy.plan(_rows((250.0, times)), list(times), "quant:bits=4", cpu_shared=False)
    assert rows[0]["exposed_ms"]["fp16"] == rows[0]["exposed_ms"]["powersgd:rank=4"] == 0.0
    assert rows[0]["chosen"] == "powersgd:rank=4"


def test_plan_queueing_behind_an_earlier_bucket_is_exposure():
    # Both ready 30 ms before the end; raw takes 25 ms each on the one FIFO worker: the second
    # ends 20 ms after backward. Compressing one of them is enough.
    times = {"none": (0.0, 25.0), "quant:bits=4": (2.0, 3.0)}
    rows = policy.plan(_rows((30.0, times), (30.0, times)), list(times), "quant:bits=4", cpu_shared=False)
    assert sorted(r["chosen"] for r in rows) == ["none", "quant:bits=4"]
    assert policy.exposed_s([0.03, 0.03], [0, 0], [0.025, 0.025], False) == pytest.approx(0.02)


def test_plan_ties_keep_raw():
    times = {"none": (0.0, 5.0), "fp16": (0.2, 4.9)}  # saves 0.1 ms < tolerance
    rows = policy.plan(_rows((0.0, times)), list(times), "fp16", cpu_shared=False)
    assert rows[0]["chosen"] == "none"


def test_decision_table_formats_every_candidate():
    times = {"none": (0.1, 40.0), "quant:bits=4": (6.0, 5.0)}
    rows = policy.plan(_rows((0.0, times)), list(times), "quant:bits=4", cpu_shared=False)
    text = policy.format_table(rows)
    assert "bucket0" in text and "0.1+40.0=40.1" in text and "6.0+5.0=11.0" in text and "quant:bits=4" in text
    pub = policy.public_rows(rows)
    assert pub[0]["candidates"]["none"]["link_ms"] == pytest.approx(40.0)
    assert policy.summary(rows) == "quant:bits=4 x1"


# -- the link: fit, EMA ------------------------------------------------------------------------
def test_fit_link_recovers_latency_and_bandwidth():
    lat, spb = 50e-6, 1 / 125e6  # 1 Gbit/s
    samples = [(n, 2, lat * 2 + spb * n) for n in (1024, 16384, 262144)]
    got_lat, got_spb = policy.fit_link(samples)
    assert got_lat == pytest.approx(lat, rel=1e-6)
    assert got_spb == pytest.approx(spb, rel=1e-6)


def test_link_tracker_follows_observed_transfers():
    tr = policy.LinkTracker(policy.LinkEstimate(latency_s=0.0, s_per_byte=1e-9))
    for _ in range(30):  # the link slowed down 10x
        tr.observe(1 << 20, 2, (1 << 20) * 1e-8)
    lat, spb, n = tr.local()
    assert n == 30 and lat == 0.0 and spb == pytest.approx(1e-8, rel=0.01)
    tr.observe(100, 2, 1.0)  # control messages say nothing about the link
    assert tr.local()[2] == 30


def test_link_tracker_refits_latency_from_training_traffic():
    """The start-up probe ran on a busy CPU (latency 1 ms per round, 20x too high); the buckets'
    own operations, two sizes, some of them slowed by waiting for a peer, give back the true
    latency and bandwidth from their lower envelope."""
    lat, spb = 50e-6, 8e-9  # 1 Gbit/s
    tr = policy.LinkTracker(policy.LinkEstimate(latency_s=1e-3, s_per_byte=5e-9))
    for i in range(40):
        n = (4 << 20) if i % 4 else (512 << 10)
        wait = 0.02 * (i % 3)  # a peer still in backward
        tr.observe(n, 2, 2 * lat + spb * n + wait)
    got_lat, got_spb, n = tr.local()
    assert got_lat == pytest.approx(lat, rel=1e-3) and got_spb == pytest.approx(spb, rel=1e-3)
    # with one size only, the per-byte time follows the fastest operation, latency stays the probe's
    tr1 = policy.LinkTracker(policy.LinkEstimate(latency_s=1e-3, s_per_byte=5e-9))
    for i in range(10):
        tr1.observe(4 << 20, 2, 2e-3 + spb * (4 << 20) + 0.01 * i)
    assert tr1.local()[:2] == pytest.approx((1e-3, spb), rel=1e-6)
    # then every bucket goes to PowerSGD: only small, latency-bound operations are observed. They
    # do not show the bandwidth, which stays the last one seen (not infinite: raw would win)
    for i in range(40):
        tr1.observe((4 << 10) * (1 + i % 4), 2, 2e-4)
    assert tr1.local()[:2] == pytest.approx((1e-3, spb), rel=1e-6)


# -- config ----------------------------------------------------------------------------------------
def test_bad_candidate_spec_fails_at_config_time_naming_it():
    with pytest.raises(ConfigError, match=r"compression\.candidates\[1\]='quant:bits=99'"):
        load_config(None, ["compression.candidates=[none, 'quant:bits=99']"]).validate()
    with pytest.raises(ConfigError, match=r"compression\.candidates\[0\]='nosuchcodec'"):
        load_config(None, ["compression.candidates=[nosuchcodec]"]).validate()
    with pytest.raises(ConfigError, match="compression.redecide_every"):
        load_config(None, ["compression.redecide_every=-1"]).validate()
    cfg = load_config(None, ["compression.grad=quant:bits=4", "compression.candidates=[fp16]",
                             "compression.act=auto"]).validate()
    assert cfg.compression.candidate_specs() == ["none", "quant:bits=4", "fp16"]


# -- 2 ranks --------------------------------------------------------------------------------------
def _agree_worker(rank, world):
    """Ranks with different local timings (rank 1's clock runs 3x slower, its codecs 2x) agree."""
    from commtrain.comm import Communicator

    comm = Communicator(timeout_s=60)
    ticks = iter(range(10**6))
    scale = 3.0 if rank else 1.0
    est = policy.measure_link(comm, sizes=(1024, 65536), reps=1, clock=lambda: next(ticks) * 1e-3 * scale)

    real_rehearse = policy.rehearse

    def skewed(cfg, spec, bucket, p, collective, reps=policy.REPS):
        out = real_rehearse(cfg, spec, bucket, p, collective, reps=1)
        out["codec_s"] = (0.002 if spec != "none" else 0.0001) * (2.0 if rank else 1.0)
        return out

    policy.rehearse = skewed
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64))
    gc = GradCompression(CompressionConfig(grad="quant:bits=4", min_numel=16, candidates=["fp16"], decide_after=0),
                         comm)
    b = Bucket("bucket0", True, ["w"], [w], [0], w.numel(), w.numel())
    gc.decide([b])
    gc._slack["bucket0"] = 0.001 * (1 + rank)  # different local slack too
    gc.link.observe(1 << 20, 2, 0.01 * (1 + rank))  # and a different observed link
    assert gc.begin_step(0)
    comm.close()
    return dict(est=(est.latency_s, est.s_per_byte), table=gc.decisions, choice=dict(gc.choice),
                record=gc.decision_record())


def _ef_worker(rank, world):
    """A bucket's codec changes across steps; after its switch to raw every delivered gradient
    sums to the sum of the true means (nothing error feedback held back is lost)."""
    from commtrain.comm import Communicator

    comm = Communicator(timeout_s=60)
    out = {}
    plans = {
        "all_reduce": ["quant:bits=4", "quant:bits=4", "quant:bits=8", "fp16", "quant:bits=2", "none", "none"],
        "powersgd": ["powersgd:rank=1,start_iter=0", "powersgd:rank=1,start_iter=0", "quant:bits=4", "none"],
        "reduce_scatter": ["quant:bits=4", "quant:bits=2", "none"],
    }
    for name, seq in plans.items():
        torch.manual_seed(1)
        w = torch.nn.Parameter(torch.zeros(30, 20))
        cc = CompressionConfig(grad=seq[0], min_numel=16, candidates=[s for s in seq], decide_after=0)
        gc = GradCompression(cc, comm)
        n = w.numel()
        b = Bucket("bucket0", True, ["w"], [w], [0], n, n)
        delivered = torch.zeros(n if name != "reduce_scatter" else -(-n // world))
        truth = torch.zeros(n)
        switches = []
        for step, spec in enumerate(seq):
            gc.choice["bucket0"] = spec
            g = torch.Generator().manual_seed(100 * step + 7)
            mine = [torch.randn(n, generator=g) * (1 + r) for r in range(world)]  # every rank's gradient
            truth += sum(mine) / world
            flat = mine[rank].clone()
            if name == "reduce_scatter":
                res = gc.reduce_scatter(b, flat, step).wait()
            else:
                res = gc.all_reduce(b, flat, step).wait()
                res = torch.cat([r.reshape(-1) for r in res]) if isinstance(res, list) else res
            delivered += res
            switches.append(gc.bucket_codecs["bucket0"])
        if name == "reduce_scatter":
            lo = rank * delivered.numel()
            truth = truth[lo:lo + delivered.numel()]
        out[name] = dict(err=(delivered - truth).abs().max().item(), scale=truth.abs().max().item(),
                         codecs=switches, left=sum(len(o.wire.residuals) for o in gc.options.values()
                                                   if hasattr(o.wire, "residuals")))
    comm.close()
    return out


def _reducer_worker(rank, world):
    """The reducer decides at step decide_after (not before), on every rank alike, and records
    a decision table; on a slow simulated link it compresses the bucket that is exposed."""
    from commtrain.comm import Communicator, LinkModel
    from commtrain.parallel.sync import GradReducer

    comm = Communicator(link=LinkModel.parse("20mbit"), timeout_s=60)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))
    gc = GradCompression(CompressionConfig(grad="quant:bits=4", min_numel=512, candidates=["none"],
                                           decide_after=2, redecide_every=2), comm)
    red = GradReducer(model.named_parameters(), gc, bucket_mb=0.02)
    decided_at = []
    for s in range(5):
        red.begin_step(s)
        if gc.decision_step == s:
            decided_at.append(s)
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(s + 10 * rank))
        model(x).pow(2).mean().backward()
        red.finish()
        model.zero_grad()
    red.close()
    comm.close()
    return dict(decided_at=decided_at, table=gc.decisions, codecs=dict(gc.bucket_codecs),
                link=gc.link_estimate.as_dict())


def _act_worker(rank, world):
    """compression.act=auto: both ends of a pipeline boundary choose alike."""
    from commtrain.comm import Communicator, LinkModel

    out = {}
    for name, link in (("slow", "10mbit"), ("fast", None)):
        comm = Communicator(link=LinkModel.parse(link) if link else None, timeout_s=60)
        spec, rows, est = policy.choose_act_codec(comm, ["none", "fp16", "quant:bits=4", "powersgd:rank=4"],
                                                  (4, 64, 64), torch.float32, "cpu")
        out[name] = dict(spec=spec, rows=rows, bw=est.bandwidth_bps)
        comm.close()
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_run_all, 2, timeout=240)


def _run_all(rank, world):
    return {"agree": _agree_worker(rank, world), "ef": _ef_worker(rank, world), "reducer": _reducer_worker(rank, world),
            "act": _act_worker(rank, world)}


def test_act_auto_both_ends_choose_alike(two_ranks):
    a0, a1 = two_ranks[0]["act"], two_ranks[1]["act"]
    for name in ("slow", "fast"):
        assert a0[name]["spec"] == a1[name]["spec"] and a0[name]["rows"] == a1[name]["rows"]
        assert "powersgd" not in {r["codec"] for r in a0[name]["rows"]}  # cannot serve a p2p boundary
    # 64 KB of activations: 52 ms raw at 10 Mbit/s; 4-bit sends ~8x fewer bytes
    assert a0["slow"]["spec"] != "none", a0["slow"]["rows"]
    best = min(a0["slow"]["rows"], key=lambda r: r["total_ms"])
    assert best["codec"] == a0["slow"]["spec"]


def test_ranks_with_different_local_timings_agree(two_ranks):
    a0, a1 = two_ranks[0]["agree"], two_ranks[1]["agree"]
    # the link: every rank holds the slowest rank's figures (rank 1: 3 ms per tick)
    assert a0["est"] == a1["est"]
    assert a0["table"] == a1["table"] and a0["choice"] == a1["choice"]
    row = a0["table"][0]
    assert row["times"]["quant:bits=4"][0] == pytest.approx(0.004)  # rank 1's codec time (the max)
    assert row["slack_s"] == pytest.approx(0.001)  # the least slack of the group
    assert a0["record"]["table"][0]["chosen"] == row["chosen"]


def test_error_feedback_consistent_across_codec_switches(two_ranks):
    for r in two_ranks:
        ef = r["ef"]
        assert ef["all_reduce"]["codecs"] == ["quant:bits=4", "quant:bits=4", "quant:bits=8", "fp16", "quant:bits=2",
                                              "none", "none"]
        assert ef["powersgd"]["codecs"][-1] == "none"
        for name, o in ef.items():
            # after the switch to raw, what was delivered == the sum of the true means
            assert o["err"] < 1e-4 * max(o["scale"], 1.0), (name, o)
            assert o["left"] == 0, name  # no residual left behind in any codec


def test_reducer_decides_after_measured_steps_and_ranks_agree(two_ranks):
    r0, r1 = two_ranks[0]["reducer"], two_ranks[1]["reducer"]
    assert r0["decided_at"] == [2, 4] == r1["decided_at"]
    assert r0["table"] == r1["table"] and r0["codecs"] == r1["codecs"]
    assert r0["table"] and all("why" in row and row["chosen"] in ("none", "quant:bits=4") for row in r0["table"])
    # 20 Mbit/s simulated, measured: the estimate is near it (the throttle is what the probe sees)
    assert 5e6 < r0["link"]["bandwidth_bps"] < 40e6, r0["link"]
    # the last bucket is launched at the end of backward: exposed, and 4x fewer bytes pay on this link
    last = r0["table"][-1]
    assert last["chosen"] == "quant:bits=4", last
