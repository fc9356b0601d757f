"""Throughput model and hardware profiles: pure and fast, except one 2-rank gloo run that checks
the predicted wire bytes against the price list and the byte meter of the real syncs."""
from __future__ import annotations

import json

import pytest
import torch

from commtrain.compress import build_codec
from commtrain.perfmodel.hardware import available_hardware, available_interconnects, load_hardware, load_interconnect
from commtrain.models import ModelConfig, build_model
from commtrain.parallel.buckets import build_buckets
from commtrain.perfmodel import (
    LinkNetwork, bubble_fraction, compare_main, describe_model, predict_step, split_codec_list,
)

SLOW = LinkNetwork(1e8, 0.0, "100mbit-no-latency")


def _chunks(n, p):
    c = -(-n // p)
    return [max(0, min(n, (j + 1) * c) - min(n, j * c)) for j in range(p)]


def test_grad_bytes_are_the_registry_codecs_bytes_over_the_real_buckets():
    """Rank 0's predicted gradient bytes = sum over the trainer's buckets of what the codec
    really emits: p-1 peer chunks (all-to-all) + p-1 copies of the own chunk (all-gather);
    plain buckets: the ring's 2(p-1)/p of fp32."""
    p, spec = 4, "quant:bits=4,group=128"
    codec = build_codec(spec)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="gpt-micro"))
    expected = 0
    for b in build_buckets(model.named_parameters(), 4.0, 4096):
        if b.compress:
            chunks = _chunks(b.numel, p)
            expected += sum(codec.wire_nbytes(n) for n in chunks[1:]) + (p - 1) * codec.wire_nbytes(chunks[0])
        else:
            expected += 2 * (p - 1) * 4 * b.numel // p
    # and the wire bytes really are what compress() produces for such a chunk
    x = torch.randn(_chunks(1000, 3)[0])
    assert codec.compress(x).nbytes == codec.wire_nbytes(x.numel())
    pred = predict_step("gpt-micro", global_batch=8, seq_len=64, dp=p, codecs={"grad": spec},
                        link=SLOW, compute_s_measured=0.1)
    assert pred.wire_bytes["grad"] == expected
    assert pred.wire_bytes["act"] == pred.wire_bytes["param"] == 0
    none = predict_step("gpt-micro", global_batch=8, seq_len=64, dp=p, link=SLOW, compute_s_measured=0.1)
    n_params = sum(q.numel() for q in model.parameters())
    assert none.wire_bytes["grad"] == pytest.approx(2 * (p - 1) / p * 4 * n_params, abs=p * 8)
    assert pred.wire_bytes["grad"] < none.wire_bytes["grad"] / 5


@pytest.mark.parametrize("spec", ["fp16", "quant:bits=8,group=128", "quant:bits=4,group=128", "topk:ratio=0.01"])
def test_comm_time_scales_with_wire_bytes(spec):
    base = predict_step("gpt-mini", global_batch=8, seq_len=64, dp=8, link=SLOW, compute_s_measured=0.1)
    comp = predict_step("gpt-mini", global_batch=8, seq_len=64, dp=8, codecs={"grad": spec}, link=SLOW,
                        compute_s_measured=0.1)
    # no latency: modeled seconds are exactly bytes / bandwidth, so the ratio is the byte ratio
    for pr in (base, comp):
        assert pr.comm_s["grad"] == pytest.approx(8 * pr.wire_bytes["grad"] / 1e8, rel=1e-12)
    assert comp.comm_s["grad"] / base.comm_s["grad"] == pytest.approx(
        comp.wire_bytes["grad"] / base.wire_bytes["grad"], rel=1e-12)
    assert comp.step_s < base.step_s
    # latency adds latency * rounds on top, per operation
    lat = predict_step("gpt-mini", global_batch=8, seq_len=64, dp=8, codecs={"grad": spec},
                       link=LinkNetwork(1e8, 1e-3), compute_s_measured=0.1)
    assert lat.comm_s["grad"] > comp.comm_s["grad"] + 14e-3  # >= one op of 2 * 7 rounds


