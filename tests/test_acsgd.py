"""AC-SGD activation channel and buffers: bit-identical ends, exact bytes, checkpoints.

Pure single-process tests drive a sender and a receiver channel directly; the gloo tests
run a 2-stage PipelineEngine with a lossy 2-bit codec and shuffled data (sample ids repeat
across steps), and compare the two ranks' buffers bit for bit.
"""
import os

import pytest
import torch

from commtrain.compress import build_codec
from commtrain.parallel.compression import CompressionConfig
from commtrain.parallel.pipeline import ActivationBuffer, ActivationChannel
from tests.dist_utils import run_ranks

ROW = (16, 32)  # (T, C)
CODEC = "quant:bits=2,group=64"


def _pair(storage, dtype, tmp_path, delta=True, warmup=0, n=24):
    def end(role):
        buf = ActivationBuffer(n, ROW, storage, dtype, path=str(tmp_path / f"{role}.bin")) if delta else None
        return ActivationChannel(CODEC, delta=delta, warmup_steps=warmup, buffer=buf)

    return end("send"), end("recv")


def _drifting_activations(n, steps, seed=0):
    """Per-sample activations that drift slowly between epochs, as in fine-tuning."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, *ROW, generator=g)
    return [base + 0.02 * t * torch.randn(n, *ROW, generator=g) for t in range(steps)]


# -- buffers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["device", "cpu", "mmap"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_buffer_write_returns_what_read_returns(storage, dtype, tmp_path):
    buf = ActivationBuffer(10, ROW, storage, dtype, path=str(tmp_path / "m.bin"))
    ids = torch.tensor([7, 2, 5])
    v = torch.randn(3, *ROW)
    buf.prefetch(torch.tensor([2, 9]))  # pending prefetch of a row about to change: must be dropped
    stored = buf.write(ids, v)
    assert torch.equal(buf.read(ids), stored)
    assert torch.equal(buf.read(torch.tensor([2, 9]))[0], stored[1])  # not the stale prefetch
    tol = {"fp32": 0.0, "fp16": 2e-3, "int8": 0.02}[dtype]
    assert (stored - v).abs().max() <= tol * v.abs().max()
    assert buf.seen(torch.tensor([7, 2, 5, 0])).tolist() == [True, True, True, False]
    assert buf.data.dtype == {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}[dtype]
    if storage == "mmap":
        assert os.path.getsize(tmp_path / "m.bin") == 10 * ROW[0] * ROW[1] * buf.data.element_size()
    buf.close()


def test_buffer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="act_buffer='disk'.*cpu, device, mmap"):
        ActivationBuffer(4, ROW, "disk")
    with pytest.raises(ValueError, match="act_buffer_dtype='bf8'.*fp32, fp16, int8"):
        ActivationBuffer(4, ROW, "cpu", "bf8")
    with pytest.raises(ValueError, match="needs a file path"):
        ActivationBuffer(4, ROW, "mmap")
    buf = ActivationBuffer(4, ROW)
    with pytest.raises(ValueError, match="must lie in 0..3"):
        buf.read(torch.tensor([4]))
    with pytest.raises(ValueError, match="distinct"):
        buf.write(torch.tensor([1, 1]), torch.zeros(2, *ROW))
    with pytest.raises(ValueError, match="compression.act_buffer='ssd'"):
        CompressionConfig(act_buffer="ssd").validate()
    with pytest.raises(ValueError, match="unknown codec 'qunat'"):
        CompressionConfig(act="qunat:bits=2").validate()


def test_mmap_snapshot_state_checks_its_checksum(tmp_path):
    buf = ActivationBuffer(6, ROW, "mmap", "int8", path=str(tmp_path / "m.bin"))
    buf.write(torch.tensor([1, 4]), torch.randn(2, *ROW))
    state = buf.state_dict(snapshot="step3")
    assert set(state["files"]) == {"data", "scale"} and os.path.exists(tmp_path / "m.bin.step3")
    before = (buf.data.clone(), buf.scale.clone())
    buf.write(torch.tensor([1]), torch.randn(1, *ROW))  # training goes on after the checkpoint
    buf.load_state_dict(state)
    assert torch.equal(buf.data, before[0]) and torch.equal(buf.scale, before[1])
    with open(tmp_path / "m.bin.step3", "r+b") as f:
        f.write(b"\x7f")
    with pytest.raises(ValueError, match="sha256"):
        buf.load_state_dict(state)
    with pytest.raises(ValueError, match="needs act_buffer='mmap'"):
        ActivationBuffer(2, ROW).state_dict(snapshot="x")


# -- channel pair, single process --------------------------------------------------------------
@pytest.mark.parametrize("storage,dtype", [("device", "fp32"), ("cpu", "fp16"), ("mmap", "int8"), ("mmap", "fp32")])
def test_sender_and_receiver_buffers_stay_bit_identical(storage, dtype, tmp_path):
    n, mb = 24, 4
    send, recv = _pair(storage, dtype, tmp_path, n=n)
    acts = _drifting_activations(n, 6)
    g = torch.Generator().manual_seed(1)
    modes = []
    for step in range(6):
        for ids in torch.randperm(n, generator=g).view(-1, mb):
            mode = send.mode(ids)
            assert mode == recv.mode(ids)
            modes.append(mode)
            pkt = send.encode(ids, acts[step][ids], mode)
            assert pkt.nbytes == recv.payload_nbytes(mode, ids.numel() * ROW[0] * ROW[1], torch.float32)
            out = recv.decode(ids, pkt, mode)
            if mode == "delta":  # the receiver's activation is its updated m[id]
                assert torch.equal(out, recv.buffer.read(ids))
        send.end_step(), recv.end_step()
    assert modes[:6] == ["first"] * 6 and set(modes[6:]) == {"delta"}  # first epoch fills the buffers
    assert torch.equal(send.buffer.data, recv.buffer.data)
    if dtype == "int8":
        assert torch.equal(send.buffer.scale, recv.buffer.scale)
    assert torch.equal(send.buffer._seen, recv.buffer._seen)


def test_delta_beats_direct_quantization_on_drifting_activations(tmp_path):
    """The point of AC-SGD: quantizing the small change since last epoch errs far less than
    quantizing the activation itself with the same codec and the same bytes."""
    n = 16
    err = {}
    for delta in (True, False):
        send, recv = _pair("cpu", "fp32", tmp_path / str(delta), delta=delta, n=n)
        acts = _drifting_activations(n, 5)
        ids = torch.arange(n)
        for step in range(5):
            a = acts[step][ids]
            pkt = send.encode(ids, a, send.mode(ids))
            out = recv.decode(ids, pkt, recv.mode(ids))
            send.end_step(), recv.end_step()
        err[delta] = ((out - a).norm() / a.norm()).item()
        assert pkt.nbytes == build_codec(CODEC).payload_nbytes(a.numel())
    assert err[True] < 0.2 * err[False], err


def test_warmup_steps_send_uncompressed():
    send = ActivationChannel(CODEC, delta=False, warmup_steps=2)
    ids = torch.arange(4)
    modes = []
    for _ in range(4):
        modes.append(send.mode(ids))
        send.end_step()
    assert modes == ["full", "full", "direct", "direct"]
    with pytest.raises(ValueError, match="act_warmup_steps=-1"):
        ActivationChannel(CODEC, warmup_steps=-1)
    with pytest.raises(ValueError, match="needs an ActivationBuffer"):
        ActivationChannel(CODEC, delta=True)


# -- two-stage pipeline over gloo ----------------------------------------------------------------
N, B, M, T = 16, 8, 2, 16
MODEL = dict(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=T, tie_weights=False)


def _batch(step, n=N):
    """Shuffled epochs over n samples: each step takes B ids, so ids repeat every n/B steps."""
    data = torch.randint(0, MODEL["vocab_size"], (n, T + 1), generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(100 + step // (n // B)))
    ids = perm[(step % (n // B)) * B:][:B]
    return ids, data[ids, :-1], data[ids, 1:]


def _make(act, out_dir, n=N):
    from commtrain.comm import Communicator
    from commtrain.models import GPT, GPTConfig
    from commtrain.parallel.mesh import Mesh
    from commtrain.parallel.pipeline import PipelineEngine

    mesh = Mesh(2, 1)
    comm = Communicator(group=mesh.pp_group, timeout_s=60)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    stage = model.stage_modules(2)[mesh.stage]
    engine = PipelineEngine(stage, mesh, comm, schedule="1f1b", n_micro=M, loss_fn=model.loss,
                            hidden_size=model.hidden_size, act=act, n_samples=n, out_dir=out_dir)
    opt = torch.optim.SGD(stage.parameters(), lr=0.5)
    return engine, stage, opt, comm


def _train(engine, stage, opt, steps, n=N):
    losses = []
    for step in steps:
        opt.zero_grad()
        losses.append(engine.train_step(*_batch(step, n)))
        opt.step()
    return losses


def _buffer_of(engine):
    ch = engine.send_channel or engine.recv_channel
    if ch.buffer is None:
        return None
    return {k: t.clone() for k, t in ch.buffer._tensors().items()} | {"seen": ch.buffer._seen.clone()}


def _acsgd_worker(rank, world, configs, out_root):
    out = []
    for i, kw in enumerate(configs):
        act = CompressionConfig(act_grad="quant:bits=4,group=64", **kw)
        engine, stage, opt, comm = _make(act, os.path.join(out_root, f"run{i}"))
        losses = _train(engine, stage, opt, range(6))
        out.append(dict(kw=kw, losses=losses, buffer=_buffer_of(engine), bytes=comm.meter.bytes))
        engine.close(), comm.close()
    torch.distributed.barrier()
    return out


def _wire_bytes(spec, numel):
    return build_codec(spec).payload_nbytes(numel)


@pytest.mark.timeout(180)
def test_pipeline_buffers_bit_identical_and_bytes_exact(tmp_path):
    configs = [
        dict(act=CODEC, act_delta=True, act_buffer="device", act_buffer_dtype="fp32"),
        dict(act=CODEC, act_delta=True, act_buffer="cpu", act_buffer_dtype="fp16"),
        dict(act=CODEC, act_delta=True, act_buffer="mmap", act_buffer_dtype="int8"),
        dict(act=CODEC, act_delta=False),
        dict(act=CODEC, act_delta=True, warmup_steps=3, act_buffer="mmap"),
        dict(act=CODEC, act_delta=True, act_first="none"),  # first visits in fp32 (before act_first)
        dict(act=CODEC, act_delta=True, act_first="quant:bits=4,group=64,rotate=hadamard", act_buffer_dtype="fp16"),
    ]
    r0, r1 = run_ranks(_acsgd_worker, 2, configs, str(tmp_path), timeout=170)
    mb_numel = B // M * T * MODEL["n_embd"]
    for a, b in zip(r0, r1):
        kw = a["kw"]
        assert a["losses"] == b["losses"]  # broadcast from the last stage
        assert all(torch.isfinite(torch.tensor(a["losses"])))
        if kw["act_delta"]:
            # sender (rank 0) and receiver (rank 1) hold the same bytes after 6 shuffled steps
            assert a["buffer"].keys() == b["buffer"].keys()
            for k in a["buffer"]:
                assert torch.equal(a["buffer"][k], b["buffer"][k]), (kw, k)
            assert bool(a["buffer"]["seen"].all())
        # Exact bytes: 6 steps x M microbatches. Uncompressed during the warm-up; then, in delta
        # mode, the first visits (steps 0-1 = epoch 1) through act_first (default 8-bit quant);
        # then packed 2-bit deltas.
        full_steps = kw.get("warmup_steps", 0)
        first_steps = max(0, 2 - full_steps) if kw["act_delta"] else 0
        first = _wire_bytes(kw.get("act_first", "quant:bits=8"), mb_numel)
        rest = 6 - full_steps - first_steps
        expected_act = M * (full_steps * mb_numel * 4 + first_steps * first + rest * _wire_bytes(CODEC, mb_numel))
        assert a["bytes"]["act"] == expected_act, kw
        assert b["bytes"]["act"] == 0 and a["bytes"]["act_grad"] == 0
        assert b["bytes"]["act_grad"] == 6 * M * _wire_bytes("quant:bits=4,group=64", mb_numel)
    # ~bits/32 of fp32 plus the per-group scales (8 bytes per 64 values)
    ratio = _wire_bytes(CODEC, mb_numel) / (mb_numel * 4)
    assert 2 / 32 < ratio <= 2 / 32 + 8 / (64 * 4) + 1e-9


def _resume_worker(rank, world, out_root, storage):
    act = CompressionConfig(act=CODEC, act_grad="quant:bits=4,group=64", act_delta=True, act_buffer=storage)
    # uninterrupted
    engine, stage, opt, comm = _make(act, os.path.join(out_root, "full"))
    full = _train(engine, stage, opt, range(6))
    full_buf = _buffer_of(engine)
    engine.close(), comm.close()
    # stop after 3 steps, restore into fresh objects, run 3 more
    engine, stage, opt, comm = _make(act, os.path.join(out_root, "first"))
    first = _train(engine, stage, opt, range(3))
    ckpt = {"model": {k: v.clone() for k, v in stage.state_dict().items()}, "engine": engine.state_dict()}
    engine.close(), comm.close()
    engine, stage, opt, comm = _make(act, os.path.join(out_root, "resumed"))
    stage.load_state_dict(ckpt["model"])
    engine.load_state_dict(ckpt["engine"])
    rest = _train(engine, stage, opt, range(3, 6))
    resumed_buf = _buffer_of(engine)
    engine.close(), comm.close()
    torch.distributed.barrier()
    return full, first + rest, full_buf, resumed_buf


@pytest.mark.timeout(120)
@pytest.mark.parametrize("storage", ["mmap"])
def test_resume_reproduces_uninterrupted_run(tmp_path, storage):
    for full, resumed, full_buf, resumed_buf in run_ranks(_resume_worker, 2, str(tmp_path), storage, timeout=110):
        assert resumed == full
        for k in full_buf:
            assert torch.equal(full_buf[k], resumed_buf[k]), k


# -- compression.act_first: compressed first visits (issue 12 item 3) ------------------------------
def test_first_visit_buffers_hold_the_decoded_value(tmp_path):
    """A first visit goes through act_first; both ends store deQ1(pkt), not the sender's a, so
    they agree bit for bit (stochastic rounding too), and the receiver feeds deQ1(pkt)."""
    n, mb = 8, 4
    first = "quant:bits=4,group=64,rounding=stochastic"
    mk = lambda: ActivationChannel(CODEC, buffer=ActivationBuffer(n, ROW, "cpu", "fp32"), first_codec=first)  # noqa: E731
    send, recv = mk(), mk()
    a = _drifting_activations(n, 1)[0]
    for ids in torch.arange(n).view(-1, mb):
        assert send.mode(ids) == recv.mode(ids) == "first"
        pkt = send.encode(ids, a[ids])
        assert pkt.nbytes == build_codec(first).payload_nbytes(a[ids].numel()) < a[ids].numel() * 4 / 6
        out = recv.decode(ids, pkt)
        dec = build_codec(first).decompress(pkt)
        assert torch.equal(out, dec) and torch.equal(recv.buffer.read(ids), dec)
        assert not torch.equal(dec, a[ids]) and ((dec - a[ids]).norm() / a[ids].norm()) < 0.15
    assert torch.equal(send.buffer.data, recv.buffer.data)
    assert send.mode(torch.arange(mb)) == "delta"
    # act_first=none: the old behaviour, fp32 first visits storing a exactly
    old = ActivationChannel(CODEC, buffer=ActivationBuffer(n, ROW, "cpu", "fp32"), first_codec="none")
    ids = torch.arange(mb)
    assert old.encode(ids, a[ids]).nbytes == a[ids].numel() * 4
    assert torch.equal(old.buffer.read(ids), a[ids])


def test_first_visit_codec_state_is_checkpointed():
    mk = lambda: ActivationChannel(CODEC, buffer=ActivationBuffer(8, ROW), first_codec="quant:bits=8")  # noqa: E731
    a, b = mk(), mk()
    x = torch.randn(4, *ROW)
    a.encode(torch.arange(4), x)  # advances the first codec's stochastic-rounding stream
    b.load_state_dict(a.state_dict())
    ids = torch.arange(4, 8)
    assert torch.equal(a.encode(ids, x).payload, b.encode(ids, x).payload)
    state = a.state_dict()
    del state["first_codec"]  # a checkpoint from before act_first still loads
    mk().load_state_dict(state)


def test_act_first_bad_spec_is_a_config_error():
    from commtrain.config import load_config
    from commtrain.validate import ConfigError

    for spec, msg in [("quant:bits=9", "compression.act_first='quant:bits=9': quant: bits=9 is invalid"),
                      ("nope", "unknown codec 'nope'"), ("powersgd:rank=2", "can only serve compression.grad")]:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            load_config("pipeline", [f"compression.act_first={spec}"]).validate()
    assert load_config("pipeline", []).compression.act_first == "quant:bits=8"


ACT2, GRAD4 = "quant:bits=2", "quant:bits=4"


def _acceptance_worker(rank, world, runs, out_root):
    out = []
    for i, (n, kw) in enumerate(runs):
        engine, stage, opt, comm = _make(CompressionConfig(**kw), os.path.join(out_root, f"run{i}"), n=n)
        losses = _train(engine, stage, opt, range(12), n=n)
        out.append(dict(losses=losses, buffer=_buffer_of(engine), bytes=dict(comm.meter.bytes)))
        engine.close(), comm.close()
    torch.distributed.barrier()
    return out


@pytest.mark.timeout(240)
def test_acceptance_12_steps_compressed_from_the_first_step(tmp_path):
    """Issue 12 acceptance: a pp=2 1F1B run of 12 steps with act=quant:bits=2 and
    act_grad=quant:bits=4 sends >= 8x fewer forward-activation bytes than the uncompressed run
    (wire meter, first visits included) and both ends' buffers stay bit-identical.

    With the default act_first (8-bit, 3.76x on its own) that holds once most visits are
    revisits (here: 16 samples, 2 steps an epoch, 6 epochs). A run shorter than one epoch
    (96 samples: every visit is a first one) gets exactly the act_first codec's ratio, so
    there >= 8x needs a <= 3-bit first-visit codec (3-bit rotated: 9.1x); both are pinned."""
    none = dict(act="none", act_grad="none", act_delta=False)
    acsgd = dict(act=ACT2, act_grad=GRAD4, act_delta=True)
    low_first = dict(acsgd, act_first="quant:bits=3,rotate=hadamard")
    runs = [(N, none), (N, acsgd), (96, none), (96, acsgd), (96, low_first)]
    r0, r1 = run_ranks(_acceptance_worker, 2, runs, str(tmp_path), timeout=230)
    mb_numel = B // M * T * MODEL["n_embd"]
    sent = [r["bytes"]["act"] for r in r0]
    assert sent[0] == sent[2] == 12 * M * mb_numel * 4
    ratio = {name: sent[0] / s for name, s in zip(["none", "acsgd", "none96", "acsgd96", "low96"], sent)}
    assert ratio["acsgd"] >= 8, ratio
    assert sent[1] == M * (2 * _wire_bytes("quant:bits=8", mb_numel) + 10 * _wire_bytes(ACT2, mb_numel))
    assert sent[3] == 12 * M * _wire_bytes("quant:bits=8", mb_numel) and 3.7 < ratio["acsgd96"] < 3.8
    assert ratio["low96"] >= 8, ratio
    for i in (1, 3, 4):
        a, b = r0[i]["buffer"], r1[i]["buffer"]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (runs[i], k)
        assert r0[i]["losses"] == r1[i]["losses"] and all(torch.isfinite(torch.tensor(r0[i]["losses"])))
    # the backward channel: 4-bit activation gradients in every compressed run
    assert r1[1]["bytes"]["act_grad"] == 12 * M * _wire_bytes(GRAD4, mb_numel)
