"""Saved GPT weights (``model.init_from``): one directory, format ``commtrain.gpt/1``.

Layout (fixed; ``commtrain export`` writes exactly this)::

    DIR/model.safetensors   the unsplit GPT's state_dict (safetensors)
    DIR/config.json         {"format": "commtrain.gpt/1",
                             "model": {the GPTConfig fields: vocab_size, n_layer, n_head,
                                       n_embd, block_size, dropout, bias, tie_weights},
                             "tokenizer": {"name": "byte" | "bpe", ...bpe settings}}

The lm head is tied to the token embedding (``tie_weights``), so the GPT's state_dict holds
one tensor under two names; safetensors refuses shared storage, and
``safetensors.torch.save_model``/``load_model`` store it once and restore the tie.

Fine-tuning from a directory takes the *architecture* from config.json; ``dropout`` is a
training choice and comes from the run's ``model.dropout``. The tokenizer must be rebuilt
exactly as during pretraining, or token ids mean something else than the weights learned:
``byte`` needs nothing; ``bpe`` is learned from the corpus, so the same data settings and
vocabulary size are required (:func:`check_tokenizer`).

Every problem (missing directory or file, unreadable JSON, unknown format, a field out of
range, a corrupt or mismatching weights file) raises ValueError with one line naming
``model.init_from``, the path and what is wrong.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .gpt import GPT, GPTConfig

FORMAT = "commtrain.gpt/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_KEY = "model.init_from"
# What config.json's "model" section must hold (GPTConfig's fields; dropout is optional
# there: a fine-tune uses its own model.dropout).
_ARCH_FIELDS = [f.name for f in dataclasses.fields(GPTConfig)]
_REQUIRED = ["vocab_size", "n_layer", "n_head", "n_embd", "block_size"]
# The data settings that determine a BPE vocabulary (it is learned from the corpus).
_BPE_DATA_KEYS = ("source", "path", "max_bytes", "text_field")


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise ValueError(f"{_KEY} needs the safetensors package; allowed: pip install safetensors") from None
    return st


def _where(path) -> str:
    return f"{_KEY}={str(path)!r}"


# -- tokenizer --------------------------------------------------------------------------
def tokenizer_info(data_cfg) -> dict[str, Any]:
    """What config.json's "tokenizer" records for a run with this data section (a DataConfig)."""
    info: dict[str, Any] = {"name": data_cfg.tokenizer}
    if data_cfg.tokenizer == "bpe":
        info["bpe_vocab_size"] = data_cfg.bpe_vocab_size
        info.update({k: getattr(data_cfg, k) for k in _BPE_DATA_KEYS})
    return info


def check_tokenizer(info: dict[str, Any], data_cfg, path) -> None:
    """ValueError unless ``data_cfg`` rebuilds the tokenizer the weights in ``path`` were trained with."""
    name = info["name"]
    if data_cfg.tokenizer != name:
        raise ValueError(
            f"data.tokenizer={data_cfg.tokenizer!r} disagrees with {_where(path)}, whose weights were trained "
            f"with tokenizer {name!r}; allowed: data.tokenizer={name}"
        )
    if name == "bpe":
        want = {"bpe_vocab_size": info.get("bpe_vocab_size"), **{k: info.get(k) for k in _BPE_DATA_KEYS if k in info}}
        for key, value in want.items():
            if getattr(data_cfg, key) != value:
                raise ValueError(
                    f"data.{key}={getattr(data_cfg, key)!r} disagrees with {_where(path)}: its BPE tokenizer was "
                    f"learned with data.{key}={value!r}, and another corpus learns other token ids; "
                    f"allowed: data.{key}={value!r}, or a base trained with data.tokenizer=byte"
                )
    elif name != "byte":
        raise ValueError(f"{_where(path)}: config.json tokenizer name={name!r} is not supported; allowed: byte, bpe")