@pytest.mark.parametrize("hw", ["rtx3090-pcie", "dgx1-v100", "h100-nvlink"])
@pytest.mark.parametrize("spec", ["none", "quant:bits=4,group=128"])
@pytest.mark.parametrize("layout", [(1, 8, 1, 0), (1, 8, 4, 0), (2, 4, 4, 0), (4, 2, 8, 0), (1, 8, 1, 2)])
def test_overlap_never_increases_step_time(hw, spec, layout):
    pp, dp, m, zero = layout
    kw = dict(global_batch=64, seq_len=256, pp=pp, dp=dp, microbatches=m, zero_stage=zero,
              codecs={"grad": spec, "act": spec, "act_grad": spec}, hardware=hw)
    on, off = predict_step("gpt-mini", overlap=True, **kw), predict_step("gpt-mini", overlap=False, **kw)
    assert on.step_s <= off.step_s + 1e-12
    assert on.step_s >= on.compute_s + on.bubble_s - 1e-12


def test_overlap_hides_comm_that_fits_in_backward_and_not_more():
    kw = dict(global_batch=8, seq_len=64, dp=2, compute_s_measured=10.0)
    fast = predict_step("gpt-micro", link=LinkNetwork(1e12, 0.0), **kw)
    assert fast.step_s == pytest.approx(10.0, rel=1e-6)  # all buckets finish inside backward
    slow_on = predict_step("gpt-micro", link=LinkNetwork(1e5, 0.0), **kw)
    slow_off = predict_step("gpt-micro", link=LinkNetwork(1e5, 0.0), overlap=False, **kw)
    assert slow_off.step_s == pytest.approx(10.0 + slow_off.comm_s["grad"], rel=1e-9)
    assert 10.0 + slow_on.comm_s["grad"] * 0.5 < slow_on.step_s < slow_off.step_s


@pytest.mark.parametrize("pp,m", [(2, 1), (2, 4), (4, 8), (4, 3)])
def test_pipeline_bubble(pp, m):
    assert bubble_fraction(pp, m) == (pp - 1) / (m + pp - 1)
    pred = predict_step("gpt-micro", global_batch=m, seq_len=64, pp=pp, microbatches=m,
                        link=LinkNetwork(None, 0.0), compute_s_measured=1.0)
    assert pred.step_s == pytest.approx((m + pp - 1) / m)
    assert pred.bubble_s / pred.step_s == pytest.approx(bubble_fraction(pp, m))
    with pytest.raises(ValueError, match="microbatches"):
        bubble_fraction(2, 0)


def test_activation_bytes_per_microbatch_and_boundary():
    spec, m, mb, T = "quant:bits=4,group=64", 4, 2, 64
    pred = predict_step("gpt-micro", global_batch=m * mb, seq_len=T, pp=2, microbatches=m,
                        codecs={"act": spec}, link=SLOW, compute_s_measured=1.0)
    C = describe_model("gpt-micro", T).hidden
    assert pred.wire_bytes["act"] == m * build_codec(spec).wire_nbytes((mb, T, C))
    assert pred.wire_bytes["act_grad"] == 0  # rank 0 is the first stage: it only receives gradients
    # p2p time per microbatch adds to the slot without overlap
    off = predict_step("gpt-micro", global_batch=m * mb, seq_len=T, pp=2, microbatches=m, codecs={"act": spec},
                       link=SLOW, compute_s_measured=1.0, overlap=False)
    assert off.step_s > pred.step_s


