"""Throughput model: predicted step time and tokens/s of a training setup, from FLOPs and from
the *exact* wire bytes the codecs produce.

Why a model: "with my GPUs and my network, which layout and which compression gives the most
tokens per second (and per dollar)?" can be answered before renting anything, and the same
model, fed a machine's measured compute time, predicts the trainer's throttled runs (so it is
checked against measurements, not just plausible).

**Compute.** FLOPs per token of one stage (forward + backward, PaLM appendix B / nanoGPT's
``estimate_mfu``)::

    flops/token = 6 * N_matmul + 12 * L * T * C

``N_matmul``: the stage's parameters that take part in matmuls (everything but the embedding
lookup, so the lm head counts even when tied); ``L`` blocks of width ``C`` at sequence length
``T`` (the attention score and value matmuls, causal mask not subtracted). Time = FLOPs /
(dense peak * ``mfu``), forward = 1/3 and backward = 2/3 of it. ``compute_s_measured``
replaces all of this with a measured number (seconds of one step's compute on one rank).

**Communication** mirrors what :mod:`commtrain.comm` does, operation by operation, with the
same byte convention as its ByteMeter (bytes *sent by this rank*) and the same link cost
(``latency * rounds + 8 * bytes / bandwidth``):

* gradients: the trainer's buckets (:func:`commtrain.parallel.buckets.build_buckets` on the
  stage's real parameter shapes, built on the meta device); a summable codec (none, fp16,
  bf16) takes a ring all-reduce, ``floor(2 (p-1) / p * payload)`` bytes in ``2 (p-1)`` rounds;
  any other codec the compressed all-reduce, an all-to-all of the ``p-1`` compressed chunks
  owned by others plus an all-gather of the own compressed reduced chunk (``p-1`` rounds
  each); PowerSGD its two plain all-reduces of P and Q; ZeRO stage 2 a reduce-scatter only.
  Payload sizes come from ``codec.payload_nbytes`` of the registry codec, never re-derived.
* pipeline: per microbatch and stage boundary one activation ``(mb, T, C)`` forward
  (``act``) and one activation gradient backward (``act_grad``), point-to-point.
* ZeRO stage >= 1: the all-gather of updated parameter shards (``param``).

**Networks.** With an explicit ``link`` (a :class:`commtrain.comm.LinkModel` or anything
with ``bandwidth_bps`` and ``latency_s``), every rank has one link, exactly as the throttled
trainer. With a hardware profile, a rank's bytes cross its own intra-node link (PCIe or
NVLink, per GPU) and the bytes that leave its node share the node's NICs; an operation takes
``latency * rounds + max(bytes / intra_bw, node_bytes / nic_bw)`` with the inter-node latency
if it leaves the node. Ring operations put one rank's volume on the node's outgoing edge; the
all-to-all sends every member's off-node chunks through the NICs.

**Step.** Data parallel (pp=1) with overlap: buckets become ready during the last backward
in proportion to the parameters done, and go through the FIFO link in order (as the reducer
launches them); step = max(compute, last bucket done). Pipelines: ``(m + pp - 1)`` slots of
the slowest stage's per-microbatch compute (and p2p, added or overlapped), i.e. a bubble
fraction of ``(pp - 1) / (m + pp - 1)``, then the gradient reduction (the reducer runs after
the flush). ZeRO reduces after backward and gathers after the optimizer step (no overlap).
Overlap never makes a prediction slower.

**Codec compute.** On a GPU the codec kernels are cheap next to the link; on a CPU they are
not (4-bit quantization with error feedback encodes at ~0.1-0.2 GB/s on one core). Given
``codec_speed`` (measured per codec with :func:`measure_codec_speed`), every bucket's
operation on the reducer's worker thread is the sequence the collectives run: encode the
chunks for the peers, all-to-all on the link, decode + sum + encode the own reduced chunk,
all-gather on the link, decode all chunks (summable codecs: encode, ring, decode). With
``codec_shares_compute`` the codec and the model compete for the same processor (a CPU
rank with one core, or codec kernels on the compute stream): while both are busy each runs
at half speed, simulated event by event. ``optimizer_s`` is the part of the measured compute
that only starts once every gradient is reduced (the optimizer step).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .comm import protocol as C
from .comm.collectives import chunk_bounds
from .comm.meter import CHANNELS
from .compress import build_codec
from .hardware import HardwareProfile, Interconnect, available_hardware, load_hardware, load_interconnect

ZERO_STAGES = (0, 1, 2)
ACT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bubble_fraction(pp: int, microbatches: int) -> float:
    """Idle fraction of a GPipe/1F1B pipeline: ``(pp - 1) / (m + pp - 1)``."""
    _check_int("pp", pp, 1)
    _check_int("microbatches", microbatches, 1)
    return (pp - 1) / (microbatches + pp - 1)


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}={v!r} is invalid; allowed: an integer >= {lo}")
    return v


def _check_pos(name: str, v, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or (hi is not None and v > hi):
        raise ValueError(f"{name}={v!r} is invalid; allowed: a number > 0" + (f" and <= {hi}" if hi else ""))
    return float(v)


# -- codec compute cost ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CodecSpeed:
    """Measured compress/decompress speed of one codec, in GB/s of *input* (uncompressed)
    bytes, on the processor that runs it. ``encode_gbps`` includes error feedback (residual
    add, compress, decompress, subtract) where the trainer uses it."""

    encode_gbps: float
    decode_gbps: float

    def __post_init__(self):
        _check_pos("encode_gbps", self.encode_gbps)
        _check_pos("decode_gbps", self.decode_gbps)

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

    from .compress import ErrorFeedback

    _check_int("numel", numel, 1)
    _check_int("repeats", repeats, 1)
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


def _codec_segments(kind: str, g_size: int, numel: int, itemsize: int, speed: CodecSpeed | None) -> list[float]:
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


def _interleave(cpu: list[float], link: list[float]) -> list[tuple[str, float]]:
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


# -- the model's shape --------------------------------------------------------------------------
@dataclass
class StageShape:
    """One pipeline stage: its parameters (name, tensor on meta) and per-token FLOPs."""

    index: int
    named_params: list[tuple[str, torch.Tensor]]
    flops_per_token: float  # forward + backward
    n_blocks: int

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.named_params)


@dataclass
class ModelShape:
    name: str
    params: int  # unique parameters of the unsplit model
    n_layer: int
    hidden: int
    n_head: int
    vocab_size: int
    seq_len: int
    stages: list[StageShape]

    @property
    def flops_per_token(self) -> float:
        return sum(s.flops_per_token for s in self.stages)


def describe_model(model: str | torch.nn.Module, seq_len: int, pp: int = 1, balance: str = "layers") -> ModelShape:
    """Parameter shapes and FLOPs of ``model`` (a preset name, built on the meta device, or a
    built model) split into ``pp`` stages exactly as the trainer splits it."""
    _check_int("seq_len", seq_len, 1)
    _check_int("pp", pp, 1)
    name = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        from .models import PRESETS, ModelConfig, build_model

        if model not in PRESETS:
            raise ValueError(f"model={model!r} is invalid; allowed presets: {', '.join(sorted(PRESETS))}")
        with torch.device("meta"):
            model = build_model(ModelConfig(preset=model))
    cfg = getattr(model, "config", None)
    n_layer = int(getattr(cfg, "n_layer", getattr(cfg, "num_hidden_layers", 0)))
    hidden = int(getattr(model, "hidden_size", getattr(cfg, "n_embd", 0)))
    n_head = int(getattr(cfg, "n_head", getattr(cfg, "num_attention_heads", 1)))
    vocab = int(getattr(model, "vocab_size", 0))
    block_size = getattr(model, "block_size", None)
    if block_size is not None and seq_len > block_size:
        raise ValueError(f"seq_len={seq_len} is invalid for {name}; allowed: <= block_size={block_size}")
    if not hasattr(model, "stage_modules"):
        raise TypeError(f"model {name} has no stage_modules(); pass a commtrain model or a preset name")
    n_layers_total = len(model.pipeline_layers()) if hasattr(model, "pipeline_layers") else None
    stages = []
    with torch.device("meta"):
        split = model.stage_modules(pp) if pp > 1 else None
    if split is None:
        layers = [(0, n_layers_total or 1, model)]
    else:
        layers = [(s.start, s.stop, s) for s in split]
    for i, (start, stop, mod) in enumerate(layers):
        named = [(n, p) for n, p in mod.named_parameters() if p.requires_grad]
        # Matmul parameters: everything but the embedding layer (layer 0: a lookup). The head's
        # lm-head matrix counts even when it is tied to the embedding (pp=1: counted once by
        # named_parameters, so add it back).
        if split is None:
            pl = model.pipeline_layers() if hasattr(model, "pipeline_layers") else [None]
            emb = {id(p): p.numel() for p in pl[0].parameters()} if pl[0] is not None else {}
            shared = sum(p.numel() for p in pl[-1].parameters() if id(p) in emb) if pl[-1] is not None else 0
            matmul = sum(p.numel() for _, p in named) - sum(emb.values()) + shared
            blocks = n_layer
        else:
            emb_n = sum(p.numel() for p in mod.layers[0].parameters()) if start == 0 else 0
            matmul = sum(p.numel() for _, p in named) - emb_n
            last = n_layers_total if n_layers_total is not None else stop
            blocks = max(0, min(stop, last - 1) - max(start, 1))
        flops = 6.0 * matmul + 12.0 * blocks * seq_len * hidden
        stages.append(StageShape(i, named, flops, blocks))
    params = sum(p.numel() for p in model.parameters())
    return ModelShape(name, params, n_layer, hidden, n_head, vocab, seq_len, stages)


# -- networks ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transfer:
    """One operation as the comm layer performs it, seen from one rank."""

    channel: str
    nbytes: int  # bytes this rank sends (ByteMeter convention)
    rounds: int  # sequential message rounds (each pays the latency)
    node_bytes: int = 0  # bytes leaving this rank's node through the NICs (0: stays inside)


@dataclass(frozen=True)
class LinkNetwork:
    """One link per rank, as :class:`commtrain.comm.LinkModel`: ``bandwidth_bps`` None = infinite."""

    bandwidth_bps: float | None
    latency_s: float
    name: str = "link"

    def time_s(self, t: Transfer) -> float:
        s = self.latency_s * t.rounds
        if self.bandwidth_bps is not None:
            s += 8.0 * t.nbytes / self.bandwidth_bps
        return s

    def describe(self) -> str:
        bw = "inf" if self.bandwidth_bps is None else f"{self.bandwidth_bps / 1e9:g} Gbit/s"
        return f"{self.name} ({bw}, {self.latency_s * 1e6:g} us)"


@dataclass(frozen=True)
class NodeNetwork:
    """GPUs in nodes: a per-GPU intra-node link and shared NICs per node."""

    hardware: HardwareProfile
    interconnect: Interconnect
    ports: int

    @property
    def gpus_per_node(self) -> int:
        return self.hardware.gpus_per_node

    def time_s(self, t: Transfer) -> float:
        hw = self.hardware
        if t.node_bytes:
            lat = self.interconnect.latency_s
            nic = self.interconnect.bandwidth_bps * self.ports
            return lat * t.rounds + max(8.0 * t.nbytes / hw.intra_bandwidth_bps, 8.0 * t.node_bytes / nic)
        return hw.intra_latency_s * t.rounds + 8.0 * t.nbytes / hw.intra_bandwidth_bps

    def describe(self) -> str:
        return f"{self.hardware.name} ({self.ports}x {self.interconnect.name} per node)"


def _as_link_network(link) -> LinkNetwork:
    if isinstance(link, LinkNetwork):
        return link
    if isinstance(link, str):
        from .comm.link import resolve_link

        link = resolve_link(link)
    if not hasattr(link, "latency_s") or not hasattr(link, "bandwidth_bps"):
        raise TypeError(f"link={link!r} is invalid; allowed: a LinkModel (bandwidth_bps, latency_s), a profile name "
                        f"or a spec such as '1gbit,50us'")
    bw = link.bandwidth_bps
    if bw is not None:
        _check_pos("link.bandwidth_bps", bw)
    if isinstance(link.latency_s, bool) or not isinstance(link.latency_s, (int, float)) or link.latency_s < 0:
        raise ValueError(f"link.latency_s={link.latency_s!r} is invalid; allowed: a number >= 0")
    return LinkNetwork(None if bw is None else float(bw), float(link.latency_s), getattr(link, "name", "") or "link")


# -- collectives, mirrored from commtrain.comm (per group rank) ------------------------------------
@dataclass(frozen=True)
class Group:
    """Global ranks of one process group, and how many GPUs share a node (0: one link per rank)."""

    ranks: tuple[int, ...]
    gpus_per_node: int = 0

    @property
    def size(self) -> int:
        return len(self.ranks)

    def node(self, r: int) -> int:
        return self.ranks[r] // self.gpus_per_node if self.gpus_per_node else self.ranks[r]

    def spans_nodes(self) -> bool:
        return self.gpus_per_node > 0 and len({self.node(r) for r in range(self.size)}) > 1

    def off_node(self, r: int, j: int) -> bool:
        return self.gpus_per_node > 0 and self.node(r) != self.node(j)


def _ring(channel: str, g: Group, nbytes: int, rounds: int) -> Transfer:
    # A ring's edge out of a node carries what one rank sends.
    return Transfer(channel, nbytes, rounds, nbytes if g.spans_nodes() else 0)


def all_to_all(channel: str, g: Group, sizes: Sequence[int]) -> list[Transfer]:
    """Rank r sends ``sizes[j]`` bytes to every j != r (the compressed reduce-scatter's exchange)."""
    p = g.size
    out = []
    for r in range(p):
        nbytes = sum(sizes) - sizes[r]
        node = 0
        if g.gpus_per_node:  # every member on r's node sends its off-node chunks through the NICs
            node = sum(sizes[j] for q in range(p) if g.node(q) == g.node(r) for j in range(p) if g.off_node(q, j))
        out.append(Transfer(channel, nbytes, p - 1, node))
    return out


def all_gather(channel: str, g: Group, sizes: Sequence[int]) -> list[Transfer]:
    """Rank r's packet of ``sizes[r]`` bytes to all: ``(p-1) * sizes[r]`` in ``p-1`` rounds."""
    p = g.size
    return [_ring(channel, g, (p - 1) * sizes[r], p - 1) for r in range(p)]


def ring_all_reduce(channel: str, g: Group, payload: int) -> list[Transfer]:
    p = g.size
    return [_ring(channel, g, 2 * (p - 1) * payload // p, 2 * (p - 1))] * p


def reduce_scatter(channel: str, g: Group, numel: int, codec, dtype) -> list[Transfer]:
    sizes = [codec.payload_nbytes(hi - lo, dtype) for lo, hi in chunk_bounds(numel, g.size)]
    return all_to_all(channel, g, sizes)


def all_reduce(channel: str, g: Group, numel: int, codec, dtype) -> list[list[Transfer]]:
    """The operations of ``Communicator.all_reduce`` (one list of per-rank transfers per op)."""
    if g.size == 1 or numel == 0:
        return []
    if codec.summable_dtype(dtype) is not None:
        return [ring_all_reduce(channel, g, codec.payload_nbytes(numel, dtype))]
    sizes = [codec.payload_nbytes(hi - lo, dtype) for lo, hi in chunk_bounds(numel, g.size)]
    return [all_to_all(channel, g, sizes), all_gather(channel, g, sizes)]


def powersgd_all_reduces(g: Group, codec, params: Sequence[torch.Tensor]) -> list[list[Transfer]]:
    """PowerSGDReducer on one bucket: all-reduce of [P factors + raw tensors], then of Q factors (fp32)."""
    none = build_codec("none")
    p_numel = q_numel = 0
    for t in params:
        n = t.shape[0] if t.dim() >= 2 else 0
        m = t.numel() // n if n else 0
        if t.dim() >= 2 and t.numel() > 0 and codec.compresses(n, m):
            r = min(codec.rank, n, m)
            p_numel, q_numel = p_numel + n * r, q_numel + m * r
        else:
            p_numel += t.numel()
    ops = all_reduce("grad", g, p_numel, none, torch.float32)
    if q_numel:
        ops += all_reduce("grad", g, q_numel, none, torch.float32)
    return ops


# -- prediction -------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """Predicted per-step figures. ``wire_bytes`` and ``comm_s`` are global rank 0's, as its
    ByteMeter counts them (bytes sent, modeled link seconds per channel); the step time uses
    the slowest rank of every operation."""

    step_s: float
    tokens_per_s: float
    compute_s: float  # the slowest stage's compute for one step (all microbatches), no bubble
    bubble_s: float
    exposed_comm_s: float  # step_s - compute_s - bubble_s
    comm_s: dict[str, float]
    wire_bytes: dict[str, int]
    tokens_per_step: int
    flops_per_token: float
    params: int
    world_size: int
    pp: int
    dp: int
    microbatches: int
    zero_stage: int
    codecs: dict[str, str]
    network: str
    overlap: bool
    memory_gb: float  # rough per-GPU estimate (weights, grads, AdamW state, activations)
    usd_per_hour: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_usd(self) -> float | None:
        return None if not self.usd_per_hour else self.tokens_per_s * 3600.0 / self.usd_per_hour

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_usd"] = self.tokens_per_usd
        return d


def _codecs(codecs: Mapping[str, Any] | None) -> dict[str, Any]:
    codecs = dict(codecs or {})
    unknown = set(codecs) - set(CHANNELS)
    if unknown:
        raise ValueError(f"codecs has unknown channel(s) {sorted(unknown)}; allowed: {', '.join(CHANNELS)}")
    out = {}
    for ch in CHANNELS:
        spec = codecs.get(ch)
        out[ch] = build_codec("none" if spec is None else spec)
    return out


def _memory_gb(shape: ModelShape, stage: StageShape, dp: int, zero: int, mb: int, inflight: int,
               act_itemsize: int, last: bool) -> float:
    n = stage.numel
    # fp32 weights + grads + AdamW (m, v) = 16 B/param; ZeRO shards the optimizer side.
    states = {0: 16.0 * n, 1: 8.0 * n + 8.0 * n / dp + 4.0 * n / dp, 2: 4.0 * n + 16.0 * n / dp}[zero]
    T, Cw, H = shape.seq_len, max(shape.hidden, 1), max(shape.n_head, 1)
    # Korthikanti et al. 2022: ~(34 + 5 a T / C) * T * C bytes per layer per sequence (16-bit,
    # no recomputation); scaled to the activation dtype.
    acts = stage.n_blocks * T * Cw * (34 + 5 * H * T / Cw) * mb * inflight * act_itemsize / 2
    if last:
        acts += 2 * mb * T * shape.vocab_size * 4 * inflight  # logits + their gradient, fp32
    return (states + acts) / 1e9


def predict_step(
    model: str | torch.nn.Module | ModelShape,
    *,
    global_batch: int,
    seq_len: int,
    pp: int = 1,
    dp: int = 1,
    microbatches: int = 1,
    zero_stage: int = 0,
    codecs: Mapping[str, Any] | None = None,
    hardware: str | HardwareProfile | None = None,
    nodes: int | None = None,
    interconnect: str | Interconnect | None = None,
    link: Any = None,
    precision: str = "bf16",
    mfu: float = 0.4,
    overlap: bool = True,
    compute_s_measured: float | None = None,
    bucket_mb: float = 4.0,
    min_numel: int = 4096,
    grad_dtype: torch.dtype = torch.float32,
    act_dtype: torch.dtype = torch.float32,
    balance: str = "layers",
    codec_speed: Mapping[str, CodecSpeed] | None = None,
    codec_shares_compute: bool = False,
    optimizer_s: float = 0.0,
) -> Prediction:
    """Predict one training step; see the module docstring for the formulas.

    ``global_batch``: sequences per step over all data-parallel replicas (the trainer's
    ``train.batch_size * dp``). ``codecs``: ``{"grad": spec, "act": spec, "act_grad": spec,
    "param": spec}`` (missing = ``none``). The network is ``link`` (one link per rank, as
    the throttled trainer) or ``hardware`` (+ ``nodes``, ``interconnect`` overriding its NIC
    profile). ``compute_s_measured`` (seconds of one step's compute on one rank, no
    communication) replaces the FLOP-based compute time.

    ``codec_speed``: measured codec speeds keyed by codec spec (``"none"``, ``"fp16"``,
    ``"quant:bits=4,group=128"``, ...; see :func:`measure_codec_speed`): the gradient codec
    work is then part of every bucket's reduction, and with ``codec_shares_compute`` it also
    slows the compute it overlaps with. ``optimizer_s``: seconds of the compute (included in
    ``compute_s_measured``) that run after the reduction (the optimizer step).
    """
    _check_int("global_batch", global_batch, 1)
    _check_int("pp", pp, 1)
    _check_int("dp", dp, 1)
    _check_int("microbatches", microbatches, 1)
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage={zero_stage!r} is invalid; allowed: {', '.join(map(str, ZERO_STAGES))}")
    if zero_stage and pp > 1:
        raise ValueError(f"zero_stage={zero_stage} with pp={pp}: ZeRO is supported with pp=1 only (as in the trainer)")
    _check_pos("mfu", mfu, 1.0)
    _check_pos("bucket_mb", bucket_mb)
    _check_int("min_numel", min_numel, 0)
    if global_batch % (dp * microbatches):
        raise ValueError(f"global_batch={global_batch} is invalid; allowed: a multiple of dp * microbatches = "
                         f"{dp} * {microbatches}")
    if compute_s_measured is not None:
        _check_pos("compute_s_measured", compute_s_measured)
    if isinstance(optimizer_s, bool) or not isinstance(optimizer_s, (int, float)) or optimizer_s < 0:
        raise ValueError(f"optimizer_s={optimizer_s!r} is invalid; allowed: a number >= 0")
    if codec_speed is not None:
        if not isinstance(codec_speed, Mapping) or not all(isinstance(v, CodecSpeed) for v in codec_speed.values()):
            raise TypeError(f"codec_speed={codec_speed!r} is invalid; allowed: a mapping codec spec -> CodecSpeed")
        codec_speed = {build_codec(k).spec: v for k, v in codec_speed.items()}
    if (link is None) == (hardware is None):
        raise ValueError("give exactly one of link= (one simulated link per rank) or hardware= (a profile in "
                         f"configs/hardware: {', '.join(available_hardware())})")
    world = pp * dp
    codec = _codecs(codecs)
    shape = model if isinstance(model, ModelShape) else describe_model(model, seq_len, pp, balance)
    if len(shape.stages) != pp or shape.seq_len != seq_len:
        raise ValueError(f"model shape was described for pp={len(shape.stages)}, seq_len={shape.seq_len}; "
                         f"this prediction needs pp={pp}, seq_len={seq_len}")

    # -- network ------------------------------------------------------------------------------
    hw: HardwareProfile | None = None
    if hardware is not None:
        hw = hardware if isinstance(hardware, HardwareProfile) else load_hardware(hardware)
        need = -(-world // hw.gpus_per_node)
        nodes = need if nodes is None else _check_int("nodes", nodes, 1)
        if not (nodes - 1) * hw.gpus_per_node < world <= nodes * hw.gpus_per_node:
            raise ValueError(f"nodes={nodes} is invalid for pp*dp={world} GPUs with {hw.gpus_per_node} per node; "
                             f"allowed: {need}")
        ic = hw.inter_link if interconnect is None else (
            interconnect if isinstance(interconnect, Interconnect) else load_interconnect(interconnect))
        net = NodeNetwork(hw, ic, hw.inter_ports)
        gpn = hw.gpus_per_node
    else:
        net, gpn = _as_link_network(link), 0

    # -- compute ------------------------------------------------------------------------------
    tokens_step = global_batch * seq_len
    tokens_replica = tokens_step // dp
    mb = global_batch // dp // microbatches
    if compute_s_measured is not None:
        worst = max(s.flops_per_token for s in shape.stages)
        stage_compute = [compute_s_measured * s.flops_per_token / worst for s in shape.stages]
    else:
        if hw is None:
            raise ValueError("compute_s_measured is required with link= (there is no hardware profile to take "
                             "peak FLOP/s from)")
        rate = hw.peak_flops(precision) * mfu
        stage_compute = [tokens_replica * s.flops_per_token / rate for s in shape.stages]
    compute = max(stage_compute)
    if optimizer_s >= compute:
        raise ValueError(f"optimizer_s={optimizer_s!r} is invalid; allowed: less than the step's compute ({compute:g} s)")

    def speed_of(wire) -> CodecSpeed | None:
        if codec_speed is None:
            return None
        if wire.spec not in codec_speed:
            raise ValueError(f"codec_speed has no entry for codec {wire.spec!r}; it has: {', '.join(sorted(codec_speed))}")
        return codec_speed[wire.spec]

    # -- communication, per stage's dp group -----------------------------------------------------------
    from .parallel.buckets import build_buckets

    comm_rank0 = dict.fromkeys(CHANNELS, 0.0)
    bytes_rank0 = dict.fromkeys(CHANNELS, 0)

    def cost(ops: list[list[Transfer]], record: bool) -> list[float]:
        """Per-op time (slowest rank); rank 0's bytes/seconds go to the meter mirror."""
        times = []
        for op in ops:
            times.append(max(net.time_s(t) for t in op))
            if record:
                bytes_rank0[op[0].channel] += op[0].nbytes
                comm_rank0[op[0].channel] += net.time_s(op[0])
        return times

    grad_times_by_stage, frac_by_stage, param_times = [], [], []
    segments_by_stage: list[list[list[tuple[str, float]]]] = []
    for s in shape.stages:
        g = Group(tuple(s.index * dp + r for r in range(dp)), gpn)
        record = s.index == 0
        pad = dp if zero_stage else 1
        buckets = build_buckets(s.named_params, bucket_mb, min_numel, pad_to=pad) if dp > 1 else []
        times, done, fracs, segs = [], 0, [], []
        for b in buckets:
            lossless = getattr(codec["grad"], "lossless", False)
            wire = codec["grad"] if b.compress and not lossless else build_codec("none")
            if getattr(wire, "needs_own_collective", False):
                if zero_stage:
                    raise ValueError(f"codecs['grad']={wire.spec!r} runs its own collective; not with ZeRO "
                                     f"(zero_stage={zero_stage})")
                ops = powersgd_all_reduces(g, wire, b.params)
            elif zero_stage == 2:
                ops = [reduce_scatter("grad", g, b.numel, wire, torch.float32)]
            else:
                ops = all_reduce("grad", g, b.numel, wire, torch.float32 if zero_stage else b.dtype)
            link_t = cost(ops, record)
            kind = "compressed" if len(ops) == 2 and not getattr(wire, "needs_own_collective", False) else "ring"
            cpu = _codec_segments(kind, g.size, b.numel, torch.empty((), dtype=b.dtype).element_size(), speed_of(wire))
            if kind != "compressed" and len(link_t) > 1:  # PowerSGD: its all-reduces back to back
                link_t = [sum(link_t)]
            segs.append(_interleave(cpu, link_t))
            times.append(sum(link_t) + sum(cpu))
            done += b.used
            fracs.append(done / max(s.numel, 1))
        if zero_stage == 2 and dp > 1:  # the global grad norm: one fp32 scalar, summed
            extra_t = sum(cost(all_reduce("grad", g, 1, build_codec("none"), torch.float32), record))
            times[-1] += extra_t
            segs[-1] = segs[-1] + [("link", extra_t)]
        if zero_stage and dp > 1:
            pc = codec["param"]
            for b in buckets:
                wire = pc if b.compress else build_codec("none")
                sizes = [wire.payload_nbytes(b.numel // dp, torch.float32)] * dp
                param_times.append(sum(cost([all_gather("param", g, sizes)], record)))
        grad_times_by_stage.append(times)
        frac_by_stage.append(fracs)
        segments_by_stage.append(segs)

    # Pipeline p2p per microbatch: act forward from stage s to s+1, act_grad back.
    p2p = [0.0] * pp
    if pp > 1:
        act_shape = (mb, seq_len, shape.hidden)
        for s in range(pp):
            ts = 0.0
            if s < pp - 1:
                t = Transfer("act", codec["act"].payload_nbytes(math.prod(act_shape), act_dtype), 1,
                             0)
                t = _p2p_node(t, s * dp, (s + 1) * dp, gpn)
                ts += net.time_s(t)
                if s == 0:
                    bytes_rank0["act"] += microbatches * t.nbytes
                    comm_rank0["act"] += microbatches * net.time_s(t)
            if s > 0:
                t = Transfer("act_grad", codec["act_grad"].payload_nbytes(math.prod(act_shape), act_dtype), 1, 0)
                t = _p2p_node(t, s * dp, (s - 1) * dp, gpn)
                ts += net.time_s(t)
            p2p[s] = ts

    # -- the step -----------------------------------------------------------------------------
    grad_total = max((sum(t) for t in grad_times_by_stage), default=0.0)
    param_total = sum(param_times)
    bubble = 0.0
    if pp > 1:
        per_mb = [c / microbatches for c in stage_compute]
        slot = max((max(c, x) if overlap else c + x) for c, x in zip(per_mb, p2p))
        pipeline = (microbatches + pp - 1) * slot
        bubble = (pp - 1) * max(per_mb)
        step = pipeline + grad_total
    elif zero_stage or not overlap:
        step = compute + grad_total + param_total
    else:
        # Buckets become ready during the last microbatch's backward and go through the
        # reducer's one worker (codec work, then the FIFO link) in order.
        model_s = compute - optimizer_s
        bwd_last = (2.0 / 3.0) * model_s / microbatches
        step = simulate_overlap(model_s - bwd_last, bwd_last, frac_by_stage[0], segments_by_stage[0],
                                optimizer_s=optimizer_s, shared=codec_shares_compute)

    inflight = [min(microbatches, pp - s) for s in range(pp)]
    mem = max(_memory_gb(shape, s, dp, zero_stage, mb, inflight[s.index], act_dtype.itemsize, s.index == pp - 1)
              for s in shape.stages)
    usd = None
    if hw is not None and hw.price_per_hour is not None:
        usd = hw.price_per_hour * nodes
    return Prediction(
        step_s=step, tokens_per_s=tokens_step / step, compute_s=compute, bubble_s=bubble,
        exposed_comm_s=max(step - compute - bubble, 0.0), comm_s=comm_rank0, wire_bytes=bytes_rank0,
        tokens_per_step=tokens_step, flops_per_token=shape.flops_per_token, params=shape.params,
        world_size=world, pp=pp, dp=dp, microbatches=microbatches, zero_stage=zero_stage,
        codecs={ch: (codecs or {}).get(ch) if isinstance((codecs or {}).get(ch), str) else c.spec
                for ch, c in codec.items()}, network=net.describe(), overlap=overlap,
        memory_gb=mem, usd_per_hour=usd,
        extra={"nodes": nodes, "hardware": hw.name if hw else None, "category": hw.category if hw else None,
               "precision": hw.precision_used(precision) if hw else None, "mfu": mfu if hw else None,
               "fits_memory": (mem <= hw.memory_gb) if hw else None,
               "codec_s": sum(c for segs in segments_by_stage[:1] for b in segs for k, c in b if k == "cpu")},
    )


def _p2p_node(t: Transfer, src: int, dst: int, gpn: int) -> Transfer:
    if gpn and src // gpn != dst // gpn:
        return Transfer(t.channel, t.nbytes, t.rounds, t.nbytes)
    return t


# -- `commtrain compare` ------------------------------------------------------------------------------
def split_codec_list(text: str) -> list[str]:
    """``"none,quant:bits=4,group=128,fp16"`` -> ``["none", "quant:bits=4,group=128", "fp16"]``.

    A comma starts a new spec unless the next item is ``key=value`` (a parameter of the spec
    before it): codec names never contain ``=``.
    """
    specs: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and specs:
            specs[-1] += "," + item
        else:
            specs.append(item)
    if not specs:
        raise ValueError(f"--codecs {text!r} is invalid; expected e.g. 'none,quant:bits=4,group=128'")
    return specs


def _fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def format_table(rows: list[Prediction]) -> str:
    head = ("hardware", "nodes", "gpus", "grad codec", "step ms", "compute ms", "exposed comm ms",
            "grad MB/rank", "tokens/s", "$/h", "tokens/$", "mem GB", "fits")
    lines = [head]
    for r in rows:
        lines.append((
            str(r.extra["hardware"]), str(r.extra["nodes"]), str(r.world_size), r.codecs["grad"],
            f"{r.step_s * 1e3:.1f}", f"{r.compute_s * 1e3:.1f}", f"{r.exposed_comm_s * 1e3:.1f}",
            f"{r.wire_bytes['grad'] / 1e6:.1f}", _fmt_rate(r.tokens_per_s),
            "-" if r.usd_per_hour is None else f"{r.usd_per_hour:.2f}", _fmt_rate(r.tokens_per_usd),
            f"{r.memory_gb:.1f}", "yes" if r.extra["fits_memory"] else "NO",
        ))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot_comparison(rows: list[Prediction], path: str, title: str) -> None:
    """Two panels: tokens/s and tokens per dollar, one bar per (hardware, codec); consumer
    boxes hatched, servers solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hws = list(dict.fromkeys(r.extra["hardware"] for r in rows))
    codecs = list(dict.fromkeys(r.codecs["grad"] for r in rows))
    by = {(r.extra["hardware"], r.codecs["grad"]): r for r in rows}
    width = 0.8 / max(len(codecs), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(hws) * 2), 4.8))
    for ax, metric, label in ((axes[0], "tokens_per_s", "tokens / s"), (axes[1], "tokens_per_usd", "tokens / $")):
        for j, c in enumerate(codecs):
            xs, ys, hatches = [], [], []
            for i, h in enumerate(hws):
                r = by.get((h, c))
                v = None if r is None else (r.tokens_per_s if metric == "tokens_per_s" else r.tokens_per_usd)
                if v is None:
                    continue
                xs.append(i + (j - (len(codecs) - 1) / 2) * width)
                ys.append(v)
                hatches.append("//" if r.extra["category"] == "consumer" else "")
            bars = ax.bar(xs, ys, width, label=c, color=colors[j % len(colors)], edgecolor="black", linewidth=0.5)
            for bar, hatch in zip(bars, hatches):
                bar.set_hatch(hatch)
        ax.set_xticks(range(len(hws)))
        cats = {r.extra["hardware"]: r.extra["category"] for r in rows}
        ax.set_xticklabels([f"{h}\n({cats[h]})" for h in hws], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(title="gradient codec (hatched: consumer)", fontsize=7, title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_main(argv: list[str] | None = None) -> int:
    """``commtrain compare``: predict tokens/s and tokens/$ for hardware x gradient codec."""
    ap = argparse.ArgumentParser(prog="commtrain compare", description=compare_main.__doc__)
    ap.add_argument("--model", default="gpt2-124m", help="built-in preset (default gpt2-124m)")
    ap.add_argument("--hardware", default=None,
                    help=f"comma-separated profiles from configs/hardware (default: all: {','.join(available_hardware())})")
    ap.add_argument("--nodes", type=int, default=1, help="nodes per setup (all GPUs of each node are used)")
    ap.add_argument("--interconnect", default=None, help="override the inter-node NIC profile (configs/hardware/links)")
    ap.add_argument("--codecs", default="none,fp16,quant:bits=8,group=128,quant:bits=4,group=128",
                    help="gradient codecs to compare, comma-separated specs")
    ap.add_argument("--batch", type=int, default=64, help="global batch in sequences (same for every setup)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--zero", type=int, default=0, choices=ZERO_STAGES)
    ap.add_argument("--act-codec", default="none")
    ap.add_argument("--act-grad-codec", default="none")
    ap.add_argument("--param-codec", default="none")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--mfu", type=float, default=0.4, help="achieved fraction of dense peak FLOP/s (default 0.4)")
    ap.add_argument("--no-overlap", action="store_true", help="do not overlap gradient reduction with backward")
    ap.add_argument("--bucket-mb", type=float, default=4.0)
    ap.add_argument("--out", default="compare.png", help="PNG plot path ('' to skip)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write all predictions as JSON")
    args = ap.parse_args(argv)
    try:
        hws = split_list(args.hardware) if args.hardware else available_hardware()
        codecs = split_codec_list(args.codecs)
        rows = []
        for h in hws:
            hw = load_hardware(h)
            world = args.nodes * hw.gpus_per_node
            if world % args.pp:
                raise ValueError(f"--pp {args.pp} does not divide the {world} GPUs of {args.nodes} x {h}")
            for c in codecs:
                rows.append(predict_step(
                    args.model, global_batch=args.batch, seq_len=args.seq_len, pp=args.pp, dp=world // args.pp,
                    microbatches=args.microbatches, zero_stage=args.zero,
                    codecs={"grad": c, "act": args.act_codec, "act_grad": args.act_grad_codec, "param": args.param_codec},
                    hardware=hw, nodes=args.nodes, interconnect=args.interconnect, precision=args.precision,
                    mfu=args.mfu, overlap=not args.no_overlap, bucket_mb=args.bucket_mb,
                    # Mixed precision: activations (memory, pipeline sends) in the compute dtype;
                    # gradients stay fp32 (fp32 master parameters).
                    act_dtype=ACT_DTYPES[args.precision],
                ))
    except ValueError as e:
        print(f"commtrain compare: {e}")
        return 2
    title = (f"{args.model}, global batch {args.batch} x {args.seq_len} tokens, {args.nodes} node(s), pp={args.pp}, "
             f"mfu={args.mfu}, {'no overlap' if args.no_overlap else 'overlap'}")
    print(title)
    print(format_table(rows))
    if args.out:
        plot_comparison(rows, args.out, title)
        print(f"plot: {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "predictions": [r.to_dict() for r in rows]}, f, indent=1)
        print(f"json: {args.json}")
    return 0


def split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]
