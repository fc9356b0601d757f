"""Models: the built-in GPT (presets) and the Hugging Face causal-LM adapter.

Both expose one interface: ``forward(idx, targets=None) -> (logits, loss)``, ``loss(logits,
targets)``, ``vocab_size``, ``block_size`` and ``stage_modules(n_stages, balance)`` for
pipeline parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .gpt import GPT, GPTConfig, PRESETS, available_presets, preset_config, register_preset
from .hf import HFCausalLM, check_hf_path
from .lora import LoraConfig, apply_lora, check_targets
from .partition import BALANCE_MODES, partition
from .pretrained import check_tokenizer, load_gpt_dir, read_gpt_dir_config, save_gpt_dir, tokenizer_info
from .stage import Stage


@dataclass
class ModelConfig:
    """``preset`` names a built-in GPT; ``hf_path`` (when set) loads a local HF checkpoint instead.

    ``vocab_size``/``block_size`` override the preset (e.g. the BPE tokenizer's vocabulary);
    for an HF checkpoint ``vocab_size`` must match it and ``block_size`` may only shorten the
    context. ``dropout`` applies to the built-in GPT (an HF checkpoint keeps its own).

    ``lora`` (:class:`LoraConfig`, ``r`` > 0) trains LoRA adapters only (:mod:`.lora`).

    ``init_from`` starts the built-in GPT from saved weights (a ``commtrain.gpt/1`` directory,
    see :mod:`.pretrained`); its config.json fixes the architecture, so ``preset``,
    ``vocab_size`` and ``block_size`` must be left unset (default) or agree with it.
    """

    preset: str = "gpt-nano"
    hf_path: str | None = None
    dropout: float = 0.0
    vocab_size: int | None = None
    block_size: int | None = None
    init_from: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        if self.init_from is not None:
            self._check_init_from()
        elif self.hf_path is not None:
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
        self.lora.validate()
        if self.lora.enabled:  # target names against the architecture (on the meta device: no weights)
            if self.hf_path is not None and self.init_from is None:
                check_targets(self.lora, hf_path=self.hf_path)
            else:
                check_targets(self.lora, gpt_config=self.gpt_config())

    def gpt_config(self) -> GPTConfig:
        """The built-in GPT's architecture (``init_from``'s, or the preset with overrides)."""
        if self.init_from is not None:
            return GPTConfig(**read_gpt_dir_config(self.init_from)["model"])
        return preset_config(self.preset, dropout=self.dropout, vocab_size=self.vocab_size, block_size=self.block_size)

    def _check_init_from(self) -> None:
        if not isinstance(self.init_from, str) or not self.init_from:
            raise ValueError(f"model.init_from={self.init_from!r} is invalid; allowed: a saved model directory or null")
        if self.hf_path is not None:
            raise ValueError(f"model.hf_path={self.hf_path!r} with model.init_from={self.init_from!r}; allowed: one of them")
        arch = GPTConfig(**read_gpt_dir_config(self.init_from)["model"])
        shape = ("n_layer", "n_head", "n_embd", "bias", "tie_weights")
        where = f"model.init_from={self.init_from!r} ({', '.join(f'{k}={getattr(arch, k)}' for k in shape[:3])}, " \
                f"vocab_size={arch.vocab_size}, block_size={arch.block_size})"
        # The preset's default cannot be told from an explicit "gpt-nano"; any other preset must agree.
        if self.preset != type(self).__dataclass_fields__["preset"].default:
            if self.preset not in PRESETS:
                raise ValueError(f"model.preset={self.preset!r} is invalid; allowed: {', '.join(available_presets())}")
            if any(getattr(PRESETS[self.preset], k) != getattr(arch, k) for k in shape):
                raise ValueError(f"model.preset={self.preset!r} disagrees with {where}; allowed: leave model.preset unset")
        for key in ("vocab_size", "block_size"):
            v = getattr(self, key)
            if v is not None and v != getattr(arch, key):
                raise ValueError(f"model.{key}={v!r} disagrees with {where}; allowed: null or {getattr(arch, key)}")

    def check_data(self, data) -> None:
        """With ``init_from``: ``data`` (a DataConfig) must rebuild the tokenizer the weights were trained with."""
        if self.init_from is not None:
            check_tokenizer(read_gpt_dir_config(self.init_from)["tokenizer"], data, self.init_from)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model ``cfg`` describes. Initialisation is deterministic given ``torch.manual_seed``."""
    cfg.validate()
    if cfg.init_from is not None:
        model = load_gpt_dir(cfg.init_from, dropout=cfg.dropout)[0]
    elif cfg.hf_path is not None:
        model = HFCausalLM.from_pretrained(cfg.hf_path, block_size=cfg.block_size)
        if cfg.vocab_size is not None and cfg.vocab_size != model.vocab_size:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size} is invalid for {cfg.hf_path!r}; allowed: null or {model.vocab_size}"
            )
    else:
        model = GPT(preset_config(cfg.preset, dropout=cfg.dropout, vocab_size=cfg.vocab_size, block_size=cfg.block_size))
    return apply_lora(model, cfg.lora) if cfg.lora.enabled else model


__all__ = [
    "BALANCE_MODES", "GPT", "GPTConfig", "HFCausalLM", "LoraConfig", "ModelConfig", "PRESETS", "Stage",
    "available_presets", "build_model", "check_tokenizer", "load_gpt_dir", "partition", "preset_config",
    "read_gpt_dir_config", "register_preset", "save_gpt_dir", "tokenizer_info",
]
