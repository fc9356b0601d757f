"""Models: the built-in GPT (presets) and the Hugging Face causal-LM adapter.

Both expose one interface: ``forward(idx, targets=None) -> (logits, loss)``, ``loss(logits,
targets)``, ``vocab_size``, ``block_size`` and ``stage_modules(n_stages, balance)`` for
pipeline parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .gpt import GPT, GPTConfig, PRESETS, available_presets, preset_config, register_preset
from .hf import HFCausalLM, check_hf_path
from .partition import BALANCE_MODES, partition
from .stage import Stage


@dataclass
class ModelConfig:
    """``preset`` names a built-in GPT; ``hf_path`` (when set) loads a local HF checkpoint instead.

    ``vocab_size``/``block_size`` override the preset (e.g. the BPE tokenizer's vocabulary);
    for an HF checkpoint ``vocab_size`` must match it and ``block_size`` may only shorten the
    context. ``dropout`` applies to the built-in GPT (an HF checkpoint keeps its own).
    """

    preset: str = "gpt-nano"
    hf_path: str | None = None
    dropout: float = 0.0
    vocab_size: int | None = None
    block_size: int | None = None

    def validate(self) -> None:
        if self.hf_path is not None:
            if not isinstance(self.hf_path, str) or not self.hf_path:
                raise ValueError(f"model.hf_path={self.hf_path!r} is invalid; allowed: a local checkpoint directory or null")
            check_hf_path(self.hf_path)
        elif self.preset not in PRESETS:
            raise ValueError(f"model.preset={self.preset!r} is invalid; allowed: {', '.join(available_presets())}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout!r} is invalid; allowed: 0 <= dropout < 1")
        for key in ("vocab_size", "block_size"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"model.{key}={v!r} is invalid; allowed: an integer >= 1 or null")


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model ``cfg`` describes. Initialisation is deterministic given ``torch.manual_seed``."""
    cfg.validate()
    if cfg.hf_path is not None:
        model = HFCausalLM.from_pretrained(cfg.hf_path, block_size=cfg.block_size)
        if cfg.vocab_size is not None and cfg.vocab_size != model.vocab_size:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size} is invalid for {cfg.hf_path!r}; allowed: null or {model.vocab_size}"
            )
        return model
    return GPT(preset_config(cfg.preset, dropout=cfg.dropout, vocab_size=cfg.vocab_size, block_size=cfg.block_size))


__all__ = [
    "BALANCE_MODES", "GPT", "GPTConfig", "HFCausalLM", "ModelConfig", "PRESETS", "Stage",
    "available_presets", "build_model", "partition", "preset_config", "register_preset",
]
