"""model.lora (peft): only the adapters train, cross the wire and get exported.

* data parallel (2 ranks, codec none): the gradient bytes a rank sends per step are exactly
  the adapters' (fp32, ring all-reduce over 2 ranks: 4 bytes per trainable element), a
  fraction of the full model's; a run killed after step 4 resumes from its step-3 checkpoint
  with bit-identical losses;
* pp=2: activations still cross through their codec (4-bit direct), the frozen base is
  untouched, the adapters moved;
* an HF tiny llama: ``export --lora merge`` loads with ``AutoModelForCausalLM`` and gives the
  trained model's logits; ``--lora adapter`` loads with ``peft.PeftModel``, likewise;
* bad input (r=-1, an unknown target module) is one ConfigError line at start-up.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from commtrain.cli import main
from commtrain.compress import build_codec
from commtrain.config import ConfigError, load_config
from commtrain.export import load_gpt_dir, load_run_model
from commtrain.metrics import read_metrics
from commtrain.models import build_model
from test_train import run

pytest.importorskip("peft")

LORA = ("model.lora.r=8", "train.eval_every=0")


def _rows(run_dir, name="metrics.jsonl"):
    return [r for r in read_metrics(Path(run_dir) / name) if "event" not in r]


def _one_line_error(sets, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config("tiny", sets).validate()
    assert "\n" not in str(e.value)


def test_bad_lora_config_is_one_line(tmp_path):
    _one_line_error(["model.lora.r=-1"], r"model.lora.r=-1 is invalid; allowed: an integer >= 0")
    _one_line_error(["model.lora.r=4", "model.lora.target_modules=[q_proj]"],
                    r"'q_proj' matches no Linear/Conv1D/Embedding layer of 'commtrain-gpt'; allowed: c_attn, c_fc, c_proj")
    _one_line_error(["model.lora.r=4", "model.lora.target_modules=[ln_1]"], r"'ln_1' matches no")
    _one_line_error(["model.lora.r=4", "model.lora.dropout=1.5"], r"model.lora.dropout=1.5 is invalid")
    load_config("tiny", ["model.lora.r=0"]).validate()  # off
    from test_models import _save_tiny

    ckpt, _, _ = _save_tiny(tmp_path, "llama")
    _one_line_error([f"model.hf_path={ckpt}", "model.lora.r=4", "model.lora.target_modules=[c_attn]"],
                    r"'c_attn' matches no .* of 'llama'; allowed: .*q_proj")
    load_config("tiny", [f"model.hf_path={ckpt}", "model.lora.r=4"]).validate()


def test_default_targets_and_frozen_base():
    m = build_model(load_config("tiny", ["model.lora.r=8"]).model)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == {"c_attn", "c_proj", "c_fc"}
    # stages of a tied model: the untied head copy stays frozen
    assert not any(p.requires_grad for n, p in m.stage_modules(2)[1].named_parameters() if "lm_head" in n)


@pytest.mark.parametrize("arch,targets", [("gpt2", {"c_attn", "c_proj"}),
                                          ("llama", {"q_proj", "k_proj", "v_proj", "o_proj"})])
def test_hf_default_targets_train_and_split(tmp_path, arch, targets):
    from test_models import _save_tiny

    ckpt, _, V = _save_tiny(tmp_path, arch)
    model = build_model(load_config("tiny", [f"model.hf_path={ckpt}", "model.lora.r=4"]).model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == targets
    x = torch.randint(0, V, (2, 16))
    logits, loss = model(x, targets=x)
    loss.backward()  # adapters get gradients (B is zero at init: A's gradient is zero, B's is not)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    stages = model.stage_modules(2)  # gpt2 ties its head: the untied copy stays frozen
    n_stage_trainable = sum(p.numel() for s in stages for p in s.parameters() if p.requires_grad)
    assert n_stage_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not any(p.requires_grad for n, p in stages[-1].named_parameters() if "lm_head" in n)
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.Sequential(*stages)(x), logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_lora_dp_sends_only_adapters_and_resumes_bit_exactly(tmp_path):
    sets = (*LORA, "compression.grad=none", "train.checkpoint_every=3")
    run(tmp_path / "full", 2, *sets)
    model = build_model(load_config("tiny", ["model.lora.r=8"]).model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    rows = _rows(tmp_path / "full")
    # 2 ranks, ring all-reduce of fp32: each rank sends 2 (p-1)/p * 4 bytes = 4 bytes per adapter element
    assert [r["wire_bytes"]["grad"] for r in rows] == [4 * n_train] * 6
    assert n_train < n_all / 5
    assert rows[-1]["loss"] < rows[0]["loss"]
    state = torch.load(tmp_path / "full" / "checkpoints" / "step_00000006" / "rank0.pt", weights_only=True)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state["model"].items())  # adapters trained
    # killed after step 4 (checkpoint at 3), restarted by hand: the same losses, bit for bit
    r = run(tmp_path / "cut", 2, *sets, env={"COMMTRAIN_FAULT_STEP": "4", "COMMTRAIN_FAULT_RANK": "1"}, check=False)
    assert r.returncode != 0
    run(tmp_path / "cut", 2, *sets)
    assert [r["loss"] for r in _rows(tmp_path / "cut")] == [r["loss"] for r in rows]

    # built-in GPT export: merge -> commtrain.gpt/1; adapter -> peft over OUT/base
    from peft import PeftModel

    _, _, trained = load_run_model(tmp_path / "full")
    assert main(["export", str(tmp_path / "full"), str(tmp_path / "merged")]) == 0  # merge is the default
    assert main(["export", str(tmp_path / "full"), str(tmp_path / "adapter"), "--lora", "adapter"]) == 0
    merged, _ = load_gpt_dir(tmp_path / "merged")
    base, _ = load_gpt_dir(tmp_path / "adapter" / "base")
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = trained(x)[0]
        torch.testing.assert_close(merged(x)[0], ref, rtol=0, atol=1e-5)
        assert not torch.allclose(base(x)[0], ref, atol=1e-4)  # the base alone is not the trained model
        torch.testing.assert_close(PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(x)[0], ref,
                                   rtol=0, atol=1e-6)


@pytest.mark.slow
def test_lora_pipeline_compresses_activations_and_trains_only_adapters(tmp_path):
    run(tmp_path, 2, *LORA, "parallel.pp=2", "parallel.microbatches=2", "compression.act=quant:bits=4,group=32",
        "compression.act_delta=false", "train.checkpoint_every=6")
    mb_elems = 2 * 32 * 64
    quant = build_codec("quant:bits=4,group=32").payload_nbytes(mb_elems, torch.float32)
    assert [r["wire_bytes"]["act"] for r in _rows(tmp_path)] == [2 * quant] * 6
    torch.manual_seed(0)  # train.seed=0: the trainer's initial model
    init = build_model(load_config("tiny", ["model.lora.r=8"]).model).stage_modules(2)
    ck = tmp_path / "checkpoints" / "step_00000006"
    for r in (0, 1):
        stage = torch.load(ck / f"rank{r}.pt", weights_only=True)["model"]
        ref = init[r].state_dict()
        assert stage.keys() == ref.keys()
        base = [k for k in stage if "lora_" not in k]
        lora_b = [k for k in stage if "lora_B" in k]
        assert base and lora_b and all(stage[k].abs().sum() > 0 for k in lora_b)  # adapters moved
        for k in base:  # the frozen base did not
            assert torch.equal(stage[k], ref[k]), k


@pytest.mark.slow
def test_hf_llama_lora_export_merge_and_adapter(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel
    from test_models import _save_tiny

    ckpt, tok, V = _save_tiny(tmp_path, "llama")
    run_dir = tmp_path / "run"
    run(run_dir, 2, f"model.hf_path={ckpt}", "data.max_bytes=30000", "model.lora.r=4", "model.lora.alpha=16",
        "train.checkpoint_every=3", "train.lr=1e-2", "compression.grad=quant:bits=8,group=64",
        "compression.min_numel=64", env={"HF_HUB_OFFLINE": "1"})
    rows = _rows(run_dir)
    _, _, trained = load_run_model(run_dir)
    assert main(["export", str(run_dir), str(tmp_path / "merged"), "--lora", "merge"]) == 0
    assert main(["export", str(run_dir), str(tmp_path / "adapter"), "--lora", "adapter"]) == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True).eval()
    x = torch.randint(0, V, (2, 32))
    with torch.no_grad():
        ref = trained(x)[0]
        assert not torch.allclose(base(input_ids=x).logits, ref, atol=1e-4)  # training changed it
        torch.testing.assert_close(merged(input_ids=x).logits, ref, rtol=0, atol=1e-5)
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(peft_model(input_ids=x).logits, ref, rtol=0, atol=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero.stage=2", "sync.strategy=diloco"])
def test_lora_with_zero_and_diloco_syncs_only_adapters(tmp_path, strategy):
    extra = ("sync.inner_steps=3", "sync.overlap=false") if "diloco" in strategy else ()
    run(tmp_path, 2, *LORA, strategy, *extra, "compression.grad=none")
    model = build_model(load_config("tiny", ["model.lora.r=8"]).model)
    adapter_bytes = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = _rows(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"]
    grad = [r["wire_bytes"]["grad"] for r in rows]
    if "zero" in strategy:  # reduce-scatter of the adapters' gradients, all-gather of their updated shards
        # (buckets are padded to a multiple of the 2 ranks: a few bytes more than half)
        for sent in (grad, [r["wire_bytes"]["param"] for r in rows]):
            assert all(adapter_bytes // 2 <= b <= adapter_bytes // 2 + 64 for b in sent), sent
    else:  # one all-reduce of the adapters' pseudo-gradients every 3 steps
        assert sum(grad) == 2 * adapter_bytes
