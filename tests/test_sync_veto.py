"""The GradSync veto: every strategy lets the caller skip an update after the reduction.

2 gloo ranks; data_parallel (stage 0), ZeRO-1 and ZeRO-2 (4-bit gradients + EF, quantized
parameter gather). Two good steps, then a step whose gradient is NaN on rank 1 only: the
veto sees the *global* norm (NaN on both ranks after the mean), the step is skipped --
parameters, optimizer state and ZeRO's master shard bit-identical to before -- and the next
good step proceeds exactly as if the bad batch had never been seen by the optimizer.
"""
import copy

import torch

from tests.dist_utils import run_ranks
from tests.test_zero import ZeroOptimizer, adamw, batch, loss_fn, make_model

KW = dict(min_numel=512, bucket_mb=0.004)


def _step(rank, world, model, sync, s, poison=False, veto=None, clip=1.0):
    x, y = batch(s)
    sync.begin_step(s)
    loss = loss_fn(model, x.chunk(world)[rank], y.chunk(world)[rank])
    if poison and rank == 1:
        loss = loss * float("nan")
    loss.backward()
    stats = sync.step(max_grad_norm=clip, veto=veto)
    sync.zero_grad()
    return stats


def _worker(rank, world):
    from commtrain.comm import Communicator

    comm = Communicator(timeout_s=60)
    out = {}
    for name, kw in (("dp", dict(stage=0)), ("zero1", dict(stage=1)),
                     ("zero2", dict(stage=2, grad_codec="quant:bits=4,group=64",
                                    param_codec="quant:bits=8,group=256,rounding=nearest,scheme=absmax"))):
        model = make_model()
        sync = ZeroOptimizer(model.named_parameters(), adamw, comm, **KW, **kw)
        seen = []
        veto = lambda norm: seen.append(float(norm)) or not bool(torch.isfinite(norm))  # noqa: E731
        for s in range(2):
            assert _step(rank, world, model, sync, s, veto=veto)["skipped"] is False
        params = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(sync.state_dict())
        bad = _step(rank, world, model, sync, 2, poison=True, veto=veto)
        after = [p.detach().clone() for p in model.parameters()]
        state_after = copy.deepcopy(sync.state_dict())
        good = _step(rank, world, model, sync, 3, veto=veto)
        out[name] = dict(bad=bad, seen=seen, params=params, after=after, opt=state["optimizer"],
                         opt_after=state_after["optimizer"], master=state.get("master"),
                         master_after=state_after.get("master"), good=good,
                         moved=[p.detach().clone() for p in model.parameters()])
    return out


def _same(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_veto_skips_the_update_on_every_strategy():
    for rank, out in enumerate(run_ranks(_worker, 2, timeout=240)):
        for name, r in out.items():
            tag = f"{name} rank {rank}"
            assert r["bad"]["skipped"] is True, tag
            assert len(r["seen"]) == 4 and torch.isnan(torch.tensor(r["seen"][2])), tag  # called once per step
            assert all(torch.equal(a, b) for a, b in zip(r["params"], r["after"])), tag  # no update, no gather
            assert _same(r["opt"], r["opt_after"]), tag  # optimizer state (step counts, moments) untouched
            if r["master"] is not None:
                assert torch.equal(r["master"], r["master_after"]), tag  # ZeRO's fp32 shard untouched
            assert r["good"]["skipped"] is False and all(torch.isfinite(p).all() for p in r["moved"]), tag
            assert any(not torch.equal(a, b) for a, b in zip(r["after"], r["moved"])), tag  # next step updates


def _no_veto_worker(rank, world):
    from commtrain.comm import Communicator

    comm = Communicator(timeout_s=60)
    res = []
    for use_veto in (False, True):
        model = make_model()
        sync = ZeroOptimizer(model.named_parameters(), adamw, comm, stage=0, **KW)
        for s in range(3):
            _step(rank, world, model, sync, s, veto=(lambda n: False) if use_veto else None)
        res.append([p.detach().clone() for p in model.parameters()])
    return res


def test_a_veto_that_never_skips_changes_nothing():
    """Norm first, clip after (clip_grad_norm_ in two halves): bit-identical to no veto."""
    for plain, vetoed in run_ranks(_no_veto_worker, 2, timeout=120):
        assert all(torch.equal(a, b) for a, b in zip(plain, vetoed))
