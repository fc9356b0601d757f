"""Compressed collectives and p2p on real gloo process groups (2 and 4 ranks, loopback).

Every distributed result is compared against plain torch.distributed (compression off:
exactly; lossy codecs: within their error bound), and the byte meter against the bytes
actually handed to torch.distributed, counted by wrapping the torch calls themselves.
"""
from __future__ import annotations

import time

import pytest
import torch

from commtrain.comm import CHANNELS, ByteMeter, Handle
from commtrain.comm.collectives import chunk_bounds
from commtrain.compress import ErrorFeedback, available_codecs, build_codec

from dist_utils import NonSummable, run_ranks

SIZES = (1, 7, 1003)


class KeyRecorder(NonSummable):
    """ErrorFeedback stand-in: records the ``key=`` it is given."""

    def __init__(self, spec):
        super().__init__(spec)
        self.keys = []

    def compress(self, x, *, key=None):
        self.keys.append(key)
        return self.codec.compress(x)


def _data(rank, n, dtype=torch.float32, salt=0):
    g = torch.Generator().manual_seed(1000 * salt + 17 * rank + n)
    return torch.randn(n, generator=g).to(dtype)


def _count_wire_bytes(rank, world):
    """Wrap the torch.distributed calls the wire makes; tally bytes this rank hands over for peers."""
    import torch.distributed as dist

    from commtrain.comm.wire import ALL_GATHER

    sent = {"n": 0}
    orig = {k: getattr(dist, k) for k in ("all_to_all_single", ALL_GATHER, "all_reduce", "send")}

    def a2a(out, inp, out_splits=None, in_splits=None, **kw):
        sent["n"] += (sum(in_splits) - in_splits[rank]) * inp.element_size()
        return orig["all_to_all_single"](out, inp, out_splits, in_splits, **kw)

    def ag(out, inp, **kw):
        sent["n"] += (world - 1) * inp.numel() * inp.element_size()
        return orig[ALL_GATHER](out, inp, **kw)

    def ar(t, *a, **kw):  # ring volume: 2 (p-1) / p of the payload
        sent["n"] += 2 * (world - 1) * t.numel() * t.element_size() // world
        return orig["all_reduce"](t, *a, **kw)

    def send(t, *a, **kw):
        sent["n"] += t.numel() * t.element_size()
        return orig["send"](t, *a, **kw)

    for k, fn in (("all_to_all_single", a2a), (ALL_GATHER, ag), ("all_reduce", ar), ("send", send)):
        setattr(dist, k, fn)
    return sent, lambda: [setattr(dist, k, v) for k, v in orig.items()]


