"""Predict one training step: compute, the wire operations of every channel, and the step time.

:func:`predict_step` is a pipeline of small steps:

1. :func:`_network`: one link per rank (``link=``) or GPUs in nodes (``hardware=``);
2. :func:`_stage_compute`: seconds of one step's compute per stage, from FLOPs
   (``FLOPs / (dense peak * mfu)``) or from a measured ``compute_s_measured``;
3. :func:`_reduce_stage`, per stage's data-parallel group: the trainer's gradient buckets
   (:func:`commtrain.parallel.buckets.build_buckets` on the stage's real parameter shapes)
   and, per bucket, the wire operations of :mod:`.network` -- a summable codec's ring
   all-reduce, any other codec's reduce-scatter + all-gather, PowerSGD's two fp32
   all-reduces, ZeRO-2's reduce-scatter (plus the global gradient norm's one fp32 scalar),
   and ZeRO's parameter all-gather on the ``param`` channel. Payload sizes come from the
   registry codec's ``payload_nbytes`` through :mod:`commtrain.comm.price`;
4. :func:`_pipeline_p2p`: per microbatch and stage boundary one activation ``(mb, T, C)``
   forward (``act``) and one activation gradient backward (``act_grad``);
5. :func:`_step_time`: data parallel (pp=1) with overlap is simulated event by event
   (:func:`.overlap.simulate_overlap`); pipelines take ``(m + pp - 1)`` slots of the slowest
   stage's per-microbatch compute (and p2p, added or overlapped), a bubble fraction of
   ``(pp - 1) / (m + pp - 1)``, then the gradient reduction (the reducer runs after the
   flush); ZeRO reduces after backward and gathers after the optimizer step (no overlap).
   Overlap never makes a prediction slower.
6. :func:`_outer_sync` (``sync={"strategy": "diloco", ...}``): no per-step gradient reduction;
   every ``inner_steps`` (H) steps each fragment's pseudo-gradient is all-reduced with
   ``sync.codec`` (the same buckets and wire operations as the trainer's
   :class:`~commtrain.parallel.sync.DiLoCo`). Figures are per *inner* step: bytes = one round
   of all fragments / H; the sync's exposed time per round is its full time without overlap,
   and ``max(0, sync - overlap_steps * inner step)`` per fragment with it; the step time is
   the compute (and pipeline) time plus the exposed time / H.

``wire_bytes`` and ``comm_s`` are global rank 0's, as its ByteMeter counts them (bytes sent,
modeled link seconds per channel); the step time uses the slowest rank of every operation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

from ..comm.meter import CHANNELS
from ..compress import build_codec
from .checks import check_int, check_non_negative, check_pos
from .hardware import HardwareProfile, Interconnect, available_hardware, load_hardware, load_interconnect
from .memory import stage_memory_gb
from .network import Group, NodeNetwork, Transfer, all_gather_flat, all_reduce, as_link_network, p2p, \
    powersgd_all_reduces, reduce_scatter
from .overlap import CodecSpeed, codec_segments, interleave, simulate_overlap
from .shapes import ModelShape, StageShape, describe_model

ZERO_STAGES = (0, 1, 2)
ACT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bubble_fraction(pp: int, microbatches: int) -> float:
    """Idle fraction of a GPipe/1F1B pipeline: ``(pp - 1) / (m + pp - 1)``."""
    check_int("pp", pp, 1)
    check_int("microbatches", microbatches, 1)
    return (pp - 1) / (microbatches + pp - 1)


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
    sync: Mapping[str, Any] | None = None,
) -> Prediction:
    """Predict one training step; see the module docstring for the steps.

    ``global_batch``: sequences per step over all data-parallel replicas (the trainer's
    ``train.batch_size * dp``). ``codecs``: ``{"grad": spec, "act": spec, "act_grad": spec,
    "param": spec}`` (missing = ``none``). The network is ``link`` (one link per rank, as
    the throttled trainer) or ``hardware`` (+ ``nodes``, ``interconnect`` overriding its NIC
    profile). ``compute_s_measured`` (seconds of one step's compute on one rank, no
    communication) replaces the FLOP-based compute time.

    ``codec_speed``: measured codec speeds keyed by codec spec (``"none"``, ``"fp16"``,
    ``"quant:bits=4,group=128"``, ...; see :func:`.overlap.measure_codec_speed`): the gradient
    codec work is then part of every bucket's reduction, and with ``codec_shares_compute`` it
    also slows the compute it overlaps with. ``optimizer_s``: seconds of the compute (included
    in ``compute_s_measured``) that run after the reduction (the optimizer step).

    ``sync``: the ``sync`` config section's keys (``strategy``, ``inner_steps``, ``codec``,
    ``fragments``, ``overlap``, ``overlap_steps``); with ``strategy="diloco"`` the outer loop
    replaces the per-step reduction (step 6 of the module docstring) and ``extra`` carries
    ``bytes_per_inner_step``, ``sync_s`` (one round's link + codec seconds) and the exposed
    sync seconds per inner step with and without overlap.
    """
    _check_layout(global_batch, pp, dp, microbatches, zero_stage, mfu, bucket_mb, min_numel)
    if compute_s_measured is not None:
        check_pos("compute_s_measured", compute_s_measured)
    check_non_negative("optimizer_s", optimizer_s)
    speeds = _codec_speeds(codec_speed)
    if (link is None) == (hardware is None):
        raise ValueError("give exactly one of link= (one simulated link per rank) or hardware= (a hardware profile: "
                         f"{', '.join(available_hardware())}, or a path to one)")
    world = pp * dp
    codec = _codecs(codecs)
    shape = model if isinstance(model, ModelShape) else describe_model(model, seq_len, pp, balance)
    if len(shape.stages) != pp or shape.seq_len != seq_len:
        raise ValueError(f"model shape was described for pp={len(shape.stages)}, seq_len={shape.seq_len}; "
                         f"this prediction needs pp={pp}, seq_len={seq_len}")
    hw, net, nodes, gpn = _network(hardware, link, nodes, interconnect, world)

    tokens_step = global_batch * seq_len
    mb = global_batch // dp // microbatches
    stage_compute = _stage_compute(shape, tokens_step // dp, compute_s_measured, hw, precision, mfu)
    compute = max(stage_compute)
    if optimizer_s >= compute:
        raise ValueError(f"optimizer_s={optimizer_s!r} is invalid; allowed: less than the step's compute ({compute:g} s)")

    meter = _RankZeroMeter(net)
    outer = _outer_config(sync, zero_stage)
    reductions = [_reduce_stage(s, dp, gpn, zero_stage, codec, bucket_mb, min_numel, speeds, meter)
                  for s in shape.stages] if outer is None else [StageReduction() for _ in shape.stages]
    p2p_s = _pipeline_p2p(shape, codec, pp, dp, gpn, mb, microbatches, act_dtype, net, meter)
    step, bubble = _step_time(reductions, p2p_s, stage_compute, pp, microbatches, zero_stage, overlap,
                              optimizer_s, codec_shares_compute)
    outer_extra = {}
    if outer is not None:
        step, outer_extra = _outer_sync(shape, dp, gpn, outer, bucket_mb, min_numel, speeds, meter, step)

    inflight = [min(microbatches, pp - s) for s in range(pp)]
    mem = max(stage_memory_gb(shape, s, dp, zero_stage, mb, inflight[s.index], act_dtype.itemsize, s.index == pp - 1)
              for s in shape.stages)
    usd = None if hw is None or hw.price_per_hour is None else hw.price_per_hour * nodes
    return Prediction(
        step_s=step, tokens_per_s=tokens_step / step, compute_s=compute, bubble_s=bubble,
        exposed_comm_s=max(step - compute - bubble, 0.0), comm_s=meter.seconds, wire_bytes=meter.bytes,
        tokens_per_step=tokens_step, flops_per_token=shape.flops_per_token, params=shape.params,
        world_size=world, pp=pp, dp=dp, microbatches=microbatches, zero_stage=zero_stage,
        codecs={ch: (codecs or {}).get(ch) if isinstance((codecs or {}).get(ch), str) else c.spec
                for ch, c in codec.items()}, network=net.describe(), overlap=overlap,
        memory_gb=mem, usd_per_hour=usd,
        extra={"nodes": nodes, "hardware": hw.name if hw else None, "category": hw.category if hw else None,
               "precision": hw.precision_used(precision) if hw else None, "mfu": mfu if hw else None,
               "fits_memory": (mem <= hw.memory_gb) if hw else None,
               "codec_s": sum(c for b in reductions[0].segments for k, c in b if k == "cpu"), **outer_extra},
    )


# -- arguments ----------------------------------------------------------------------------------
def _check_layout(global_batch, pp, dp, microbatches, zero_stage, mfu, bucket_mb, min_numel) -> None:
    check_int("global_batch", global_batch, 1)
    check_int("pp", pp, 1)
    check_int("dp", dp, 1)
    check_int("microbatches", microbatches, 1)
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage={zero_stage!r} is invalid; allowed: {', '.join(map(str, ZERO_STAGES))}")
    if zero_stage and pp > 1:
        raise ValueError(f"zero_stage={zero_stage} with pp={pp}: ZeRO is supported with pp=1 only (as in the trainer)")
    check_pos("mfu", mfu, 1.0)
    check_pos("bucket_mb", bucket_mb)
    check_int("min_numel", min_numel, 0)
    if global_batch % (dp * microbatches):
        raise ValueError(f"global_batch={global_batch} is invalid; allowed: a multiple of dp * microbatches = "
                         f"{dp} * {microbatches}")


def _codec_speeds(codec_speed: Mapping[str, CodecSpeed] | None) -> dict[str, CodecSpeed] | None:
    """Keyed by the canonical spec of each codec (``"quant:bits=4"`` and its defaults spelled out agree)."""
    if codec_speed is None:
        return None
    if not isinstance(codec_speed, Mapping) or not all(isinstance(v, CodecSpeed) for v in codec_speed.values()):
        raise TypeError(f"codec_speed={codec_speed!r} is invalid; allowed: a mapping codec spec -> CodecSpeed")
    return {build_codec(k).spec: v for k, v in codec_speed.items()}


def _codecs(codecs: Mapping[str, Any] | None) -> dict[str, Any]:
    codecs = dict(codecs or {})
    unknown = set(codecs) - set(CHANNELS)
    if unknown:
        raise ValueError(f"codecs has unknown channel(s) {sorted(unknown)}; allowed: {', '.join(CHANNELS)}")
    # "auto" (compression.act=auto) is decided at run time from measurements: priced as raw here
    return {ch: build_codec("none" if codecs.get(ch) in (None, "auto") else codecs[ch]) for ch in CHANNELS}


# -- network and compute --------------------------------------------------------------------------
def _network(hardware, link, nodes, interconnect, world: int):
    """(hardware profile or None, network, nodes, GPUs per node -- 0 for one link per rank)."""
    if hardware is None:
        return None, as_link_network(link), nodes, 0
    hw = hardware if isinstance(hardware, HardwareProfile) else load_hardware(hardware)
    need = -(-world // hw.gpus_per_node)
    nodes = need if nodes is None else check_int("nodes", nodes, 1)
    if not (nodes - 1) * hw.gpus_per_node < world <= nodes * hw.gpus_per_node:
        raise ValueError(f"nodes={nodes} is invalid for pp*dp={world} GPUs with {hw.gpus_per_node} per node; "
                         f"allowed: {need}")
    ic = hw.inter_link if interconnect is None else (
        interconnect if isinstance(interconnect, Interconnect) else load_interconnect(interconnect))
    return hw, NodeNetwork(hw, ic, hw.inter_ports), nodes, hw.gpus_per_node


def _stage_compute(shape: ModelShape, tokens_replica: int, measured: float | None, hw: HardwareProfile | None,
                   precision: str, mfu: float) -> list[float]:
    """Seconds of one step's compute (all microbatches) on each stage."""
    if measured is not None:  # the slowest stage took ``measured``; the others in FLOP proportion
        worst = max(s.flops_per_token for s in shape.stages)
        return [measured * s.flops_per_token / worst for s in shape.stages]
    if hw is None:
        raise ValueError("compute_s_measured is required with link= (there is no hardware profile to take "
                         "peak FLOP/s from)")
    rate = hw.peak_flops(precision) * mfu
    return [tokens_replica * s.flops_per_token / rate for s in shape.stages]


class _RankZeroMeter:
    """What global rank 0's ByteMeter would count: bytes sent and modeled link seconds per channel."""

    def __init__(self, net):
        self.net = net
        self.bytes = dict.fromkeys(CHANNELS, 0)
        self.seconds = dict.fromkeys(CHANNELS, 0.0)

    def add(self, t: Transfer, times: int = 1) -> None:
        self.bytes[t.channel] += times * t.nbytes
        self.seconds[t.channel] += times * self.net.time_s(t)

    def cost(self, ops: list[list[Transfer]], record: bool) -> list[float]:
        """Seconds of each operation (its slowest rank); rank 0's part is metered if ``record``."""
        times = []
        for op in ops:
            times.append(max(self.net.time_s(t) for t in op))
            if record:
                self.add(op[0])
        return times


# -- gradients (and ZeRO's parameters), per stage ---------------------------------------------------
@dataclass
class StageReduction:
    """One stage's data-parallel reduction: per gradient bucket its seconds (codec + link), the
    fraction of the stage's parameters whose gradients exist once it is ready, and its worker
    segments; and the seconds of each parameter all-gather (ZeRO)."""

    grad_s: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    segments: list[list[tuple[str, float]]] = field(default_factory=list)
    param_s: list[float] = field(default_factory=list)


def _reduce_stage(s: StageShape, dp: int, gpn: int, zero_stage: int, codec: dict, bucket_mb: float,
                  min_numel: int, speeds: dict | None, meter: _RankZeroMeter) -> StageReduction:
    from ..parallel.buckets import build_buckets

    g = Group(tuple(s.index * dp + r for r in range(dp)), gpn)
    record = s.index == 0  # global rank 0 is in stage 0's group
    buckets = build_buckets(s.named_params, bucket_mb, min_numel, pad_to=dp if zero_stage else 1) if dp > 1 else []
    red, done = StageReduction(), 0
    for b in buckets:
        wire = codec["grad"] if b.compress and not getattr(codec["grad"], "lossless", False) else build_codec("none")
        own = bool(getattr(wire, "needs_own_collective", False))
        ops = _grad_ops(g, b, wire, zero_stage)
        link_t = meter.cost(ops, record)
        kind = "compressed" if len(ops) == 2 and not own else "ring"
        itemsize = torch.empty((), dtype=b.dtype).element_size()
        cpu = codec_segments(kind, g.size, b.numel, itemsize, _speed_of(speeds, wire))
        if kind != "compressed" and len(link_t) > 1:  # PowerSGD: its all-reduces back to back
            link_t = [sum(link_t)]
        red.segments.append(interleave(cpu, link_t))
        red.grad_s.append(sum(link_t) + sum(cpu))
        done += b.used
        red.ready.append(done / max(s.numel, 1))
    if zero_stage == 2 and dp > 1:  # the global grad norm: one fp32 scalar, summed
        extra_t = sum(meter.cost(all_reduce("grad", g, 1, build_codec("none"), torch.float32), record))
        red.grad_s[-1] += extra_t
        red.segments[-1] = red.segments[-1] + [("link", extra_t)]
    if zero_stage and dp > 1:  # updated shards gathered into the parameters
        for b in buckets:
            wire = codec["param"] if b.compress else build_codec("none")
            ops = all_gather_flat("param", g, [b.numel // dp] * dp, wire, torch.float32)
            red.param_s.append(sum(meter.cost(ops, record)))
    return red


def _grad_ops(g: Group, b, wire, zero_stage: int) -> list[list[Transfer]]:
    """The wire operations that reduce gradient bucket ``b`` with codec ``wire``."""
    if getattr(wire, "needs_own_collective", False):
        if zero_stage:
            raise ValueError(f"codecs['grad']={wire.spec!r} runs its own collective; not with ZeRO "
                             f"(zero_stage={zero_stage})")
        return powersgd_all_reduces(g, wire, b.params)
    if zero_stage == 2:
        return reduce_scatter("grad", g, b.numel, wire, torch.float32)
    return all_reduce("grad", g, b.numel, wire, torch.float32 if zero_stage else b.dtype)


def _speed_of(speeds: dict | None, wire) -> CodecSpeed | None:
    if speeds is None:
        return None
    if wire.spec not in speeds:
        raise ValueError(f"codec_speed has no entry for codec {wire.spec!r}; it has: {', '.join(sorted(speeds))}")
    return speeds[wire.spec]


# -- the outer loop (DiLoCo): pseudo-gradient syncs every H inner steps ------------------------------
def _outer_config(sync: Mapping[str, Any] | None, zero_stage: int) -> dict[str, Any] | None:
    if sync is None or sync.get("strategy", "step") == "step":
        return None
    from ..parallel.sync import SyncConfig

    cfg = SyncConfig(**{"strategy": "diloco", **dict(sync)})
    cfg.validate()
    if zero_stage:
        raise ValueError(f"sync strategy diloco with zero_stage={zero_stage}: not supported (as in the trainer)")
    return dict(H=cfg.inner_steps, F=cfg.fragments, codec=build_codec(cfg.codec),
                tau=cfg.overlap_steps if cfg.overlap else 0)


def _outer_sync(shape: ModelShape, dp: int, gpn: int, outer: dict, bucket_mb: float, min_numel: int,
                speeds: dict | None, meter: _RankZeroMeter, inner_step_s: float) -> tuple[float, dict]:
    """(step seconds per inner step, extra figures). Rank 0's meter gets one round / H."""
    from ..parallel.sync.diloco import DiLoCo

    H, tau, codec = outer["H"], outer["tau"], outer["codec"]
    per_fragment = [0.0] * outer["F"]  # the slowest stage's seconds per fragment sync
    round_meter = _RankZeroMeter(meter.net)
    for s in shape.stages:
        g = Group(tuple(s.index * dp + r for r in range(dp)), gpn)
        if dp == 1:
            continue
        for f, frag in enumerate(DiLoCo._split(s.named_params, outer["F"], bucket_mb, min_numel)):
            t = 0.0
            for b in frag:
                wire = codec if b.compress and not codec.lossless else build_codec("none")
                ops = all_reduce("grad", g, b.numel, wire, torch.float32)
                link_t = round_meter.cost(ops, s.index == 0)
                kind = "ring" if wire.summable_dtype(torch.float32) is not None else "compressed"
                t += sum(link_t) + sum(codec_segments(kind, g.size, b.numel, 4, _speed_of(speeds, wire)))
            per_fragment[f] = max(per_fragment[f], t)
    for ch in CHANNELS:  # per inner step: one round spread over H steps
        meter.bytes[ch] += round_meter.bytes[ch] // H
        meter.seconds[ch] += round_meter.seconds[ch] / H
    exposed_sync = sum(per_fragment)  # without overlap: every sync blocks
    exposed_overlap = sum(max(0.0, t - tau * inner_step_s) for t in per_fragment)
    exposed = exposed_overlap if tau else exposed_sync
    return inner_step_s + exposed / H, {
        "sync": f"diloco H={H} F={outer['F']} codec={codec.spec} overlap_steps={tau}",
        "bytes_per_inner_step": sum(round_meter.bytes.values()) / H,
        "sync_s": sum(per_fragment), "exposed_sync_s_per_step": exposed / H,
        "exposed_sync_s_per_step_no_overlap": exposed_sync / H,
        "exposed_sync_s_per_step_overlap": exposed_overlap / H if tau else None,
    }


# -- pipeline p2p and the step ------------------------------------------------------------------------
def _pipeline_p2p(shape: ModelShape, codec: dict, pp: int, dp: int, gpn: int, mb: int, microbatches: int,
                  act_dtype: torch.dtype, net, meter: _RankZeroMeter) -> list[float]:
    """Seconds of p2p per microbatch on each stage: its activation forward to stage s+1 and its
    activation gradient back to stage s-1 (rank 0, stage 0, only sends activations)."""
    times = [0.0] * pp
    if pp == 1:
        return times
    numel = math.prod((mb, shape.seq_len, shape.hidden))
    for s in range(pp):
        if s < pp - 1:
            t = p2p("act", codec["act"].payload_nbytes(numel, act_dtype), s * dp, (s + 1) * dp, gpn)
            times[s] += net.time_s(t)
            if s == 0:
                meter.add(t, microbatches)
        if s > 0:
            t = p2p("act_grad", codec["act_grad"].payload_nbytes(numel, act_dtype), s * dp, (s - 1) * dp, gpn)
            times[s] += net.time_s(t)
    return times


def _step_time(reductions: list[StageReduction], p2p_s: list[float], stage_compute: list[float], pp: int,
               microbatches: int, zero_stage: int, overlap: bool, optimizer_s: float,
               shared: bool) -> tuple[float, float]:
    """(step seconds, bubble seconds)."""
    grad_total = max((sum(r.grad_s) for r in reductions), default=0.0)
    compute = max(stage_compute)
    if pp > 1:
        per_mb = [c / microbatches for c in stage_compute]
        slot = max((max(c, x) if overlap else c + x) for c, x in zip(per_mb, p2p_s))
        return (microbatches + pp - 1) * slot + grad_total, (pp - 1) * max(per_mb)
    if zero_stage or not overlap:
        return compute + grad_total + sum(p for r in reductions for p in r.param_s), 0.0
    # Buckets become ready during the last microbatch's backward and go through the
    # reducer's one worker (codec work, then the FIFO link) in order.
    model_s = compute - optimizer_s
    bwd_last = (2.0 / 3.0) * model_s / microbatches
    step = simulate_overlap(model_s - bwd_last, bwd_last, reductions[0].ready, reductions[0].segments,
                            optimizer_s=optimizer_s, shared=shared)
    return step, 0.0
