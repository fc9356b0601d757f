"""What the perf model needs of a model: per-stage parameter shapes and FLOPs per token.

FLOPs per token of one stage (forward + backward, PaLM appendix B / nanoGPT's ``estimate_mfu``)::

    flops/token = 6 * N_matmul + 12 * L * T * C

``N_matmul``: the stage's parameters that take part in matmuls (everything but the embedding
lookup, so the lm head counts even when tied); ``L`` blocks of width ``C`` at sequence length
``T`` (the attention score and value matmuls, causal mask not subtracted). The model is built
on the meta device, so describing GPT-2 XL costs no memory, and split into stages exactly as
the trainer splits it (``model.stage_modules(pp)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_int


@dataclass
class StageShape:
    """One pipeline stage: its parameters (name, tensor on meta) and per-token FLOPs."""

    index: int
    named_params: list[tuple[str, torch.Tensor]]
    flops_per_token: float  # forward + backward
    n_blocks: int

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.named_params)


@dataclass
class ModelShape:
    name: str
    params: int  # unique parameters of the unsplit model
    n_layer: int
    hidden: int
    n_head: int
    vocab_size: int
    seq_len: int
    stages: list[StageShape]

    @property
    def flops_per_token(self) -> float:
        return sum(s.flops_per_token for s in self.stages)


def describe_model(model: str | torch.nn.Module, seq_len: int, pp: int = 1, balance: str = "layers") -> ModelShape:
    """Parameter shapes and FLOPs of ``model`` (a preset name, built on the meta device, or a
    built model) split into ``pp`` stages exactly as the trainer splits it."""
    check_int("seq_len", seq_len, 1)
    check_int("pp", pp, 1)
    name = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        model = _meta_preset(model)
    cfg = getattr(model, "config", None)
    n_layer = int(getattr(cfg, "n_layer", getattr(cfg, "num_hidden_layers", 0)))
    hidden = int(getattr(model, "hidden_size", getattr(cfg, "n_embd", 0)))
    n_head = int(getattr(cfg, "n_head", getattr(cfg, "num_attention_heads", 1)))
    vocab = int(getattr(model, "vocab_size", 0))
    block_size = getattr(model, "block_size", None)
    if block_size is not None and seq_len > block_size:
        raise ValueError(f"seq_len={seq_len} is invalid for {name}; allowed: <= block_size={block_size}")
    if not hasattr(model, "stage_modules"):
        raise TypeError(f"model {name} has no stage_modules(); pass a commtrain model or a preset name")
    with torch.device("meta"):
        split = model.stage_modules(pp) if pp > 1 else None
    if split is None:
        stages = [_whole_model_stage(model, n_layer, seq_len, hidden)]
    else:
        n_layers_total = len(model.pipeline_layers()) if hasattr(model, "pipeline_layers") else None
        stages = [_split_stage(i, s, n_layers_total, seq_len, hidden) for i, s in enumerate(split)]
    params = sum(p.numel() for p in model.parameters())
    return ModelShape(name, params, n_layer, hidden, n_head, vocab, seq_len, stages)


def _meta_preset(preset: str) -> torch.nn.Module:
    from ..models import PRESETS, ModelConfig, build_model

    if preset not in PRESETS:
        raise ValueError(f"model={preset!r} is invalid; allowed presets: {', '.join(sorted(PRESETS))}")
    with torch.device("meta"):
        return build_model(ModelConfig(preset=preset))


def _flops(matmul: int, blocks: int, seq_len: int, hidden: int) -> float:
    return 6.0 * matmul + 12.0 * blocks * seq_len * hidden


def _whole_model_stage(model, n_layer: int, seq_len: int, hidden: int) -> StageShape:
    """pp=1: every parameter; matmul parameters are all but the embedding layer (layer 0: a
    lookup). The lm-head matrix counts even when tied to the embedding (named_parameters lists
    a tied weight once, so its share is added back)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    pl = model.pipeline_layers() if hasattr(model, "pipeline_layers") else [None]
    emb = {id(p): p.numel() for p in pl[0].parameters()} if pl[0] is not None else {}
    shared = sum(p.numel() for p in pl[-1].parameters() if id(p) in emb) if pl[-1] is not None else 0
    matmul = sum(p.numel() for _, p in named) - sum(emb.values()) + shared
    return StageShape(0, named, _flops(matmul, n_layer, seq_len, hidden), n_layer)


def _split_stage(index: int, stage, n_layers_total: int | None, seq_len: int, hidden: int) -> StageShape:
    """One stage of ``stage_modules(pp)``: layers ``[start, stop)`` of embedding, blocks, head."""
    start, stop = stage.start, stage.stop
    named = [(n, p) for n, p in stage.named_parameters() if p.requires_grad]
    emb_n = sum(p.numel() for p in stage.layers[0].parameters()) if start == 0 else 0
    matmul = sum(p.numel() for _, p in named) - emb_n
    last = n_layers_total if n_layers_total is not None else stop
    blocks = max(0, min(stop, last - 1) - max(start, 1))  # layer 0 embeds, the last is the head
    return StageShape(index, named, _flops(matmul, blocks, seq_len, hidden), blocks)