def _collectives(rank, world):
    import torch.distributed as dist

    from commtrain.comm import Communicator

    comm = Communicator(timeout_s=60)
    sent, restore = _count_wire_bytes(rank, world)
    out = {}
    for n in SIZES:
        x = _data(rank, n)
        ref_sum = x.clone()
        dist.all_reduce(ref_sum)  # unpatched reference would also count: subtract below
        sent["n"] -= 2 * (world - 1) * ref_sum.numel() * 4 // world
        ref_mean = ref_sum / world
        none = build_codec("none")
        # (1) none == dist.all_reduce, exactly, on the summable path
        s = comm.all_reduce(x, none, op="sum")
        m = comm.all_reduce(x, none, op="mean")
        assert torch.equal(s, ref_sum) and torch.equal(m, ref_mean), n
        assert s.data_ptr() != x.data_ptr() and torch.equal(x, _data(rank, n)), "input must be untouched"
        # (2) the compressed reduce-scatter/all-gather path with a lossless codec
        y = comm.all_reduce(x, NonSummable("none"), op="sum")
        if world == 2:  # a + b is the same number in any order
            assert torch.equal(y, ref_sum), n
        torch.testing.assert_close(y, ref_sum, rtol=1e-6, atol=1e-6)
        # (3) lossy: fp16 summable and via reduce-scatter/all-gather
        bound = (world + 2) * 2.0**-11 * sum(_data(r, n).abs() for r in range(world)) + 1e-7
        for codec in (build_codec("fp16"), NonSummable("fp16")):
            for op, ref in (("sum", ref_sum), ("mean", ref_mean)):
                z = comm.all_reduce(x, codec, op=op)
                scale = 1 if op == "sum" else world
                assert z.dtype == x.dtype and z.shape == x.shape
                assert ((z - ref).abs() <= bound / scale).all(), (n, op, (z - ref).abs().max())
        out[f"fp16/{n}"] = comm.all_reduce(x, NonSummable("fp16"), op="mean")
        for spec, tol in (("quant:bits=8", 0.02), ("quant:bits=4", 0.25)):
            if spec.split(":")[0] in available_codecs() and n > 1:
                z = comm.all_reduce(x, build_codec(spec), op="mean")
                rel = ((z - ref_mean).norm() / ref_mean.norm()).item()
                assert rel < tol, (spec, n, rel)
                out[f"{spec}/{n}"] = z
        # (4) reduce_scatter: this rank's ceil(n/p) chunk of the sum (the last may be empty)
        lo, hi = chunk_bounds(n, world)[rank]
        rs = comm.reduce_scatter(x, none, channel="grad", op="sum")
        assert rs.shape == (hi - lo,)
        torch.testing.assert_close(rs, ref_sum[lo:hi], rtol=1e-6, atol=1e-6)
        rs16 = comm.reduce_scatter(x.view(1, n), build_codec("fp16"), channel="grad", op="mean")
        assert ((rs16 - ref_mean[lo:hi]).abs() <= bound[lo:hi] / world).all()
        # (5) all_gather: peers' tensors, own entry is t itself
        parts = comm.all_gather(x.view(n, 1), none, channel="param")
        assert parts[rank] is not None and parts[rank].data_ptr() == x.data_ptr()
        for r in range(world):
            assert torch.equal(parts[r], _data(r, n).view(n, 1))
        parts16 = comm.all_gather(x, build_codec("fp16"), channel="param")
        for r in range(world):
            assert torch.equal(parts16[r], _data(r, n) if r == rank else _data(r, n).half().float())
    # (6) all_gather_flat with uneven shards (ZeRO's short last shard) and an empty one
    numels = [5, 3, 0, 2][:world] if world == 4 else [4, 1]
    shard = _data(rank, numels[rank], salt=3)
    full = torch.cat([_data(r, numels[r], salt=3) for r in range(world)])
    assert torch.equal(comm.all_gather_flat(shard, build_codec("none"), channel="param", numels=numels), full)
    g16 = comm.all_gather_flat(shard, build_codec("fp16"), channel="param", numels=numels)
    assert torch.equal(g16, full.half().float())  # own shard decompressed too: identical on all ranks
    out["g16"] = g16
    # (7) async handles overlap: several in flight, completed in order
    xs = [_data(rank, 257, salt=k) for k in range(3)]
    hs = [comm.all_reduce(v, NonSummable("fp16"), op="sum", async_op=True) for v in xs]
    assert all(isinstance(h, Handle) for h in hs)
    for k, h in enumerate(hs):
        assert torch.equal(h.wait(), comm.all_reduce(xs[k], NonSummable("fp16"), op="sum"))
        assert h.is_completed()
    # (8) error-feedback-style keyed codecs get one key per chunk and phase
    rec = KeyRecorder("fp16")
    comm.all_reduce(_data(rank, 10), rec, op="mean", key="w")
    assert rec.keys == [f"w/rs/{j}" for j in range(world) if j != rank] + ["w/ag"], rec.keys
    with pytest.raises(ValueError, match="key=None"):
        comm.all_reduce(_data(rank, 10), ErrorFeedback(NonSummable("fp16").codec))
    # (9) meter == bytes handed to torch.distributed; and == the formula for one compressed all-reduce
    assert comm.meter.total() == sent["n"] and comm.meter.bytes["grad"] + comm.meter.bytes["param"] == sent["n"]
    before = comm.meter.total()
    n = 1003
    comm.all_reduce(_data(rank, n), NonSummable("fp16"))
    lens = [hi - lo for lo, hi in chunk_bounds(n, world)]
    expect = sum(2 * lens[j] for j in range(world) if j != rank) + (world - 1) * 2 * lens[rank]
    assert comm.meter.total() - before == expect == sent["n"] - before
    # (10) the price list is what the wire meters, for every collective and codec path
    from commtrain.comm import price

    for spec in ("none", "fp16", "quant:bits=4,group=64"):
        for codec in (build_codec(spec), NonSummable(spec)):
            for n in (1, 7, 1003):
                b0 = comm.meter.total()
                comm.all_reduce(_data(rank, n), codec, key="p")
                assert comm.meter.total() - b0 == price.rank_total(price.all_reduce(codec, n, torch.float32, world), rank).nbytes
                b0 = comm.meter.total()
                comm.reduce_scatter(_data(rank, n), codec)
                assert comm.meter.total() - b0 == price.rank_total(price.reduce_scatter(codec, n, torch.float32, world), rank).nbytes
    numels = [5, 3, 0, 2][:world] if world == 4 else [4, 1]
    b0 = comm.meter.total()
    comm.all_gather_flat(_data(rank, numels[rank]), build_codec("fp16"), numels=numels)
    assert comm.meter.total() - b0 == price.rank_total(price.all_gather_flat(build_codec("fp16"), numels, torch.float32), rank).nbytes
    restore()
    comm.barrier()
    comm.close()
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("world", [2, 4])
def test_collectives(world):
    outs = run_ranks(_collectives, world, timeout=120)
    for key in outs[0]:  # replicas must not drift: every rank holds the same bits
        for r in range(1, world):
            assert torch.equal(outs[0][key], outs[r][key]), (key, r)


