"""Data: built-in corpus or user files -> tokenizer -> TokenDataset (stable sample ids) -> ShardedSampler."""
from __future__ import annotations

from dataclasses import dataclass

from .corpus import available_sources, fingerprint, load_text, register_source, resolve_paths
from .dataset import TokenDataset, split_train_eval
from .sampler import ShardedSampler
from .tokenizer import (
    AUTO, ByteTokenizer, FastTokenizer, available_tokenizers, build_tokenizer, register_tokenizer, resolve_tokenizer,
)


@dataclass
class DataConfig:
    """``source``: "stdlib" (the Python standard library's source, no download), "shakespeare"
    (vendored public-domain plays, ~1.5 MB, for fine-tuning) or "files"
    (``path``: a .txt/.jsonl file, directory, glob, comma-separated list or list).
    ``tokenizer``: "auto" (the default: "hf" with ``model.hf_path``, else "byte"), "byte"
    (vocab 256), "bpe" (trained on the corpus with ``bpe_vocab_size`` tokens, cached under
    ``cache_dir`` or $COMMTRAIN_CACHE or ~/.cache/commtrain) or "hf" (the checkpoint's own).
    "byte"/"bpe" with ``model.hf_path`` needs ``allow_foreign_tokenizer: true`` (see
    :func:`.tokenizer.resolve_tokenizer`). ``max_bytes`` caps the corpus read from any source."""

    source: str = "stdlib"
    path: str | list[str] | None = None
    tokenizer: str = AUTO
    seq_len: int = 64
    eval_fraction: float = 0.05
    max_bytes: int = 2_000_000
    seed: int = 0
    text_field: str = "text"
    bpe_vocab_size: int = 2048
    cache_dir: str | None = None
    allow_foreign_tokenizer: bool = False  # byte/bpe ids for a model.hf_path checkpoint, on purpose

    def validate(self) -> None:
        if self.source not in available_sources():
            raise ValueError(f"data.source={self.source!r} is invalid; allowed: {', '.join(available_sources())}")
        if self.source == "files" and not self.path:
            raise ValueError("data.path=None is invalid for data.source='files'; allowed: a file, directory, glob or list")
        if self.source != "files" and self.path:
            raise ValueError(f"data.path={self.path!r} is only used with data.source='files' (data.source={self.source!r})")
        if self.tokenizer != AUTO and self.tokenizer not in available_tokenizers():
            raise ValueError(f"data.tokenizer={self.tokenizer!r} is invalid; allowed: {', '.join(available_tokenizers())}, "
                             f"or {AUTO} (hf with model.hf_path, else byte)")
        if not isinstance(self.allow_foreign_tokenizer, bool):
            raise ValueError(f"data.allow_foreign_tokenizer={self.allow_foreign_tokenizer!r} is invalid; allowed: true, false")
        for key, lo in (("seq_len", 1), ("max_bytes", 1), ("seed", 0), ("bpe_vocab_size", 258)):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"data.{key}={v!r} is invalid; allowed: an integer >= {lo}")
        f = self.eval_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise ValueError(f"data.eval_fraction={f!r} is invalid; allowed: 0 <= eval_fraction < 1")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"data.text_field={self.text_field!r} is invalid; allowed: a non-empty string")


def build_data(cfg: DataConfig, model_vocab: int, hf_tokenizer=None, block_size: int | None = None):
    """``(train_ds, eval_ds, tokenizer)``; eval ids follow train ids. Raises ValueError when
    the tokenizer's ids do not fit the model's vocabulary or seq_len exceeds ``block_size``."""
    cfg.validate()
    if block_size is not None and cfg.seq_len > block_size:
        raise ValueError(f"data.seq_len={cfg.seq_len} is invalid; allowed: <= the model's block_size={block_size}")
    text = load_text(cfg.source, cfg.path, cfg.max_bytes, cfg.text_field)
    # "auto" is resolved against the model config by Config.validate; a caller without one
    # (a script, a test) gets the checkpoint's tokenizer when it passes one, else bytes.
    name = cfg.tokenizer if cfg.tokenizer != AUTO else ("hf" if hf_tokenizer is not None else "byte")
    tok = build_tokenizer(name, text, bpe_vocab_size=cfg.bpe_vocab_size, cache_dir=cfg.cache_dir,
                          hf_tokenizer=hf_tokenizer)
    if tok.vocab_size > model_vocab:
        raise ValueError(
            f"data.tokenizer={name!r} produces {tok.vocab_size} token ids but the model's vocab_size is "
            f"{model_vocab}; allowed: model.vocab_size >= {tok.vocab_size}"
        )
    train, evals = split_train_eval(tok.encode(text), cfg.seq_len, cfg.eval_fraction)
    return train, evals, tok


__all__ = [
    "ByteTokenizer", "DataConfig", "FastTokenizer", "ShardedSampler", "TokenDataset", "available_sources",
    "available_tokenizers", "build_data", "build_tokenizer", "fingerprint", "load_text", "register_source",
    "register_tokenizer", "resolve_paths", "resolve_tokenizer", "split_train_eval",
]
