"""One dataclass config tree: YAML files, ``--set a.b=c`` overrides, validation.

Each component owns its section, a dataclass beside its code (``model``: models/,
``data``: data/, ``parallel``: parallel/mesh.py, ``compression``: parallel/compression.py,
``zero``: parallel/sync/zero.py, ``link``: comm/link.py; ``train`` is the trainer's own, here).
This module assembles the tree and validates it *before* any process group exists, so a bad
value fails fast with one line naming the key, the value and what is allowed. Allowed values
are the registries' (codecs, schedules, buffer storages, data sources, tokenizers).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from . import resources
from .comm.link import LinkConfig
from .data import DataConfig, resolve_paths, resolve_tokenizer
from .data.tokenizer import checkpoint_vocab_size
from .models import ModelConfig
from .parallel.compression import CompressionConfig
from .parallel.mesh import ParallelConfig
from .parallel.sync import SyncConfig
from .parallel.sync.zero import ZeroConfig
from .precision import PRECISIONS, autocast_supported
from .validate import ConfigError, choice, integer, non_negative, positive

__all__ = ["Config", "ConfigError", "TrainConfig", "load_config", "from_dict", "RESUME_MODES"]

NONFINITE_POLICIES = ("skip", "stop")
# resume: "auto" resumes the run recorded in out_dir when its identity matches (and starts
# fresh in an empty out_dir); "never" always starts fresh and refuses a non-empty out_dir
# (unless --overwrite moves the old run aside); "must" refuses to start without a checkpoint.
RESUME_MODES = ("auto", "never", "must")
# YAML's true/false (the old boolean ``resume``) read as these modes.
RESUME_ALIASES = {True: "auto", False: "never"}

# Example configs ship with the package: ``--config tiny`` (or demo, pipeline) from any directory.
CONFIG_DIR = resources.directory(__package__, "configs")


@dataclass
class TrainConfig:
    """The ``train`` section: the trainer's own loop settings."""

    steps: int = 100
    lr: float = 3e-3
    lr_warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    batch_size: int = 8  # sequences per data-parallel replica per step
    seq_len: int = 64
    seed: int = 0
    eval_every: int = 50  # 0 disables periodic eval (a final eval still runs)
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0: no periodic checkpoints (one is always written at the end of a run)
    keep_checkpoints: int = 3
    progress: bool = True  # tqdm bar on rank 0
    # A step whose loss or gradient norm is non-finite on any rank is skipped (no update).
    # "skip": go on, but stop after max_nonfinite_steps consecutive skips; "stop": stop at once.
    nonfinite: str = "skip"
    max_nonfinite_steps: int = 5
    # Compute dtype of forward + loss (torch.autocast); weights and optimizer state stay fp32.
    # fp16 adds dynamic loss scaling (commtrain.precision): overflowing steps are skipped on every rank.
    precision: str = "fp32"

    def validate(self) -> None:
        positive(self, "train", "lr")
        non_negative(self, "train", "weight_decay", "grad_clip")
        for key in ("steps", "batch_size", "seq_len", "eval_batches", "keep_checkpoints", "max_nonfinite_steps"):
            integer(self, "train", key, 1)
        for key in ("lr_warmup_steps", "eval_every", "checkpoint_every", "seed"):
            integer(self, "train", key, 0)
        choice("train.nonfinite", self.nonfinite, NONFINITE_POLICIES)
        choice("train.precision", self.precision, PRECISIONS)
        if not isinstance(self.progress, bool):
            raise ConfigError(f"train.progress={self.progress!r} is invalid; allowed: true, false")


