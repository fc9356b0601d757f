"""Run identity: which run an out_dir holds, and what resume=auto|never|must does with it."""
import os

import pytest

from commtrain.config import CONFIG_DIR
from commtrain.config import load_config
from commtrain.export import write_run_config
from commtrain.rundir import MAY_CHANGE_ON_RESUME, differences, fingerprint, plan
from commtrain.runtime import RunError
from pathlib import Path

TINY = CONFIG_DIR / "tiny.yaml"


def resolved(*sets):
    return load_config(TINY, list(sets)).resolved(1)


def recorded_run(tmp_path, *sets):
    """A run directory as the trainer leaves it: config.yaml, a checkpoint, metrics."""
    d = tmp_path / "run"
    d.mkdir()
    write_run_config(resolved(*sets), d)
    (d / "checkpoints" / "step_00000003").mkdir(parents=True)
    (d / "checkpoints" / "step_00000003" / "rank0.pt").write_bytes(b"weights")
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    return d


def snapshot(d):
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


def test_empty_or_missing_dir_starts_fresh(tmp_path):
    for mode in ("auto", "never"):
        assert plan(tmp_path / "none", resolved().to_dict(), mode).resume is False
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "error.log").write_text("a failed start leaves only this")
    (tmp_path / "logs" / "error_rank1.log").write_text("and this")
    assert plan(tmp_path / "logs", resolved().to_dict(), "auto").resume is False


def test_same_run_resumes_and_allowed_changes_are_listed(tmp_path):
    d = recorded_run(tmp_path)
    p = plan(d, resolved().to_dict(), "auto")
    assert p.resume and p.recorded_steps == 6 and p.changed == []
    p = plan(d, resolved("train.steps=40", "train.checkpoint_every=5", "link.profile=1gbit").to_dict(), "must")
    assert p.resume and p.recorded_steps == 6
    assert "train.steps" in p.changed and "train.checkpoint_every" in p.changed


def test_other_lr_is_refused_naming_the_key_and_nothing_is_touched(tmp_path):
    d = recorded_run(tmp_path)
    before = snapshot(d)
    with pytest.raises(RunError) as e:
        plan(d, resolved("train.lr=1e-3").to_dict(), "auto")
    msg = str(e.value)
    assert "train.lr: 0.003 -> 0.001" in msg and str(d) in msg and "--overwrite" in msg and "\n" not in msg
    with pytest.raises(RunError, match="compression.grad: 'none' -> .*model.preset: 'gpt-nano' -> 'gpt-micro'"):
        plan(d, resolved("model.preset=gpt-micro", "compression.grad=quant:bits=4,group=64").to_dict(), "must")
    assert snapshot(d) == before


@pytest.mark.parametrize("key", ["compression.grad=quant:bits=4,group=64", "parallel.bucket_mb=1.0", "train.seed=3",
                                 "train.batch_size=2", "data.max_bytes=1000", "train.lr_warmup_steps=1",
                                 "train.weight_decay=0.1", "zero.stage=1"])
def test_identity_covers_model_data_layout_codecs_optimizer(key):
    assert differences(resolved().to_dict(), resolved(key).to_dict())[0].startswith(key.split("=")[0])
    assert fingerprint(resolved().to_dict()) != fingerprint(resolved(key).to_dict())


def test_allowed_keys_leave_the_fingerprint_alone():
    base = fingerprint(resolved().to_dict())
    assert base == fingerprint(resolved("train.steps=99", "train.eval_every=1", "timeout_s=5", "link.profile=1gbit",
                                        "train.keep_checkpoints=1", "resume=never", "out_dir=/elsewhere").to_dict())
    assert "train.steps" in MAY_CHANGE_ON_RESUME and "train.lr" not in MAY_CHANGE_ON_RESUME


def test_never_refuses_and_overwrite_moves_the_old_run_aside(tmp_path):
    d = recorded_run(tmp_path)
    before = snapshot(d)
    with pytest.raises(RunError, match="resume=never.*--overwrite"):
        plan(d, resolved().to_dict(), "never")
    p = plan(d, resolved("train.lr=1e-3").to_dict(), "never", overwrite=True)
    assert not p.resume and not d.exists()
    moved = Path(p.moved_to)
    assert moved.parent == d.parent and moved.name.startswith("run.old-")
    assert snapshot(moved) == before  # renamed, not rewritten


def test_must_needs_a_run_and_no_record_is_refused(tmp_path):
    with pytest.raises(RunError, match="resume=must.*holds no run"):
        plan(tmp_path / "empty", resolved().to_dict(), "must")
    with pytest.raises(RunError, match="contradictory"):
        plan(tmp_path / "empty", resolved().to_dict(), "must", overwrite=True)
    d = tmp_path / "foreign"
    (d / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunError, match="no run record"):
        plan(d, resolved().to_dict(), "auto")


def test_a_key_the_record_lacks_counts_as_its_default(tmp_path):
    import yaml

    d = recorded_run(tmp_path)
    raw = yaml.safe_load((d / "config.yaml").read_text())
    del raw["train"]["weight_decay"]  # e.g. written by an older commtrain
    (d / "config.yaml").write_text(yaml.safe_dump(raw))
    p = plan(d, resolved().to_dict(), "auto")
    assert p.resume
    # Its checkpoints carry the older fingerprint (hash without the key): the plan hands it to
    # the Checkpointer, which accepts it (test_checkpoint: also_accept).
    assert p.recorded_fingerprint == fingerprint(raw) != fingerprint(resolved().to_dict())
    with pytest.raises(RunError, match="train.weight_decay"):
        plan(d, resolved("train.weight_decay=0.5").to_dict(), "auto")


def test_relative_paths_compare_absolute(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("hello world " * 2000)
    monkeypatch.chdir(tmp_path)
    rel = resolved("data.source=files", "data.path=a.txt")
    ab = resolved("data.source=files", f"data.path={os.path.join(tmp_path, 'a.txt')}")
    assert differences(rel.to_dict(), ab.to_dict()) == []
