"""``compression.policy=auto``: per bucket, the codec that minimises the *exposed* step time.

Compression trades codec time (CPU/GPU work) for link time, and link time only costs where
it is not hidden behind backward. So ``auto`` decides from three measurements, not from
bytes, and from no configured model (a simulated link is measured like a real one):

1. **The link** (:class:`LinkEstimate`, per group): at start-up, a few timed all-reduces of
   different sizes through the real collective code (``Communicator.all_reduce``, codec
   ``none``), each rank's median per size, the group's max per size (every rank holds one
   figure), fitted to ``latency * rounds + bytes / bandwidth`` over the price list's
   bytes and rounds. During training every wire operation of the group reports its wall
   time (``Wire.observer``), and latency and per-byte time are refitted to the lower envelope
   of the last few operations (a link that slows down, or one busy with other traffic, is
   followed; the *fastest* operation per size, because a rank's wait in a collective includes
   waiting for the last peer to arrive). At a decision the group takes the smallest figures
   (the last rank to arrive sees the transfer alone).
2. **The codecs on this device**: each candidate's reduction of each bucket layout is
   rehearsed over a :class:`~commtrain.comm.wire.LoopbackWire` (the real collective code,
   PowerSGD included, mirrored peers, nothing sent): its wall time is the codec time, the
   wire operations it issues (bytes and rounds, the price list) give its link time on the
   measured link. Times are the group's max.
3. **When each bucket becomes ready**: the sync reports when each bucket's reduction was
   launched and when backward ended; ``slack`` is the EMA of the difference (the group's
   min).

The plan (:func:`plan`) simulates the step's reductions as they run: one FIFO worker, a
bucket starts when it is ready and the previous one is done, and lasts codec + link time;
on a CPU device the codec work done while backward still runs takes backward's cores and
delays the end of backward by as much. The exposed time of an assignment is how long after
the end of a communication-free backward the last reduction ends. Starting from every
bucket raw, a coordinate descent (two passes, bucket by bucket) switches a bucket to a
codec when that lowers the exposed time by more than ``TOLERANCE_S``; of the codecs, the
one with the least exposed time plus ``BUSY_WEIGHT`` x its codec + link time (of two
predicted to expose alike, the one that keeps link and CPU busy for less: it survives a
slack that was measured too large; then the user's preferred codec ``compression.grad``). A bucket whose raw transfer hides behind
backward therefore stays raw: no candidate can beat zero.

The decision table (one row per compressible bucket: size, slack, each candidate's codec,
link and resulting exposed milliseconds, the chosen codec and why) is logged on rank 0 at
each decision and kept in ``GradCompression.decisions`` (the trainer writes it to the
metrics file).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..comm import Communicator
from ..comm.link import LinkModel
from ..comm.wire import LoopbackWire
from ..compress import build_codec
from .buckets import Bucket

log = logging.getLogger(__name__)

REPS = 3  # timed repetitions per rehearsal (after one untimed warm-up); the median counts
PROBE_BYTES = (1 << 10, 16 << 10, 256 << 10, 2 << 20)  # start-up link probe: all-reduce payload sizes
PROBE_BUDGET_S = 0.05  # ... ascending, until one takes longer than this (slow links: fewer, small probes)
PROBE_REPS = 3
EMA_ALPHA = 0.2  # weight of a new observation (bucket slack)
MIN_FIT_BYTES = 1 << 10  # wire operations below this are control messages: they are not fitted
MIN_OBS_BYTES = 64 << 10  # smaller wire operations are latency-bound: alone, they say little about bandwidth
TOLERANCE_S = 0.5e-3  # a codec must lower the exposed time by more than this to replace raw
BUSY_WEIGHT = 0.1  # between codecs: exposed + this x (codec + link time), see plan()
DEFAULT_CANDIDATES = ("none", "fp16", "quant:bits=8", "quant:bits=4", "powersgd:rank=4")


# -- 1. the link ---------------------------------------------------------------------------------
@dataclass
class LinkEstimate:
    """A measured link: ``latency_s`` per message round, ``s_per_byte`` (1 / bandwidth)."""

    latency_s: float
    s_per_byte: float
    source: str = "probe"  # "probe" (start-up) or "probe+observed" once training traffic updated it
    observed: int = 0  # training operations folded into the EMA

    def cost_s(self, nbytes: int, rounds: int) -> float:
        return self.latency_s * rounds + self.s_per_byte * nbytes

    @property
    def bandwidth_bps(self) -> float:
        return math.inf if self.s_per_byte <= 0 else 8.0 / self.s_per_byte

    def describe(self) -> str:
        bw = self.bandwidth_bps
        bw_s = "inf" if math.isinf(bw) else (f"{bw / 1e9:.3g} Gbit/s" if bw >= 1e9 else f"{bw / 1e6:.3g} Mbit/s")
        return f"measured {bw_s}, {self.latency_s * 1e6:.0f} us/round ({self.source}, {self.observed} ops observed)"

    def as_dict(self) -> dict[str, Any]:
        bw = self.bandwidth_bps
        return {"bandwidth_bps": None if math.isinf(bw) else bw, "latency_s": self.latency_s,
                "source": self.source, "observed": self.observed}


class LinkTracker:
    """The link estimate of one group: measured at start-up, then followed by the group's own
    wire operations (``observe`` is the Wire's observer).

    A collective's wall time includes waiting for the slowest peer to arrive (a peer still
    compressing, or still in backward), so each observation is an upper bound of the transfer.
    The estimate is therefore fitted to the *lower envelope* of the last ``window`` operations:
    the fastest operation of each size class (powers of two), fitted to ``latency * rounds +
    bytes * s_per_byte`` when the window holds sizes at least 4x apart; with one size class
    only, the per-byte time follows that class's fastest operation and the latency stays the
    start-up probe's. A window of latency-bound operations only (< ``MIN_OBS_BYTES``, e.g. every
    bucket on PowerSGD) does not show the bandwidth: the last estimate that did is kept.
    Fitting both from training traffic matters: the start-up probe's latency
    is inflated when the CPU is busy (small all-reduces wait for a core), and subtracting an
    inflated latency from every bucket's time would make the link look faster than it is."""

    def __init__(self, estimate: LinkEstimate, window: int = 32):
        from collections import deque

        self.estimate = estimate
        self._last = (estimate.latency_s, estimate.s_per_byte)  # the last estimate bandwidth was seen in
        self._obs: deque = deque(maxlen=window)
        self._n = 0
        self._lock = threading.Lock()

    def observe(self, nbytes: int, rounds: int, seconds: float) -> None:
        if nbytes < MIN_FIT_BYTES:  # control messages: all wait, no bandwidth
            return
        with self._lock:
            self._obs.append((int(nbytes), int(rounds), float(seconds)))
            self._n += 1

    def local(self) -> tuple[float, float, int]:
        """(latency_s, s_per_byte, operations observed) from this rank's recent operations."""
        with self._lock:
            obs, n = list(self._obs), self._n
        lat, spb = self._last
        if not obs:
            return lat, spb, 0
        fastest: dict[int, tuple[int, int, float]] = {}
        for b, r, t in obs:  # the lower envelope: the fastest operation per size class
            k = b.bit_length()
            if k not in fastest or t < fastest[k][2]:
                fastest[k] = (b, r, t)
        env = list(fastest.values())
        sizes = [b for b, _, _ in env]
        big = [(b, r, t) for b, r, t in env if b >= MIN_OBS_BYTES]
        if not big:  # only latency-bound operations (e.g. every bucket on PowerSGD): bandwidth unseen
            return lat, spb, n
        if len(env) >= 2 and max(sizes) >= 4 * min(sizes):
            fit = fit_link(env)
            if fit[1] > 0:
                self._last = fit
                return (*fit, n)
        spb = min(max(t - lat * r, 0.0) / b for b, r, t in big)
        self._last = (lat, spb)
        return lat, spb, n

    def agree(self, comm) -> LinkEstimate:
        """The group's estimate now (a collective): the smallest per-rank latency and per-byte
        time (the last rank to arrive sees the transfer alone)."""
        lat, spb, n = self.local()
        lat, spb = (-comm.agree_max(torch.tensor([-lat, -spb], dtype=torch.float64))).tolist()
        est = self.estimate
        if n:
            est = dataclasses.replace(est, latency_s=float(lat), s_per_byte=float(spb), source="probe+observed",
                                      observed=n)
        return est


