"""Config tree: YAML + overrides, and bad configs rejected before any process group exists."""
import os
import subprocess
import sys

import pytest

from commtrain import resources
from commtrain.config import CONFIG_DIR, Config, ConfigError, load_config

TINY = CONFIG_DIR / "tiny.yaml"


def test_yaml_and_overrides():
    cfg = load_config(TINY, ["train.steps=3", "compression.grad=quant:bits=4,group=64", "parallel.dp=2", "link.profile=1gbit"])
    assert cfg.train.steps == 3 and cfg.model.preset == "gpt-nano"
    assert cfg.compression.grad == "quant:bits=4,group=64"
    cfg.validate(world_size=2)
    assert cfg.link.build().bandwidth_bps == pytest.approx(1e9)


def test_every_shipped_config_is_valid():
    names = resources.names(CONFIG_DIR)
    assert {"tiny", "pipeline", "demo"} <= set(names)
    for name in names:  # by name, as ``--config tiny`` finds them
        load_config(name).validate(world_size=load_config(name).parallel.pp)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("compression.grad=nope", "compression.grad='nope'"),
        ("compression.grad=quant:bits=0", "bits=0"),
        ("train.lr=-1", "train.lr=-1"),
        ("train.stepz=3", "train.stepz: unknown key"),
        ("zero.stage=3", "zero.stage=3"),
        ("model.hf_path=/nonexistent/ckpt", "/nonexistent/ckpt"),
        ("parallel.schedule=zigzag", "parallel.schedule='zigzag'"),
        ("link.profile=56k-modem", "56k-modem"),
        ("train.steps=ten", "train.steps='ten'"),
        ("data.seq_len=48", "data.seq_len=48 conflicts with train.seq_len"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override]).validate(world_size=1)
    assert needle in str(e.value)


def test_world_size_mismatch_names_every_factor():
    cfg = load_config(TINY, ["parallel.pp=3", "parallel.dp=2"])
    with pytest.raises(ConfigError) as e:
        cfg.validate(world_size=4)
    msg = str(e.value)
    assert "parallel.pp=3" in msg and "parallel.dp=2" in msg and "world size 4" in msg


def test_dp_defaults_to_world_over_pp():
    cfg = Config()
    cfg.parallel.pp = 2
    cfg.train.batch_size = 8
    assert cfg.validate(world_size=4).parallel.degrees(4) == (2, 2)  # dp: the world over pp
    assert cfg.parallel.dp is None  # validation reads the config, it never fills it in


