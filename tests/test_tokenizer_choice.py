"""data.tokenizer with a Hugging Face checkpoint: its own tokenizer by default, foreign ids only on request."""
from __future__ import annotations

import math
import shutil

import pytest

from commtrain.cli import main
from commtrain.config import Config, ConfigError, load_config
from commtrain.data import DataConfig, resolve_tokenizer
from commtrain.models import ModelConfig

pytest.importorskip("transformers")
from test_models import _save_tiny  # noqa: E402  (a tiny Llama + its BPE tokenizer, saved here)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d, tok, V = _save_tiny(tmp_path_factory.mktemp("ckpt"), "llama")
    return d, tok, V


def _cfg(*sets) -> Config:
    return load_config(None, list(sets))


def test_auto_resolves_to_the_checkpoints_own_tokenizer(llama):
    d, _, _ = llama
    assert DataConfig().tokenizer == "auto"
    assert _cfg(f"model.hf_path={d}").resolved(1).data.tokenizer == "hf"
    assert _cfg().resolved(1).data.tokenizer == "byte"  # the built-in GPT keeps bytes
    assert _cfg("data.tokenizer=bpe").resolved(1).data.tokenizer == "bpe"


@pytest.mark.parametrize("name", ["byte", "bpe"])
def test_foreign_tokenizer_with_hf_model_is_refused_unless_asked_for(llama, name):
    d, _, V = llama
    with pytest.raises(ConfigError) as e:
        _cfg(f"model.hf_path={d}", f"data.tokenizer={name}").validate(1)
    msg = str(e.value)
    assert "\n" not in msg and f"data.tokenizer='{name}'" in msg and "data.allow_foreign_tokenizer=true" in msg
    cfg = _cfg(f"model.hf_path={d}", f"data.tokenizer={name}", "data.allow_foreign_tokenizer=true",
               f"data.bpe_vocab_size={V}").resolved(1)
    assert cfg.data.tokenizer == name
    if name == "bpe":  # the checkpoint's embedding stays; BPE ids index into it
        assert cfg.model.vocab_size == V


def test_bpe_larger_than_the_checkpoint_vocab_is_one_line(llama):
    d, _, V = llama
    with pytest.raises(ConfigError, match=rf"data.bpe_vocab_size=2048 exceeds .*allowed: <= {V}"):
        _cfg(f"model.hf_path={d}", "data.tokenizer=bpe", "data.allow_foreign_tokenizer=true").validate(1)


def test_hf_tokenizer_without_hf_path_is_refused():
    with pytest.raises(ConfigError, match="data.tokenizer='hf' needs model.hf_path"):
        _cfg("data.tokenizer=hf").validate(1)


def test_folder_without_tokenizer_files_names_what_is_missing(llama, tmp_path):
    d, _, _ = llama
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(d / f, bare / f)
    with pytest.raises(ConfigError) as e:
        _cfg(f"model.hf_path={bare}").validate(1)
    msg = str(e.value)
    assert "has no tokenizer files" in msg and "tokenizer.json" in msg and "found: config.json, model.safetensors" in msg
    (bare / "vocab.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"incomplete: vocab.json \+ merges.txt \(missing merges.txt\)"):
        _cfg(f"model.hf_path={bare}").validate(1)
    # the opt-in trains such a checkpoint on bytes (vocab 300 >= 256)
    _cfg(f"model.hf_path={bare}", "data.tokenizer=byte", "data.allow_foreign_tokenizer=true").validate(1)


def test_resolve_tokenizer_on_plain_sections(llama):
    d, _, _ = llama
    data = DataConfig()
    assert resolve_tokenizer(data, ModelConfig(hf_path=str(d))) == "hf"
    assert data.tokenizer == "auto"  # resolving reads the sections; Config.resolved records the answer


def test_cli_refusal_is_one_line(llama, capsys):
    d, _, _ = llama
    assert main(["train", "--set", f"model.hf_path={d}", "--set", "data.tokenizer=byte"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("commtrain: config error: data.tokenizer='byte'")


def test_hf_model_trains_with_its_own_tokenizer_by_default(llama, tmp_path, monkeypatch):
    """One process, no torchrun: the tokenizer the trainer builds is the checkpoint's, ids > 255 occur."""
    from commtrain.train import Trainer, distributed

    d, tok, _ = llama
    for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    cfg = _cfg(f"model.hf_path={d}", f"out_dir={tmp_path / 'run'}", "train.steps=2", "train.seq_len=16",
               "train.batch_size=2", "train.eval_batches=1", "train.progress=false", "data.max_bytes=20000")
    cfg.validate(1)
    with distributed(cfg) as device:
        trainer = Trainer(cfg, device)
        assert trainer.tokenizer.name == "hf" and trainer.tokenizer.vocab_size == len(tok)
        text = "def main():\n    return 0\n"
        assert trainer.tokenizer.encode(text).tolist() == tok(text, add_special_tokens=False)["input_ids"]
        assert int(trainer.train_ds.tokens.max()) > 255  # BPE merges, not bytes
        out = trainer.fit()
    assert out["final"] and math.isfinite(out["eval_loss"]) and out["eval_loss"] > 0
