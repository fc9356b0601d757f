"""LoRA adapters via ``peft`` (the optional extra ``commtrain[lora]``): ``model.lora``.

``model.lora.r`` > 0 injects LoRA layers (``peft.inject_adapter_in_model``) into the built-in
GPT or the HF model *in place*, before pipeline stages are split, and freezes every other
parameter. The trainer hands only parameters with ``requires_grad`` to the gradient sync, so
only the adapters are reduced (and compressed), optimised and gathered; pipelines still send
activations through their codecs. Checkpoints hold the module's whole ``state_dict`` (frozen
base + adapters; resume is bit-exact) and ``commtrain export --lora merge|adapter`` merges the
adapters into the weights or writes a peft adapter directory (see :mod:`commtrain.export`).

Default ``target_modules`` per architecture (:data:`DEFAULT_TARGETS`): the built-in GPT's
attention and MLP Linear layers (``c_attn``, ``c_proj``, ``c_fc``); ``gpt2``: ``c_attn``,
``c_proj``; llama-like (``llama``, ``mistral``, ``qwen2``): ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``. A name matches a layer whose name is it or ends with ``.`` + it
(peft's rule); one that matches no Linear/Conv1D/Embedding layer fails at start-up.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from torch import nn

GPT_ARCH = "commtrain-gpt"
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    GPT_ARCH: ["c_attn", "c_proj", "c_fc"],
    "gpt2": ["c_attn", "c_proj"],
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
}


@dataclass
class LoraConfig:
    """The ``model.lora`` section. ``r`` 0 or null: no LoRA. ``alpha`` null: 2 r.
    ``target_modules`` null: the architecture's default (:data:`DEFAULT_TARGETS`)."""

    r: Optional[int] = None
    alpha: Optional[float] = None
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None

    @property
    def enabled(self) -> bool:
        return bool(self.r)

    def validate(self) -> None:
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0):
            raise ValueError(f"model.lora.r={self.r!r} is invalid; allowed: an integer >= 0 (0 or null: no LoRA)")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not self.alpha > 0):
            raise ValueError(f"model.lora.alpha={self.alpha!r} is invalid; allowed: a number > 0 or null (2 r)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout={self.dropout!r} is invalid; allowed: 0 <= dropout < 1")
        t = self.target_modules
        if t is not None and (not isinstance(t, list) or not t or not all(isinstance(x, str) and x for x in t)):
            raise ValueError(f"model.lora.target_modules={t!r} is invalid; allowed: a non-empty list of layer "
                             f"names, or null (the architecture's default)")

    def peft_config(self, arch: str, targets: list[str]):
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(r=int(self.r), lora_alpha=float(self.alpha if self.alpha is not None else 2 * self.r),
                              lora_dropout=float(self.dropout), target_modules=list(targets), bias="none",
                              fan_in_fan_out=arch == "gpt2", task_type=None if arch == GPT_ARCH else "CAUSAL_LM")


def _peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ValueError("model.lora.r > 0 needs peft: pip install 'commtrain[lora]'") from None


def architecture(model: nn.Module) -> str:
    """``commtrain-gpt`` or the HF ``model_type`` (``gpt2``, ``llama``, ...)."""
    hf = getattr(model, "hf", None)
    return GPT_ARCH if hf is None else str(getattr(hf.config, "model_type", type(hf).__name__))


def _target_root(model: nn.Module) -> nn.Module:
    """The module adapters are injected into (and keyed against): the HF model itself."""
    hf = getattr(model, "hf", None)
    return hf if hf is not None else model


def targets_for(cfg: LoraConfig, arch: str, layers: dict[str, bool]) -> list[str]:
    """The target names for ``arch`` whose layers are ``{qualified name: adaptable?}``, checked."""
    targets = cfg.target_modules if cfg.target_modules is not None else DEFAULT_TARGETS.get(arch)
    adaptable = sorted({n.rsplit(".", 1)[-1] for n, ok in layers.items() if ok})
    if targets is None:
        raise ValueError(f"model.lora.target_modules is required for architecture {arch!r} (no default); allowed: "
                         f"names of its layers: {', '.join(adaptable)}")
    for t in targets:
        hits = [n for n in layers if n == t or n.endswith("." + t)]
        if not hits or not all(layers[n] for n in hits):
            raise ValueError(f"model.lora.target_modules: {t!r} matches no Linear/Conv1D/Embedding layer of "
                             f"{arch!r}; allowed: {', '.join(adaptable)}")
    return list(targets)


def layer_types(root: nn.Module) -> dict[str, bool]:
    """``{qualified name: can LoRA adapt it}`` (Linear, Embedding, transformers' Conv1D)."""
    return {n: isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "Conv1D"
            for n, m in root.named_modules() if n}


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Inject ``cfg``'s adapters into ``model`` in place (only they stay trainable)."""
    _peft()
    from peft import inject_adapter_in_model

    root, arch = _target_root(model), architecture(model)
    targets = targets_for(cfg, arch, layer_types(root))
    inject_adapter_in_model(cfg.peft_config(arch, targets), root)
    for n, p in model.named_parameters():  # peft froze the base; make sure of it for every part
        p.requires_grad_("lora_" in n)
    return model


@functools.lru_cache(maxsize=8)
def _meta_layers(preset_key: tuple | None, hf_path: str | None) -> tuple[str, tuple[tuple[str, bool], ...]]:
    import torch

    with torch.device("meta"):
        if hf_path is not None:
            from transformers import AutoConfig, AutoModelForCausalLM

            from .hf import _offline

            with _offline():
                conf = AutoConfig.from_pretrained(hf_path, local_files_only=True)
            root, arch = AutoModelForCausalLM.from_config(conf), str(conf.model_type)
        else:
            from .gpt import GPT, GPTConfig

            root, arch = GPT(GPTConfig(**dict(preset_key))), GPT_ARCH
    return arch, tuple(layer_types(root).items())


def check_targets(cfg: LoraConfig, gpt_config=None, hf_path: str | None = None) -> None:
    """Start-up check (no weights loaded: the architecture on the meta device)."""
    if not cfg.enabled:
        return
    _peft()
    from dataclasses import asdict

    key = tuple(sorted(asdict(gpt_config).items())) if gpt_config is not None else None
    arch, layers = _meta_layers(key, hf_path)
    targets_for(cfg, arch, dict(layers))


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base layer and remove the LoRA wrappers (in place)."""
    return _unwrap(model, merge=True)


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove the LoRA wrappers without merging (in place): the frozen base model."""
    return _unwrap(model, merge=False)


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    from peft.tuners.lora import LoraLayer

    root = _target_root(model)
    for name, module in list(root.named_modules()):
        if isinstance(module, LoraLayer):
            if merge:
                module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, module.get_base_layer())
    if hasattr(root, "peft_config"):
        del root.peft_config
    return model


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapters' tensors keyed as a peft adapter directory stores them."""
    from peft import get_peft_model_state_dict

    return {f"base_model.model.{k}": v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(_target_root(model)).items()}