def test_zero_param_gather_bytes():
    p, spec = 4, "quant:bits=8,group=256"
    codec = build_codec(spec)
    pred = predict_step("gpt-micro", global_batch=8, seq_len=64, dp=p, zero_stage=2, codecs={"param": spec},
                        link=SLOW, compute_s_measured=0.1)
    model = build_model(ModelConfig(preset="gpt-micro"))
    expected = sum((p - 1) * (codec.wire_nbytes(b.numel // p) if b.compress else 4 * (b.numel // p))
                   for b in build_buckets(model.named_parameters(), 4.0, 4096, pad_to=p))
    assert pred.wire_bytes["param"] == expected
    with pytest.raises(ValueError, match="zero_stage"):
        predict_step("gpt-micro", global_batch=8, seq_len=64, dp=p, zero_stage=3, link=SLOW, compute_s_measured=1)


def test_flops_formula_and_stage_split():
    shape = describe_model("gpt2-124m", 1024)
    model = build_model(ModelConfig(preset="gpt-nano"))  # cheap real model for the count check
    nano = describe_model(model, 128)
    cfg = model.config
    wpe = cfg.block_size * cfg.n_embd  # position embedding: a lookup, no matmul
    n = sum(q.numel() for q in model.parameters())
    assert nano.flops_per_token == 6 * (n - wpe) + 12 * cfg.n_layer * 128 * cfg.n_embd
    # the split keeps the total (the untied head copy is a matmul either way)
    for pp in (2, 4):
        assert describe_model("gpt2-124m", 1024, pp).flops_per_token == pytest.approx(shape.flops_per_token)
    assert shape.params == 124439808


def test_hardware_profiles_load_with_sources():
    assert {"rtx3090-pcie", "rtx4090-pcie", "dgx1-v100", "dgx-a100", "h100-nvlink"} <= set(available_hardware())
    assert {"1gbe", "10gbe", "100gbe", "infiniband-hdr", "infiniband-ndr"} <= set(available_interconnects())
    for name in available_hardware():
        hw = load_hardware(name)
        assert hw.sources["tflops"] and hw.peak_flops("bf16") > 0
    assert load_hardware("dgx-a100").peak_flops("bf16") == 312e12
    v100 = load_hardware("dgx1-v100")
    assert v100.precision_used("bf16") == "fp16" and v100.peak_flops("bf16") == 125e12
    assert load_interconnect("infiniband-hdr").bandwidth_bps == 200e9
    assert load_hardware("dgx-a100").inter_bandwidth_bps == 8 * 200e9


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.replace("memory_gb: 24\n", ""), "memory_gb"),
    (lambda t: t.replace("bf16: 71", "bf16: -3"), "tflops.bf16"),
    (lambda t: t.replace("bandwidth: 13GB/s", "bandwidth: 13gbps"), "intra_node.bandwidth"),
    (lambda t: t.replace("link: 10gbe", "link: 7gbe"), "inter_node.link"),
    (lambda t: t.replace("category: consumer", "category: gamer"), "category"),
    (lambda t: t.replace("  memory_gb: [NVIDIA GeForce RTX 3090 product page (24 GB GDDR6X)]\n", ""), "sources.memory_gb"),
])
def test_invalid_profile_names_file_and_field(tmp_path, edit, match):
    from commtrain.perfmodel.hardware import HARDWARE_DIR

    bad = tmp_path / "bad.yaml"
    bad.write_text(edit((HARDWARE_DIR / "rtx3090-pcie.yaml").read_text()))
    with pytest.raises(ValueError, match=match) as e:
        load_hardware(str(bad))
    assert str(bad) in str(e.value)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="rtx3090-pcie"):
        load_hardware("gtx1080")
    with pytest.raises(ValueError, match="valid codecs"):
        predict_step("gpt-micro", global_batch=8, seq_len=64, dp=2, codecs={"grad": "zip"}, link=SLOW,
                     compute_s_measured=1)
    with pytest.raises(ValueError, match="allowed presets"):
        describe_model("gpt-huge", 64)
    with pytest.raises(ValueError, match="channel"):
        predict_step("gpt-micro", global_batch=8, seq_len=64, dp=2, codecs={"grads": "none"}, link=SLOW,
                     compute_s_measured=1)
    with pytest.raises(ValueError, match="exactly one of link"):
        predict_step("gpt-micro", global_batch=8, seq_len=64, dp=2, compute_s_measured=1)
    with pytest.raises(ValueError, match="global_batch"):
        predict_step("gpt-micro", global_batch=7, seq_len=64, dp=2, link=SLOW, compute_s_measured=1)


def test_multi_node_all_to_all_crosses_the_nics():
    kw = dict(global_batch=64, seq_len=256, dp=16, codecs={"grad": "quant:bits=4,group=128"}, overlap=False)
    slow = predict_step("gpt-mini", hardware="rtx3090-pcie", interconnect="1gbe", **kw)
    fast = predict_step("gpt-mini", hardware="rtx3090-pcie", interconnect="100gbe", **kw)
    one = predict_step("gpt-mini", hardware="rtx3090-pcie", **{**kw, "dp": 8, "global_batch": 32})
    assert slow.extra["nodes"] == 2 and one.extra["nodes"] == 1
    assert slow.wire_bytes == fast.wire_bytes
    assert slow.step_s > fast.step_s > 0
    assert one.comm_s["grad"] < slow.comm_s["grad"]


def test_split_codec_list():
    assert split_codec_list("none,quant:bits=4,group=128,fp16,topk:ratio=0.01") == [
        "none", "quant:bits=4,group=128", "fp16", "topk:ratio=0.01"]
    with pytest.raises(ValueError):
        split_codec_list(" , ")


