"""``policy="auto"``: compress a gradient bucket only where it makes the step faster.

Compression trades codec time (CPU/GPU work) for link time. On a slow link the trade is
lopsided in its favour; on a fast one it can lose: on one CPU core, 4-bit quantizing a
13 MB gradient (with error feedback and the compressed all-reduce's decompress /
re-compress round) takes ~50-100 ms, while a 10 Gbit/s link moves the raw 13 MB in ~10 ms.
So, per compressible bucket, once when the reducer is built::

    codec_s = measured time of the codec work one compressed all-reduce of this bucket does
              (a local rehearsal of collectives.all_reduce without the wire: compress the
              p-1 peers' chunks, decompress p-1 received chunks and sum, re-compress the
              reduced chunk, decompress p chunks; PowerSGD: its whole reduce() with the
              collectives replaced by local identities; fp16/bf16: cast and back)
    comp_s  = modeled link seconds for the exact compressed bytes (the link's own cost_s,
              with the byte and round counts of comm/wire.py)
    raw_s   = modeled link seconds for the raw ring all-reduce of the bucket

    compress the bucket  iff  codec_s + comp_s < raw_s

The codec time is the *max over the data-parallel group* (one small all-reduce): every
rank must take the same decision, or ranks would issue mismatched collectives.

Only a link with a known bandwidth can be priced. With none (a real network: the
Communicator's link is unthrottled, ``bandwidth_bps is None``) or a single rank, nothing
is decided and every eligible bucket compresses as configured.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from ..comm import codecs as C
from ..comm.collectives import chunk_bounds
from ..compress import ErrorFeedback, build_codec

log = logging.getLogger(__name__)

POLICIES = ("auto", "always")
REPS = 3  # timed repetitions per bucket shape (after one untimed warm-up); the median counts


def choose_compressed_buckets(buckets, comm, codec_spec: str, use_ef: bool, own_collective: bool,
                              reps: int = REPS) -> list[dict[str, Any]]:
    """One record per bucket in ``buckets`` (the compressible ones): ``bucket``, ``numel``,
    ``codec_s``, ``raw_s``, ``compressed_s`` (modeled link seconds), ``compress`` (bool).
    Empty when the link's bandwidth is unknown or the group has one rank."""
    link = getattr(comm, "link", None)
    p = int(getattr(comm, "world_size", 1))
    if not buckets or p < 2 or getattr(link, "bandwidth_bps", None) is None:
        return []

    # Measure each distinct bucket layout once (buckets of one model mostly share a size).
    measured: dict[tuple, tuple[float, float]] = {}
    for b in buckets:
        layout = (tuple(tuple(q.shape) for q in b.params), b.numel, b.dtype, str(b.device))
        if layout not in measured:
            rehearse = _powersgd_rehearsal if own_collective else _allreduce_rehearsal
            measured[layout] = rehearse(b, codec_spec, use_ef, p, link, reps)
    layouts = [(tuple(tuple(q.shape) for q in b.params), b.numel, b.dtype, str(b.device)) for b in buckets]

    codec_s = torch.tensor([measured[k][0] for k in layouts], dtype=torch.float64, device=buckets[0].device)
    dist.all_reduce(codec_s, op=dist.ReduceOp.MAX, group=getattr(comm, "group", None))  # all ranks agree

    report = []
    for b, k, t in zip(buckets, layouts, codec_s.tolist()):
        raw = _ring_cost(link, b.numel * b.dtype.itemsize, p)
        comp = measured[k][1]
        report.append(dict(bucket=b.key, numel=b.numel, codec_s=t, raw_s=raw, compressed_s=comp,
                           compress=t + comp < raw))
    _log_decision(report, codec_spec, link)
    return report


