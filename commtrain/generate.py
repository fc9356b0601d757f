"""Sample text from an exported model: ``commtrain generate MODEL_DIR --prompt TEXT --max-new-tokens N``.

``MODEL_DIR`` is either format ``commtrain export`` writes: a Hugging Face ``save_pretrained``
directory (loaded with ``AutoModelForCausalLM``, offline) or a ``commtrain.gpt/1`` directory
(read by :func:`commtrain.export.load_gpt_dir`).

Sampling, one token at a time from the last position's logits ``z`` (vocabulary V):

- ``temperature = 0``: greedy, ``argmax z``;
- otherwise ``p = softmax(z / temperature)`` restricted to the ``top_k`` largest logits when
  ``top_k`` is given (the others get probability 0), and the next token is drawn from ``p``
  with a ``torch.Generator`` seeded by ``--seed``: the same seed gives the same text.

The built-in GPT recomputes its (cropped) context every step; an HF model reuses its
key/value cache, so its prompt plus new tokens must fit its context window.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .export import GPT_FORMAT, HF_MARKER, ExportError, load_gpt_dir


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    """Next token ids (B,) from last-position logits (B, V); see the module docstring."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Loaded:
    """A model with ``encode``/``decode`` and ``generate_ids(ids, n, sample)``."""

    def __init__(self, model, encode, decode, step, context: int | None, eos: int | None, vocab: int):
        self.model, self.encode, self.decode, self._step = model, encode, decode, step
        self.context, self.eos = context, eos
        self.vocab = vocab  # ids the tokenizer can decode; a model's embedding may be larger


def _is_gpt_dir(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("format") == GPT_FORMAT
    except (OSError, ValueError):
        return False


def load(model_dir, device: str | torch.device = "cpu") -> _Loaded:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ExportError(f"MODEL_DIR {str(model_dir)!r} has no config.json; expected a `commtrain export` directory")
    if _is_gpt_dir(path):
        model, tok = load_gpt_dir(path)
        model.to(device)
        block = model.block_size

        @torch.no_grad()
        def step_fn(ids, state):
            logits, _ = model(ids[:, -block:])  # a sliding window over the context
            return logits[:, -1], None

        return _Loaded(model, lambda t: tok.encode(t).tolist(), lambda ids: tok.decode(ids), step_fn, None, None,
                       tok.vocab_size)
    return _load_hf(path, device)


def _load_hf(path: Path, device) -> _Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .export import _quiet_transformers
    from .models.hf import _offline

    _quiet_transformers()
    marker = {}
    if (path / HF_MARKER).is_file():
        marker = json.loads((path / HF_MARKER).read_text())
    with _offline():
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).to(device).eval()
        if marker.get("tokenizer", {}).get("name") == "byte":
            from .data import ByteTokenizer

            bt = ByteTokenizer()
            encode, decode, eos, vocab = (lambda t: bt.encode(t).tolist()), bt.decode, None, bt.vocab_size
        else:
            try:
                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as e:
                raise ExportError(f"MODEL_DIR {str(path)!r}: its tokenizer does not load ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0]})") from None
            encode = lambda t: tok(t)["input_ids"]  # noqa: E731 -- the tokenizer's own special tokens (e.g. BOS)
            decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
            eos, vocab = tok.eos_token_id, len(tok)
    cfg = model.config
    context = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)

    # The key/value cache argument is `cache` in transformers >= 5.x, `past_key_values` before.
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.no_grad()
    def step_fn(ids, cache):
        # First call: the whole prompt; then one new token per call on top of the cache.
        inp = ids if cache is None else ids[:, -1:]
        out = model(input_ids=inp, use_cache=True, **{cache_kw: cache})
        return out.logits[:, -1], getattr(out, cache_kw)

    return _Loaded(model, encode, decode, step_fn, context, eos, vocab)


def generate(model_dir, prompt: str, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0, device: str = "cpu") -> str:
    """The prompt followed by up to ``max_new_tokens`` sampled tokens, decoded."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ExportError(f"--max-new-tokens={max_new_tokens!r} is invalid; allowed: an integer >= 0")
    if temperature < 0:
        raise ExportError(f"--temperature={temperature!r} is invalid; allowed: >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise ExportError(f"--top-k={top_k!r} is invalid; allowed: an integer >= 1")
    m = load(model_dir, device)
    ids = m.encode(prompt)
    if not ids:
        raise ExportError("--prompt encodes to no tokens; give a non-empty prompt")
    if m.context is not None and len(ids) + max_new_tokens > m.context:
        raise ExportError(f"prompt ({len(ids)} tokens) + --max-new-tokens={max_new_tokens} exceeds the model's "
                          f"context of {m.context} tokens")
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    state = None
    for _ in range(max_new_tokens):
        logits, state = m._step(x, state)
        # Only ids the tokenizer knows: an embedding padded past the vocabulary (or a
        # checkpoint trained on fewer foreign ids) must not emit undecodable ones.
        nxt = sample_next(logits[:, : m.vocab], temperature, top_k, gen)
        x = torch.cat([x, nxt[:, None]], dim=1)
        if m.eos is not None and int(nxt) == m.eos:
            break
    return m.decode(x[0].tolist())


def generate_main(args) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        text = generate(args.model_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, device)
    except ExportError as e:
        print(f"commtrain generate: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    return 0


__all__ = ["generate", "generate_main", "load", "sample_next"]
