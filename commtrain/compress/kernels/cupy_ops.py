"""CuPy back-end: fused CUDA kernels for the codecs' numeric cores (GPU only).

Same function names, arguments and payload bytes as :mod:`torch_ops` (the layouts there are
the contract); ``kernels.resolve`` falls back to the reference for any function missing
here. The CUDA sources are the ``*.cu`` files next to this module: compiled by NVRTC through
``cupy.RawModule`` once per (source, device) and cached (CuPy also caches the binaries on
disk), and compiled by ``nvcc`` in CPU CI (tests/test_kernel_sources.py).

* Tensors cross to CuPy through DLPack (``cupy.from_dlpack``, no copies); outputs are
  allocated by torch, so they live in torch's caching allocator.
* Every launch runs on the *current torch CUDA stream* (``cupy.cuda.ExternalStream``), so
  kernels are ordered with the surrounding torch work and NCCL calls without syncs.
* Stochastic rounding uses Philox4x32-10 keyed by one int64 drawn from the caller's
  ``torch.Generator`` per call (on the device, so no host sync): same generator state, same
  payload. The random bits differ from ``torch.rand``'s, so stochastic payloads match the
  reference in distribution, not bit for bit; deterministic rounding matches bit for bit.
* fp16/bf16 inputs are read directly (as 16-bit words, widened in registers).
* Top-k *selection* stays ``torch.topk`` (a radix select; a hand-written one is not faster
  for the k/n ratios used here). :func:`sparse_pack` fuses the gather, value cast and index
  packing that follow it into one kernel.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import cupy
import numpy as np
import torch

from . import torch_ops
from .torch_ops import FP8_FORMATS, level_bits, num_groups, packed_nbytes, quant_payload_nbytes

_DIR = Path(__file__).resolve().parent
_SOURCES = ("grouped", "natural", "sparse")
_THREADS = 256
# Mirrors grouped.cu: the fused quant/fp8 kernel handles tiles of up to 4096 elements.
_FUSED_TILE = 4096
_MODES = {"minmax": 0, "absmax": 1, "e4m3": 2, "e5m2": 3, "uniform": 4, "pow2": 5}
_DT_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


# -- compilation, streams, DLPack -------------------------------------------------------
def source_path(name: str) -> Path:
    return _DIR / f"{name}.cu"


@functools.lru_cache(maxsize=None)
def _module(name: str, device_index: int) -> "cupy.RawModule":
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(
            code=source_path(name).read_text(), options=("--std=c++14", f"-I{_DIR}"), name_expressions=None
        )


@functools.lru_cache(maxsize=None)
def _kernel(name: str, fn: str, device_index: int):
    return _module(name, device_index).get_function(fn)


def _cp(t: torch.Tensor):
    """Zero-copy CuPy view of a torch tensor (16-bit floats as int16: CuPy has no bf16)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return cupy.from_dlpack(t)


class _Launch:
    """Context: the tensor's device and the current torch stream, for CuPy launches."""

    def __init__(self, t: torch.Tensor):
        self.index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        self.dev = cupy.cuda.Device(self.index)
        self.stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(t.device).cuda_stream, self.index)

    def __enter__(self):
        self.dev.__enter__()
        self.stream.__enter__()
        return self

    def __exit__(self, *exc):
        self.stream.__exit__(*exc)
        self.dev.__exit__(*exc)

    def __call__(self, src: str, fn: str, grid: int, block: int, args) -> None:
        _kernel(src, fn, self.index)((int(grid),), (int(block),), args)


def _i64(v) -> np.int64:
    return np.int64(v)


def _i32(v) -> np.int32:
    return np.int32(v)


_NULL = np.uint64(0)  # pointer argument a kernel never dereferences (no stochastic rounding)


def _flat_input(x: torch.Tensor, fn: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        raise TypeError(f"cupy_ops.{fn}: expected a CUDA tensor, got {getattr(x, 'device', type(x).__name__)}")
    if x.dtype not in _DT_SUFFIX:
        raise TypeError(f"cupy_ops.{fn}: dtype {x.dtype} is not supported; allowed: float32, float16, bfloat16")
    return x.reshape(-1).contiguous()


def _vec(*ts: torch.Tensor) -> np.int32:
    """1 when every tensor's data is 16-byte aligned (full chunks then use 16-byte accesses)."""
    return np.int32(all(t.data_ptr() % 16 == 0 for t in ts))


def _seed(gen, device: torch.device) -> torch.Tensor:
    """One int64 from ``gen`` (drawn on the generator's device, no host sync) on ``device``."""
    g_dev = gen.device if gen is not None else device
    s = torch.randint(0, 2**62, (1,), generator=gen, device=g_dev, dtype=torch.int64)
    return s.to(device, non_blocking=True)


def _check_choice(fn, name, value, allowed):
    if value not in allowed:
        raise ValueError(f"cupy_ops.{fn}: {name}={value!r} is invalid; allowed: {', '.join(map(str, allowed))}")


def _check_int(fn, name, value, lo, hi=None):
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"cupy_ops.{fn}: {name}={value!r} is invalid; allowed: {allowed}")