# -- modeled link time (the byte and round counts of comm/wire.py) ------------------------------
def _ring_cost(link, payload_bytes: int, p: int) -> float:
    return link.cost_s(2 * (p - 1) * payload_bytes // p, rounds=2 * (p - 1))


def _compressed_allreduce_cost(link, codec, numel: int, dtype: torch.dtype, p: int) -> float:
    """Reduce-scatter (all-to-all of p-1 packets) + all-gather (own packet to p-1 peers);
    the slowest rank's cost (the one owning the biggest chunk)."""
    sizes = [C.payload_nbytes(codec, hi - lo, dtype) for lo, hi in chunk_bounds(numel, p)]
    return max(
        link.cost_s(sum(sizes) - sizes[r], rounds=p - 1) + link.cost_s((p - 1) * sizes[r], rounds=p - 1)
        for r in range(p)
    )


# -- local rehearsals of the codec work, timed -------------------------------------------------
def _timed(fn, reps: int, device: torch.device) -> float:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once()  # warm-up: allocator, lazy kernel imports
    return statistics.median(once() for _ in range(reps))


def _probe(b) -> torch.Tensor:
    # A fixed seed: the probe's values (and hence e.g. top-k's work) are the same on every rank.
    g = torch.Generator().manual_seed(1234)
    return torch.randn(b.numel, generator=g).to(device=b.device, dtype=b.dtype)


def _allreduce_rehearsal(b, codec_spec, use_ef, p, link, reps) -> tuple[float, float]:
    # A fresh codec (and EF wrapper): probing must not touch the real codec's RNG or residuals.
    codec = build_codec(codec_spec)
    wire_codec = ErrorFeedback(codec) if use_ef else codec
    flat = _probe(b)
    n, dtype = flat.numel(), flat.dtype
    if C.summable_dtype(wire_codec, dtype) is not None:  # fp16/bf16: cast, plain all-reduce, cast back
        def work():
            pkt = C.compress(wire_codec, flat / p, "probe", "ar")
            C.decompress(wire_codec, pkt.payload, flat.shape, dtype)

        wire = C.payload_nbytes(wire_codec, n, dtype)
        return _timed(work, reps, flat.device), _ring_cost(link, wire, p)

    bounds = chunk_bounds(n, p)

    def work():  # what collectives.all_reduce does on rank 0, minus the wire
        lo0, hi0 = bounds[0]
        sent = [(C.compress(wire_codec, flat[lo:hi], "probe", f"rs/{j}"), hi - lo)
                for j, (lo, hi) in enumerate(bounds) if j != 0]
        acc = flat[lo0:hi0].to(torch.float32, copy=True)
        for pkt, m in sent:  # peers' packets have these sizes: decode own as stand-ins
            acc += C.decompress(wire_codec, pkt.payload, (m,), dtype).float()
        mine = C.compress(wire_codec, (acc / p).to(dtype), "probe", "ag")
        C.decompress(wire_codec, mine.payload, (hi0 - lo0,), dtype)
        for pkt, m in sent:
            C.decompress(wire_codec, pkt.payload, (m,), dtype)

    return _timed(work, reps, flat.device), _compressed_allreduce_cost(link, wire_codec, n, dtype, p)


class _LocalComm:
    """Stands in for the group in a PowerSGD rehearsal: the mean over identical replicas is
    the input; records each all-reduce's payload bytes for the link model."""

    def __init__(self, world_size: int):
        self.world_size, self.rank, self.payloads = world_size, 0, []

    def all_reduce(self, t, codec, channel="grad", op="mean", key=None, async_op=False):
        self.payloads.append(t.numel() * t.element_size())
        return t.clone()


def _powersgd_rehearsal(b, codec_spec, use_ef, p, link, reps) -> tuple[float, float]:
    from .powersgd import PowerSGDReducer

    local = _LocalComm(p)
    red = PowerSGDReducer(build_codec(codec_spec), local, error_feedback=use_ef)
    flat = _probe(b)
    grads = b.views(flat)
    codec_s = _timed(lambda: red.reduce("probe", grads), reps, flat.device)
    per_call = local.payloads[: len(local.payloads) // (reps + 1)]  # one reduce()'s all-reduces
    return codec_s, sum(_ring_cost(link, nbytes, p) for nbytes in per_call)


def _log_decision(report: list[dict[str, Any]], codec_spec: str, link) -> None:
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    on = [r for r in report if r["compress"]]
    saving = sum(r["raw_s"] - r["codec_s"] - r["compressed_s"] for r in on)
    lines = ", ".join(
        f"{r['bucket']}: {'compress' if r['compress'] else 'raw'} (codec {r['codec_s'] * 1e3:.1f} ms + link "
        f"{r['compressed_s'] * 1e3:.1f} ms vs raw {r['raw_s'] * 1e3:.1f} ms)" for r in report
    )
    msg = (f"compression.policy=auto on {link.describe()}: {codec_spec} on {len(on)}/{len(report)} "
           f"compressible buckets, predicted saving {saving * 1e3:.1f} ms/step; {lines}")
    # A warning when the policy overrides the configured codec somewhere: the user should see it.
    (log.warning if len(on) < len(report) else log.info)(msg)
