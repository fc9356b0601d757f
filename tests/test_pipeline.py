"""Pipeline executor against the unsplit model (gloo ranks on loopback, compression off).

With every codec lossless, a pipeline of pp stages under GPipe or 1F1B must reproduce the
single-process model's loss and every parameter's gradient (up to float summation order).
"""
import pytest
import torch

from tests.dist_utils import run_ranks

CFG = dict(vocab_size=64, n_layer=4, n_head=2, n_embd=32, block_size=16, tie_weights=False)
B, T, M = 8, 16, 4


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG["vocab_size"], (B, T), generator=g)
    y = torch.randint(0, CFG["vocab_size"], (B, T), generator=g)
    return torch.arange(B) + 100 * seed, x, y


def _reference(x, y):
    from commtrain.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    _, loss = model(x, y)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


def _pipeline_vs_reference(rank, world, layouts):
    from commtrain.comm import Communicator
    from commtrain.models import GPT, GPTConfig
    from commtrain.parallel.mesh import Mesh
    from commtrain.parallel.pipeline import PipelineEngine

    results = []
    for pp, dp, schedule in layouts:
        mesh = Mesh(pp, dp)
        comm = Communicator(group=mesh.pp_group, timeout_s=60)
        ids, x, y = _batch(seed=mesh.dp_rank)  # each replica its own batch
        ref_loss, ref_grads = _reference(x, y)
        torch.manual_seed(0)
        model = GPT(GPTConfig(**CFG))
        names = {id(p): n for n, p in model.named_parameters()}
        stage = model.stage_modules(pp)[mesh.stage]
        engine = PipelineEngine(stage, mesh, comm, schedule=schedule, n_micro=M, loss_fn=model.loss,
                                hidden_size=model.hidden_size)
        loss = engine.train_step(ids, x, y)
        grads = {names[id(p)]: p.grad for p in stage.parameters()}
        assert grads and all(g is not None for g in grads.values())
        grad_err = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
        # eval: forward-only loss equals the model's loss on the same batch
        eval_loss = engine.eval_loss(x, y)
        results.append(dict(pp=pp, dp=dp, schedule=schedule, stage=mesh.stage, loss=loss, ref_loss=ref_loss,
                            eval_loss=eval_loss, grad_err=grad_err, n_params=len(grads)))
        comm.close()
    torch.distributed.barrier()
    return results


def _check(results, world):
    for rank_results in results:
        for r in rank_results:
            tag = f"pp={r['pp']} dp={r['dp']} {r['schedule']} stage {r['stage']}"
            assert abs(r["loss"] - r["ref_loss"]) < 1e-5, tag
            assert abs(r["eval_loss"] - r["ref_loss"]) < 1e-5, tag
            assert r["grad_err"] < 1e-5, (tag, r["grad_err"])
    # every parameter of the model is covered by exactly one stage of each pipeline
    from commtrain.models import GPT, GPTConfig

    n_total = len(list(GPT(GPTConfig(**CFG)).parameters()))
    for i in range(len(results[0])):
        pp, dp = results[0][i]["pp"], results[0][i]["dp"]
        per_pipeline = sum(results[rank][i]["n_params"] for rank in range(world)) // dp
        assert per_pipeline == n_total, (pp, dp)


@pytest.mark.timeout(180)
def test_pp2_matches_unsplit_model_gpipe_and_1f1b():
    layouts = [(2, 1, "gpipe"), (2, 1, "1f1b")]
    _check(run_ranks(_pipeline_vs_reference, 2, layouts, timeout=150), 2)


@pytest.mark.timeout(240)
def test_pp4_and_pp2_dp2_match_unsplit_model():
    layouts = [(4, 1, "gpipe"), (4, 1, "1f1b"), (2, 2, "1f1b")]
    _check(run_ranks(_pipeline_vs_reference, 4, layouts, timeout=220), 4)


def _bad_args(rank, world):
    from commtrain.comm import Communicator
    from commtrain.models import GPT, GPTConfig
    from commtrain.parallel.mesh import Mesh
    from commtrain.parallel.pipeline import PipelineEngine

    mesh = Mesh(2, 1)
    comm = Communicator(group=mesh.pp_group, timeout_s=30)
    model = GPT(GPTConfig(**CFG))
    stage = model.stage_modules(2)[mesh.stage]
    errors = []
    for kw in (dict(schedule="zigzag"), dict(n_micro=0), dict(hidden_size=None)):
        args = dict(schedule="1f1b", n_micro=M, loss_fn=model.loss, hidden_size=32) | kw
        try:
            PipelineEngine(stage, mesh, comm, **args)
        except ValueError as e:
            errors.append(str(e))
    engine = PipelineEngine(stage, mesh, comm, schedule="gpipe", n_micro=3, loss_fn=model.loss, hidden_size=32)
    ids, x, y = _batch(0)
    try:
        engine.train_step(ids, x, y)
    except ValueError as e:
        errors.append(str(e))
    comm.close()
    torch.distributed.barrier()  # rank 0 hosts the store: keep it alive until rank 1 is done
    return errors


def test_bad_arguments_raise_clear_errors():
    for errors in run_ranks(_bad_args, 2, timeout=60):
        assert len(errors) == 4, errors
        assert "unknown schedule 'zigzag'" in errors[0]
        assert "n_micro=0" in errors[1]
        assert "hidden_size=None" in errors[2]
        assert "not divisible by parallel.microbatches=3" in errors[3]
