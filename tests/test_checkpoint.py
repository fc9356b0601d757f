"""Checkpoints: atomic, checksummed, corrupt/truncated ones detected and skipped (single process)."""
import json
import logging

import pytest
import torch

from commtrain.checkpoint import Checkpointer, CheckpointError


def _state(v):
    return {"model": {"w": torch.full((4, 4), float(v))}, "step": v, "rng": torch.get_rng_state()}


def test_roundtrip_and_keep(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for s in (1, 2, 3):
        ck.save(s, _state(s))
    assert [p.name for p in ck.list()] == ["step_00000003", "step_00000002"]
    step, state = ck.load_latest()
    assert step == 3 and torch.equal(state["model"]["w"], torch.full((4, 4), 3.0))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary directories left behind


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_newest_falls_back_to_previous(tmp_path, damage, caplog):
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(5, _state(5))
    newest = ck.save(10, _state(10))
    shard = newest / "rank0.pt"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "delete":
        shard.unlink()
    else:
        (newest / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        step, state = ck.load_latest()
    assert step == 5 and state["step"] == 5
    assert str(newest) in caplog.text  # the problem is reported, naming the file


def test_no_checkpoint_returns_none(tmp_path):
    assert Checkpointer(tmp_path / "none").load_latest() is None


def test_world_size_mismatch_is_an_error(tmp_path):
    ck = Checkpointer(tmp_path)
    path = ck.save(1, _state(1))
    mf = json.loads((path / "manifest.json").read_text())
    mf["world_size"] = 4
    (path / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(CheckpointError, match="written by 4 ranks"):
        ck.load_latest()


class Evil:
    """A non-tensor object: weights_only loading must refuse it."""


def test_no_arbitrary_pickle(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(1, _state(1))
    ck.save(2, {"obj": Evil()})  # saving works, but loading refuses non-tensor objects
    step, _ = ck.load_latest()
    assert step == 1


# -- issue 13: never a non-finite checkpoint, never a fresh start over unverifiable ones --------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_state_is_never_written(tmp_path, bad):
    from commtrain.checkpoint import NonFiniteStateError

    ck = Checkpointer(tmp_path, keep=1)
    good = ck.save(1, _state(1))
    state = _state(2)
    state["model"]["w"][1, 2] = bad
    with pytest.raises(NonFiniteStateError) as e:
        ck.save(2, state)
    assert "model.w" in str(e.value) and str(good) in str(e.value)  # names the tensor and the last good one
    assert [p.name for p in ck.list()] == ["step_00000001"]  # keep=1 did not rotate the good one away
    assert not list(tmp_path.glob(".step_*"))  # nothing half-written either
    assert ck.load_latest()[0] == 1


def test_integer_and_non_tensor_state_is_not_checked_for_finiteness(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(1, {"ids": torch.arange(4), "meta": {"x": float("nan")}, "rng": torch.get_rng_state()})
    assert ck.load_latest()[0] == 1


def test_no_verifiable_checkpoint_is_an_error_naming_the_files(tmp_path):
    ck = Checkpointer(tmp_path, keep=3)
    a, b = ck.save(2, _state(2)), ck.save(4, _state(4))
    (a / "rank0.pt").write_bytes(b"garbage")
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        ck.load_latest()
    msg = str(e.value)
    assert "none of the 2 checkpoint(s)" in msg and str(a / "rank0.pt") in msg and str(b / "manifest.json") in msg
    assert "--overwrite" in msg and "\n" not in msg
    assert (a / "rank0.pt").read_bytes() == b"garbage"  # nothing touched


def test_fingerprint_is_recorded_and_checked(tmp_path):
    ck = Checkpointer(tmp_path, fingerprint="aaaa")
    path = ck.save(1, _state(1))
    assert json.loads((path / "manifest.json").read_text())["fingerprint"] == "aaaa"
    assert Checkpointer(tmp_path, fingerprint="aaaa").load_latest()[0] == 1
    with pytest.raises(CheckpointError, match="belongs to another run"):
        Checkpointer(tmp_path, fingerprint="bbbb").load_latest()
    # The same run recorded by an older commtrain (rundir.plan matched it): accepted.
    assert Checkpointer(tmp_path, fingerprint="bbbb", also_accept=("aaaa",)).load_latest()[0] == 1
