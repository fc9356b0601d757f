"""Get a usable model out of a run: ``commtrain export RUN_DIR OUT_DIR [--step N]``.

A run directory holds ``config.yaml`` (the resolved config, written by rank 0 at train
start) and ``checkpoints/step_N/rank{r}.pt`` (one shard per rank; ``state["model"]`` is
that rank's module ``state_dict``). Export reads the newest checkpoint whose shards pass
their manifest's size and SHA-256 check (or ``--step N``) and rebuilds one unsplit model:

- ``pp = 1``: data-parallel replicas are identical after every step (they apply the same
  all-reduced gradient), so the shard of rank 0 is the model.
- ``pp > 1``: global rank ``stage * dp + dp_rank`` holds stage ``stage``; the shards of
  dp rank 0 (ranks ``0, dp, 2 dp, ...``) are loaded into the stage modules of a freshly built
  model, which share its parameters, so loading the stages fills the whole model. A tied
  embedding/lm head was untied across stages during training (the two copies trained apart,
  see :mod:`commtrain.models.stage`), so the exported model is untied too: its logits are
  exactly the pipeline's.

Output formats:

- Hugging Face model (``model.hf_path``): a ``save_pretrained`` directory (weights, config,
  the tokenizer) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads, plus
  ``commtrain.json`` naming the tokenizer the run used.
- Built-in GPT: the directory format ``commtrain.gpt/1``::

      OUT_DIR/model.safetensors   the unsplit GPT's state_dict (safetensors.torch.save_model;
                                  a tied lm head is stored once)
      OUT_DIR/config.json         {"format": "commtrain.gpt/1",
                                   "model": {every GPTConfig field},
                                   "tokenizer": {"name": "byte"} or
                                                {"name": "bpe", "vocab_size": V, "file": "tokenizer.json"}}
      OUT_DIR/tokenizer.json      the BPE tokenizer (``tokenizers`` JSON), when name is "bpe"

  :func:`load_gpt_dir` reads it back.

LoRA runs (``model.lora.r`` > 0; checkpoints hold the frozen base and the adapters):

- ``--lora merge`` (the default for a LoRA run): the adapters are merged into the weights
  (``W + B A * alpha / r``) and the model is written as above -- an ordinary HF directory or
  ``commtrain.gpt/1`` directory, no peft needed to load it.
- ``--lora adapter``: a peft adapter directory (``adapter_config.json`` +
  ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, OUT_DIR)``
  loads. For an HF model the base is ``model.hf_path`` (named in the adapter config, and
  the tokenizer is saved beside it); for the built-in GPT the base weights are written to
  ``OUT_DIR/base`` (``commtrain.gpt/1``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"
GPT_FORMAT = "commtrain.gpt/1"
HF_FORMAT = "commtrain.hf/1"
HF_MARKER = "commtrain.json"  # beside a save_pretrained directory: which tokenizer the run used


class ExportError(ValueError):
    """A run or model directory that cannot be exported/loaded; the message says why and what to do."""


# -- the run's resolved config ------------------------------------------------------------
def _absolute(value):
    """Relative paths made absolute against this process's cwd (export may run elsewhere)."""
    if value is None:
        return None
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    return os.path.abspath(os.path.expanduser(str(value)))


def write_run_config(cfg, out_dir) -> Path:
    """Write ``cfg`` (a validated :class:`commtrain.config.Config`) to ``out_dir/config.yaml``.

    Paths (checkpoint, data files, cache) are stored absolute so that ``commtrain export``
    works from any directory; the file is a valid ``--config`` for ``commtrain train``. The
    write is atomic (temporary name, then rename).
    """
    import yaml

    raw = cfg.to_dict()
    raw["model"]["hf_path"] = _absolute(raw["model"].get("hf_path"))
    raw["data"]["path"] = _absolute(raw["data"].get("path"))
    raw["data"]["cache_dir"] = _absolute(raw["data"].get("cache_dir"))
    path = Path(out_dir) / RUN_CONFIG
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text("# The resolved config of this run (written at train start; read by `commtrain export`).\n"
                   + yaml.safe_dump(raw, sort_keys=False))
    os.replace(tmp, path)
    return path


def read_run_config(run_dir, config: str | None = None, overrides: list[str] | None = None):
    """The run's config: ``RUN_DIR/config.yaml``, or ``config`` (for runs from before it was stored)."""
    from .config import ConfigError, load_config

    path = Path(config) if config else Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise ExportError(
            f"{str(run_dir)!r} has no {RUN_CONFIG} (the resolved config written at train start); "
            "pass the config the run was trained with: --config FILE [--set KEY=VALUE ...]"
        )
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        raise ExportError(f"config {str(path)!r}: {e}") from None


