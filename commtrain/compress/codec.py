"""Codec base class, the decorator registry, and spec parsing.

A codec is a small dataclass: its fields are its parameters (so a spec string such as
``"quant:bits=4,group=128"`` is parsed and type-checked against them), its class
attributes declare its mathematical properties, and ``compress``/``decompress`` turn a
tensor into a :class:`Packet` of packed bytes and back.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from .packet import Packet

_REGISTRY: dict[str, type["Codec"]] = {}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNELS = ("auto", "torch", "cupy")


def register_codec(name: str):
    """Class decorator: make a codec buildable by ``name`` from a spec string or dict."""

    def deco(cls: type[Codec]) -> type[Codec]:
        if name in _REGISTRY:
            raise ValueError(f"codec {name!r} registered twice ({_REGISTRY[name]} and {cls})")
        cls.name = name
        # Subclasses inherit __dataclass_fields__, so decorate unless the class did itself.
        if "__dataclass_fields__" not in cls.__dict__:
            cls = dataclass(cls)
        _REGISTRY[name] = cls
        return cls

    return deco


def available_codecs() -> list[str]:
    return sorted(_REGISTRY)


def codec_class(name: str) -> type["Codec"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown codec {name!r}; valid codecs: {', '.join(available_codecs())}"
        ) from None


@dataclass
class Codec:
    """Base class. Subclasses are dataclasses whose fields are the codec's parameters.

    Properties (class attributes) let the runtime refuse invalid pairings at build time:

    * ``lossless``: decompress(compress(x)) == x bit for bit.
    * ``unbiased``: E[decompress(compress(x))] == x (stochastic codecs).
    * ``contractive``: ||C(x) - x||^2 <= (1 - delta) ||x||^2 for some delta > 0 (top-k,
      deterministic rounding): the property error feedback relies on.
    * ``summable``: compressed representations can be summed by a plain all-reduce
      (casts), so the compressed all-reduce may skip the decompress/re-compress round.
    * ``needs_shared_seed``: both ends must agree on a random seed (sent in the payload).

    ``kernel`` selects the implementation of the numeric core: ``"torch"`` (reference,
    CPU and CUDA), ``"cupy"`` (fused CUDA kernels) or ``"auto"`` (CuPy for CUDA tensors
    when available, else torch). Every codec works with ``"torch"``.
    """

    name: ClassVar[str] = "?"
    lossless: ClassVar[bool] = False
    unbiased: ClassVar[bool] = False
    contractive: ClassVar[bool] = False
    summable: ClassVar[bool] = False
    needs_shared_seed: ClassVar[bool] = False
    # encode() receives the input in its own dtype (else: as float32) and decode() returns it.
    native_dtype: ClassVar[bool] = False
    # The dtype a summable codec's payload holds (the casts); None: not a plain float array.
    wire_dtype: ClassVar[torch.dtype | None] = None

    kernel: str = "auto"
    seed: int = 0

    _generators: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- subclass API ------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the bad parameter and the allowed values."""

    def payload_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        """Exact payload size in bytes for a tensor of ``numel`` elements of ``dtype``."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Encode a flat float32 tensor into a 1-D uint8 payload."""
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """Decode a payload into a flat float32 tensor of ``numel`` elements."""
        raise NotImplementedError

    # -- public API ----------------------------------------------------------------------
    def __post_init__(self):
        check_choice(self, "kernel", self.kernel, KERNELS)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{self.name}: seed={self.seed!r} is invalid; allowed: an integer >= 0")
        self.validate()

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None, *, key: str | None = None) -> Packet:
        """``x`` as a packet. ``key`` names the tensor for stateful wrappers (error feedback);
        a codec itself is stateless across calls (but for its RNG) and ignores it."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{self.name}: expected a float tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {x.dtype}"
            )
        flat = x.detach().reshape(-1)
        if flat.numel() == 0:
            payload = torch.empty(0, dtype=torch.uint8, device=x.device)
        else:
            gen = generator if generator is not None else self._generator(x.device)
            # Codecs encode fp32 (a bf16/fp16 input is upcast first), except ``none`` and a cast
            # whose wire dtype is the input's own (bf16 activations through ``bf16``): no round trip.
            payload = self.encode(flat if self.native_dtype or self._same_wire(x.dtype) else flat.float(), gen)
        expected = self.payload_nbytes(flat.numel(), x.dtype)
        assert payload.numel() == expected, (self.name, payload.numel(), expected)
        return Packet(payload.contiguous(), x.shape, x.dtype)

    def decompress(self, pkt: Packet) -> torch.Tensor:
        n = pkt.numel
        expected = self.payload_nbytes(n, pkt.dtype)
        if pkt.payload.numel() != expected:
            raise ValueError(
                f"{self.name}: payload has {pkt.payload.numel()} bytes, expected "
                f"{expected} for {n} elements (corrupt or mismatched codec)"
            )
        if n == 0:
            return torch.empty(pkt.shape, dtype=pkt.dtype, device=pkt.device)
        if self.native_dtype:
            return self.decode(pkt.payload, n, pkt.dtype).reshape(pkt.shape)
        if self._same_wire(pkt.dtype):  # the payload already is the tensor's bytes (a cast)
            from .kernels.torch_ops import from_bytes

            return from_bytes(pkt.payload, pkt.dtype).reshape(pkt.shape)
        return self.decode(pkt.payload, n).to(pkt.dtype).reshape(pkt.shape)

    def _same_wire(self, dtype: torch.dtype) -> bool:
        """A summable cast whose payload is plain ``dtype`` values (bf16 -> ``bf16``, fp16 -> ``fp16``)."""
        return self.summable and self.wire_dtype == dtype

    def summable_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype in which payloads of this codec (for inputs of ``dtype``) can be summed by
        a plain ``dist.all_reduce``, or None: ``none`` sums in the input's own dtype, the casts
        in their ``wire_dtype``; every other codec needs the compressed all-reduce."""
        if not self.summable:
            return None
        wd = dtype if (self.lossless and self.native_dtype) else self.wire_dtype
        if not isinstance(wd, torch.dtype) or not wd.is_floating_point:
            return None
        return wd

    def wire_nbytes(self, shape_or_numel, dtype: torch.dtype = torch.float32) -> int:
        """Bytes on the wire for one tensor of this shape (used by the perf model)."""
        numel = shape_or_numel if isinstance(shape_or_numel, int) else torch.Size(shape_or_numel).numel()
        return self.payload_nbytes(int(numel), dtype)

    @property
    def spec(self) -> str:
        params = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if f.init and f.name not in ("kernel", "seed") and getattr(self, f.name) != f.default
        ]
        return self.name + (":" + ",".join(params) if params else "")

    def properties(self) -> dict[str, bool]:
        return {k: getattr(self, k) for k in ("lossless", "unbiased", "contractive", "summable", "needs_shared_seed")}

    def ops(self, device: torch.device):
        """The kernel module (torch reference or CuPy) that runs this codec on ``device``."""
        from .kernels import resolve

        return resolve(self.kernel, device)

    # -- random state (part of checkpoints so resumed runs draw the same bits) -----------
    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return g

    def state_dict(self) -> dict[str, Any]:
        return {k: g.get_state() for k, g in self._generators.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, s in state.items():
            self._generator(torch.device(key)).set_state(s)


# -- helpers for validation ---------------------------------------------------------------
def check_range(codec: Codec, param: str, value, lo, hi=None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{codec.name}: {param}={value!r} is invalid; allowed: {allowed}")


def check_choice(codec: Codec, param: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{codec.name}: {param}={value!r} is invalid; allowed: {', '.join(map(str, choices))}")


# -- spec parsing -------------------------------------------------------------------------
def _convert(cls: type[Codec], fname: str, raw: Any, ftype: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(ftype)
    args = [a for a in typing.get_args(ftype) if a is not type(None)]
    if origin is typing.Union or (origin is not None and type(None) in typing.get_args(ftype)):
        if raw.lower() in ("none", "null", ""):
            return None
        ftype = args[0] if args else str
    try:
        if ftype is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if ftype is int:
            return int(raw)
        if ftype is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"{cls.name}: {fname}={raw!r} is not a valid {ftype.__name__}") from None
    return raw


def parse_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"quant:bits=4,group=128"`` or ``{"name": "quant", "bits": 4}`` -> (name, params)."""
    if isinstance(spec, Mapping):
        params = dict(spec)
        if "name" not in params:
            raise ValueError(f"codec dict {spec!r} needs a 'name' key; valid codecs: {', '.join(available_codecs())}")
        return str(params.pop("name")), params
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"codec spec must be a non-empty string or dict, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"codec spec {spec!r}: {item!r} is not of the form key=value")
        params[key.strip()] = value.strip()
    return name.strip(), params


def build_codec(spec: str | Mapping[str, Any] | Codec, **overrides) -> Codec:
    """Build a codec from ``"name:key=value,..."``, a dict with a ``name`` key, or a Codec."""
    if isinstance(spec, Codec):
        return dataclasses.replace(spec, **overrides) if overrides else spec
    name, params = parse_spec(spec)
    params.update(overrides)
    cls = codec_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in params:
        if key not in fields:
            raise ValueError(
                f"{name}: unknown parameter {key!r}; valid parameters: {', '.join(sorted(fields)) or '(none)'}"
            )
    kwargs = {k: _convert(cls, k, v, hints.get(k, str)) for k, v in params.items()}
    return cls(**kwargs)
