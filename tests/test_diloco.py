"""The DiLoCo outer loop (sync.strategy=diloco) against references: H=1 plain averaging equals
per-step data parallelism (a linear inner optimizer); H>1 equals DiLoCo written out in one
process (replicas simulated), with fragments and with the overlapped, delayed update; overlap
sends the same bytes; state round-trips mid-sync; bad values fail naming the key."""
import copy

import pytest
import torch

from commtrain.config import Config, ConfigError, load_config
from commtrain.parallel.compression import CompressionConfig
from commtrain.parallel.sync import SyncConfig
from tests.dist_utils import run_ranks

WORLD = 2


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 4))


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 16, generator=g)
    return x, torch.tanh(x[:, :4] * 2)


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)


def adamw(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)


def _run_sync(rank, comm, strategy, steps, optimizer, start=0, sync=None, model=None, finalize=False, **kw):
    from commtrain.parallel.sync import build_sync

    model = model if model is not None else make_model()
    sync = sync if sync is not None else build_sync(
        strategy, model.named_parameters(), optimizer, comm,
        compression=CompressionConfig(min_numel=512), bucket_mb=0.01, **kw)
    events = []
    for s in range(start, start + steps):
        sync.begin_step(s)
        loss_fn(model, *batch(rank, s)).backward()
        events += sync.step(max_grad_norm=0.0).get("outer_syncs", [])
        sync.zero_grad()
    if finalize:
        events += sync.finalize().get("outer_syncs", [])
    return model, sync, events


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, world):
    from commtrain.comm import Communicator

    comm = Communicator(timeout_s=60)
    out = {}
    # (1) H=1, plain averaging, no overlap, SGD inner == per-step DP with SGD.
    avg = SyncConfig(strategy="diloco", inner_steps=1, outer_optimizer="sgd", outer_lr=1.0, overlap=False)
    out["h1"] = _params(_run_sync(rank, comm, "diloco", 5, sgd, config=avg)[0])
    out["dp"] = _params(_run_sync(rank, comm, "data_parallel", 5, sgd)[0])
    # (2) H=3, Nesterov, AdamW inner, 7 steps: 2 syncs and 1 inner step after the last.
    for name, cfg in {
        "nesterov": SyncConfig(strategy="diloco", inner_steps=3, overlap=False),
        "fragments": SyncConfig(strategy="diloco", inner_steps=4, fragments=2, overlap=False),
        "overlap": SyncConfig(strategy="diloco", inner_steps=3, overlap=True, overlap_steps=1),
        "overlap_frag": SyncConfig(strategy="diloco", inner_steps=4, fragments=2, overlap=True, overlap_steps=2),
    }.items():
        b0 = comm.meter.bytes["grad"]
        model, sync, events = _run_sync(rank, comm, "diloco", 7 if "frag" not in name else 9, adamw, config=cfg)
        out[name] = dict(params=_params(model), events=events, bytes=comm.meter.bytes["grad"] - b0,
                         layout=[[[p.shape for p in b.params] for b in f] for f in sync.fragments])
    # Right after a synchronous sync (6 steps, H=3) every replica holds the new global weights.
    out["at_sync"] = _params(_run_sync(rank, comm, "diloco", 6, adamw,
                                       config=SyncConfig(strategy="diloco", inner_steps=3, overlap=False))[0])
    # (3) overlap on/off: same bytes with a lossy codec + EF too.
    for name, ov in (("q_on", True), ("q_off", False)):
        cfg = SyncConfig(strategy="diloco", inner_steps=2, codec="topk:ratio=0.1,chunk=256,value_bits=2", overlap=ov)
        b0 = comm.meter.bytes["grad"]
        model, _, events = _run_sync(rank, comm, "diloco", 8, adamw, config=cfg, finalize=True)
        out[name] = dict(bytes=comm.meter.bytes["grad"] - b0, params=_params(model), syncs=len(events))
    # finalize after a partial round: one more sync, and every replica holds the same weights
    cfg = SyncConfig(strategy="diloco", inner_steps=3, fragments=1, overlap=True)
    model, sync, events = _run_sync(rank, comm, "diloco", 7, adamw, config=cfg, finalize=True)
    out["final"] = dict(params=_params(model), syncs=len(events), again=sync.finalize())
    # (4) state round trip with a sync in flight (overlap, H=3, save after step 3 = the sync just started).
    cfg = SyncConfig(strategy="diloco", inner_steps=3, overlap=True, overlap_steps=2,
                     codec="quant:bits=4,group=64")
    straight, _, _ = _run_sync(rank, comm, "diloco", 8, adamw, config=cfg)
    model, sync, _ = _run_sync(rank, comm, "diloco", 3, adamw, config=cfg)
    state = copy.deepcopy(sync.state_dict())
    msd = copy.deepcopy(model.state_dict())
    out["inflight_saved"] = len(state["inflight"])
    model2 = make_model()
    model2.load_state_dict(msd)
    from commtrain.parallel.sync import build_sync

    sync2 = build_sync("diloco", model2.named_parameters(), adamw, comm, compression=CompressionConfig(min_numel=512),
                       bucket_mb=0.01, config=cfg)
    sync2.load_state_dict(state)
    resumed, _, _ = _run_sync(rank, comm, "diloco", 5, adamw, start=3, sync=sync2, model=model2)
    out["resume"] = dict(straight=_params(straight), resumed=_params(resumed))
    comm.close()
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_worker, WORLD, timeout=180)