# -- checkpoints --------------------------------------------------------------------------
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def find_checkpoint(run_dir, ranks: list[int], step: int | None = None) -> tuple[int, dict[int, dict], int]:
    """``(step, {rank: state}, world_size)`` of the newest checkpoint (or ``step``) whose
    shards of ``ranks`` pass the manifest's size and SHA-256 check; older ones are tried
    when the newest is damaged (as the trainer does on resume)."""
    from .checkpoint import sha256_file

    root = Path(run_dir) / "checkpoints"
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), reverse=True) \
        if root.is_dir() else []
    if step is not None:
        dirs = [d for d in dirs if int(_STEP_DIR.match(d.name).group(1)) == step]
        if not dirs:
            have = sorted(int(_STEP_DIR.match(p.name).group(1)) for p in (root.iterdir() if root.is_dir() else [])
                          if _STEP_DIR.match(p.name))
            raise ExportError(f"--step {step}: no checkpoint step_{step:08d} in {root}; available steps: "
                              f"{', '.join(map(str, have)) or 'none'}")
    if not dirs:
        raise ExportError(
            f"{str(run_dir)!r} has no checkpoints ({root} is empty or missing); train with "
            "train.checkpoint_every=N (a divisor of train.steps, so the final weights are saved)"
        )
    problems = []
    for d in dirs:
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            entries = {e["file"]: e for e in manifest["shards"]}
            states = {}
            for r in ranks:
                shard, entry = d / f"rank{r}.pt", entries.get(f"rank{r}.pt")
                if entry is None or not shard.is_file():
                    raise ExportError(f"shard {shard} missing")
                if shard.stat().st_size != entry["bytes"] or sha256_file(shard) != entry["sha256"]:
                    raise ExportError(f"shard {shard} fails its size/SHA-256 check")
                states[r] = torch.load(shard, map_location="cpu", weights_only=True)
            return int(manifest["step"]), states, int(manifest["world_size"])
        except Exception as e:  # noqa: BLE001 -- any unreadable shard/manifest: try an older one
            problems.append(f"{d.name}: {e}")
            log.warning("export: %s is unusable (%s); trying an older checkpoint", d, e)
    raise ExportError(f"no usable checkpoint in {root}: {'; '.join(problems)}")


# -- gathering the model ------------------------------------------------------------------
def _untie_gpt(cfg):
    return dataclasses.replace(cfg, tie_weights=False)


def _untie_hf(model) -> None:
    """Give an HF model's output embedding its own copy of the (tied) input embedding."""
    hf = model.hf
    out = hf.get_output_embeddings()
    out.weight = nn.Parameter(hf.get_input_embeddings().weight.detach().clone())
    hf.config.tie_word_embeddings = False
    text_cfg = getattr(hf.config, "get_text_config", lambda: None)()
    if text_cfg is not None:
        text_cfg.tie_word_embeddings = False


def build_unsplit(cfg, states_by_stage: list[dict[str, Any]]) -> nn.Module:
    """The full model of ``cfg`` with the weights of one pipeline's stage shards (one per stage)."""
    from .models import GPT, apply_lora, build_model, preset_config

    mc, pp = cfg.model, len(states_by_stage)
    if mc.hf_path is not None:
        model = build_model(mc)  # the checkpoint's architecture (its weights are overwritten)
        if pp > 1 and model._tied():
            _untie_hf(model)
    else:
        gcfg = preset_config(mc.preset, dropout=mc.dropout, vocab_size=mc.vocab_size, block_size=mc.block_size)
        model = GPT(_untie_gpt(gcfg) if pp > 1 and gcfg.tie_weights else gcfg)
        if mc.lora.enabled:
            apply_lora(model, mc.lora)
    targets = [model] if pp == 1 else model.stage_modules(pp, getattr(cfg.parallel, "balance", "layers"))
    for i, (module, state) in enumerate(zip(targets, states_by_stage)):
        try:
            module.load_state_dict(state["model"])
        except RuntimeError as e:
            where = "the model" if pp == 1 else f"stage {i} of {pp}"
            raise ExportError(f"checkpoint weights do not fit {where} of the run's config: "
                              f"{str(e).splitlines()[0]} ...") from None
    return model.eval()


