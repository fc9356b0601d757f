"""One dataclass config tree: YAML files in ``configs/``, ``--set a.b=c`` overrides, validation.

Each component owns its section (model and data configs live next to their code); this
module assembles the tree and validates it *before* any process group exists, so a bad
value fails fast with one line naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .data import DataConfig, resolve_tokenizer
from .models import ModelConfig


class ConfigError(ValueError):
    """An invalid configuration. The message names the key, the bad value and what is allowed."""


@dataclass
class TrainConfig:
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
    checkpoint_every: int = 0  # 0 disables periodic checkpoints
    keep_checkpoints: int = 3
    progress: bool = True  # tqdm bar on rank 0

    def validate(self):
        _positive(self, "train", "steps", "lr", "batch_size", "seq_len", "eval_batches", "keep_checkpoints")
        _non_negative(self, "train", "lr_warmup_steps", "weight_decay", "grad_clip", "eval_every", "checkpoint_every", "seed")


@dataclass
class ParallelConfig:
    dp: Optional[int] = None  # None: world_size // pp
    pp: int = 1
    schedule: str = "1f1b"
    microbatches: int = 4
    bucket_mb: float = 4.0
    overlap: bool = True  # start each gradient bucket's reduction as soon as it is ready

    def validate(self):
        _positive(self, "parallel", "pp", "microbatches", "bucket_mb")
        if self.dp is not None:
            _positive(self, "parallel", "dp")
        _choice("parallel.schedule", self.schedule, ("gpipe", "1f1b"))


@dataclass
class CompressionConfig:
    grad: str = "none"  # data-parallel gradients
    act: str = "none"  # pipeline forward activations
    act_grad: str = "none"  # pipeline backward activation gradients
    param: Optional[str] = None  # ZeRO parameter all-gather (None: exact)
    error_feedback: bool = True
    warmup_steps: int = 0  # uncompressed steps at the start (all channels)
    min_numel: int = 4096  # gradients smaller than this, and all 1-D ones, go uncompressed
    # DP gradient buckets: "auto" compresses a bucket only where measured codec time + modeled
    # compressed link time beats the raw link time (needs a link with a known bandwidth;
    # otherwise it compresses as configured); "always" compresses every eligible bucket.
    policy: str = "auto"
    act_delta: bool = True  # AC-SGD: send Q(a - m[id]) rather than Q(a)
    act_buffer: str = "cpu"  # where AC-SGD per-sample buffers live
    act_buffer_dtype: str = "fp32"

    def validate(self):
        from .compress import build_codec

        for key in ("grad", "act", "act_grad", "param"):
            spec = getattr(self, key)
            if spec is None:
                continue
            try:
                build_codec(spec)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"compression.{key}={spec!r}: {e}") from None
        _non_negative(self, "compression", "warmup_steps", "min_numel")
        _choice("compression.policy", self.policy, ("auto", "always"))
        _choice("compression.act_buffer", self.act_buffer, ("device", "cpu", "mmap"))
        _choice("compression.act_buffer_dtype", self.act_buffer_dtype, ("fp32", "fp16", "int8"))


@dataclass
class ZeroConfig:
    stage: int = 0

    def validate(self):
        _choice("zero.stage", self.stage, (0, 1, 2))


@dataclass
class LinkConfig:
    profile: Optional[str] = None  # a file in configs/links/ (e.g. 100mbit, 1gbit, 10gbit)
    bandwidth: Optional[str] = None  # e.g. "100mbit", "1gbit", "12.5GB" (per second)
    latency: Optional[str] = None  # e.g. "50us", "1ms"

    def validate(self):
        if self.profile is not None and (self.bandwidth is not None or self.latency is not None):
            raise ConfigError(
                f"link: give either link.profile ({self.profile!r}) or link.bandwidth/link.latency, not both"
            )
        try:
            self.build()
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"link: {e}") from None

    def build(self):
        """The LinkModel this section describes, or None for an unthrottled link."""
        from .comm import LinkModel, load_link_profile

        if self.profile is not None:
            return load_link_profile(self.profile)
        if self.bandwidth is None and self.latency is None:
            return None
        # LinkModel.parse takes one "bandwidth[,latency]" spec; a latency-only link has no bandwidth cap.
        if self.bandwidth is None:
            from .comm.link import parse_latency

            return LinkModel(None, parse_latency(self.latency), name=f"latency {self.latency}")
        return LinkModel.parse(f"{self.bandwidth},{self.latency or '0s'}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    out_dir: str = "runs/default"
    resume: bool = True  # continue from the newest good checkpoint in out_dir, if any
    backend: str = "auto"  # torch.distributed backend: auto (nccl with CUDA, else gloo), gloo, nccl
    timeout_s: float = 300.0  # a dead peer raises after this long instead of hanging

    def validate(self, world_size: int | None = None) -> "Config":
        for section in (self.model, self.data, self.train, self.parallel, self.compression, self.zero, self.link):
            try:
                section.validate()
            except ConfigError:
                raise
            except ValueError as e:
                raise ConfigError(str(e)) from None
        try:  # cross-section: data.tokenizer "auto" and the HF checkpoint's own tokenizer
            resolve_tokenizer(self.data, self.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        default_seq = DataConfig.__dataclass_fields__["seq_len"].default
        if self.data.seq_len not in (default_seq, self.train.seq_len):
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} conflicts with train.seq_len={self.train.seq_len}; "
                f"set train.seq_len (the data section follows it)"
            )
        self.data.seq_len = self.train.seq_len
        _choice("backend", self.backend, ("auto", "gloo", "nccl"))
        _positive(self, "", "timeout_s")
        p = self.parallel
        if p.pp > 1 and self.zero.stage:
            raise ConfigError(f"zero.stage={self.zero.stage} with parallel.pp={p.pp}: ZeRO is supported with pp=1 only")
        if world_size is not None:
            dp = p.dp if p.dp is not None else world_size // p.pp
            if dp < 1 or p.pp * dp != world_size:
                raise ConfigError(
                    f"parallel.pp={p.pp} x parallel.dp={p.dp if p.dp is not None else 'auto'} "
                    f"must equal the world size {world_size} (pp * dp = {p.pp * max(dp, 0)})"
                )
            p.dp = dp
        if p.pp > 1 and self.train.batch_size % p.microbatches:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} must be divisible by parallel.microbatches={p.microbatches}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- loading ------------------------------------------------------------------------------
def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (sections as in :class:`Config`) and apply ``key.sub=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
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
    args = typing.get_args(ftype)
    if typing.get_origin(ftype) in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        if value is None and type(None) in args:
            return None
        ftype = next(a for a in args if a is not type(None))
    if ftype is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if ftype is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if ftype in (int, float, str, bool) and not (isinstance(value, ftype) and not (ftype is int and isinstance(value, bool))):
        raise ConfigError(f"{key}={value!r} is invalid; allowed: a value of type {ftype.__name__}")
    return value


# -- validation helpers -------------------------------------------------------------------
def _name(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _positive(obj, section, *keys):
    for k in keys:
        v = getattr(obj, k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{_name(section, k)}={v!r} is invalid; allowed: a number > 0")


def _non_negative(obj, section, *keys):
    for k in keys:
        v = getattr(obj, k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{_name(section, k)}={v!r} is invalid; allowed: a number >= 0")


def _choice(key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {', '.join(map(str, allowed))}")
