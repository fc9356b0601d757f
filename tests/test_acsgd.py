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
    assert modes[:6] == ["full"] * 6 and set(modes[6:]) == {"delta"}  # first epoch fills the buffers
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


def _batch(step):
    """Shuffled epochs over N samples: each step takes B ids, so ids repeat every N/B steps."""
    data = torch.randint(0, MODEL["vocab_size"], (N, T + 1), generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(100 + step // (N // B)))
    ids = perm[(step % (N // B)) * B:][:B]
    return ids, data[ids, :-1], data[ids, 1:]


def _make(act, out_dir):
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
                            hidden_size=model.hidden_size, act=act, n_samples=N, out_dir=out_dir)
    opt = torch.optim.SGD(stage.parameters(), lr=0.5)
    return engine, stage, opt, comm


def _train(engine, stage, opt, steps):
    losses = []
    for step in steps:
        opt.zero_grad()
        losses.append(engine.train_step(*_batch(step)))
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
        # Exact bytes: 6 steps x M microbatches. Uncompressed until every sample was seen
        # (steps 0-1 = epoch 1) or the warm-up ends; then packed 2-bit deltas.
        full_steps = max(kw.get("warmup_steps", 0), 2 if kw["act_delta"] else 0)
        expected_act = M * (full_steps * mb_numel * 4 + (6 - full_steps) * _wire_bytes(CODEC, mb_numel))
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
