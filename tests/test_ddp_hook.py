"""The DDP comm hook: with ``none`` it equals stock DDP bit for bit; with lossy codecs
(4-bit quantization + EF, PowerSGD) training progresses and replicas stay identical."""
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from commtrain.parallel.compression import CompressionConfig
from commtrain.parallel.ddp_hook import CommtrainHookState, commtrain_hook
from tests.dist_utils import run_ranks

STEPS = 12


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 4))


def batch(step, n=32):
    g = torch.Generator().manual_seed(300 + step % 4)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    return x, torch.tanh(x @ w)


def _train(rank, world, hook_codec, steps=STEPS, **state_kw):
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=0.004)  # several buckets, mixed big/small tensors
    state = None
    if hook_codec is not None:
        state = CommtrainHookState(CompressionConfig(grad=hook_codec, **state_kw))
        ddp.register_comm_hook(state, commtrain_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for s in range(steps):
        x, y = batch(s)
        loss = torch.nn.functional.mse_loss(ddp(x.chunk(world)[rank]), y.chunk(world)[rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    info = {}
    if state is not None:
        info = dict(codecs=dict(state.bucket_codecs), bytes=state.meter.bytes["grad"], sd=state.state_dict())
        state.comm.close()
    return dict(params=[p.detach().clone() for p in model.parameters()], losses=losses, **info)


def _hook_worker(rank, world):
    return {
        "stock": _train(rank, world, None),
        "none": _train(rank, world, "none"),
        # pinned (policy=always): auto would (rightly, issue 11) send raw bytes on the fast loopback link
        "quant4": _train(rank, world, "quant:bits=4,group=64", min_numel=512, warmup_steps=1, policy="always"),
        "powersgd": _train(rank, world, "powersgd:rank=2,start_iter=1", min_numel=512, warmup_steps=1,
                           policy="always"),
        # auto decides from iteration 2 on and switches buckets between codecs: replicas stay identical
        "auto": _train(rank, world, "quant:bits=4,group=64", min_numel=512, decide_after=0, redecide_every=3),
        "auto_powersgd": _train(rank, world, "powersgd:rank=2,start_iter=0", min_numel=512, decide_after=0,
                                redecide_every=3),
    }


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_hook_worker, 2, timeout=120)


def test_none_matches_stock_ddp_exactly(runs):
    for r in runs:
        for a, b in zip(r["stock"]["params"], r["none"]["params"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["quant4", "powersgd"])
def test_lossy_hook_trains_and_replicas_identical(runs, name):
    a, b = runs[0][name], runs[1][name]
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
    assert a["losses"][-1] < 0.5 * a["losses"][0], a["losses"]
    assert any(c.startswith(name[:5]) for c in a["codecs"].values())
    # Far fewer bytes than the uncompressed hook sent for the same steps.
    assert a["bytes"] < 0.5 * runs[0]["none"]["bytes"]


@pytest.mark.parametrize("name", ["auto", "auto_powersgd"])
def test_auto_hook_trains_and_replicas_identical(runs, name):
    a, b = runs[0][name], runs[1][name]
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
    assert a["codecs"] == b["codecs"]
    assert a["losses"][-1] < 0.5 * a["losses"][0], a["losses"]


def test_quant_hook_keeps_ef_residuals_per_bucket(runs):
    sd = runs[0]["quant4"]["sd"]
    assert sd["iteration"] == STEPS
    assert sd["ef"] and all(k.startswith("bucket") for k in sd["ef"])
    state = CommtrainHookState(CompressionConfig(grad="quant:bits=4,group=64"), comm=_NoComm())
    state.load_state_dict(sd)
    assert state.iteration == STEPS
    assert all(torch.equal(state.compression.wire.residuals[k], v) for k, v in sd["ef"].items())


class _NoComm:
    meter = None


def test_split_policy_sends_small_and_1d_exactly():
    state = CommtrainHookState(CompressionConfig(grad="quant:bits=4", min_numel=100), comm=_NoComm())
    params = [torch.zeros(10, 20), torch.zeros(20), torch.zeros(5, 4), torch.zeros(30, 10)]
    buf = torch.zeros(sum(p.numel() for p in params))
    grads, off = [], 0
    for p in params:
        grads.append(buf[off:off + p.numel()].view_as(p))
        off += p.numel()
    comp, plain = state.split("bucket0", buf, grads, params)
    assert comp == [(0, 200), (240, 540)]  # the two matrices with >= 100 elements
    assert plain == [(200, 240)]  # the 1-D bias and the 5x4 matrix, merged into one run
