"""compression.policy=auto through every strategy: the plain DP reducer, ZeRO and the DDP comm
hook share one GradCompression, so on the same link they take the same decisions (all ranks
alike), rehearsing the real collective each of them runs.

Issue 11 changed what auto decides from (the *measured* link, exposed time, a candidate list,
decisions at begin_step after ``decide_after`` steps): the runs here pin the candidates to
``[none, quant:bits=4]``, decide at step 0 (``decide_after=0``; the DDP hook decides from its
third iteration, after DDP's bucket rebuild) and read the new decision table."""
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from commtrain.parallel.compression import CompressionConfig
from tests.dist_utils import run_ranks

LINKS = {"slow": "1mbit", "fast": "1000gbit"}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 4))


def _step(model, sync_like, rank, world):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 16, generator=g)
    model(x.chunk(world)[rank]).pow(2).mean().backward()


def _worker(rank, world):
    from commtrain.comm import Communicator, LinkModel
    from commtrain.parallel.ddp_hook import CommtrainHookState, commtrain_hook
    from commtrain.parallel.sync import build_sync

    out = {}
    for name, spec in LINKS.items():
        cc = CompressionConfig(grad="quant:bits=4", min_numel=512, policy="auto", candidates=["none"], decide_after=0)
        comm = Communicator(link=LinkModel.parse(spec), timeout_s=60)
        res = {}
        for strategy, kw in (("data_parallel", {}), ("zero", dict(stage=2))):
            model = make_model()
            sync = build_sync(strategy, model.named_parameters(), lambda ps: torch.optim.SGD(ps, lr=0.1), comm,
                              compression=cc, bucket_mb=0.006, **kw)
            for s in range(2):
                sync.begin_step(s)
                _step(model, sync, rank, world)
                sync.step()
                sync.zero_grad()
            res[strategy] = dict(decisions=[(r["bucket"], r["compress"]) for r in sync.compression.decisions],
                                 report=sync.compression.decisions, codecs=dict(sync.compression.bucket_codecs))
            sync.close()
        model = make_model()
        ddp = DDP(model, bucket_cap_mb=0.006)
        state = CommtrainHookState(cc, comm=comm)
        ddp.register_comm_hook(state, commtrain_hook)
        for _ in range(4):  # DDP rebuilds its buckets after the first iteration; decides at the third
            _step(ddp, None, rank, world)
            ddp.zero_grad()
        res["ddp_hook"] = dict(decisions=[(r["bucket"], r["compress"]) for r in state.compression.decisions],
                               report=state.compression.decisions, codecs=dict(state.bucket_codecs))
        comm.close()
        out[name] = res
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_worker, 2, timeout=180)


@pytest.mark.parametrize("link,expect", [("slow", True), ("fast", False)])
def test_auto_decides_the_same_in_reducer_zero_and_ddp_hook(runs, link, expect):
    for strategy in ("data_parallel", "zero", "ddp_hook"):
        r0, r1 = runs[0][link][strategy], runs[1][link][strategy]
        assert r0["decisions"], (link, strategy)
        assert r0["report"] == r1["report"], (link, strategy)  # same inputs on every rank, not just outcome
        assert {c for _, c in r0["decisions"]} == {expect}, (link, strategy, r0["report"])
        compressed = {k for k, v in r0["codecs"].items() if v != "none"}
        assert bool(compressed) == expect, (link, strategy, r0["codecs"])
        for rec in r0["report"]:  # each strategy rehearsed its own collective and priced it on the measured link
            q, raw = rec["times"]["quant:bits=4"], rec["times"]["none"]
            assert q[1] > 0 and raw[1] > 0
            assert rec["compress"] == (rec["chosen"] == "quant:bits=4")


def test_auto_compressed_link_time_is_the_price_of_the_collective(runs):
    # ZeRO-2 reduce-scatters (half the bytes of an all-reduce): its priced link time per
    # compressed bucket is below the reducer's all-reduce of a bucket of the same size.
    dp = {r["numel"]: r["times"]["quant:bits=4"][1] for r in runs[0]["slow"]["data_parallel"]["report"]}
    z = {r["numel"]: r["times"]["quant:bits=4"][1] for r in runs[0]["slow"]["zero"]["report"]}
    common = set(dp) & set(z)
    assert common, (dp, z)
    for n in common:
        assert z[n] < 0.75 * dp[n], (n, z[n], dp[n])