def test_compare_main_prints_table_and_writes_png(tmp_path, capsys):
    png, js = tmp_path / "cmp.png", tmp_path / "cmp.json"
    rc = compare_main(["--model", "gpt-mini", "--seq-len", "256", "--batch", "16",
                       "--hardware", "rtx3090-pcie,dgx1-v100", "--codecs", "none,quant:bits=4,group=128",
                       "--out", str(png), "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "tokens/$" in out
    assert out.count("rtx3090-pcie") >= 2 and "quant:bits=4,group=128" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(js.read_text())["predictions"]
    assert len(rows) == 4 and all(r["tokens_per_s"] > 0 for r in rows)
    assert compare_main(["--hardware", "nope", "--out", ""]) == 2


# -- codec compute cost (calibrated CPU codecs) -------------------------------------------------
from commtrain.perfmodel import CodecSpeed, measure_codec_speed, simulate_overlap  # noqa: E402

SPEEDS = {"none": CodecSpeed(100.0, 100.0), "quant:bits=4": CodecSpeed(0.25, 2.0)}


def test_codec_cost_is_the_collectives_encode_decode_sequence():
    """Without overlap the step grows by exactly the codec work of every bucket: compressed
    all-reduce = encode the peers' chunks, decode received + encode own, decode all chunks."""
    kw = dict(global_batch=8, seq_len=64, dp=2, link=SLOW, compute_s_measured=1.0, overlap=False,
              codecs={"grad": "quant:bits=4"})
    base = predict_step("gpt-micro", **kw)
    timed = predict_step("gpt-micro", codec_speed=SPEEDS, **kw)
    shape = describe_model("gpt-micro", 64)
    expect = 0.0
    for b in build_buckets(shape.stages[0].named_params, 4.0, 4096):
        n = b.numel * 4
        if b.compress:
            own = _chunks(b.numel, 2)[0] * 4  # rank 0's chunk is the larger: the slowest rank
            s = SPEEDS["quant:bits=4"]
            expect += (n - own) / (s.encode_gbps * 1e9) + own / (s.decode_gbps * 1e9) \
                + own / (s.encode_gbps * 1e9) + n / (s.decode_gbps * 1e9)
        else:
            expect += n / 100e9 * 2
    assert timed.step_s - base.step_s == pytest.approx(expect, rel=1e-9)
    assert timed.extra["codec_s"] == pytest.approx(expect, rel=1e-9)
    assert timed.wire_bytes == base.wire_bytes  # codec speed never changes the bytes


def test_simulate_overlap_without_codec_work_is_the_fifo_chain():
    ready, links = [0.2, 0.5, 1.0], [0.3, 0.1, 0.4]
    end = 0.0
    for f, t in zip(ready, links):
        end = max(end, 1.0 + 2.0 * f) + t
    got = simulate_overlap(1.0, 2.0, ready, [[("cpu", 0.0), ("link", t), ("cpu", 0.0)] for t in links])
    assert got == pytest.approx(max(3.0, end))


def test_shared_processor_halves_both_while_busy():
    # 0.5 s of codec work starts with a 1 s backward: sharing, both run at half speed until
    # t=1 (codec done, backward half done), then backward alone for 0.5 s.
    assert simulate_overlap(0.0, 1.0, [0.0], [[("cpu", 0.5)]], shared=True) == pytest.approx(1.5)
    assert simulate_overlap(0.0, 1.0, [0.0], [[("cpu", 0.5)]], shared=False) == pytest.approx(1.0)
    # link waits do not take the processor; the optimizer runs after everything
    assert simulate_overlap(0.0, 1.0, [0.0], [[("link", 2.0)]], optimizer_s=0.1, shared=True) == pytest.approx(2.1)


def test_codec_cost_and_optimizer_in_overlapped_prediction():
    kw = dict(global_batch=8, seq_len=64, dp=2, link=LinkNetwork(1e12, 0.0), compute_s_measured=1.0,
              codecs={"grad": "quant:bits=4"})
    free = predict_step("gpt-micro", **kw)
    assert free.step_s == pytest.approx(1.0)
    own = predict_step("gpt-micro", codec_speed=SPEEDS, **kw)
    shared = predict_step("gpt-micro", codec_speed=SPEEDS, codec_shares_compute=True, **kw)
    assert free.step_s < own.step_s < shared.step_s  # the last bucket's codec work is never hidden
    assert shared.step_s <= 1.0 + shared.extra["codec_s"] + shared.comm_s["grad"] + 1e-9
    # the optimizer cannot overlap: with everything else hidden it adds nothing, but it delays the end
    late = predict_step("gpt-micro", codec_speed=SPEEDS, optimizer_s=0.5, **kw)
    assert late.step_s > own.step_s


def test_codec_speed_validation():
    kw = dict(global_batch=8, seq_len=64, dp=2, link=SLOW, compute_s_measured=1.0, codecs={"grad": "fp16"})
    with pytest.raises(ValueError, match="no entry for codec 'fp16'"):
        predict_step("gpt-micro", codec_speed=SPEEDS, **kw)
    with pytest.raises(TypeError, match="codec_speed"):
        predict_step("gpt-micro", codec_speed={"fp16": 1.0}, **kw)
    with pytest.raises(ValueError, match="optimizer_s"):
        predict_step("gpt-micro", optimizer_s=-1, **kw)
    with pytest.raises(ValueError, match="optimizer_s"):
        predict_step("gpt-micro", optimizer_s=2.0, **kw)
    with pytest.raises(ValueError, match="encode_gbps"):
        CodecSpeed(0.0, 1.0)


def test_measure_codec_speed_orders_codecs():
    none = measure_codec_speed("none", numel=1 << 16, repeats=2)
    quant = measure_codec_speed("quant:bits=4", numel=1 << 16, repeats=2)
    assert none.encode_gbps > quant.encode_gbps > 0  # a view vs quantize + error feedback


# -- predicted bytes = the price list = what a real 2-rank run meters -----------------------------
from commtrain.comm import price  # noqa: E402
from tests.dist_utils import run_ranks  # noqa: E402

BYTES_BUCKET_MB = 0.1  # gpt-nano in 5 buckets (4 compressible, 1 of small/1-D tensors)
BYTES_STEP = 10  # a steady-state step: past PowerSGD's default start_iter (exact all-reduce before it)
# (name, zero stage, grad codec, param codec)
BYTES_CASES = [
    ("dp-none", 0, "none", None),
    ("dp-quant4", 0, "quant:bits=4", None),
    ("dp-powersgd", 0, "powersgd:rank=2", None),
    ("zero2-quant4", 2, "quant:bits=4", "quant:bits=8,group=256,rounding=nearest,scheme=absmax"),
    ("zero2-none", 2, "none", None),
]


def _price_list_bytes(stage, grad_spec, param_spec, p, rank):
    """Per channel, what ``rank`` sends in one step, from commtrain.comm.price alone: the sync's
    operations over the trainer's buckets of gpt-nano."""
    model = build_model(ModelConfig(preset="gpt-nano"))
    codec, none = build_codec(grad_spec), build_codec("none")
    pc = build_codec(param_spec) if param_spec else none
    buckets = build_buckets(model.named_parameters(), BYTES_BUCKET_MB, 4096, pad_to=p if stage else 1)
    ops = {"grad": [], "param": []}
    for b in buckets:
        wire = codec if b.compress and not codec.lossless else none
        if getattr(wire, "needs_own_collective", False):  # PowerSGD: fp32 P (+ raw tensors), then Q
            pq = [0, 0]
            for t in b.params:
                n, m = t.shape[0], t.numel() // t.shape[0]
                r = min(wire.rank, n, m)
                pq = [pq[0] + n * r, pq[1] + m * r] if wire.compresses(n, m) else [pq[0] + t.numel(), pq[1]]
            ops["grad"] += [op for k in pq if k for op in price.all_reduce(none, k, torch.float32, p)]
        elif stage == 2:
            ops["grad"] += price.reduce_scatter(wire, b.numel, torch.float32, p)
        else:
            ops["grad"] += price.all_reduce(wire, b.numel, torch.float32, p)
        if stage:
            ops["param"] += price.all_gather_flat(pc if b.compress else none, [b.numel // p] * p, torch.float32)
    if stage == 2:  # the global gradient norm over disjoint shards: one fp32 scalar
        ops["grad"] += price.all_reduce(none, 1, torch.float32, p)
    return {ch: price.rank_total(o, rank).nbytes for ch, o in ops.items()}


def _metered_step_worker(rank, world):
    """One training step of gpt-nano through the real sync of each case; the meter's bytes."""
    from commtrain.comm import Communicator
    from commtrain.parallel.compression import CompressionConfig
    from commtrain.parallel.sync import build_sync

    comm = Communicator(timeout_s=60)
    out = {}
    for name, stage, grad, param in BYTES_CASES:
        torch.manual_seed(0)
        model = build_model(ModelConfig(preset="gpt-nano"))
        cc = CompressionConfig(grad=grad, param=param, policy="always")
        kw = dict(compression=cc, bucket_mb=BYTES_BUCKET_MB)
        sync = (build_sync("zero", model.named_parameters(), torch.optim.AdamW, comm, stage=stage, **kw) if stage
                else build_sync("data_parallel", model.named_parameters(), torch.optim.AdamW, comm, **kw))
        x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(rank))
        before = dict(comm.meter.bytes)
        sync.begin_step(BYTES_STEP)
        model(x[:, :-1], x[:, 1:])[1].backward()
        sync.step(max_grad_norm=1.0)
        out[name] = ({ch: comm.meter.bytes[ch] - before[ch] for ch in before},
                     set(sync.compression.bucket_codecs.values()))
        sync.close()
    comm.close()
    return out


@pytest.mark.slow
def test_predicted_wire_bytes_equal_price_list_and_real_meter():
    """For none / 4-bit quantization / PowerSGD (plain DP) and ZeRO-2 (reduce-scatter, grad-norm
    scalar, compressed parameter gather): rank 0's predicted bytes per channel == the price
    list's == the ByteMeter's in a real 2-rank gloo step; rank 1's metered == its price."""
    runs = run_ranks(_metered_step_worker, 2, timeout=240)
    for name, stage, grad, param in BYTES_CASES:
        pred = predict_step("gpt-nano", global_batch=4, seq_len=32, dp=2, zero_stage=stage,
                            codecs={"grad": grad, "param": param}, link=SLOW, compute_s_measured=1.0,
                            bucket_mb=BYTES_BUCKET_MB)
        for rank, (metered, used) in enumerate(r[name] for r in runs):
            priced = _price_list_bytes(stage, grad, param, 2, rank)
            assert metered["grad"] == priced["grad"] > 0, (name, rank)
            assert metered["param"] == priced["param"], (name, rank)
            assert metered["act"] == metered["act_grad"] == 0
            assert build_codec(grad).spec in used, (name, used)  # the codec really ran (no warm-up, no policy)
        metered0 = runs[0][name][0]
        assert pred.wire_bytes == metered0, (name, pred.wire_bytes, metered0)
        assert (pred.wire_bytes["param"] > 0) == bool(stage)
    grad_bytes = {name: runs[0][name][0]["grad"] for name, *_ in BYTES_CASES}
    assert grad_bytes["dp-quant4"] < grad_bytes["dp-none"] / 4
    assert grad_bytes["dp-powersgd"] < grad_bytes["dp-none"] / 4


@pytest.mark.parametrize("spec", ["none", "fp16", "quant:bits=4,group=64", "topk:ratio=0.05"])
@pytest.mark.parametrize("p,gpn", [(2, 0), (3, 0), (4, 2), (8, 4), (4, 8)])
def test_network_transfers_are_the_price_lists_plus_topology(spec, p, gpn):
    """The perf model's per-rank bytes and rounds are price.all_reduce's, for any topology; the
    topology only adds node_bytes: 0 inside a node, a ring's own volume across nodes."""
    from commtrain.perfmodel import Group, all_reduce

    codec, numel = build_codec(spec), 10_007  # odd: uneven chunks, rank-dependent sizes
    g = Group(tuple(range(p)), gpn)
    ops = all_reduce("grad", g, numel, codec, torch.float32)
    priced = price.all_reduce(codec, numel, torch.float32, p)
    assert [[(t.nbytes, t.rounds) for t in op] for op in ops] == [[(c.nbytes, c.rounds) for c in op] for op in priced]
    spans = gpn and p > gpn
    for t in (t for op in ops for t in op):
        assert (t.node_bytes > 0) == bool(spans)
    if spans and len(ops) == 2:  # ring all-gather: one rank's volume leaves the node
        assert all(t.node_bytes == t.nbytes for t in ops[1])


def test_all_to_all_node_bytes_sum_the_nodes_off_node_chunks():
    from commtrain.perfmodel import Group, all_to_all

    a, b, c, d = 100, 200, 300, 400  # rank j receives sizes[j] from each peer; ranks {0,1}, {2,3} share nodes
    ts = all_to_all("grad", Group((0, 1, 2, 3), 2), [a, b, c, d])
    assert [t.nbytes for t in ts] == [b + c + d, a + c + d, a + b + d, a + b + c]
    assert [t.rounds for t in ts] == [3] * 4
    assert [t.node_bytes for t in ts] == [2 * (c + d)] * 2 + [2 * (a + b)] * 2