def _p2p(rank, world):
    from commtrain.comm import Communicator

    comm = Communicator(timeout_s=30)
    sent, restore = _count_wire_bytes(rank, world)
    peer = 1 - rank
    shape = (3, 5, 7)
    mine, theirs = _data(rank, 105).view(shape), _data(peer, 105).view(shape)
    none, fp16 = build_codec("none"), build_codec("fp16")
    # round trip, both directions at once: each rank posts its recv *before* its send. With
    # a single worker (or blocking calls) both ranks would wait in recv forever.
    hr = comm.recv(shape, torch.float32, peer, none, channel="act", async_op=True)
    hs = comm.send(mine, peer, none, channel="act", async_op=True)
    got = hr.wait()
    hs.wait()
    assert torch.equal(got, theirs)
    hr = comm.recv(shape, torch.float32, peer, fp16, channel="act_grad", async_op=True)
    comm.send(mine, peer, fp16, channel="act_grad")
    assert torch.equal(hr.wait(), theirs.half().float())
    # bf16 tensors and an empty one (gloo sends wait for the matching recv, so send async first)
    hs = comm.send(mine.bfloat16(), peer, none, channel="act", async_op=True)
    assert torch.equal(comm.recv(shape, torch.bfloat16, peer, none, channel="act"), theirs.bfloat16())
    hs.wait()
    comm.send(torch.empty(0, 4), peer, none, channel="act")
    assert comm.recv((0, 4), torch.float32, peer, none, channel="act").shape == (0, 4)
    assert comm.meter.bytes["act"] == 105 * 4 + 105 * 2 and comm.meter.bytes["act_grad"] == 105 * 2
    assert comm.meter.ops["act"] == 3 and comm.meter.total() == sent["n"]
    # packets of a known size: the layer above encodes and decodes, comm moves the bytes
    payload = fp16.compress(mine).payload
    hr = comm.recv_packet(payload.numel(), peer, channel="act", async_op=True)
    comm.send_packet(payload, peer, channel="act")
    assert torch.equal(hr.wait(), fp16.compress(theirs).payload)
    with pytest.raises(TypeError, match="uint8"):
        comm.send_packet(mine, peer, channel="act")
    # argument errors are clear and raised in the caller
    for bad, match in (
        (lambda: comm.send(mine, rank, none, channel="act"), "dst"),
        (lambda: comm.send(mine, 5, none, channel="act"), "dst"),
        (lambda: comm.send(mine, peer, none, channel="weights"), "channel"),
        (lambda: comm.all_reduce(mine, none, op="max"), "op"),
        (lambda: comm.all_reduce(mine, "fp16"), "codec"),
        (lambda: comm.all_reduce(torch.ones(3, dtype=torch.long), none), "floating"),
        (lambda: comm.recv(shape, torch.int32, peer, none), "dtype"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            bad()
    restore()
    comm.barrier()
    comm.close()
    return True


def test_p2p_round_trip_and_concurrent_send_recv():
    assert run_ranks(_p2p, 2, timeout=60) == [True, True]


def _dead_peer(rank, world):
    from commtrain.comm import Communicator

    comm = Communicator(timeout_s=20)
    if rank == 1:
        return None  # exits without joining the collective
    t0 = time.monotonic()
    try:
        comm.all_reduce(torch.ones(1000), NonSummable("fp16"))
    except (RuntimeError, TimeoutError) as e:
        return time.monotonic() - t0, type(e).__name__, str(e)[:200]
    return "no error"


def test_dead_peer_times_out_instead_of_hanging():
    res, _ = run_ranks(_dead_peer, 2, timeout=60, pg_timeout=10)
    assert res != "no error", "all_reduce with a dead peer returned normally"
    elapsed, kind, msg = res
    assert elapsed < 25, (elapsed, kind, msg)


def test_meter_is_thread_safe_and_complete():
    import threading

    m = ByteMeter()
    assert set(m.bytes) == set(CHANNELS) and m.total() == 0
    threads = [threading.Thread(target=lambda: [m.add("grad", 3, modeled_s=0.5) for _ in range(1000)]) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    snap = m.snapshot(reset=True)
    assert snap["bytes"]["grad"] == 12000 and snap["ops"]["grad"] == 4000 and snap["total_bytes"] == 12000
    assert snap["modeled_s"]["grad"] == pytest.approx(2000.0)
    assert m.total() == 0
    m.add("grad", 5)  # lifetime bytes survive the per-step reset (a span across steps is their difference)
    assert m.lifetime_bytes["grad"] == 12005 and m.bytes["grad"] == 5
    with pytest.raises(ValueError, match="channel"):
        m.add("weights", 1)
    with pytest.raises(ValueError, match="nbytes"):
        m.add("grad", -1)


def test_chunk_bounds():
    assert chunk_bounds(7, 4) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert chunk_bounds(1, 4) == [(0, 1), (1, 1), (1, 1), (1, 1)]
    assert chunk_bounds(0, 2) == [(0, 0), (0, 0)]
    assert chunk_bounds(8, 2) == [(0, 4), (4, 8)]


def _stalled_peer(rank, world):
    from commtrain.comm import Communicator

    comm = Communicator(timeout_s=30)
    if rank == 1:
        time.sleep(8)  # alive, connected, but never joins: only a timeout can end rank 0's wait
        return None
    t0 = time.monotonic()
    try:
        comm.all_reduce(torch.ones(1000), NonSummable("fp16"))
    except (RuntimeError, TimeoutError) as e:
        return time.monotonic() - t0, type(e).__name__
    return "no error"


def test_stalled_peer_hits_the_process_group_timeout():
    res, _ = run_ranks(_stalled_peer, 2, timeout=60, pg_timeout=3)
    assert res != "no error"
    assert 2.5 < res[0] < 7.5, res


def test_loopback_runs_the_real_collective_and_prices_it():
    """A mirrored group of p replicas in one process: no network, same codec work, the price
    list's bytes in the meter and the link's seconds for them."""
    from commtrain.comm import Communicator, LinkModel, price

    link = LinkModel.parse("100mbit,1ms")
    for p in (2, 4):
        loop = Communicator.loopback(p, link)
        x = _data(0, 4 * 1000)
        for codec in (build_codec("none"), build_codec("fp16"), build_codec("quant:bits=8,group=64")):
            b0, s0 = loop.meter.total(), loop.meter.snapshot()["total_modeled_s"]
            y = loop.all_reduce(x, codec, key="w")
            ops = price.all_reduce(codec, x.numel(), x.dtype, p)
            assert loop.meter.total() - b0 == price.rank_total(ops, 0).nbytes
            assert loop.meter.snapshot()["total_modeled_s"] - s0 == pytest.approx(price.seconds(ops, link))
            assert y.shape == x.shape and bool(torch.isfinite(y).all())
            if codec.summable_dtype(x.dtype) is not None:  # a plain all-reduce: the mean over replicas is x
                tol = 0 if codec.lossless else 1e-3
                assert ((y - x).norm() / x.norm()).item() <= tol, codec.spec
        loop.close()
