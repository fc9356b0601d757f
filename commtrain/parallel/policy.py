"""``compression.policy=auto``: compress a gradient bucket only where it makes the step faster.

Compression trades codec time (CPU/GPU work) for link time. On a slow link the trade is
lopsided in its favour; on a fast one it can lose: on one CPU core, 4-bit quantizing a 13 MB
gradient (with error feedback and the compressed all-reduce's decompress / re-compress
round) takes ~50-100 ms, while a 10 Gbit/s link moves the raw 13 MB in ~10 ms. So, per
compressible bucket, once when the sync is built::

    rehearse the bucket's real reduction (GradCompression.all_reduce or .reduce_scatter, the
    very code the step runs, PowerSGD included) over a LoopbackWire: a group of mirrored
    replicas that sends nothing, meters with the price list and prices the link
        codec_s, comp_s = wall time of the compressed rehearsal, its modeled link seconds
        plain_s, raw_s  = the same for the uncompressed rehearsal
    compress the bucket  iff  codec_s + comp_s < plain_s + raw_s

The measured times are the *max over the data-parallel group* (one small control
all-reduce): every rank must take the same decision, or ranks would issue mismatched
collectives. Only a link with a known bandwidth can be priced: with none (a real network of
unknown speed) or a single rank nothing is decided and every eligible bucket compresses as
configured.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from typing import Any

import torch

from ..comm import Communicator
from .buckets import Bucket

log = logging.getLogger(__name__)

REPS = 3  # timed repetitions per bucket layout (after one untimed warm-up); the median counts


def decide(compression, buckets: list[Bucket], collective: str, reps: int = REPS) -> list[dict[str, Any]]:
    """One record per bucket: ``bucket``, ``numel``, ``codec_s``, ``compressed_s`` (modeled link
    seconds), ``plain_s``, ``raw_s``, ``compress`` (bool). Empty when the link's bandwidth is
    unknown or the group has one rank."""
    comm = compression.comm
    link = getattr(comm, "link", None)
    p = int(getattr(comm, "world_size", 1))
    if not buckets or p < 2 or getattr(link, "bandwidth_bps", None) is None:
        return []
    # Buckets of one model mostly share a few layouts: rehearse each layout once.
    layouts = [_layout(b) for b in buckets]
    measured = {k: rehearse(compression, b, p, link, collective, reps) for k, b in zip(layouts, buckets)}
    times = torch.tensor([[measured[k]["codec_s"], measured[k]["plain_s"]] for k in layouts], dtype=torch.float64)
    times = comm.agree_max(times)  # every rank decides from the same numbers
    report = []
    for b, k, (codec_s, plain_s) in zip(buckets, layouts, times.tolist()):
        m = measured[k]
        report.append(dict(bucket=b.key, numel=b.numel, codec_s=codec_s, compressed_s=m["compressed_s"],
                           plain_s=plain_s, raw_s=m["raw_s"],
                           compress=codec_s + m["compressed_s"] < plain_s + m["raw_s"]))
    _log_decision(report, compression.codec.spec, link)
    return report


def _layout(b: Bucket) -> tuple:
    return tuple(tuple(q.shape) for q in b.params), b.numel, b.dtype, str(b.device)


def rehearse(compression, bucket: Bucket, p: int, link, collective: str, reps: int = REPS) -> dict[str, float]:
    """Time and price one reduction of ``bucket`` with and without its codec, locally.

    A fresh GradCompression (same config, never the real one's RNG, residuals or factors)
    over ``Communicator.loopback(p, link)`` runs the real collective code; the probe tensor is
    padded to a multiple of ``p`` so that the mirrored peers' packets have this rank's sizes.
    """
    from .compression import GradCompression

    loop = Communicator.loopback(p, link)
    try:
        probe_cfg = dataclasses.replace(compression.cfg, policy="always", warmup_steps=0)
        rehearsal = GradCompression(probe_cfg, loop)
        rehearsal.start_step = 0  # rehearse the compressed path itself, whatever its start step
        padded = dataclasses.replace(bucket, numel=-(-bucket.numel // p) * p)
        plain_bucket = dataclasses.replace(padded, compress=False)
        flat = _probe(padded)
        out = {}
        for name, b in (("codec", padded), ("plain", plain_bucket)):
            reduce = getattr(rehearsal, collective)

            def once(b=b):
                reduce(b, flat, step=0, async_op=True).wait()

            before = loop.meter.snapshot()["total_modeled_s"]
            out[f"{name}_s"] = _timed(once, reps, flat.device)
            link_s = (loop.meter.snapshot()["total_modeled_s"] - before) / (reps + 1)
            out["compressed_s" if name == "codec" else "raw_s"] = link_s
        return out
    finally:
        loop.close()


def _timed(fn, reps: int, device: torch.device) -> float:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once()  # warm-up: allocator, lazy kernel imports, first residuals
    return statistics.median(once() for _ in range(reps))


def _probe(b: Bucket) -> torch.Tensor:
    # A fixed seed: the probe's values (and hence e.g. top-k's work) are the same on every rank.
    g = torch.Generator().manual_seed(1234)
    return torch.randn(b.numel, generator=g).to(device=b.device, dtype=b.dtype)


def _log_decision(report: list[dict[str, Any]], codec_spec: str, link) -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    on = [r for r in report if r["compress"]]
    saving = sum(r["plain_s"] + r["raw_s"] - r["codec_s"] - r["compressed_s"] for r in on)
    lines = ", ".join(
        f"{r['bucket']}: {'compress' if r['compress'] else 'raw'} (codec {r['codec_s'] * 1e3:.1f} ms + link "
        f"{r['compressed_s'] * 1e3:.1f} ms vs raw {(r['plain_s'] + r['raw_s']) * 1e3:.1f} ms)" for r in report
    )
    msg = (f"compression.policy=auto on {link.describe()}: {codec_spec} on {len(on)}/{len(report)} "
           f"compressible buckets, predicted saving {saving * 1e3:.1f} ms/step; {lines}")
    # A warning when the policy overrides the configured codec somewhere: the user should see it.
    (log.warning if len(on) < len(report) else log.info)(msg)
