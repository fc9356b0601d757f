"""Adapter for Hugging Face causal LMs from a *local* checkpoint directory.

Loads with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1`` so nothing is ever downloaded,
and presents the same interface as :class:`commtrain.models.gpt.GPT`: ``forward(idx,
targets) -> (logits, loss)``, ``loss``, ``vocab_size``, ``block_size`` and
``stage_modules(n_stages, balance)``.

Targets are already shifted by the data pipeline (``y[t] = x[t + 1]``), so the loss is
computed here on the logits as they are rather than through HF's ``labels=`` (which shifts
again).

Stage splitting needs to know where an architecture keeps its embedding, decoder layers and
final norm + lm head. Each known layout is a small function registered with
:func:`register_layout`; a model no layout matches raises NotImplementedError.
"""
from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .gpt import lm_loss
from .stage import Stage, split_into_stages

log = logging.getLogger(__name__)


def check_hf_path(path) -> Path:
    """The checkpoint directory, or ValueError naming the path and what is missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"model.hf_path={str(path)!r} does not exist or is not a directory")
    if not (p / "config.json").is_file():
        raise ValueError(f"model.hf_path={str(path)!r} has no config.json; expected a save_pretrained() directory")
    return p


# What AutoTokenizer can build a *fast* tokenizer from, in the order it looks: the fast
# tokenizer's own file, a GPT-2 style BPE vocabulary, or a sentencepiece model (converted).
TOKENIZER_FILE_SETS: tuple[tuple[str, ...], ...] = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def check_hf_tokenizer_files(path) -> list[str]:
    """The tokenizer files present in checkpoint ``path``, or ValueError saying what is missing.

    A checkpoint directory saved with ``model.save_pretrained`` alone has weights and
    config.json but no tokenizer; the error names the files looked for and the ones found,
    and how to fix it (save the tokenizer there, or opt into a foreign tokenizer).
    """
    p = check_hf_path(path)
    for files in TOKENIZER_FILE_SETS:
        if all((p / f).is_file() for f in files):
            return list(files)
    present = sorted(f.name for f in p.iterdir() if f.is_file())
    partial = [f"{' + '.join(fs)} (missing {', '.join(f for f in fs if not (p / f).is_file())})"
               for fs in TOKENIZER_FILE_SETS if len(fs) > 1 and any((p / f).is_file() for f in fs)]
    wanted = " or ".join(" + ".join(fs) for fs in TOKENIZER_FILE_SETS)
    raise ValueError(
        f"model.hf_path={str(path)!r} has no tokenizer files: looked for {wanted}"
        + (f"; incomplete: {'; '.join(partial)}" if partial else "")
        + f"; found: {', '.join(present) or 'nothing'}. Save the checkpoint's tokenizer there "
        "(tokenizer.save_pretrained(path)), or train with data.tokenizer=byte|bpe and data.allow_foreign_tokenizer=true"
    )


@contextmanager
def _offline():
    """HF_HUB_OFFLINE=1 while loading, restoring the caller's environment afterwards."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _no_hf_progress_bars() -> None:
    """transformers' per-file load/save bars would interleave with commtrain's own progress
    (and garble every rank's log); commtrain reports progress itself."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# -- layouts: where the embedding, decoder layers and head live ----------------------------
_LAYOUTS: list[tuple[str, Callable[[nn.Module], bool], Callable[[nn.Module], list[nn.Module]]]] = []


def register_layout(name: str, matches: Callable[[nn.Module], bool]):
    """Decorator: ``fn(hf_model) -> [embedding, *layers, head]`` used when ``matches(hf_model)``."""

    def deco(fn):
        _LAYOUTS.append((name, matches, fn))
        return fn

    return deco


def _causal_mask(config, hidden: torch.Tensor, position_ids: torch.Tensor):
    """The mask HF's own model would build for an unpadded causal sequence (None for SDPA)."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None,
                              position_ids=position_ids, **{_mask_cache_kw(): None})


@functools.lru_cache(maxsize=1)
def _mask_cache_kw() -> str:
    """create_causal_mask's no-cache argument: renamed past_key_values -> cache in transformers
    5.x; pass whichever this version takes (neither a TypeError nor a FutureWarning)."""
    import inspect

    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class _GPT2Embedding(nn.Module):
    def __init__(self, tr: nn.Module):
        super().__init__()
        self.wte, self.wpe, self.drop = tr.wte, tr.wpe, tr.drop

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.drop(self.wte(idx) + self.wpe(_positions(idx)))


class _GPT2Layer(nn.Module):
    def __init__(self, block: nn.Module, config):
        super().__init__()
        self.block, self.config = block, config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = _positions(x)
        return _first(self.block(x, None, _causal_mask(self.config, x, pos), position_ids=pos))