def test_h1_plain_averaging_equals_per_step_data_parallel(runs):
    for r in runs:
        for a, b in zip(r["h1"], r["dp"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def reference_diloco(H, steps, fragments=1, tau=0, lr=0.7, mu=0.9):
    """DiLoCo written out: WORLD replicas in one process, AdamW inner, Nesterov outer."""
    reps = [make_model() for _ in range(WORLD)]
    opts = [adamw(m.parameters()) for m in reps]
    names = [n for n, _ in reps[0].named_parameters()]
    glob = {n: p.detach().clone() for n, p in reps[0].named_parameters()}
    mom = {n: torch.zeros_like(p) for n, p in glob.items()}
    # fragments: contiguous, about equal numel (the implementation's rule), by parameter order
    sizes = [glob[n].numel() for n in names]
    total, groups, f, cum = sum(sizes), [[] for _ in range(fragments)], 0, 0
    for i, n in enumerate(names):
        if groups[f] and f < fragments - 1 and (cum >= total * (f + 1) / fragments or len(names) - i <= fragments - f - 1):
            f += 1
        groups[f].append(n)
        cum += sizes[i]
    pending = []
    for s in range(steps):
        for r, (m, o) in enumerate(zip(reps, opts)):
            o.zero_grad()
            loss_fn(m, *batch(r, s)).backward()
            o.step()
        n = s + 1
        due = [p for p in pending if p[0] <= n]
        for frag in range(fragments):
            if n % H == ((frag + 1) * H // fragments) % H:
                deltas = [{k: glob[k] - dict(m.named_parameters())[k].detach() for k in groups[frag]} for m in reps]
                pending.append((n + tau, frag, deltas))
                if tau == 0:
                    due.append(pending[-1])
        for item in due:
            pending.remove(item)
            _, frag, deltas = item
            for k in groups[frag]:
                mean = sum(d[k] for d in deltas) / WORLD
                mom[k] = mu * mom[k] + mean
                new = glob[k] - lr * (mean + mu * mom[k])
                with torch.no_grad():
                    for m, d in zip(reps, deltas):
                        p = dict(m.named_parameters())[k]
                        p.copy_(new if tau == 0 else p + (new - glob[k]) + d[k])
                glob[k] = new
    return [[p.detach().clone() for p in m.parameters()] for m in reps]


@pytest.mark.parametrize("name,H,steps,F,tau", [("nesterov", 3, 7, 1, 0), ("fragments", 4, 9, 2, 0),
                                                ("overlap", 3, 7, 1, 1), ("overlap_frag", 4, 9, 2, 2)])
def test_h_steps_equal_a_reference_diloco(runs, name, H, steps, F, tau):
    ref = reference_diloco(H, steps, F, tau)
    for rank, r in enumerate(runs):
        for a, b in zip(r[name]["params"], ref[rank]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ev = runs[0][name]["events"]
    assert ev and all(e["bytes"] > 0 for e in ev)
    if tau:
        assert all(e["applied_after_step"] - e["started_after_step"] == tau for e in ev)
    assert len(runs[0][name]["layout"]) == F


def test_replicas_are_bit_identical_right_after_a_synchronous_sync(runs):
    for a, b in zip(runs[0]["at_sync"], runs[1]["at_sync"]):
        assert torch.equal(a, b)
    # ... and drift apart with their own data in the inner steps that follow (step 7).
    assert any(not torch.equal(a, b) for a, b in zip(runs[0]["nesterov"]["params"], runs[1]["nesterov"]["params"]))


def test_overlap_on_and_off_send_the_same_bytes(runs):
    assert runs[0]["q_on"]["bytes"] == runs[0]["q_off"]["bytes"] > 0
    assert runs[0]["q_on"]["syncs"] == runs[0]["q_off"]["syncs"] == 4  # H=2 over 8 steps
    assert runs[0]["overlap"]["bytes"] == runs[0]["nesterov"]["bytes"]


def test_finalize_leaves_every_replica_with_the_final_global_weights(runs):
    # 7 steps, H=3, overlap: syncs after 3 and 6 (applied after 4 and 7), then finalize syncs
    # the last step's progress: 3 events, identical replicas, and nothing left to do after.
    assert runs[0]["final"]["syncs"] == 3 and runs[0]["final"]["again"] == {}
    for a, b in zip(runs[0]["final"]["params"], runs[1]["final"]["params"]):
        assert torch.equal(a, b)


def test_state_round_trip_with_a_sync_in_flight(runs):
    for r in runs:
        assert r["inflight_saved"] == 1
        for a, b in zip(r["resume"]["straight"], r["resume"]["resumed"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("override,key", [
    ("sync.inner_steps=0", "sync.inner_steps"),
    ("sync.strategy=gossip", "sync.strategy"),
    ("sync.outer_optimizer=adam", "sync.outer_optimizer"),
    ("sync.codec=topk:ratio=2", "sync.codec"),
    ("sync.fragments=40", "sync.fragments"),
])
def test_bad_values_fail_with_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override, "sync.strategy=diloco" if "strategy" not in override else override]).validate(2)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_fragments_beyond_the_parameter_tensors_fail_naming_the_key():
    from commtrain.comm import Communicator
    from commtrain.parallel.sync import build_sync

    model = torch.nn.Linear(4, 4)  # 2 tensors
    with pytest.raises(ValueError, match="sync.fragments=3"):
        build_sync("diloco", model.named_parameters(), adamw, Communicator.loopback(2),
                   config=SyncConfig(strategy="diloco", inner_steps=8, fragments=3))


def test_diloco_refuses_zero_and_per_step_gradient_codecs():
    for sets, match in ((["zero.stage=2"], "zero.stage=2"), (["compression.grad=quant:bits=4"], "sync.codec")):
        with pytest.raises(ConfigError, match=match):
            load_config("tiny", ["sync.strategy=diloco", *sets]).validate(2)
    assert Config().sync.strategy == "step"


# -- the trainer: kill/resume reproduces losses; pp=2 x dp=2 runs ------------------------------
DILOCO = ("sync.strategy=diloco", "sync.inner_steps=2", "sync.codec=topk:ratio=0.05,chunk=1024,value_bits=2",
          "sync.overlap=true", "compression.min_numel=512")


@pytest.mark.slow
def test_killed_and_resumed_diloco_run_reproduces_its_losses(tmp_path):
    from test_train import losses, run
    from commtrain.metrics import read_metrics

    # checkpoint after step 3: the sync started after step 2 has been applied, none in flight;
    # after step 2 one is in flight: checkpoint every 2 to cover the in-flight case too.
    sets = (*DILOCO, "train.checkpoint_every=2", "train.steps=7")
    run(tmp_path / "full", 2, *sets)
    r = run(tmp_path / "cut", 2, *sets, env={"COMMTRAIN_FAULT_STEP": "5", "COMMTRAIN_FAULT_RANK": "1"}, check=False)
    assert r.returncode != 0
    run(tmp_path / "cut", 2, *sets)
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    steps = [m for m in rows if "event" not in m]
    # inner steps send nothing; a sync's bytes cross while the next inner step computes (overlap)
    sent = [m["wire_bytes"]["grad"] for m in steps]
    assert sent[0] == 0 and sum(b > 0 for b in sent) >= 2
    events = [e for m in steps for e in m.get("outer_syncs", [])]
    assert [(e["started_after_step"], e["applied_after_step"]) for e in events] == [(2, 3), (4, 5), (6, 7)]
    assert all(e["bytes"] > 0 for e in events) and sum(sent) >= sum(e["bytes"] for e in events[:2])
    final = [m for m in rows if m.get("event") == "final_sync"]
    assert len(final) == 1 and len(final[0]["outer_syncs"]) == 1  # step 6's sync in flight + step 7's progress


@pytest.mark.slow
def test_pp2_dp2_with_diloco_runs(tmp_path):
    from test_train import losses, run

    run(tmp_path, 4, *DILOCO, "parallel.pp=2", "parallel.microbatches=2", "data.max_bytes=20000",
        "compression.act=quant:bits=4,group=64", "compression.act_grad=quant:bits=4,group=64")
    ls = losses(tmp_path)
    assert len(ls) == 6 and all(x == x for x in ls) and ls[-1] < ls[0]
