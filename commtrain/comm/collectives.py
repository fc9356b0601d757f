"""Compressed collectives over a :class:`Wire`, written once for every codec.

Compressed all-reduce = reduce-scatter then all-gather on compressed chunks (the CGX /
ZeRO++ qgZ / 1-bit Adam pattern)::

    flat -> p chunks -> compress the p-1 chunks owned by others -> all-to-all of packets
         -> own chunk (exact) + decompressed peers' chunks, summed in fp32   [reduce-scatter]
         -> compress the reduced chunk -> all-gather packets -> decompress all  [all-gather]

Chunking: ``n`` elements split into ``p`` contiguous chunks of ``ceil(n / p)`` elements;
the last chunks are shorter or empty (n=7, p=4: 2, 2, 2, 1; n=1, p=4: 1, 0, 0, 0).
Chunk ``j`` is reduced by rank ``j``.

Own chunk: in the reduce-scatter a rank adds its own contribution exactly (it never
crosses the wire, so compressing it would only add error). In the all-gather every rank,
the owner included, uses the *decompressed* reduced chunk, so that all ranks end with
bit-identical results (replicas must not drift apart).

Summable codecs (``none``, ``fp16``, ``bf16``) skip all this: one plain ``dist.all_reduce``
on the payload in its wire dtype. For ``none`` this is exactly ``dist.all_reduce`` (mean
= sum / p, computed after the sum). For lossy casts the mean is pre-divided by p before
the cast, as DDP's fp16 hook does, so that a sum of p fp16 values cannot overflow.
"""
from __future__ import annotations

import torch

from . import protocol as C
from .price import chunk_bounds, chunk_payloads
from .protocol import WireCodec
from .wire import Wire

__all__ = ["all_gather_packets", "all_reduce", "chunk_bounds", "reduce_scatter"]


def reduce_scatter(wire: Wire, flat: torch.Tensor, codec: WireCodec, channel: str, op: str, key: str | None) -> torch.Tensor:
    """This rank's chunk of the sum (or mean) over ranks, in fp32."""
    p, r, dtype = wire.world_size, wire.rank, flat.dtype
    bounds = chunk_bounds(flat.numel(), p)
    sizes = chunk_payloads(codec, flat.numel(), dtype, p)

    payloads, send_splits = [], []
    for j, (lo, hi) in enumerate(bounds):
        if j == r:
            send_splits.append(0)
            continue
        payload = C.compress(codec, flat[lo:hi], key, f"rs/{j}")
        if payload.numel() != sizes[j]:
            raise RuntimeError(f"codec {codec!r}: packet of {payload.numel()} bytes, payload_nbytes says {sizes[j]}")
        payloads.append(payload)
        send_splits.append(sizes[j])
    send = torch.cat(payloads) if payloads else flat.new_empty(0, dtype=torch.uint8)
    recv_splits = [0 if i == r else sizes[r] for i in range(p)]
    received = wire.all_to_all(send, send_splits, recv_splits, channel).split(recv_splits)

    lo, hi = bounds[r]
    acc = flat[lo:hi].to(torch.float32, copy=True)
    for i in range(p):
        if i != r:
            acc += C.decompress(codec, received[i], (hi - lo,), dtype).float()
    if op == "mean":
        acc /= p
    return acc


def all_gather_packets(wire: Wire, part: torch.Tensor, numels: list[int], codec: WireCodec, channel: str,
                       key: str | None) -> list[torch.Tensor]:
    """Every rank's ``part`` (rank i's has ``numels[i]`` elements), decompressed, flat."""
    dtype = part.dtype
    sizes = [codec.payload_nbytes(n, dtype) for n in numels]
    payload = C.compress(codec, part, key, "ag")
    if payload.numel() != sizes[wire.rank]:
        raise RuntimeError(f"codec {codec!r}: packet of {payload.numel()} bytes, payload_nbytes says {sizes[wire.rank]}")
    payloads = wire.all_gather(payload, sizes, channel)
    return [C.decompress(codec, payloads[i], (numels[i],), dtype) for i in range(wire.world_size)]


def all_reduce(wire: Wire, t: torch.Tensor, codec: WireCodec, channel: str, op: str, key: str | None) -> torch.Tensor:
    p = wire.world_size
    wire_dtype = codec.summable_dtype(t.dtype)  # the path price.all_reduce prices too
    if wire_dtype is not None:
        return _summable_all_reduce(wire, t, codec, wire_dtype, channel, op, key)
    flat = t.reshape(-1)
    mine = reduce_scatter(wire, flat, codec, channel, op, key).to(t.dtype)
    numels = [hi - lo for lo, hi in chunk_bounds(flat.numel(), p)]
    parts = all_gather_packets(wire, mine, numels, codec, channel, key)
    return torch.cat(parts).reshape(t.shape)


def _summable_all_reduce(wire, t, codec, wire_dtype, channel, op, key):
    p = wire.world_size
    pre_divide = op == "mean" and not codec.lossless
    x = t / p if pre_divide else t
    buf = C.compress(codec, x, key, "ar").view(wire_dtype)
    if buf.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        buf = buf.clone()  # ``none`` packs by reinterpreting memory: never reduce into t itself
    wire.all_reduce(buf, channel)
    out = C.decompress(codec, buf.view(torch.uint8), t.shape, t.dtype)
    if op == "mean" and not pre_divide:
        out = out / p
    return out
