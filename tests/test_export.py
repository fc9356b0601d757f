"""`commtrain export` / `commtrain generate`: trained runs (dp=2 and pp=2) come out as one model
whose logits are the trained model's: the exported model's eval loss equals the trainer's own
final eval loss, and its logits equal the checkpoint shards run stage by stage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from commtrain.cli import main
from commtrain.data import build_data
from commtrain.export import ExportError, load_gpt_dir, read_run_config
from commtrain.metrics import read_metrics, tensorboard_available
from commtrain.models import GPT, build_model, preset_config
from commtrain.models.gpt import lm_loss
from test_train import run  # torchrun on loopback, the packaged tiny config (6 steps)

pytestmark = pytest.mark.slow

CKPT = ("train.checkpoint_every=3",)  # steps=6: the final weights are checkpointed
PP2 = ("parallel.pp=2", "parallel.microbatches=2", "compression.act=quant:bits=4,group=32",
       "compression.act_grad=quant:bits=8,group=32")
DP2 = ("compression.grad=quant:bits=4,group=64", "compression.min_numel=512")


def final_eval_loss(run_dir) -> float:
    rows = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("final")]
    return rows[-1]["eval_loss"]


def eval_loss_like_trainer(forward, run_dir, hf_tokenizer=None) -> float:
    """The mean loss over the held-out samples ``Trainer.evaluate`` uses, with one unsplit model."""
    cfg = read_run_config(run_dir)
    tc, pc = cfg.train, cfg.parallel
    _, eval_ds, _ = build_data(cfg.data, 10**9, hf_tokenizer=hf_tokenizer)
    n = min(len(eval_ds), tc.eval_batches * tc.batch_size * pc.dp)
    total = count = 0.0
    for r in range(pc.dp):
        mine = list(range(r, n, pc.dp))
        if pc.pp > 1:
            mine = mine[: len(mine) - len(mine) % pc.microbatches]
        for i in range(0, len(mine), tc.batch_size):
            chunk = mine[i : i + tc.batch_size]
            _, x, y = eval_ds.batch([eval_ds.first_id + j for j in chunk])
            with torch.no_grad():
                total += float(lm_loss(forward(x), y)) * len(chunk)
            count += len(chunk)
    return total / count


def shards_as_stages(model, run_dir, step) -> torch.nn.Module:
    """The checkpoint's stage shards (dp rank 0) loaded into ``model``'s own stages, composed."""
    cfg = read_run_config(run_dir)
    pp, dp = cfg.parallel.pp, cfg.parallel.dp
    ck = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    states = [torch.load(ck / f"rank{s * dp}.pt", weights_only=True)["model"] for s in range(pp)]
    if pp == 1:
        model.load_state_dict(states[0])
        return model.eval()
    stages = model.stage_modules(pp)
    for st, sd in zip(stages, states):
        st.load_state_dict(sd)
    return torch.nn.Sequential(*stages).eval()


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_gpt_export_matches_the_trained_model(tmp_path, layout, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "export"
    r = run(run_dir, 2, *CKPT, *(DP2 if layout == "dp2" else PP2))
    # the end-of-run summary line (rank 0) and the TensorBoard files beside metrics.jsonl
    summary = [ln for ln in r.stdout.splitlines() if ln.startswith("commtrain: done:")]
    assert len(summary) == 1 and "6 steps" in summary[0] and "final eval loss" in summary[0]
    assert f"weights: {run_dir / 'checkpoints' / 'step_00000006'}" in summary[0]
    assert ("act " in summary[0]) is (layout == "pp2") and "grad " in summary[0]
    if tensorboard_available():
        assert list(run_dir.glob("events.out.tfevents.*"))
    assert main(["export", str(run_dir), str(out)]) == 0
    assert "exported step 6" in capsys.readouterr().out
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "commtrain.gpt/1" and meta["tokenizer"] == {"name": "byte"}
    model, tok = load_gpt_dir(out)
    # pp=2 trained the tied head as an untied copy on the last stage: the export keeps both.
    assert meta["model"]["tie_weights"] is (layout == "dp2")
    if layout == "pp2":
        assert not torch.equal(model.head.lm_head.weight, model.embed.wte.weight)

    exported = eval_loss_like_trainer(lambda x: model(x)[0], run_dir)
    assert exported == pytest.approx(final_eval_loss(run_dir), rel=1e-5)
    fresh = GPT(preset_config("gpt-nano", tie_weights=layout == "dp2"))
    reference = shards_as_stages(fresh, run_dir, 6)
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ref = reference(x)[0] if layout == "dp2" else reference(x)
        torch.testing.assert_close(model(x)[0], ref, rtol=0, atol=0)
    # and it is trained: the initial model scores worse on the same samples
    torch.manual_seed(0)
    init = build_model(read_run_config(run_dir).model).eval()
    assert eval_loss_like_trainer(lambda x: init(x)[0], run_dir) > exported + 0.05

    # generate: deterministic with a seed, greedy equals a hand-written argmax loop
    args = ["generate", str(out), "--prompt", "def ", "--max-new-tokens", "24", "--device", "cpu"]
    texts = []
    for seed in ("5", "5", "6"):
        assert main([*args, "--seed", seed]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2] and texts[0].startswith("def ")
    assert main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    ids = tok.encode("def ")[None]
    with torch.no_grad():
        for _ in range(24):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert greedy == tok.decode(ids[0]) + "\n"


@pytest.mark.parametrize("arch,layout", [("llama", "dp2"), ("gpt2", "pp2")])
def test_hf_export_loads_with_automodel_and_matches(tmp_path, arch, layout, capsys, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from test_models import _save_tiny

    ckpt, tok, V = _save_tiny(tmp_path, arch)
    run_dir, out = tmp_path / "run", tmp_path / "export"
    # No data.tokenizer: the checkpoint's own is the default.
    run(run_dir, 2, f"model.hf_path={ckpt}", "data.max_bytes=30000", *CKPT, *(DP2 if layout == "dp2" else PP2),
        env={"HF_HUB_OFFLINE": "1"})
    assert read_run_config(run_dir).data.tokenizer == "hf"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert "tokenizer hf" in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok2 = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "the quick brown fox\n"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]

    exported = eval_loss_like_trainer(lambda x: hf(input_ids=x).logits, run_dir, hf_tokenizer=tok)
    assert exported == pytest.approx(final_eval_loss(run_dir), rel=1e-5)
    base = build_model(read_run_config(run_dir).model)
    if layout == "pp2":  # GPT-2 ties its head; the pipeline trained an untied copy of it
        assert base._tied() and not hf.config.tie_word_embeddings
        from commtrain.export import _untie_hf

        _untie_hf(base)
    reference = shards_as_stages(base, run_dir, 6)
    x = torch.randint(0, V, (2, 32))
    with torch.no_grad():
        ref = reference(x)[0] if layout == "dp2" else reference(x)
        torch.testing.assert_close(hf(input_ids=x).logits, ref, rtol=1e-5, atol=1e-5)

    args = ["generate", str(out), "--prompt", "the quick", "--max-new-tokens", "12", "--device", "cpu"]
    assert main([*args, "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--seed", "1"]) == 0
    assert capsys.readouterr().out == first and first.startswith("the quick")
    # greedy through the key/value cache == greedy recomputing the whole context (no EOS in 12 tokens here)
    assert main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    ids = torch.tensor([tok2("the quick")["input_ids"]])
    with torch.no_grad():
        for _ in range(12):
            nxt = hf(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            if int(nxt) == tok2.eos_token_id:
                break
            ids = torch.cat([ids, nxt], dim=1)
    assert greedy == tok2.decode(ids[0], skip_special_tokens=True) + "\n"


def test_export_errors_are_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run(run_dir, 1, "train.steps=2", "train.eval_every=0", "train.checkpoint_every=1")

    def err(*argv) -> str:
        assert main(["export", *map(str, argv)]) == 2
        e = capsys.readouterr().err.strip()
        assert e.count("\n") == 0, e
        return e

    assert "no LoRA adapters in this run" in err(run_dir, tmp_path / "a", "--lora", "merge")
    assert "available steps: 1, 2" in err(run_dir, tmp_path / "b", "--step", "7")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in err(run_dir, tmp_path / "full")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "config.yaml", bare / "config.yaml")
    assert "train.checkpoint_every=N" in err(bare, tmp_path / "c")
    (bare / "config.yaml").unlink()
    assert "--config FILE" in err(bare, tmp_path / "d")
    # a damaged newest checkpoint: the previous one is exported
    shard = run_dir / "checkpoints" / "step_00000002" / "rank0.pt"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["export", str(run_dir), str(tmp_path / "e")]) == 0
    assert "exported step 1" in capsys.readouterr().out
    with pytest.raises(ExportError, match="not a commtrain GPT directory"):
        load_gpt_dir(tmp_path / "nothing")
    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_gpt_export_with_a_bpe_tokenizer(tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "export"
    run(run_dir, 1, "data.tokenizer=bpe", "data.bpe_vocab_size=300", f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_bytes=40000", "train.steps=2", "train.eval_every=0", "train.checkpoint_every=2")
    assert main(["export", str(run_dir), str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["tokenizer"] == {"name": "bpe", "vocab_size": 300, "file": "tokenizer.json"}
    assert meta["model"]["vocab_size"] == 300  # the trainer sized the embedding for the BPE
    model, tok = load_gpt_dir(out)
    from tokenizers import Tokenizer

    cached = Tokenizer.from_file(str(next((tmp_path / "cache").glob("bpe-v300-*.json"))))
    text = "import os\nfor x in range(3):\n    print(x)\n"
    assert tok.encode(text).tolist() == cached.encode(text, add_special_tokens=False).ids
    capsys.readouterr()
    args = ["generate", str(out), "--prompt", "import ", "--max-new-tokens", "8", "--top-k", "5", "--seed", "2",
            "--device", "cpu"]
    assert main(args) == 0 and main(args) == 0
    a, b = capsys.readouterr().out.split("\n", 1)
    assert a + "\n" == b and a.startswith("import ")


def test_hf_dir_with_foreign_byte_ids_generates_bytes(tmp_path, capsys):
    """An HF model trained on byte ids (data.allow_foreign_tokenizer): commtrain.json says so."""
    pytest.importorskip("transformers")
    from commtrain.data import ByteTokenizer
    from commtrain.export import save_hf_dir
    from commtrain.generate import generate
    from commtrain.models import ModelConfig
    from test_models import _save_tiny

    ckpt, _, _ = _save_tiny(tmp_path, "llama")
    model = build_model(ModelConfig(hf_path=str(ckpt)))
    save_hf_dir(model, ByteTokenizer(), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "commtrain.json").read_text())["tokenizer"] == {"name": "byte"}
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    text = generate(tmp_path / "out", "ab", 6, temperature=0)
    ids = torch.tensor([[97, 98]])
    with torch.no_grad():
        for _ in range(6):  # greedy among the 256 byte ids (the embedding has 296 rows)
            ids = torch.cat([ids, model(ids)[0][:, -1, :256].argmax(-1, keepdim=True)], dim=1)
    assert text == ByteTokenizer().decode(ids[0])
    with pytest.raises(ExportError, match="exceeds the model's context of 64"):
        generate(tmp_path / "out", "ab", 63)