@pytest.mark.parametrize(
    "override, needle",
    [("compression.grad=quant:bits=0", "bits=0"), ("train.lr=-1", "train.lr"), ("parallel.pp=3", "parallel.pp=3"),
     ("model.hf_path=/nonexistent/ckpt", "/nonexistent/ckpt"), ("compression.grad=nope", "valid codecs")],
)
def test_cli_exits_nonzero_with_one_line_before_training(override, needle, tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2"}
    env.pop("MASTER_ADDR", None)
    r = subprocess.run(
        [sys.executable, "-m", "commtrain", "train", "--config", str(TINY), "--set", override, "--set", f"out_dir={tmp_path}/run"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_explicit_bandwidth_and_latency_build_a_link():
    link = load_config(TINY, ["link.bandwidth=300mbit", "link.latency=2ms"]).validate(world_size=1).link.build()
    assert link.bandwidth_bps == pytest.approx(3e8) and link.latency_s == pytest.approx(2e-3)
    with pytest.raises(ConfigError, match="either link.profile"):
        load_config(TINY, ["link.profile=1gbit", "link.bandwidth=1gbit"]).validate(world_size=1)
    with pytest.raises(ConfigError, match="300mb"):
        load_config(TINY, ["link.bandwidth=300mb"]).validate(world_size=1)


# -- issue 13: config that reads like YAML; everything the run needs checked at start-up --------
def test_floats_as_users_write_them(tmp_path):
    cfg = load_config(TINY, ["train.lr=1e-3", "train.weight_decay=.5", "train.grad_clip=.5e0",
                             "timeout_s=3E2"])
    assert cfg.train.lr == 1e-3 and cfg.train.weight_decay == 0.5 and cfg.train.grad_clip == 0.5
    assert cfg.timeout_s == 300.0 and type(cfg.train.lr) is float
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 3e-4\n  weight_decay: .5\n  grad_clip: 1\ncompression:\n  grad: none\n")
    cfg = load_config(f)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.grad_clip) == (3e-4, 0.5, 1.0)
    cfg.validate(world_size=1)


@pytest.mark.parametrize("value", ["inf", ".inf", "-inf", "nan", ".nan", "1e999"])
def test_non_finite_lr_is_rejected(value):
    with pytest.raises(ConfigError, match=r"train\.lr=.* is invalid; allowed: a finite number > 0"):
        load_config(TINY, [f"train.lr={value}"]).validate(world_size=1)


def test_data_path_list_form(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first file " * 50)
    b.write_text("second file " * 50)
    cfg = load_config(TINY, ["data.source=files", f"data.path=[{a},{b}]"])
    assert cfg.data.path == [str(a), str(b)]
    cfg.validate(world_size=1)
    assert load_config(TINY, ["data.source=files", f"data.path={a}"]).data.path == str(a)
    with pytest.raises(ConfigError, match="data.path"):
        load_config(TINY, ["data.source=files", "data.path=[1, 2]"])


def test_missing_data_files_are_found_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="data.path='/nonexistent/x.txt' does not exist"):
        load_config(TINY, ["data.source=files", "data.path=/nonexistent/x.txt"]).validate(world_size=2)
    with pytest.raises(ConfigError, match="data.path=None is invalid"):
        load_config(TINY, ["data.source=files"]).validate(world_size=2)


def test_resume_modes_and_the_old_booleans():
    assert load_config(TINY).resume == "auto"
    assert load_config(TINY, ["resume=true"]).resume == "auto"
    assert load_config(TINY, ["resume=false"]).resume == "never"
    for mode in ("auto", "never", "must"):
        assert load_config(TINY, [f"resume={mode}"]).validate(world_size=1).resume == mode
    with pytest.raises(ConfigError, match="resume='sometimes' is invalid; allowed: auto, never, must"):
        load_config(TINY, ["resume=sometimes"]).validate(world_size=1)


def test_nonfinite_policy_keys():
    cfg = load_config(TINY, ["train.nonfinite=stop", "train.max_nonfinite_steps=2"]).validate(world_size=1)
    assert (cfg.train.nonfinite, cfg.train.max_nonfinite_steps) == ("stop", 2)
    with pytest.raises(ConfigError, match="train.nonfinite='ignore' is invalid; allowed: skip, stop"):
        load_config(TINY, ["train.nonfinite=ignore"]).validate(world_size=1)
    with pytest.raises(ConfigError, match="train.max_nonfinite_steps=0"):
        load_config(TINY, ["train.max_nonfinite_steps=0"]).validate(world_size=1)


@pytest.mark.parametrize("override, needle", [
    ("compression.act=powersgd", "compression.act='powersgd' is invalid"),
    ("compression.act_grad=powersgd", "compression.act_grad='powersgd' is invalid"),
])
def test_codec_channel_pairings_refused_with_the_reason(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(TINY, [override, "parallel.pp=2", "parallel.microbatches=2"]).validate(world_size=2)
    with pytest.raises(ConfigError, match="PowerSGD's low-rank factors"):
        load_config(TINY, ["zero.stage=2", "compression.grad=powersgd"]).validate(world_size=2)
    with pytest.raises(ConfigError, match="compression.param='powersgd' is invalid"):
        load_config(TINY, ["zero.stage=2", "compression.param=powersgd"]).validate(world_size=2)
