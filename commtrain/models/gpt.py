"""Built-in GPT (nanoGPT style), splittable into pipeline stages.

Token + learned position embedding, pre-LayerNorm blocks (causal self-attention through
``F.scaled_dot_product_attention``, GELU MLP), final LayerNorm and an lm head tied to the
token embedding by default. Initialisation follows GPT-2: N(0, 0.02) weights, zero biases,
and residual output projections scaled by 1/sqrt(2 * n_layer) so the residual stream's
variance does not grow with depth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .stage import Stage, split_into_stages


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True

    def validate(self) -> None:
        for key in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"gpt.{key}={v!r} is invalid; allowed: an integer >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"gpt.n_embd={self.n_embd} is invalid; allowed: a multiple of n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"gpt.dropout={self.dropout!r} is invalid; allowed: 0 <= dropout < 1")


# -- presets ------------------------------------------------------------------------------
PRESETS: dict[str, GPTConfig] = {}


def register_preset(name: str, cfg: GPTConfig) -> GPTConfig:
    if name in PRESETS:
        raise ValueError(f"GPT preset {name!r} registered twice")
    cfg.validate()
    PRESETS[name] = cfg
    return cfg


def available_presets() -> list[str]:
    return sorted(PRESETS)


def preset_config(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r} is invalid; allowed: {', '.join(available_presets())}")
    cfg = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


# Byte-level vocabulary (256) by default; a BPE tokenizer overrides vocab_size.
register_preset("gpt-nano", GPTConfig(vocab_size=256, n_layer=2, n_head=2, n_embd=64, block_size=256))  # ~0.13M
register_preset("gpt-micro", GPTConfig(vocab_size=256, n_layer=4, n_head=4, n_embd=256, block_size=256))  # ~3.3M
register_preset("gpt-mini", GPTConfig(vocab_size=256, n_layer=6, n_head=6, n_embd=384, block_size=512))  # ~10.9M
register_preset("gpt2-124m", GPTConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024))


# -- layers -------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Embedding(nn.Module):
    """Stage-0 layer: token ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.block_size = cfg.block_size
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} is invalid; allowed: <= block_size={self.block_size}")
        pos = torch.arange(T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))


class Head(nn.Module):
    """Last-stage layer: hidden states (B, T, C) -> logits (B, T, V)."""

    def __init__(self, ln_f: nn.LayerNorm, lm_head: nn.Linear):
        super().__init__()
        self.ln_f, self.lm_head = ln_f, lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))

    def untied(self) -> "Head":
        """A head with its own copy of the lm-head matrix (same values), sharing ln_f."""
        w = self.lm_head.weight
        lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lm_head.weight.copy_(w)
        lm_head.weight.requires_grad_(w.requires_grad)  # frozen stays frozen (LoRA)
        return Head(self.ln_f, lm_head)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over all target tokens (targets == -1 are ignored)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


# -- the model ----------------------------------------------------------------------------
class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head = Head(nn.LayerNorm(cfg.n_embd, bias=cfg.bias), nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False))
        if cfg.tie_weights:
            self.head.lm_head.weight = self.embed.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections (GPT-2 paper)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def hidden_size(self) -> int:
        """Width C of the (B, T, C) activations that cross pipeline stage boundaries."""
        return self.config.n_embd

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared (tied) tensors counted once

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        return logits, (self.loss(logits, targets) if targets is not None else None)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, targets)

    def pipeline_layers(self) -> list[nn.Module]:
        return [self.embed, *self.blocks, self.head]

    def stage_modules(self, n_stages: int, balance: str = "layers") -> list[Stage]:
        """Split into ``n_stages`` stages sharing this model's parameters (see :mod:`.stage`)."""
        untie = (lambda head: head.untied()) if self.config.tie_weights else None
        return split_into_stages(self.pipeline_layers(), n_stages, balance, untie)
