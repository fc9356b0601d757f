"""model.init_from: save a GPT in the commtrain.gpt/1 format and start a model from it."""
from __future__ import annotations

import json

import pytest
import torch

from commtrain.config import ConfigError, load_config
from commtrain.data import DataConfig
from commtrain.models import GPT, GPTConfig, ModelConfig, build_model, load_gpt_dir, save_gpt_dir, tokenizer_info

TINY = GPTConfig(vocab_size=256, n_layer=2, n_head=2, n_embd=32, block_size=64)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(3)
    model = GPT(TINY)
    with torch.no_grad():  # move away from the init distribution so a fresh GPT cannot pass by chance
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out = save_gpt_dir(model, {"name": "byte"}, tmp_path / "base")
    return model, out


def _x():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def test_format_on_disk(saved):
    model, out = saved
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "commtrain.gpt/1" and cfg["tokenizer"] == {"name": "byte"}
    assert cfg["model"] == {"vocab_size": 256, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64,
                            "dropout": 0.0, "bias": True, "tie_weights": True}
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    # The tied lm head / token embedding is stored once.
    assert len({"embed.wte.weight", "head.lm_head.weight"} & keys) == 1
    assert len(keys) == len(model.state_dict()) - 1


def test_save_load_identical_logits_and_tie_restored(saved):
    model, out = saved
    loaded, info = load_gpt_dir(out)
    assert info["model"]["n_embd"] == 32
    assert loaded.head.lm_head.weight is loaded.embed.wte.weight
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(_x())[0], loaded(_x())[0])


def test_build_model_init_from_and_config_path(saved):
    model, out = saved
    torch.manual_seed(123)  # the run's seed must not change the loaded weights
    built = build_model(ModelConfig(init_from=str(out), dropout=0.1))
    assert built.config.dropout == 0.1 and built.config.n_embd == 32
    built.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(_x())[0], built(_x())[0])
    # Through the YAML/--set config: architecture from the directory, preset left at default.
    cfg = load_config(None, [f"model.init_from={out}", "train.seq_len=32"]).validate()
    assert cfg.model.init_from == str(out)
    # A pipeline split of the loaded model computes the same logits.
    stages = build_model(cfg.model).stage_modules(2)
    with torch.no_grad():
        h = _x()
        for s in stages:
            h = s(h)
        assert torch.allclose(h, model(_x())[0], atol=1e-6)


@pytest.mark.parametrize("sets, msg", [
    (["model.vocab_size=512"], r"model.vocab_size=512 disagrees with model.init_from=.*vocab_size=256.*allowed: null or 256"),
    (["model.block_size=128"], r"model.block_size=128 disagrees with .*allowed: null or 64"),
    (["model.preset=gpt-micro"], r"model.preset='gpt-micro' disagrees with model.init_from=.*n_layer=2, n_head=2, n_embd=32"),
    (["model.hf_path=/x"], r"model.hf_path='/x' with model.init_from=.*allowed: one of them"),
    (["data.tokenizer=bpe"], r"data.tokenizer='bpe' disagrees with model.init_from=.*trained with tokenizer 'byte'"),
])
def test_mismatches_are_one_line_config_errors(saved, sets, msg):
    _, out = saved
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(None, [f"model.init_from={out}", *sets]).validate()
    assert "\n" not in str(e.value)


def test_matching_preset_and_sizes_are_accepted(tmp_path):
    torch.manual_seed(0)
    out = save_gpt_dir(GPT(GPTConfig(vocab_size=256, n_layer=2, n_head=2, n_embd=64, block_size=256)), {"name": "byte"},
                       tmp_path / "nano")
    cfg = ModelConfig(preset="gpt-nano", init_from=str(out), vocab_size=256, block_size=256)
    cfg.validate()
    assert build_model(cfg).config.n_embd == 64


def test_bpe_base_needs_the_same_corpus_settings(tmp_path):
    torch.manual_seed(0)
    data = DataConfig(tokenizer="bpe", bpe_vocab_size=512, source="stdlib", max_bytes=100_000)
    info = tokenizer_info(data)
    assert info == {"name": "bpe", "bpe_vocab_size": 512, "source": "stdlib", "path": None, "max_bytes": 100_000,
                    "text_field": "text"}
    out = save_gpt_dir(GPT(GPTConfig(vocab_size=512, n_layer=1, n_head=1, n_embd=16, block_size=32)), info, tmp_path / "b")
    ok = [f"model.init_from={out}", "data.tokenizer=bpe", "data.bpe_vocab_size=512", "data.max_bytes=100000"]
    load_config(None, ok).validate()
    with pytest.raises(ConfigError, match=r"data.source='shakespeare' disagrees with .*learned with data.source='stdlib'"):
        load_config(None, ok + ["data.source=shakespeare"]).validate()
    with pytest.raises(ConfigError, match=r"data.bpe_vocab_size=2048 disagrees"):
        load_config(None, ok + ["data.bpe_vocab_size=2048"]).validate()


def _write(out, name, text):
    (out / name).write_text(text)