# -- reading ----------------------------------------------------------------------------
def read_gpt_dir_config(path) -> dict[str, Any]:
    """config.json of a saved directory, checked (cheap: the weights are not read)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"{_where(path)} does not exist or is not a directory")
    cfg_file, weights = p / CONFIG, p / WEIGHTS
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ValueError(f"{_where(path)} has no {f.name}; expected a directory with {CONFIG} and {WEIGHTS} "
                             "(written by `commtrain export`)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{_where(path)}: {CONFIG} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else raw
        raise ValueError(f"{_where(path)}: {CONFIG} format={got!r} is not supported; allowed: {FORMAT!r}")
    model, tok = raw.get("model"), raw.get("tokenizer")
    if not isinstance(model, dict):
        raise ValueError(f"{_where(path)}: {CONFIG} has no \"model\" mapping (the GPTConfig fields)")
    missing = [k for k in _REQUIRED if k not in model]
    unknown = sorted(set(model) - set(_ARCH_FIELDS))
    if missing or unknown:
        what = f"lacks {', '.join(missing)}" if missing else f"has unknown keys {', '.join(unknown)}"
        raise ValueError(f"{_where(path)}: {CONFIG} \"model\" {what}; allowed keys: {', '.join(_ARCH_FIELDS)}")
    try:
        GPTConfig(**model).validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{_where(path)}: {CONFIG}: {e}") from None
    if not isinstance(tok, dict) or not isinstance(tok.get("name"), str):
        raise ValueError(f"{_where(path)}: {CONFIG} has no \"tokenizer\" mapping with a \"name\" (byte or bpe)")
    return raw


def load_gpt_dir(path, dropout: float | None = None) -> tuple[GPT, dict[str, Any]]:
    """``(GPT with the saved weights, config.json as a dict)``.

    ``dropout`` (the fine-tune's own) replaces the saved value when given. Tensor names and
    shapes are checked against the architecture before anything is copied, so a file from
    another model fails with one line instead of a partial load.
    """
    info = read_gpt_dir_config(path)
    arch = dict(info["model"])
    if dropout is not None:
        arch["dropout"] = dropout
    model = GPT(GPTConfig(**arch))
    st = _safetensors()
    weights = Path(path).expanduser() / WEIGHTS
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types for bad files
        raise ValueError(f"{_where(path)}: {WEIGHTS} cannot be read ({type(e).__name__}: {e})") from None
    for k, shape in shapes.items():
        if k in expected and shape != expected[k]:
            raise ValueError(f"{_where(path)}: {WEIGHTS} tensor {k!r} has shape {list(shape)} but {CONFIG}'s "
                             f"architecture needs {list(expected[k])}")
    try:
        missing, unexpected = st.load_model(model, weights, strict=False)
    except Exception as e:  # noqa: BLE001 -- a truncated data section surfaces only here
        raise ValueError(f"{_where(path)}: {WEIGHTS} cannot be loaded ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if missing or unexpected:
        parts = ([f"missing {', '.join(sorted(missing)[:4])}"] if missing else []) + (
            [f"unexpected {', '.join(sorted(unexpected)[:4])}"] if unexpected else [])
        raise ValueError(f"{_where(path)}: {WEIGHTS} does not match {CONFIG}'s architecture ({'; '.join(parts)})")
    return model, info


# -- writing ----------------------------------------------------------------------------
def save_gpt_dir(model: nn.Module, tokenizer_info: dict[str, Any], out_dir) -> Path:
    """Write ``model`` (a built-in GPT, unsplit) to ``out_dir`` in the ``commtrain.gpt/1`` format.

    Each file is written under a temporary name and renamed, so a reader never sees a
    half-written file; config.json is renamed last.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"save_gpt_dir needs the built-in GPT (unsplit), got {type(model).__name__}")
    if not isinstance(tokenizer_info, dict) or not isinstance(tokenizer_info.get("name"), str):
        raise ValueError(f"tokenizer_info={tokenizer_info!r} is invalid; allowed: a mapping with a \"name\" (byte or bpe)")
    st = _safetensors()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "model": dataclasses.asdict(model.config), "tokenizer": dict(tokenizer_info)}

    def _atomic(name: str, write) -> None:
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, out / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # No metadata of our own (config.json carries the format): safetensors writes its header
    # metadata from a hash map, so two keys could come out in either order and identical
    # weights would give different bytes. save_model adds one entry for the tied tensor.
    _atomic(WEIGHTS, lambda tmp: st.save_model(model, tmp))
    _atomic(CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1) + "\n"))
    return out
