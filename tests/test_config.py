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