@pytest.mark.parametrize("break_it, msg", [
    (lambda out: [p.unlink() for p in out.iterdir()] and out.rmdir(), r"does not exist or is not a directory"),
    (lambda out: (out / "model.safetensors").unlink(), r"has no model.safetensors; expected a directory with"),
    (lambda out: (out / "config.json").unlink(), r"has no config.json"),
    (lambda out: _write(out, "config.json", "{nope"), r"config.json is not valid JSON"),
    (lambda out: _write(out, "config.json", json.dumps({"format": "hf/9"})), r"format='hf/9' is not supported; allowed: 'commtrain.gpt/1'"),
    (lambda out: _write(out, "config.json", json.dumps({"format": "commtrain.gpt/1", "model": {"n_layer": 2},
                                                       "tokenizer": {"name": "byte"}})), r"\"model\" lacks vocab_size"),
    (lambda out: _write(out, "config.json", json.dumps({"format": "commtrain.gpt/1", "model": {**vars(TINY), "n_embd": 33},
                                                       "tokenizer": {"name": "byte"}})), r"gpt.n_embd=33 is invalid"),
    (lambda out: _write(out, "config.json", json.dumps({"format": "commtrain.gpt/1", "model": vars(TINY)})),
     r"has no \"tokenizer\" mapping"),
])
def test_bad_directory_is_one_line(saved, break_it, msg):
    _, out = saved
    break_it(out)
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(None, [f"model.init_from={out}"]).validate()
    assert "\n" not in str(e.value) and "model.init_from=" in str(e.value)


def test_corrupt_or_foreign_weights_are_one_line(saved, tmp_path):
    _, out = saved
    f = out / "model.safetensors"
    good = f.read_bytes()
    for bad, msg in [
        (b"\x00" * 7, r"model.safetensors cannot be (read|loaded)"),  # shorter than the header length field
        (good[: len(good) // 2], r"model.safetensors cannot be (read|loaded)"),  # truncated
        (b"garbage!" + good[8:], r"model.safetensors cannot be read"),  # header length field overwritten
    ]:
        f.write_bytes(bad)
        with pytest.raises(ValueError, match=msg) as e:
            load_gpt_dir(out)
        assert "\n" not in str(e.value)
    # Weights of another architecture under this config.json: named shape mismatch, no partial load.
    torch.manual_seed(0)
    other = save_gpt_dir(GPT(GPTConfig(vocab_size=256, n_layer=2, n_head=2, n_embd=64, block_size=64)), {"name": "byte"},
                         tmp_path / "other")
    f.write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"tensor '.*' has shape \[.*\] but config.json's architecture needs \[.*\]"):
        load_gpt_dir(out)
    # Fewer layers than config.json says: the missing tensors are named.
    short = save_gpt_dir(GPT(GPTConfig(vocab_size=256, n_layer=1, n_head=2, n_embd=32, block_size=64)), {"name": "byte"},
                         tmp_path / "short")
    f.write_bytes((short / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"does not match config.json's architecture \(missing blocks.1"):
        load_gpt_dir(out)


def test_save_rejects_non_gpt_and_bad_tokenizer_info(tmp_path):
    with pytest.raises(TypeError, match="needs the built-in GPT"):
        save_gpt_dir(torch.nn.Linear(2, 2), {"name": "byte"}, tmp_path / "x")
    with pytest.raises(ValueError, match="tokenizer_info=.* is invalid"):
        save_gpt_dir(GPT(TINY), {}, tmp_path / "x")


@pytest.mark.slow
def test_trainer_starts_from_the_saved_weights(saved, tmp_path):
    """`commtrain train` with model.init_from: at lr ~0 its eval loss is the saved model's own."""
    import subprocess
    import sys
    from pathlib import Path

    from commtrain.data import build_data
    from commtrain.metrics import read_metrics

    model, out = saved
    root = Path(__file__).resolve().parents[1]
    sets = [f"model.init_from={out}", "data.source=shakespeare", "train.steps=1", "train.lr=1.0e-12",
            "train.eval_every=0", "train.eval_batches=2", "train.batch_size=4", "train.seq_len=32",
            f"out_dir={tmp_path / 'run'}", "train.progress=false", "resume=false"]
    r = subprocess.run([sys.executable, "-m", "commtrain", "train", "--config", "tiny",
                        *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    final = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m.get("final")][0]["eval_loss"]
    # The same held-out windows the Trainer evaluates (the first eval_batches * batch_size).
    _, ev, _ = build_data(DataConfig(source="shakespeare", max_bytes=300_000, seq_len=32), 256)
    _, x, y = ev.batch(list(ev.ids)[:8])
    model.eval()
    with torch.no_grad():
        want = model(x, targets=y)[1].item()
    assert final == pytest.approx(want, abs=1e-4)
    assert abs(want - 5.545) > 0.05  # not the loss of a uniform guess over 256 bytes: real weights were used


def test_same_weights_give_the_same_bytes(saved, tmp_path):
    """The cached base is keyed by its settings, so its file must be byte-stable."""
    model, out = saved
    again = save_gpt_dir(model, {"name": "byte"}, tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (again / "config.json").read_bytes() == (out / "config.json").read_bytes()