class _Head(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


class _LlamaEmbedding(nn.Module):
    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(idx)


class _LlamaLayer(nn.Module):
    """A decoder layer that recomputes its rotary embedding and mask (cheap) from (B, T, C)."""

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module, config):
        super().__init__()
        self.layer, self.rotary_emb, self.config = layer, rotary_emb, config  # rotary_emb: buffers only, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = _positions(x)
        return _first(self.layer(x, attention_mask=_causal_mask(self.config, x, pos),
                                 position_embeddings=self.rotary_emb(x, position_ids=pos), position_ids=pos))


@register_layout("gpt2", lambda m: hasattr(m, "transformer") and hasattr(m.transformer, "h") and hasattr(m.transformer, "wpe"))
def _gpt2_layers(m: nn.Module) -> list[nn.Module]:
    tr = m.transformer
    return [_GPT2Embedding(tr), *(_GPT2Layer(b, m.config) for b in tr.h), _Head(tr.ln_f, m.lm_head)]


@register_layout("llama", lambda m: all(hasattr(getattr(m, "model", None), a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")))
def _llama_layers(m: nn.Module) -> list[nn.Module]:
    inner = m.model
    return [_LlamaEmbedding(inner.embed_tokens), *(_LlamaLayer(l, inner.rotary_emb, m.config) for l in inner.layers),
            _Head(inner.norm, m.lm_head)]


def _untie(head: _Head) -> _Head:
    w = head.lm_head.weight
    lm_head = nn.Linear(w.shape[1], w.shape[0], bias=head.lm_head.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lm_head.weight.copy_(w)
        if head.lm_head.bias is not None:
            lm_head.bias.copy_(head.lm_head.bias)
    for new, old in zip(lm_head.parameters(), head.lm_head.parameters()):
        new.requires_grad_(old.requires_grad)  # frozen stays frozen (LoRA)
    return _Head(head.norm, lm_head)


class HFCausalLM(nn.Module):
    """A local Hugging Face causal LM with commtrain's model interface."""

    def __init__(self, hf_model: nn.Module, tokenizer=None, block_size: int | None = None):
        super().__init__()
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.tokenizer_error: str | None = None  # why the checkpoint's tokenizer did not load
        cfg = hf_model.config
        max_pos = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        if block_size is not None and max_pos is not None and block_size > max_pos:
            raise ValueError(f"model.block_size={block_size} is invalid; allowed: <= {max_pos} (the checkpoint's context)")
        self._block_size = block_size or max_pos

    @classmethod
    def from_pretrained(cls, path, block_size: int | None = None, **kwargs) -> "HFCausalLM":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = check_hf_path(path)
        _no_hf_progress_bars()
        with _offline():
            # SDPA lets decoder layers run without an explicit mask (is_causal), which keeps
            # stage-by-stage execution identical to the whole model.
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, attn_implementation="sdpa", **kwargs)
            tok, error = None, None
            try:
                tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            except (OSError, ValueError, ImportError) as e:
                # A checkpoint without (loadable) tokenizer files: the data config must supply
                # one; data.tokenizer=hf then reports why this one did not load.
                error = f"{type(e).__name__}: {e}".splitlines()[0]
                if any((p / f).is_file() for fs in TOKENIZER_FILE_SETS for f in fs):
                    log.warning("the tokenizer in %s did not load (%s)", p, error)
        out = cls(model, tok, block_size)
        out.tokenizer_error = error
        return out

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_input_embeddings().weight.shape[0])

    @property
    def block_size(self) -> int | None:
        return self._block_size

    @property
    def hidden_size(self) -> int:
        """Width C of the (B, T, C) activations that cross pipeline stage boundaries."""
        return int(self.hf.get_input_embeddings().weight.shape[1])

    @property
    def config(self):
        return self.hf.config

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.hf(input_ids=idx, use_cache=False).logits
        return logits, (self.loss(logits, targets) if targets is not None else None)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, targets)

    def pipeline_layers(self) -> list[nn.Module]:
        for _name, matches, fn in _LAYOUTS:
            if matches(self.hf):
                return fn(self.hf)
        raise NotImplementedError(
            f"stage splitting is not implemented for {type(self.hf).__name__}; supported layouts: "
            f"{', '.join(n for n, _, _ in _LAYOUTS)} (GPT2LMHeadModel-like .transformer.h, "
            "LlamaForCausalLM-like .model.layers)"
        )

    def _tied(self) -> bool:
        return self.hf.get_output_embeddings().weight is self.hf.get_input_embeddings().weight

    def stage_modules(self, n_stages: int, balance: str = "layers") -> list[Stage]:
        """Split into stages sharing this model's parameters; a tied head is untied across stages."""
        return split_into_stages(self.pipeline_layers(), n_stages, balance, _untie if self._tied() else None)