def load_run_model(run_dir, step: int | None = None, config: str | None = None, overrides=None):
    """``(cfg, step, model)``: the unsplit trained model of a run (see the module docstring)."""
    cfg = read_run_config(run_dir, config, overrides)
    pp = cfg.parallel.pp
    dp = cfg.parallel.dp
    manifest_world = _manifest_world(run_dir)
    if dp is None:
        dp = (manifest_world or pp) // pp
    try:
        cfg = cfg.resolved(pp * dp)  # the run's own derived values (vocab, tokenizer), as the trainer had them
    except ValueError as e:
        raise ExportError(f"the run's config is not valid here: {e}") from None
    if manifest_world is not None and manifest_world != pp * dp:
        raise ExportError(f"checkpoints were written by {manifest_world} ranks but the config says "
                          f"parallel.pp={pp} x parallel.dp={dp}")
    step, states, _ = find_checkpoint(run_dir, [s * dp for s in range(pp)], step)
    model = build_unsplit(cfg, [states[s * dp] for s in range(pp)])
    return cfg, step, model


def _manifest_world(run_dir) -> int | None:
    root = Path(run_dir) / "checkpoints"
    for d in sorted(root.glob("step_*"), reverse=True) if root.is_dir() else []:
        try:
            return int(json.loads((d / "manifest.json").read_text())["world_size"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def run_tokenizer(cfg, model=None):
    """The tokenizer the run trained with (byte, the cached/retrained BPE, or the checkpoint's)."""
    from .data import ByteTokenizer, build_tokenizer, load_text

    dc = cfg.data
    if dc.tokenizer == "byte":
        return ByteTokenizer()
    if dc.tokenizer == "hf":
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ExportError(f"the tokenizer of model.hf_path={cfg.model.hf_path!r} did not load")
        return tok
    # BPE: deterministic given the corpus; build_tokenizer finds it in the cache (or retrains).
    text = load_text(dc.source, dc.path, dc.max_bytes, dc.text_field)
    return build_tokenizer("bpe", text, bpe_vocab_size=dc.bpe_vocab_size, cache_dir=dc.cache_dir)


# -- writers and readers ------------------------------------------------------------------
def _tokenizer_entry(tok) -> dict[str, Any]:
    name = getattr(tok, "name", "hf")
    if name == "byte":
        return {"name": "byte"}
    if name == "bpe":
        return {"name": "bpe", "vocab_size": int(tok.vocab_size), "file": "tokenizer.json"}
    return {"name": "hf"}


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise ExportError("the commtrain.gpt/1 format needs safetensors: pip install safetensors "
                          "(or commtrain[hf])") from None
    return st


def save_gpt_dir(model, tokenizer, out_dir) -> Path:
    """Write a built-in GPT in the ``commtrain.gpt/1`` directory format (see the module docstring)."""
    save_model = _safetensors().save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entry = _tokenizer_entry(tokenizer)
    if entry["name"] not in ("byte", "bpe"):
        raise ExportError(f"a built-in GPT exports with a byte or bpe tokenizer, not {entry['name']!r}")
    save_model(model, str(out / "model.safetensors"))
    if entry["name"] == "bpe":
        tokenizer.tok.save(str(out / entry["file"]))
    meta = {"format": GPT_FORMAT, "model": dataclasses.asdict(model.config), "tokenizer": entry}
    (out / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def read_gpt_config(path) -> dict[str, Any]:
    """``config.json`` of a ``commtrain.gpt/1`` directory, checked (ExportError otherwise)."""
    p = Path(path) / "config.json"
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{str(path)!r} is not a commtrain GPT directory: {p} unreadable ({e})") from None
    if meta.get("format") != GPT_FORMAT:
        raise ExportError(f"{p} has format={meta.get('format')!r}; expected {GPT_FORMAT!r}")
    return meta


def load_gpt_dir(path):
    """``(GPT, tokenizer)`` from a ``commtrain.gpt/1`` directory."""
    load_model = _safetensors().load_model

    from .data import ByteTokenizer, FastTokenizer
    from .models import GPT, GPTConfig

    meta = read_gpt_config(path)
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(meta["model"]) - names
    if unknown:
        raise ExportError(f"{path}/config.json: unknown GPTConfig fields {sorted(unknown)} (a newer format?)")
    model = GPT(GPTConfig(**meta["model"]))
    load_model(model, str(Path(path) / "model.safetensors"))
    entry = meta["tokenizer"]
    if entry["name"] == "byte":
        tok = ByteTokenizer()
    elif entry["name"] == "bpe":
        from tokenizers import Tokenizer

        f = Path(path) / entry.get("file", "tokenizer.json")
        tok = FastTokenizer(Tokenizer.from_file(str(f)), "bpe", int(entry["vocab_size"]), f)
    else:
        raise ExportError(f"{path}/config.json: tokenizer {entry['name']!r} is not one of byte, bpe")
    return model.eval(), tok


def save_hf_dir(model, tokenizer, out_dir) -> Path:
    """``save_pretrained`` of the HF model and its tokenizer, plus ``commtrain.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _quiet_transformers()
    model.hf.save_pretrained(str(out))
    entry = _tokenizer_entry(tokenizer)
    if entry["name"] == "hf":
        tokenizer.save_pretrained(str(out))
    elif entry["name"] == "bpe":  # a foreign BPE (data.allow_foreign_tokenizer): as an HF fast tokenizer
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok, eos_token="<|endoftext|>").save_pretrained(str(out))
    # byte ids have no HF tokenizer; commtrain.json says so and `commtrain generate` uses bytes.
    (out / HF_MARKER).write_text(json.dumps({"format": HF_FORMAT, "tokenizer": entry}, indent=1) + "\n")
    return out


def export_run(run_dir, out_dir, step: int | None = None, lora: str | None = None,
               config: str | None = None, overrides=None) -> dict[str, Any]:
    """Export a run (see the module docstring); returns what was written."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"OUT_DIR {str(out)!r} exists and is not empty; choose a new directory")
    cfg, got_step, model = load_run_model(run_dir, step, config, overrides)
    if not cfg.model.lora.enabled and lora is not None:
        raise ExportError(f"--lora {lora}: no LoRA adapters in this run")
    if lora not in (None, "merge", "adapter"):
        raise ExportError(f"--lora {lora!r} is invalid; allowed: merge, adapter")
    tok = run_tokenizer(cfg, model)
    info = {"step": got_step, "out_dir": str(out), "pp": cfg.parallel.pp, "tokenizer": _tokenizer_entry(tok)["name"],
            "trained_steps": _last_step(run_dir)}
    if cfg.model.lora.enabled:
        lora = lora or "merge"
        info["lora"] = lora
        if lora == "adapter":
            save_adapter_dir(cfg, model, tok, out)
            return {**info, "format": "peft adapter"}
        from .models.lora import merge_lora

        merge_lora(model)
    if cfg.model.hf_path is not None:
        save_hf_dir(model, tok, out)
        fmt = "hf"
    else:
        save_gpt_dir(model, tok, out)
        fmt = GPT_FORMAT
    return {**info, "format": fmt}


def save_adapter_dir(cfg, model, tokenizer, out_dir) -> Path:
    """A peft adapter directory of a LoRA run's adapters (see the module docstring)."""
    from .models.lora import DEFAULT_TARGETS, adapter_state_dict, architecture

    st = _safetensors()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lc = cfg.model.lora
    arch = architecture(model)
    targets = lc.target_modules if lc.target_modules is not None else DEFAULT_TARGETS[arch]  # what the run adapted
    pcfg = lc.peft_config(arch, targets)
    pcfg.base_model_name_or_path = _absolute(cfg.model.hf_path) if cfg.model.hf_path is not None else "base"
    pcfg.inference_mode = True
    pcfg.save_pretrained(str(out))
    st.save_file(adapter_state_dict(model), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if cfg.model.hf_path is not None:
        entry = _tokenizer_entry(tokenizer)
        if entry["name"] == "hf":
            tokenizer.save_pretrained(str(out))
        (out / HF_MARKER).write_text(json.dumps({"format": HF_FORMAT, "tokenizer": entry, "adapter": True},
                                                indent=1) + "\n")
    else:  # the frozen base weights, without the adapters, beside them
        from .models.lora import unload_lora

        save_gpt_dir(unload_lora(model), tokenizer, out / "base")
    return out


def _last_step(run_dir) -> int | None:
    from .metrics import metrics_path, read_metrics

    path = metrics_path(run_dir, 0)
    if not path.is_file():
        return None
    steps = [r["step"] for r in read_metrics(path) if "event" not in r]
    return max(steps) if steps else None


def _quiet_transformers() -> None:
    """No per-file progress bars from save/load (the CLI prints one line)."""
    from .models.hf import _no_hf_progress_bars

    _no_hf_progress_bars()


def export_main(args) -> int:
    """``commtrain export``: one line on success, one line on error (exit 2)."""
    try:
        info = export_run(args.run_dir, args.out_dir, args.step, args.lora, args.config, args.set)
    except ExportError as e:
        print(f"commtrain export: {e}", file=sys.stderr)
        return 2
    stages = f", {info['pp']} pipeline stages gathered" if info["pp"] > 1 else ""
    lora = {"merge": ", LoRA merged", "adapter": ", LoRA adapter"}.get(info.get("lora"), "")
    print(f"exported step {info['step']} of {args.run_dir} ({info['format']}, tokenizer {info['tokenizer']}{stages}{lora}) "
          f"to {info['out_dir']}")
    if info["trained_steps"] is not None and info["trained_steps"] > info["step"]:
        print(f"note: the run trained to step {info['trained_steps']} but its newest checkpoint is step {info['step']}; "
              "set train.checkpoint_every to a divisor of train.steps to export the final weights", file=sys.stderr)
    return 0
