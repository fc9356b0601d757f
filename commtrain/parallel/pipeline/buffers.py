"""Per-sample activation buffers m[id] for AC-SGD: storage, precision, prefetch, checkpoint.

AC-SGD keeps, on *both* ends of a pipeline boundary, the last activation each training
sample produced there: one (T, C) row per sample id, i.e. ``n_samples * T * C`` values --
often more than the model, hence the choice of where they live:

* ``device``: a tensor on the compute device (fastest, costs accelerator memory);
* ``cpu``: host memory (pinned when the compute device is CUDA, so copies are async);
* ``mmap``: an ``np.memmap`` file under ``out_dir`` (larger than RAM; the OS pages it).

and at which precision (``fp32``, ``fp16``, or ``int8`` with one fp32 absmax scale per
(sample, token) row). Low precision is safe for bit-identity because what both ends use
is always the value *read back from storage*: the sender computes its delta against the
stored m, and both ends round m the same deterministic way after each update.

Reads for the next microbatch can be prefetched on a background thread
(:meth:`ActivationBuffer.prefetch`), so the step does not wait on host/disk reads. A write
to rows that a pending prefetch covers invalidates it (the prefetched copy would be stale).
"""
from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ...checkpoint import sha256_file
from ...registry import Registry

# -- storage kinds: where the rows live ---------------------------------------------------
# ``alloc(shape, dtype, device, path) -> (zero-filled Tensor, flush() or None)``, by name.
_STORAGES: Registry[Callable[..., torch.Tensor]] = Registry("buffer storage")
register_storage = _STORAGES.register
available_storages = _STORAGES.names


@register_storage("device")
def _alloc_device(shape, dtype, device, path):
    return torch.zeros(shape, dtype=dtype, device=device), None


@register_storage("cpu")
def _alloc_cpu(shape, dtype, device, path):
    t = torch.zeros(shape, dtype=dtype)
    return (t.pin_memory() if device.type == "cuda" else t), None


_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int8: np.int8}


