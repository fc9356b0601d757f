"""Kernel back-ends for the codecs' numeric cores.

``torch_ops`` is the reference: vectorised torch operations that run on CPU and CUDA.
``cupy_ops`` (fused CUDA kernels, imported lazily) is the fast path for CUDA tensors. A
back-end module exposes the same function names; a codec calls ``self.ops(device).fn``
and a back-end that lacks ``fn`` falls back to the reference for it.
"""
from __future__ import annotations

import functools
import logging
import types

import torch

from . import torch_ops

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def cupy_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401

        from . import cupy_ops  # noqa: F401
    except Exception as e:  # ImportError, or CUDA/driver mismatch inside CuPy
        log.info("CuPy kernels unavailable (%s); using torch reference kernels", e)
        return False
    return True


class _WithFallback(types.SimpleNamespace):
    """Attribute lookup on a back-end module, falling back to the torch reference."""

    def __init__(self, primary, name: str):
        super().__init__()
        self._primary, self.name = primary, name

    def __getattr__(self, fn):
        return getattr(self._primary, fn, None) or getattr(torch_ops, fn)


@functools.lru_cache(maxsize=None)
def _cupy_backend():
    from . import cupy_ops

    return _WithFallback(cupy_ops, "cupy")


def resolve(kernel: str, device: torch.device):
    """Pick the back-end for ``kernel`` in {"auto", "torch", "cupy"} on ``device``."""
    device = torch.device(device)
    if kernel == "torch" or (kernel == "auto" and (device.type != "cuda" or not cupy_available())):
        return torch_ops
    if device.type != "cuda":
        raise ValueError(f"kernel='cupy' needs a CUDA tensor, got one on {device}")
    if not cupy_available():
        raise RuntimeError("kernel='cupy' requested but CuPy (or a CUDA GPU) is not available")
    return _cupy_backend()


def backend_name(kernel: str, device: torch.device) -> str:
    """Name of the back-end ``resolve`` picks: for logs and metrics."""
    b = resolve(kernel, device)
    return "torch" if b is torch_ops else b.name
