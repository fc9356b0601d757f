"""Tokenizers: byte-level (zero setup), BPE trained locally and cached, or a checkpoint's own.

All expose ``vocab_size``, ``encode(text) -> LongTensor`` and ``decode(ids) -> str``, and are
registered by name with ``@register_tokenizer``; ``build_tokenizer(name, ...)`` builds one.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..registry import Registry

_TOKENIZERS: Registry[Callable[..., "object"]] = Registry("tokenizer")
_CHUNK = 1 << 16  # characters per encode_batch item (split at newlines)


register_tokenizer = _TOKENIZERS.register
available_tokenizers = _TOKENIZERS.names


def build_tokenizer(name: str, text: str, **kw):
    return _TOKENIZERS.get(name, "data.tokenizer")(text=text, **kw)


AUTO = "auto"  # data.tokenizer default: the checkpoint's own with model.hf_path, else byte


def resolve_tokenizer(data, model) -> str:
    """The tokenizer ``data.tokenizer`` names for ``model`` (a DataConfig and a ModelConfig),
    checked; the configs are only read (``Config.resolved`` records the answer).

    A pretrained model only makes sense with the ids it was trained on, so:

    - ``auto`` becomes ``hf`` when ``model.hf_path`` is set, else ``byte``;
    - ``hf`` needs ``model.hf_path`` and a checkpoint directory with tokenizer files
      (the error lists what is missing);
    - ``byte``/``bpe`` with ``model.hf_path`` is refused unless ``data.allow_foreign_tokenizer``
      is true (e.g. a checkpoint without a tokenizer, trained further on new ids); with the
      opt-in, a BPE vocabulary must fit the checkpoint's embedding.

    Called by ``Config.validate`` (before any process starts); ValueError names the keys.
    """
    from ..models.hf import check_hf_tokenizer_files

    hf_path = getattr(model, "hf_path", None)
    name = data.tokenizer
    if name == AUTO:
        name = "hf" if hf_path is not None else "byte"
    if name == "hf":
        if hf_path is None:
            raise ValueError("data.tokenizer='hf' needs model.hf_path (a checkpoint with its tokenizer); "
                             "allowed without it: auto, byte, bpe")
        check_hf_tokenizer_files(hf_path)
    elif hf_path is not None:
        if not data.allow_foreign_tokenizer:
            raise ValueError(
                f"data.tokenizer={name!r} with model.hf_path={hf_path!r}: a pretrained model must see the "
                "token ids it was trained on; use data.tokenizer=hf (the default, auto), or set "
                "data.allow_foreign_tokenizer=true to train it on foreign ids on purpose"
            )
        if name == "bpe":
            vocab = checkpoint_vocab_size(hf_path)
            if vocab is not None and data.bpe_vocab_size > vocab:
                raise ValueError(
                    f"data.bpe_vocab_size={data.bpe_vocab_size} exceeds the vocabulary of model.hf_path={hf_path!r}; "
                    f"allowed: <= {vocab}"
                )
    return name


def checkpoint_vocab_size(path) -> int | None:
    """``vocab_size`` from a checkpoint's config.json (no model load), or None."""
    import json

    try:
        cfg = json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    v = cfg.get("vocab_size", cfg.get("text_config", {}).get("vocab_size"))
    return v if isinstance(v, int) else None


def default_cache_dir() -> Path:
    return Path(os.environ.get("COMMTRAIN_CACHE", Path.home() / ".cache" / "commtrain"))


def _chunks(text: str) -> list[str]:
    """Split at newlines into ~64K-character pieces (tokens never span a newline boundary
    here, so the split is deterministic and costs almost nothing in compression)."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + _CHUNK)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


class ByteTokenizer:
    """UTF-8 bytes as token ids: vocabulary 256, nothing to train or download."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))

    def decode(self, ids) -> str:
        return bytes(torch.as_tensor(ids, dtype=torch.uint8).tolist()).decode("utf-8", errors="replace")


class FastTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` (BPE or a checkpoint's fast tokenizer)."""

    def __init__(self, tok, name: str, vocab_size: int, path: Path | None = None):
        self.tok, self.name, self.vocab_size, self.path = tok, name, vocab_size, path

    def encode(self, text: str) -> torch.Tensor:
        encs = self.tok.encode_batch(_chunks(text), add_special_tokens=False)
        if not encs:
            return torch.empty(0, dtype=torch.int64)
        return torch.from_numpy(np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encs]))

    def decode(self, ids) -> str:
        return self.tok.decode(torch.as_tensor(ids).tolist())


@register_tokenizer("byte")
def _byte(text: str, **_) -> ByteTokenizer:
    return ByteTokenizer()


def train_bpe(text: str, vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained on ``text``; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(_chunks(text), trainer)
    return tok


@register_tokenizer("bpe")
def _bpe(text: str, bpe_vocab_size: int = 2048, cache_dir=None, **_) -> FastTokenizer:
    """Train once per (corpus, vocab size) and cache the tokenizer JSON under ``cache_dir``.

    The cache key hashes the corpus, so a changed corpus never reuses a stale tokenizer.
    The file is written to a temporary name and renamed, so concurrent ranks sharing the
    cache directory never read a half-written file.
    """
    from tokenizers import Tokenizer

    if not isinstance(bpe_vocab_size, int) or bpe_vocab_size < 258:
        raise ValueError(f"data.bpe_vocab_size={bpe_vocab_size} is invalid; allowed: >= 258 (256 bytes + merges)")
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = cache / f"bpe-v{bpe_vocab_size}-{key}.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = train_bpe(text, bpe_vocab_size)
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
        os.close(fd)
        tok.save(tmp)
        os.replace(tmp, path)
    return FastTokenizer(tok, "bpe", tok.get_vocab_size(), path)


@register_tokenizer("hf")
def _hf(text: str, hf_tokenizer=None, **_) -> FastTokenizer:
    """The checkpoint's own tokenizer (passed in by the caller, e.g. ``HFCausalLM.tokenizer``)."""
    if hf_tokenizer is None:
        raise ValueError(
            "data.tokenizer='hf' needs the checkpoint's tokenizer, and none was loaded; allowed with a "
            "model.hf_path whose directory holds loadable tokenizer files (see the warning above, if any)"
        )
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"data.tokenizer='hf': {type(hf_tokenizer).__name__} is not a fast tokenizer")
    return FastTokenizer(backend, "hf", len(hf_tokenizer))