@register_storage("mmap")
def _alloc_mmap(shape, dtype, device, path):
    if path is None:
        raise ValueError("act_buffer='mmap' needs a file path (buffers are stored under out_dir)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # mode w+ creates (or truncates) a zero-filled file; torch.from_numpy shares its memory.
    arr = np.memmap(path, dtype=_NP[dtype], mode="w+", shape=tuple(shape))
    return torch.from_numpy(arr), arr.flush


# -- stored precision: how a float32 row is rounded into storage ---------------------------
@dataclass(frozen=True)
class _Precision:
    data_dtype: torch.dtype
    has_scale: bool


PRECISIONS = {
    "fp32": _Precision(torch.float32, False),
    "fp16": _Precision(torch.float16, False),
    "int8": _Precision(torch.int8, True),
}


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic symmetric int8 per last-dim row: round-to-nearest, fp32 absmax/127 scale.

    Deterministic (no random rounding) so that sender and receiver, rounding the same fp32
    values, store the same bytes.
    """
    scale = x.abs().amax(dim=-1, keepdim=True).float() / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x.float() / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale.squeeze(-1)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.unsqueeze(-1)


class ActivationBuffer:
    """``n_samples`` rows of shape ``row_shape`` (e.g. (T, C)), indexed by sample id.

    ``read(ids) -> float32 (len(ids), *row_shape)`` on ``device``; ``write(ids, values)``
    stores rounded values and returns exactly what a later read returns; ``seen(ids)``
    tells which rows were ever written (a sample seen for the first time is sent
    uncompressed). ``ids`` are 1-D int64 CPU tensors of distinct sample ids.
    """

    def __init__(
        self,
        n_samples: int,
        row_shape: tuple[int, ...],
        storage: str = "cpu",
        dtype: str = "fp32",
        device: str | torch.device = "cpu",
        path: str | None = None,
        prefetch: bool = True,
    ):
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
            raise ValueError(f"n_samples={n_samples!r} is invalid; allowed: an integer >= 1 (the dataset size)")
        alloc = _STORAGES.get(storage, "act_buffer")
        if dtype not in PRECISIONS:
            raise ValueError(f"act_buffer_dtype={dtype!r} is invalid; allowed: {', '.join(PRECISIONS)}")
        self.n_samples, self.row_shape = n_samples, tuple(int(d) for d in row_shape)
        self.storage, self.dtype, self.device, self.path = storage, dtype, torch.device(device), path
        prec = PRECISIONS[dtype]
        self.data, f1 = alloc((n_samples, *self.row_shape), prec.data_dtype, self.device, path)
        self.scale, f2 = None, None
        if prec.has_scale:
            spath = None if path is None else path + ".scale"
            self.scale, f2 = alloc((n_samples, *self.row_shape[:-1]), torch.float32, self.device, spath)
        self._flushers = [f for f in (f1, f2) if f is not None]
        # Which ids have a row. Kept on the CPU: the send/compress decision is made there.
        self._seen = torch.zeros(n_samples, dtype=torch.bool)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="acsgd-prefetch") if prefetch else None
        self._pending: dict[tuple[int, ...], Future] = {}
        self._lock = threading.Lock()

    # -- ids -----------------------------------------------------------------------------
    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"sample ids must be a 1-D integer tensor, got {ids!r}")
        ids = ids.to("cpu", torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_samples):
            raise ValueError(
                f"sample ids must lie in 0..{self.n_samples - 1} (act buffer sized for the dataset), "
                f"got min={int(ids.min())} max={int(ids.max())}"
            )
        if ids.unique().numel() != ids.numel():
            raise ValueError("sample ids within one microbatch must be distinct (AC-SGD keeps one row per sample)")
        return ids

    def seen(self, ids: torch.Tensor) -> torch.Tensor:
        return self._seen[self._check_ids(ids)]

    # -- read / write ----------------------------------------------------------------------
    def _read_now(self, ids: torch.Tensor) -> torch.Tensor:
        idx = ids.to(self.data.device)
        rows = self.data.index_select(0, idx)
        if self.scale is not None:
            rows = dequantize_int8(rows, self.scale.index_select(0, idx))
        rows = rows.float()
        if rows.device != self.device:
            if self.device.type == "cuda" and not rows.is_pinned():
                rows = rows.pin_memory()
            rows = rows.to(self.device, non_blocking=True)
        return rows

    def prefetch(self, ids: torch.Tensor) -> None:
        """Start reading ``ids``' rows in the background; a later :meth:`read` of the same ids
        takes the result. No-op for device storage (rows are already where they are used)."""
        if self._pool is None or self.storage == "device":
            return
        ids = self._check_ids(ids)
        key = tuple(ids.tolist())
        with self._lock:
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._read_now, ids)

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._check_ids(ids)
        with self._lock:
            fut = self._pending.pop(tuple(ids.tolist()), None)
        return fut.result() if fut is not None else self._read_now(ids)

    def write(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Store ``values`` (len(ids), *row_shape) at ``ids``; return them as stored (rounded to
        the buffer's precision), on ``device`` -- the value both pipeline ends must use."""
        ids = self._check_ids(ids)
        if tuple(values.shape) != (ids.numel(), *self.row_shape):
            raise ValueError(f"values have shape {tuple(values.shape)}, expected {(ids.numel(), *self.row_shape)}")
        values = values.detach()
        idx = ids.to(self.data.device)
        touched = set(ids.tolist())
        # Under the lock no prefetch can be submitted, so none can read these rows between
        # the invalidation and the write and then linger with stale values. A pending
        # prefetch of these rows is finished first (it may be reading them right now) and
        # dropped; prefetches of other rows may keep reading concurrently (disjoint memory).
        with self._lock:
            for key in [k for k in self._pending if touched.intersection(k)]:
                self._pending.pop(key).result()
            if self.scale is not None:
                q, s = quantize_int8(values)
                self.data.index_copy_(0, idx, q.to(self.data.device))
                self.scale.index_copy_(0, idx, s.to(self.scale.device))
                stored = dequantize_int8(q, s)
            else:
                cast = values.to(self.data.dtype)
                self.data.index_copy_(0, idx, cast.to(self.data.device))
                stored = cast.float()
            self._seen[ids] = True
        return stored.to(self.device)

    # -- checkpoint ----------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"data": self.data, **({"scale": self.scale} if self.scale is not None else {})}

    def flush(self) -> None:
        """Write memmap pages to the file (no-op for device/cpu storage)."""
        for f in self._flushers:
            f()

    def _files(self) -> dict[str, str]:
        return {"data": self.path, **({"scale": self.path + ".scale"} if self.scale is not None else {})}

    def state_dict(self, snapshot: str | None = None) -> dict[str, Any]:
        """Everything needed to continue with identical buffers.

        Default: CPU copies of the rows (they go into the checkpoint file). With
        ``snapshot=TAG`` and mmap storage, the memmap files are flushed and copied to
        ``{path}.{TAG}`` instead, and the state records those paths and their sha256, so a
        large buffer never passes through the checkpoint blob.
        """
        meta = {"n_samples": self.n_samples, "row_shape": list(self.row_shape), "dtype": self.dtype}
        with self._lock:
            futs = list(self._pending.values())
            self._pending.clear()
        for f in futs:
            f.result()
        state: dict[str, Any] = {"meta": meta, "seen": self._seen.clone()}
        if snapshot is None:
            state["tensors"] = {k: t.detach().to("cpu", copy=True) for k, t in self._tensors().items()}
            return state
        if self.storage != "mmap":
            raise ValueError(f"state_dict(snapshot=...) needs act_buffer='mmap', this buffer is {self.storage!r}")
        self.flush()
        files = {}
        for k, src in self._files().items():
            dst = f"{src}.{snapshot}"
            shutil.copyfile(src, dst)
            files[k] = {"path": dst, "sha256": sha256_file(dst)}
        state["files"] = files
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = {"n_samples": self.n_samples, "row_shape": list(self.row_shape), "dtype": self.dtype}
        if dict(state["meta"]) != meta:
            raise ValueError(f"act buffer checkpoint has {dict(state['meta'])}, this run expects {meta}")
        with self._lock:
            self._pending.clear()
        tensors = self._tensors()
        if "tensors" in state:
            for k, t in tensors.items():
                t.copy_(state["tensors"][k])
        else:
            for k, t in tensors.items():
                f = state["files"][k]
                if not os.path.exists(f["path"]):
                    raise ValueError(f"act buffer snapshot {f['path']!r} is missing")
                if sha256_file(f["path"]) != f["sha256"]:
                    raise ValueError(f"act buffer snapshot {f['path']!r} fails its sha256 check (changed since saved)")
                arr = np.fromfile(f["path"], dtype=_NP[t.dtype]).reshape(tuple(t.shape))
                t.copy_(torch.from_numpy(arr))
        self._seen.copy_(state["seen"])
        self.flush()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


