"""Codec compute and its overlap with backward: the data-parallel step, event by event.

**Codec compute.** On a GPU the codec kernels are cheap next to the link; on a CPU they are
not (4-bit quantization with error feedback encodes at ~0.1-0.2 GB/s on one core). Given a
:class:`CodecSpeed` per codec (measured with :func:`measure_codec_speed`), every bucket's
operation on the reducer's worker thread is the sequence the collectives run
(:func:`codec_segments`): encode the chunks for the peers, all-to-all on the link, decode +
sum + encode the own reduced chunk, all-gather on the link, decode all chunks (summable
codecs: encode, ring, decode).

**Overlap** (:func:`simulate_overlap`). Buckets become ready during the last backward in
proportion to the parameters done, and go through one worker and the FIFO link in order (as
the reducer launches them); the optimizer runs once every gradient is reduced. When the codec
and the model share one processor (a CPU rank with one core, or codec kernels on the compute
stream), each runs at half speed while both are busy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..comm import protocol as C
from ..comm.price import chunk_bounds
from ..compress import build_codec
from .checks import check_int, check_pos


@dataclass(frozen=True)
class CodecSpeed:
    """Measured compress/decompress speed of one codec, in GB/s of *input* (uncompressed)
    bytes, on the processor that runs it. ``encode_gbps`` includes error feedback (residual
    add, compress, decompress, subtract) where the trainer uses it."""

    encode_gbps: float
    decode_gbps: float

    def __post_init__(self):
        check_pos("encode_gbps", self.encode_gbps)
        check_pos("decode_gbps", self.decode_gbps)

    def encode_s(self, nbytes: int) -> float:
        return nbytes / (self.encode_gbps * 1e9)

    def decode_s(self, nbytes: int) -> float:
        return nbytes / (self.decode_gbps * 1e9)


def measure_codec_speed(spec: str, numel: int = 1 << 19, error_feedback: bool = True, repeats: int = 5,
                        dtype: torch.dtype = torch.float32) -> CodecSpeed:
    """Time ``spec``'s compress (wrapped in error feedback if ``error_feedback`` and the codec is
    lossy, as the reducer wraps it) and decompress on a gradient-like tensor of ``numel``
    elements in this process (median of ``repeats`` after one warm-up). Measure with the
    thread count the ranks use (torchrun: ``OMP_NUM_THREADS=1``)."""
    import time

    from ..compress import ErrorFeedback

    check_int("numel", numel, 1)
    check_int("repeats", repeats, 1)
    codec = build_codec(spec)
    enc = ErrorFeedback(codec) if error_feedback and not getattr(codec, "lossless", False) else codec
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=gen, dtype=torch.float32).to(dtype) * 1e-3
    enc_t, dec_t = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        payload = C.compress(enc, x, "calibration", "x")
        t1 = time.perf_counter()
        C.decompress(enc, payload, x.shape, dtype)
        t2 = time.perf_counter()
        if i:  # the first round pays allocation and residual creation once
            enc_t.append(t1 - t0)
            dec_t.append(t2 - t1)
    nbytes = numel * x.element_size()
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return CodecSpeed(nbytes / max(med(enc_t), 1e-9) / 1e9, nbytes / max(med(dec_t), 1e-9) / 1e9)


def codec_segments(kind: str, g_size: int, numel: int, itemsize: int, speed: CodecSpeed | None) -> list[float]:
    """CPU seconds of the codec work around the link operations of one all-reduce on the
    slowest rank, in order: summable/own collective [encode, decode]; compressed
    [encode peers' chunks, decode received + encode own reduced chunk, decode all chunks]."""
    if speed is None or g_size == 1 or numel == 0:
        return [0.0] * (2 if kind != "compressed" else 3)
    if kind != "compressed":
        return [speed.encode_s(numel * itemsize), speed.decode_s(numel * itemsize)]
    bounds = chunk_bounds(numel, g_size)
    worst = [0.0, 0.0, 0.0]
    for r, (lo, hi) in enumerate(bounds):
        own = (hi - lo) * itemsize
        seg = [speed.encode_s(numel * itemsize - own), speed.decode_s((g_size - 1) * own) + speed.encode_s(own),
               speed.decode_s(numel * itemsize)]
        if sum(seg) > sum(worst):
            worst = seg
    return worst


def interleave(cpu: list[float], link: list[float]) -> list[tuple[str, float]]:
    """[cpu0, link0, cpu1, link1, ..., cpuN]: the worker's segments for one bucket."""
    out = []
    for i, c in enumerate(cpu):
        out.append(("cpu", c))
        if i < len(link):
            out.append(("link", link[i]))
    return out


def simulate_overlap(pre_s: float, backward_s: float, ready: Sequence[float],
                     buckets: Sequence[Sequence[tuple[str, float]]], optimizer_s: float = 0.0,
                     shared: bool = False) -> float:
    """Step time of one data-parallel rank with overlapped reduction.

    The main thread computes ``pre_s`` (forward and earlier microbatches) then ``backward_s``;
    bucket ``i`` is ready once a fraction ``ready[i]`` of that backward is done. One worker
    takes buckets in order, each a list of ``("cpu", s)`` / ``("link", s)`` segments (the
    link is FIFO and used by this worker only). The optimizer runs after both finish. With
    ``shared``, main and worker CPU segments share one processor (each at half speed while
    both are busy); link segments only wait.
    """
    total = pre_s + backward_s
    marks = [pre_s + backward_s * f for f in ready]
    t = done = 0.0
    k, seg, left = 0, 0, None  # worker: bucket, segment, seconds of work left in it
    eps = 1e-12
    while True:
        main_busy = done < total - eps
        if left is None and k < len(buckets) and (marks[k] <= done + eps or not main_busy):
            seg, left = 0, buckets[k][0][1]
        worker_cpu = left is not None and buckets[k][seg][0] == "cpu"
        if not main_busy and left is None and k >= len(buckets):
            return t + optimizer_s
        both = shared and main_busy and worker_cpu
        r_main = 0.5 if both else 1.0
        r_work = (0.5 if both else 1.0) if worker_cpu else 1.0
        dts = []
        if main_busy:
            nxt = total
            if left is None and k < len(buckets):
                nxt = min(nxt, marks[k])
            dts.append((nxt - done) / r_main)
        if left is not None:
            dts.append(left / r_work)
        dt = max(min(dts), 0.0)
        t += dt
        if main_busy:
            done = min(total, done + dt * r_main)
        if left is not None:
            left -= dt * r_work
            if left <= eps:
                seg += 1
                if seg < len(buckets[k]):
                    left = buckets[k][seg][1]
                else:
                    k, left = k + 1, None
