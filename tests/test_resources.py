"""Package data: link profiles, hardware profiles and example configs are found through
importlib.resources from any working directory (a non-editable install has no repository
around it), every packaged file is listed in pyproject's package-data, and a user's own
file path works wherever a name does."""
import fnmatch
import os
import sys
from pathlib import Path

import pytest

from commtrain import resources
from commtrain.comm import available_link_profiles, load_link_profile, resolve_link
from commtrain.config import CONFIG_DIR, ConfigError, load_config
from commtrain.perfmodel.hardware import (
    HARDWARE_DIR, INTERCONNECT_DIR, available_hardware, available_interconnects, load_hardware, load_interconnect,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "commtrain"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a directory that has nothing of the repository in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_packaged_resource_loads_by_name_from_another_directory(elsewhere):
    assert {"100mbit", "1gbit", "10gbit"} <= set(available_link_profiles())
    assert {"rtx3090-pcie", "dgx-a100", "h100-nvlink"} <= set(available_hardware())
    assert {"10gbe", "infiniband-hdr"} <= set(available_interconnects())
    assert {"tiny", "pipeline", "demo"} <= set(resources.names(CONFIG_DIR))
    for name in available_link_profiles():
        assert load_link_profile(name).name == name
    for name in available_hardware():
        assert load_hardware(name).name == name
    for name in available_interconnects():
        assert load_interconnect(name).bandwidth_bps > 0
    for name in resources.names(CONFIG_DIR):
        cfg = load_config(name)
        cfg.validate(world_size=cfg.parallel.pp)
    assert load_link_profile("1gbit").bandwidth_bps == 1e9
    assert resolve_link("100mbit").bandwidth_bps == 1e8
    assert load_config("demo", ["link.profile=1gbit"]).link.build().bandwidth_bps == 1e9
    from commtrain.demo import CONFIG

    assert CONFIG.is_file() and load_config(os.fspath(CONFIG)).model.preset == load_config("demo").model.preset


def test_resources_are_read_through_importlib_not_the_repository():
    from importlib.resources import files

    assert os.fspath(HARDWARE_DIR) == os.fspath(files("commtrain.perfmodel") / "hardware_profiles")
    assert os.fspath(INTERCONNECT_DIR) == os.fspath(files("commtrain.perfmodel") / "hardware_profiles" / "interconnects")
    assert os.fspath(CONFIG_DIR) == os.fspath(files("commtrain") / "configs")
    from commtrain.comm.link import PROFILE_DIR

    assert os.fspath(PROFILE_DIR) == os.fspath(files("commtrain.comm") / "link_profiles")
    # No module climbs out of the package to a repository folder.
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "parents[" in p.read_text()]
    assert offenders == []


def test_every_packaged_data_file_is_in_package_data():
    """What `pip install .` copies is what pyproject lists: a YAML file beside the code but
    missing from package-data works in the source tree and is absent from a real install."""
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["commtrain"]
    data = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.y*ml")]
    assert len(data) >= 3 + 7 + 5 + 6
    missing = [d for d in data if not any(fnmatch.fnmatch(d, g) and d.count("/") == g.count("/") for g in globs)]
    assert missing == []


def test_own_files_by_path(elsewhere):
    (elsewhere / "slow.yaml").write_text("name: slow\nbandwidth: 3mbit\nlatency: 2ms\n")
    assert load_link_profile("slow.yaml").bandwidth_bps == 3e6
    assert resolve_link(str(elsewhere / "slow.yaml")).latency_s == pytest.approx(2e-3)
    assert load_config(None, ["link.profile=slow.yaml"]).link.build().name == "slow"

    hw = (HARDWARE_DIR / "rtx3090-pcie.yaml").read_text().replace("name: rtx3090-pcie", "name: my-box")
    (elsewhere / "box.yaml").write_text(hw.replace("link: 10gbe", f"link: {elsewhere / 'nic.yaml'}"))
    (elsewhere / "nic.yaml").write_text((INTERCONNECT_DIR / "10gbe.yaml").read_text().replace("10gbit", "25gbit"))
    box = load_hardware("box.yaml")
    assert box.name == "my-box" and box.inter_link.bandwidth_bps == 25e9

    (elsewhere / "run.yaml").write_text("train:\n  steps: 7\n")
    (elsewhere / "tiny").write_text("train:\n  steps: 9\n")  # an existing file wins over a packaged name
    assert load_config("run.yaml").train.steps == 7
    assert load_config("tiny").train.steps == 9
    assert load_config(CONFIG_DIR / "tiny.yaml").train.steps != 9


def test_unknown_names_and_missing_files_list_what_is_packaged(elsewhere):
    with pytest.raises(ValueError, match="link profile '56k' not found; available: .*1gbit"):
        load_link_profile("56k")
    with pytest.raises(ValueError, match="link profile file 'nope.yaml' does not exist .*100mbit"):
        load_link_profile("nope.yaml")
    with pytest.raises(ValueError, match="hardware 'gtx1080' not found; available: .*rtx3090-pcie"):
        load_hardware("gtx1080")
    with pytest.raises(ConfigError, match="config 'tyni' not found; available: demo, pipeline, tiny"):
        load_config("tyni")
    with pytest.raises(ConfigError, match="config file 'configs/tiny.yaml' does not exist"):
        load_config("configs/tiny.yaml")  # the old repository path, from elsewhere