def measure_link(comm, sizes: Sequence[int] = PROBE_BYTES, reps: int = PROBE_REPS,
                 clock: Callable[[], float] = time.perf_counter) -> Optional[LinkEstimate]:
    """Time all-reduces of ``sizes`` payload bytes over ``comm`` with codec ``none`` (a
    collective: every rank of the group calls it) and fit latency and bandwidth. None for a
    group of one rank (nothing crosses a link)."""
    from ..comm import price

    p = int(getattr(comm, "world_size", 1))
    if p < 2:
        return None
    none = build_codec("none")
    times = []
    wire = getattr(comm, "wire", None)
    saved = getattr(wire, "meter", None)
    if wire is not None:  # the probe's bytes are no step's: meter them aside
        from ..comm.meter import ByteMeter

        wire.meter = ByteMeter()
    try:
        times = []
        for nbytes in sizes:
            t = _probe_time(comm, none, nbytes, reps, clock)
            # every rank must probe the same sizes: the stop is agreed on (one tiny max)
            slow = float(comm.agree_max(torch.tensor([t], dtype=torch.float64))[0]) > PROBE_BUDGET_S
            times.append(t)
            if slow and len(times) >= 2:
                break
    finally:
        if wire is not None:
            wire.meter = saved
    agreed = comm.agree_max(torch.tensor(times, dtype=torch.float64)).tolist()
    costs = [price.ring_all_reduce(4 * max(n // 4, 1), p) for n in sizes[:len(times)]]
    lat, spb = fit_link([(c.nbytes, c.rounds, s) for c, s in zip(costs, agreed)])
    return LinkEstimate(lat, spb)


def _probe_time(comm, none, nbytes, reps, clock) -> float:
    t = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32)
    comm.all_reduce(t, none, channel="grad", op="sum")  # warm-up (and drains anything queued)
    samples = []
    for _ in range(reps):
        comm.agree_max(torch.zeros(1, dtype=torch.float64))  # start together
        t0 = clock()
        comm.all_reduce(t, none, channel="grad", op="sum")
        samples.append(clock() - t0)
    return statistics.median(samples)


def fit_link(samples: Sequence[tuple[int, int, float]]) -> tuple[float, float]:
    """Least-squares ``seconds = latency * rounds + s_per_byte * nbytes`` (both >= 0)."""
    import numpy as np

    a = np.array([[r, b] for b, r, _ in samples], dtype=float)
    y = np.array([s for _, _, s in samples], dtype=float)
    (lat, spb), *_ = np.linalg.lstsq(a, y, rcond=None)
    if spb <= 0:  # latency-bound at every size: the bandwidth is beyond what the probe resolves
        spb = 0.0
        lat = float(np.mean(y / a[:, 0]))
    if lat < 0:
        lat = 0.0
        spb = float(np.dot(a[:, 1], y) / np.dot(a[:, 1], a[:, 1]))
    return float(lat), float(spb)


# -- 2. the codecs on this device --------------------------------------------------------------
class _RecordingLoopback(LoopbackWire):
    """A LoopbackWire that keeps the (bytes, rounds) of every operation it prices."""

    def __init__(self, world_size: int):
        super().__init__(world_size)
        self.ops: list[tuple[int, int]] = []

    def _reserve(self, c):
        self.ops.append((c.nbytes, c.rounds))
        return super()._reserve(c)


def rehearse(cfg, spec: str, bucket: Bucket, p: int, collective: str, reps: int = REPS) -> dict[str, Any]:
    """Time one reduction of ``bucket`` with codec ``spec`` locally: ``codec_s`` (wall time
    of the real collective code over mirrored peers, the median of ``reps``) and ``ops``
    (bytes and rounds of each wire operation one reduction issues)."""
    from .compression import GradCompression

    wire = _RecordingLoopback(p)
    loop = Communicator(link=wire.link, meter=wire.meter, wire=wire)
    try:
        probe_cfg = dataclasses.replace(cfg, grad=spec, policy="always", warmup_steps=0, candidates=[spec])
        rehearsal = GradCompression(probe_cfg, loop)
        rehearsal.start_step = 0
        padded = dataclasses.replace(bucket, numel=-(-bucket.numel // p) * p)
        if spec == "none":
            padded = dataclasses.replace(padded, compress=False)
        flat = _probe(padded)
        reduce = getattr(rehearsal, collective)

        def once():
            reduce(padded, flat, step=0, async_op=True).wait()

        codec_s = _timed(once, reps, flat.device)
        n_ops = len(wire.ops) // (reps + 1)
        return {"codec_s": codec_s, "ops": wire.ops[:n_ops]}
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


def layout(b: Bucket) -> tuple:
    return tuple(tuple(q.shape) for q in b.params), b.numel, b.dtype, str(b.device)


# -- 3. the plan ---------------------------------------------------------------------------------
def exposed_s(slack: Sequence[float], codec_s: Sequence[float], link_s: Sequence[float], cpu_shared: bool) -> float:
    """Seconds the step's last reduction ends after a communication-free backward would have
    ended. Buckets in launch order; bucket i is ready ``slack[i]`` seconds before the end of
    backward and occupies the (one, FIFO) collective worker for ``codec_s[i] + link_s[i]``.
    ``cpu_shared``: codec work while backward runs delays backward (and later buckets)."""
    end, shift, free = 0.0, 0.0, -math.inf
    for s, c, l in zip(slack, codec_s, link_s):
        start = max(-s + shift, free)
        if cpu_shared and start < end:
            stolen = min(c, end - start)
            shift += stolen
            end += stolen
        free = start + c + l
    return max(end, free, 0.0)


def plan(rows: list[dict[str, Any]], candidates: Sequence[str], preferred: str, cpu_shared: bool,
         tolerance_s: float = TOLERANCE_S) -> list[dict[str, Any]]:
    """Choose a candidate per bucket. ``rows``: per bucket in launch order, ``slack_s`` and
    ``times`` {spec: (codec_s, link_s)} (a spec missing from ``times`` cannot serve it).
    Fills in ``chosen``, ``why`` and ``exposed_ms`` {spec: exposed step ms with this bucket
    on spec and the others as chosen}; returns ``rows``."""
    n = len(rows)
    choice = ["none"] * n

    def total(ch) -> float:
        return exposed_s([r["slack_s"] for r in rows], [rows[i]["times"][c][0] for i, c in enumerate(ch)],
                         [rows[i]["times"][c][1] for i, c in enumerate(ch)], cpu_shared)

    def rank(c: str) -> int:  # tie-break: raw, then the user's codec, then the list's order
        return 0 if c == "none" else 1 if c == preferred else 2 + list(candidates).index(c)

    def busy(i: int, c: str) -> float:
        return sum(rows[i]["times"][c])

    for _ in range(2):  # coordinate descent: each bucket's best given the others' choices
        for i in range(n):
            t = {c: total(choice[:i] + [c] + choice[i + 1:]) for c in rows[i]["times"]}
            # among codecs, the least exposed plus a share of the time it keeps the worker busy:
            # hiding is a prediction from measured slack, and of two codecs predicted to expose
            # alike the one that occupies the link and CPU less survives a smaller slack
            coded = sorted((c for c in t if c != "none"), key=rank)
            best = min(coded, key=lambda c: t[c] + BUSY_WEIGHT * busy(i, c), default="none")
            choice[i] = best if t[best] < t["none"] - tolerance_s else "none"
    raw_all = total(["none"] * n)
    for i, r in enumerate(rows):
        r["chosen"] = choice[i]
        r["exposed_ms"] = {c: 1e3 * total(choice[:i] + [c] + choice[i + 1:]) for c in r["times"]}
        raw_c, raw_l = r["times"]["none"]
        raw_end = -r["slack_s"] + raw_c + raw_l
        if choice[i] == "none":
            if raw_end <= 0:
                r["why"] = "hidden: its raw reduction ends before backward does"
            else:
                r["why"] = "raw exposes least (no codec saves more than its own time)"
        else:
            c, l = r["times"][choice[i]]
            r["why"] = (f"exposed {r['exposed_ms'][choice[i]]:.1f} ms vs raw {r['exposed_ms']['none']:.1f} ms "
                        f"(codec {c * 1e3:.1f} + link {l * 1e3:.1f} ms vs raw link {raw_l * 1e3:.1f} ms)")
        r["compress"] = choice[i] != "none"
    if rows:
        rows[0]["_step_exposed_ms"] = (1e3 * raw_all, 1e3 * total(choice))
    return rows


def log_table(rows: list[dict[str, Any]], link: LinkEstimate, step: int, what: str = "grad") -> None:
    """The decision table on rank 0's log (one line per bucket)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0 or not rows:
        return
    raw_ms, chosen_ms = rows[0].get("_step_exposed_ms", (float("nan"), float("nan")))
    lines = [f"compression.policy=auto [{what}] decision at step {step} on the {link.describe()}: exposed "
             f"communication {chosen_ms:.1f} ms/step (all raw: {raw_ms:.1f} ms)",
             format_table(rows)]
    log.warning("\n".join(lines))


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text decision table: per bucket, its size and slack, then per candidate
    ``codec+link=exposed`` in ms, the chosen codec and why."""
    if not rows:
        return "(no compressible buckets)"
    specs = list(rows[0]["times"])
    head = ["bucket", "MB", "slack ms"] + specs + ["chosen", "why"]
    body = []
    for r in rows:
        cells = [r["bucket"], f"{r['numel'] * 4 / 2**20:.2f}", f"{r['slack_s'] * 1e3:.1f}"]
        for s in specs:
            if s in r["times"]:
                c, l = r["times"][s]
                cells.append(f"{c * 1e3:.1f}+{l * 1e3:.1f}={r['exposed_ms'][s]:.1f}")
            else:
                cells.append("n/a")
        body.append(cells + [r["chosen"], r["why"]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(b) for b in body])


def summary(rows: list[dict[str, Any]]) -> str:
    """``bucket0 quant:bits=4, bucket1 none, ...`` grouped: ``quant:bits=4 x3, none x2``."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["chosen"]] = counts.get(r["chosen"], 0) + 1
    return ", ".join(f"{c} x{n}" for c, n in counts.items())


def public_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON-ready copy of the table (for the metrics file)."""
    out = []
    for r in rows:
        out.append({"bucket": r["bucket"], "numel": r["numel"], "slack_ms": 1e3 * r["slack_s"],
                    "candidates": {s: {"codec_ms": 1e3 * c, "link_ms": 1e3 * l, "exposed_ms": r["exposed_ms"][s]}
                                   for s, (c, l) in r["times"].items()},
                    "chosen": r["chosen"], "why": r["why"]})
    return out


# -- pipeline boundaries: compression.act=auto ----------------------------------------------------
def choose_act_codec(comm, candidates: Sequence[str], shape: Sequence[int], dtype: torch.dtype, device,
                     reps: int = REPS) -> tuple[str, list[dict[str, Any]], Optional[LinkEstimate]]:
    """The activation codec of a pipeline boundary (a collective over the pipeline group,
    so both ends of every boundary choose alike): per candidate, the measured encode +
    decode time of one microbatch's activation on this device plus its payload's time on
    the measured pipeline link (one message round); the group's max times; the least total
    wins (ties: ``none``). A boundary transfer sits on the pipeline's critical path between
    two stages' compute, so it is taken as exposed."""
    link = measure_link(comm)
    specs = [s for s in candidates if not getattr(build_codec(s), "needs_own_collective", False)]
    if link is None:
        return "none", [], None
    numel = int(math.prod(shape))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7)).to(device=device, dtype=dtype)
    codec_times = []
    for s in specs:
        codec = build_codec(s)
        codec_times.append(_timed(lambda: codec.decompress(codec.compress(x)), reps, x.device) if s != "none" else 0.0)
    agreed = comm.agree_max(torch.tensor(codec_times, dtype=torch.float64)).tolist()
    rows = []
    for s, c in zip(specs, agreed):
        nbytes = build_codec(s).payload_nbytes(numel, dtype)
        rows.append({"codec": s, "codec_ms": 1e3 * c, "link_ms": 1e3 * link.cost_s(nbytes, 1),
                     "total_ms": 1e3 * (c + link.cost_s(nbytes, 1))})
    best = min(rows, key=lambda r: (r["total_ms"] - (TOLERANCE_S * 1e3 if r["codec"] == "none" else 0.0),
                                    r["codec"] != "none"))
    for r in rows:
        r["chosen"] = r is best
    return best["codec"], rows, link