def _fused_tile(group: int) -> int:
    """Tile for the one-pass kernel (a multiple of lcm(group, 8)), or 0 if it cannot apply."""
    if group < 8:
        return 0
    base = group * 8 // math.gcd(group, 8)
    return base * (_FUSED_TILE // base) if base <= _FUSED_TILE else 0


# -- per-group scaled codecs (quant, fp8, QSGD / natural dithering) ------------------------
def _grouped_encode(x, group, mode, aux, norm2, stochastic, bits, rec_bytes, gen, fn, fused_ok):
    x = _flat_input(x, fn)
    n = x.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device)
    nb = packed_nbytes(n, bits)
    G = num_groups(n, group)
    payload = torch.empty(nb + rec_bytes * G, dtype=torch.uint8, device=x.device)
    suf = _DT_SUFFIX[x.dtype]
    with _Launch(x) as L:
        seed = _cp(_seed(gen, x.device)) if stochastic else _NULL
        xc, pc, vec = _cp(x), _cp(payload), _vec(x)
        tile = _fused_tile(group) if fused_ok else 0
        if tile:
            L("grouped", f"grouped_fused_{suf}", -(-n // tile), _THREADS,
              (xc, _i64(n), _i64(group), _i64(tile), _i32(mode), _i32(aux), _i32(stochastic), _i32(bits),
               seed, pc, _i64(nb), vec))
        else:
            params = torch.empty(2 * G, dtype=torch.float32, device=x.device)
            block = min(_THREADS, 32 * -(-group // 32))
            L("grouped", f"grouped_stats_{suf}", G, block,
              (xc, _i64(n), _i64(group), _i32(mode), _i32(aux), _i32(norm2), _cp(params), pc, _i64(nb)))
            L("grouped", f"grouped_encode_{suf}", -(-n // (8 * _THREADS)), _THREADS,
              (xc, _i64(n), _i64(group), _i32(mode), _i32(aux), _i32(norm2), _i32(stochastic), _i32(bits),
               _cp(params), seed, pc, _i64(nb), vec))
    return payload


def _grouped_decode(payload, n, group, mode, aux, bits, out, fn):
    if not payload.is_cuda:
        raise TypeError(f"cupy_ops.{fn}: expected a CUDA payload, got one on {payload.device}")
    add = out is not None
    if not add:
        out = torch.empty(n, dtype=torch.float32, device=payload.device)
    if n == 0:
        return out
    payload = payload.contiguous()
    with _Launch(payload) as L:
        L("grouped", "grouped_decode", -(-n // (8 * _THREADS)), _THREADS,
          (_cp(payload), _i64(n), _i64(group), _i32(mode), _i32(aux), _i32(bits), _i64(packed_nbytes(n, bits)),
           _cp(out), _i32(add), _vec(out)))
    return out


def _check_quant(fn, bits, group, scheme):
    _check_int(fn, "bits", bits, 1, 8)
    _check_int(fn, "group", group, 1)
    _check_choice(fn, "scheme", scheme, ("minmax", "absmax"))
    if scheme == "absmax":
        torch_ops.absmax_half_levels(bits)  # bits=1 has no symmetric grid with a zero: one-line error


def quantize_pack(x: torch.Tensor, bits: int, group: int, scheme: str, stochastic: bool, gen) -> torch.Tensor:
    """Fused :func:`torch_ops.quantize_pack` (same bytes for nearest rounding)."""
    _check_quant("quantize_pack", bits, group, scheme)
    rec = torch_ops.quant_scale_nbytes(scheme)
    return _grouped_encode(x, group, _MODES[scheme], bits, 0, int(bool(stochastic)), bits, rec, gen,
                           "quantize_pack", True)


def unpack_dequantize(payload: torch.Tensor, n: int, bits: int, group: int, scheme: str) -> torch.Tensor:
    _check_quant("unpack_dequantize", bits, group, scheme)
    _check_payload("unpack_dequantize", payload, quant_payload_nbytes(n, bits, group, scheme))
    return _grouped_decode(payload, n, group, _MODES[scheme], bits, bits, None, "unpack_dequantize")


def unpack_dequantize_add(payload, n: int, bits: int, group: int, scheme: str, out: torch.Tensor) -> torch.Tensor:
    """``out += unpack_dequantize(...)`` in one pass (fp32 contiguous CUDA ``out``; any other
    ``out`` goes through the reference)."""
    if not (out.is_cuda and out.dtype == torch.float32 and out.is_contiguous() and out.numel() == n):
        return torch_ops.unpack_dequantize_add(payload, n, bits, group, scheme, out)
    _check_quant("unpack_dequantize_add", bits, group, scheme)
    _check_payload("unpack_dequantize_add", payload, quant_payload_nbytes(n, bits, group, scheme))
    _grouped_decode(payload, n, group, _MODES[scheme], bits, bits, out.view(-1), "unpack_dequantize_add")
    return out


def _check_payload(fn, payload, expected):
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
        raise ValueError(
            f"cupy_ops.{fn}: payload must be a 1-D uint8 tensor of {expected} bytes, got "
            f"{tuple(payload.shape)} {payload.dtype}"
        )


def level_encode(x: torch.Tensor, levels: int, bucket: int, norm: str, spacing: str, gen) -> torch.Tensor:
    """QSGD (``spacing="uniform"``) / natural dithering (``"pow2"``) encode; always stochastic."""
    _check_int("level_encode", "levels", levels, 1, 127)
    _check_int("level_encode", "bucket", bucket, 1)
    _check_choice("level_encode", "norm", norm, ("2", "inf"))
    _check_choice("level_encode", "spacing", spacing, ("uniform", "pow2"))
    return _grouped_encode(x, bucket, _MODES[spacing], levels, int(norm == "2"), 1, level_bits(levels), 4, gen,
                           "level_encode", False)


def level_decode(payload: torch.Tensor, n: int, levels: int, bucket: int, spacing: str) -> torch.Tensor:
    _check_int("level_decode", "levels", levels, 1, 127)
    _check_int("level_decode", "bucket", bucket, 1)
    _check_choice("level_decode", "spacing", spacing, ("uniform", "pow2"))
    _check_payload("level_decode", payload, torch_ops.level_payload_nbytes(n, levels, bucket))
    return _grouped_decode(payload, n, bucket, _MODES[spacing], levels, level_bits(levels), None, "level_decode")


def fp8_encode(x: torch.Tensor, fmt: str, group: int, stochastic: bool, gen) -> torch.Tensor:
    _check_choice("fp8_encode", "fmt", fmt, tuple(FP8_FORMATS))
    _check_int("fp8_encode", "group", group, 1)
    return _grouped_encode(x, group, _MODES[fmt], 0, 0, int(bool(stochastic)), 8, 4, gen, "fp8_encode", True)


def fp8_decode(payload: torch.Tensor, n: int, fmt: str, group: int) -> torch.Tensor:
    _check_choice("fp8_decode", "fmt", fmt, tuple(FP8_FORMATS))
    _check_int("fp8_decode", "group", group, 1)
    _check_payload("fp8_decode", payload, n + 4 * num_groups(n, group))
    return _grouped_decode(payload, n, group, _MODES[fmt], 0, 8, None, "fp8_decode")


# -- natural compression ---------------------------------------------------------------------
def natural_encode(x: torch.Tensor, gen) -> torch.Tensor:
    x = _flat_input(x, "natural_encode")
    n = x.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device)
    payload = torch.empty(n + 4, dtype=torch.uint8, device=x.device)
    amax = torch.zeros(1, dtype=torch.int32, device=x.device)  # fp32 bits of max finite |x|
    suf = _DT_SUFFIX[x.dtype]
    with _Launch(x) as L:
        xc = _cp(x)
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        L("natural", f"natural_amax_{suf}", min(-(-n // _THREADS), 4 * sms), _THREADS, (xc, _i64(n), _cp(amax)))
        L("natural", f"natural_encode_{suf}", -(-n // (8 * _THREADS)), _THREADS,
          (xc, _i64(n), _cp(amax), _cp(_seed(gen, x.device)), _cp(payload), _vec(x)))
    return payload


def natural_decode(payload: torch.Tensor, n: int) -> torch.Tensor:
    _check_payload("natural_decode", payload, n + 4)
    out = torch.empty(n, dtype=torch.float32, device=payload.device)
    if n == 0:
        return out
    payload = payload.contiguous()
    with _Launch(payload) as L:
        L("natural", "natural_decode", -(-n // (8 * _THREADS)), _THREADS, (_cp(payload), _i64(n), _cp(out), _vec(out)))
    return out


# -- sparse (top-k / random-k) value + index packing ---------------------------------------------
_VALUE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_INDEX_CODES = {torch.uint16: 2, torch.int32: 4}


def sparse_pack(x: torch.Tensor, idx: torch.Tensor, value_dtype: torch.dtype, index_dtype: torch.dtype) -> torch.Tensor:
    """``cat([to_bytes(x[idx].to(value_dtype)), to_bytes(idx.to(index_dtype))])`` (the top-k
    payload) in one kernel: gather, cast (round to nearest even) and both packings fused."""
    x = _flat_input(x, "sparse_pack")
    _check_choice("sparse_pack", "value_dtype", value_dtype, tuple(_VALUE_CODES))
    _check_choice("sparse_pack", "index_dtype", index_dtype, tuple(_INDEX_CODES))
    idx = idx.reshape(-1).to(device=x.device, dtype=torch.int64).contiguous()
    k = idx.numel()
    payload = torch.empty(k * (value_dtype.itemsize + index_dtype.itemsize), dtype=torch.uint8, device=x.device)
    if k == 0:
        return payload
    with _Launch(x) as L:
        L("sparse", f"sparse_pack_{_DT_SUFFIX[x.dtype]}", -(-k // _THREADS), _THREADS,
          (_cp(x), _cp(idx), _i64(k), _i32(_VALUE_CODES[value_dtype]), _i32(_INDEX_CODES[index_dtype]),
           _cp(payload)))
    return payload