@dataclass
class Config:
    """The whole run: one section per component (each owns its dataclass and ``validate``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    out_dir: str = "runs/default"
    resume: str = "auto"  # auto | never | must (see RESUME_MODES; true/false read as auto/never)
    backend: str = "auto"  # torch.distributed backend: auto (nccl with CUDA, else gloo), gloo, nccl
    timeout_s: float = 300.0  # a dead peer raises after this long instead of hanging

    SECTIONS = ("model", "data", "train", "parallel", "compression", "zero", "sync", "link")

    def validate(self, world_size: int | None = None) -> "Config":
        """Check every section, then what spans sections. Reads only: nothing is filled in or
        corrected (derived values, such as the dp degree, are computed where they are used)."""
        for name in self.SECTIONS:
            try:
                getattr(self, name).validate()
            except ConfigError:
                raise
            except ValueError as e:
                raise ConfigError(str(e)) from None
        try:  # cross-section: the tokenizer an HF checkpoint or init_from weights were trained with
            tokenizer = resolve_tokenizer(self.data, self.model)
            self.model.check_data(dataclasses.replace(self.data, tokenizer=tokenizer))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.data.seq_len not in (DataConfig.__dataclass_fields__["seq_len"].default, self.train.seq_len):
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} conflicts with train.seq_len={self.train.seq_len}; "
                f"set train.seq_len (the data section follows it)"
            )
        choice("backend", self.backend, ("auto", "gloo", "nccl"))
        choice("resume", self.resume, RESUME_MODES)
        positive(self, "", "timeout_s")
        if self.data.source == "files":  # the files must exist now, not when rank 0 reads them
            try:
                resolve_paths(self.data.path)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self._check_precision()
        p = self.parallel
        if p.pp > 1 and self.zero.stage:
            raise ConfigError(f"zero.stage={self.zero.stage} with parallel.pp={p.pp}: ZeRO is supported with pp=1 only")
        self.zero.check_compression(self.compression)
        if self.sync.strategy == "diloco":
            if self.zero.stage:
                raise ConfigError(
                    f"sync.strategy=diloco with zero.stage={self.zero.stage} is invalid: DiLoCo replicas run their inner "
                    f"optimizer independently on their own data for sync.inner_steps steps, so its state cannot be "
                    f"sharded across them; use zero.stage=0"
                )
            if self.compression.grad != "none":
                raise ConfigError(
                    f"compression.grad={self.compression.grad!r} with sync.strategy=diloco: inner steps send no "
                    f"gradients; compress the pseudo-gradient with sync.codec instead (allowed here: none)"
                )
        if world_size is not None:
            p.degrees(world_size)
        if p.pp > 1 and self.train.batch_size % p.microbatches:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} must be divisible by parallel.microbatches={p.microbatches}"
            )
        return self

    def _check_precision(self) -> None:
        prec = self.train.precision
        if prec == "fp32":
            return
        if prec == "fp16" and self.sync.strategy == "diloco":
            raise ConfigError("train.precision=fp16 with sync.strategy=diloco is invalid: fp16 loss scaling unscales "
                              "gradients where they are reduced, and DiLoCo's inner steps reduce none; use "
                              "train.precision=bf16 (no loss scale needed)")
        import torch

        device = "cuda" if self.backend == "nccl" or (self.backend == "auto" and torch.cuda.is_available()) else "cpu"
        why = autocast_supported(prec, device)
        if why is not None:
            raise ConfigError(f"train.precision={prec} is not available on {device}: {why}; allowed here: fp32"
                              + (", bf16" if autocast_supported("bf16", device) is None else ""))

    def resolved(self, world_size: int) -> "Config":
        """A validated copy with every derived value written out, for the run to use and record:
        ``parallel.dp`` (the world over pp), ``data.seq_len`` (= ``train.seq_len``),
        ``data.tokenizer`` (``auto`` resolved against the model) and ``model.vocab_size`` (the
        trained BPE's size for the built-in GPT). ``self`` is not changed."""
        self.validate(world_size)
        pp, dp = self.parallel.degrees(world_size)
        tokenizer = resolve_tokenizer(self.data, self.model)
        vocab = self.model.vocab_size
        if tokenizer == "bpe" and vocab is None and self.model.init_from is None:
            # The built-in GPT's embedding is sized for the trained BPE; an HF checkpoint keeps its own.
            vocab = checkpoint_vocab_size(self.model.hf_path) if self.model.hf_path else self.data.bpe_vocab_size
        return dataclasses.replace(
            self,
            model=dataclasses.replace(self.model, vocab_size=vocab),
            data=dataclasses.replace(self.data, seq_len=self.train.seq_len, tokenizer=tokenizer),
            parallel=dataclasses.replace(self.parallel, dp=dp),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- loading ------------------------------------------------------------------------------
def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (sections as in :class:`Config`) and apply ``key.sub=value`` overrides.

    ``path``: a YAML file, or the name of a packaged example config (``tiny``, ``pipeline``,
    ``demo``: ``commtrain/configs/<name>.yaml``) when no file of that name exists."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            path = resources.find(path, CONFIG_DIR, "config")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return from_dict(Config, raw, "")


def from_dict(cls, raw: dict[str, Any], prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; valid keys: {', '.join(sorted(names))}")
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype):
            kwargs[key] = from_dict(ftype, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, ftype)
    return cls(**kwargs)


def _coerce(key: str, value: Any, ftype: Any) -> Any:
    if key == "resume" and isinstance(value, bool):
        return RESUME_ALIASES[value]
    args = typing.get_args(ftype)
    if typing.get_origin(ftype) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        # A value that already is one of the members (e.g. the list of ``str | list[str]``)
        # is kept; otherwise the first member's coercion decides (and words the error).
        for member in members:
            if _is_instance(value, member):
                return value
        ftype = members[0]
    if ftype is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if ftype is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads 1e-3 and 3e-4 as strings: a float key takes them as numbers.
        try:
            return float(value)
        except ValueError:
            pass
    if ftype is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if ftype in (int, float, str, bool) and not _is_instance(value, ftype):
        raise ConfigError(f"{key}={value!r} is invalid; allowed: a value of type {ftype.__name__}")
    return value


def _is_instance(value: Any, ftype: Any) -> bool:
    """``isinstance`` for the config's field types: ``bool`` is not an ``int`` or ``float``
    here, and ``list[str]`` checks its items."""
    if typing.get_origin(ftype) is list:
        (item,) = typing.get_args(ftype) or (Any,)
        return isinstance(value, list) and (item is Any or all(_is_instance(v, item) for v in value))
    if ftype in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, ftype) if isinstance(ftype, type) else False
