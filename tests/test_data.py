"""Corpus, tokenizers, TokenDataset ids and the resumable ShardedSampler."""
from __future__ import annotations

import json
import socket

import pytest
import torch

from commtrain.data import (
    DataConfig, ShardedSampler, TokenDataset, build_data, build_tokenizer, fingerprint, load_text, split_train_eval,
)
from commtrain.data.corpus import stdlib_files


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# -- corpus -------------------------------------------------------------------------------
def test_stdlib_corpus_is_real_text_and_deterministic(no_network):
    a = load_text("stdlib", max_bytes=300_000)
    b = load_text("stdlib", max_bytes=300_000)
    assert a == b and fingerprint(a) == fingerprint(b)
    assert len(a.encode("utf-8")) == 300_000
    assert a.startswith("# ---- ") and "def " in a and "import " in a
    files = stdlib_files()
    root = files[0].parent
    assert len(files) > 100 and files == sorted(files, key=lambda p: p.relative_to(root).as_posix())
    assert not any("site-packages" in p.parts for p in files)
    tr, ev, tok = build_data(DataConfig(max_bytes=100_000, seq_len=32), model_vocab=256)
    tr2, ev2, _ = build_data(DataConfig(max_bytes=100_000, seq_len=32), model_vocab=256)
    assert tr.fingerprint() == tr2.fingerprint() and ev.fingerprint() == ev2.fingerprint()
    assert tok.vocab_size == 256 and int(tr.tokens.max()) < 256


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta " * 40}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n")
    (tmp_path / "skip.bin").write_bytes(b"\0\1")
    whole_dir = load_text("files", str(tmp_path))
    assert whole_dir == "alpha " * 50 + "\n\n" + "beta " * 40 + "\n\ngamma"
    assert load_text("files", [str(tmp_path / "b.jsonl"), str(tmp_path / "a.txt")]).startswith("beta")
    assert load_text("files", str(tmp_path / "*.txt")) == "alpha " * 50
    assert load_text("files", f"{tmp_path}/a.txt,{tmp_path}/b.jsonl") == whole_dir
    assert load_text("files", str(tmp_path), max_bytes=10) == "alpha alph"
    tr, ev, _ = build_data(DataConfig(source="files", path=str(tmp_path), seq_len=16, eval_fraction=0.2), 256)
    assert len(whole_dir) == 509 and (len(tr), len(ev)) == (25, 6)  # 508 // 16 = 31 windows, 20% eval
    _, x, y = tr[0]
    assert bytes(x.tolist()).decode() == whole_dir[:16] and bytes(y.tolist()).decode() == whole_dir[1:17]


def test_bad_files_and_config_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.path='/nope.txt' does not exist"):
        load_text("files", "/nope.txt")
    with pytest.raises(ValueError, match="matched no"):
        load_text("files", str(tmp_path / "*.txt"))
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1 has no string field 'text'"):
        load_text("files", str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not valid JSON"):
        load_text("files", str(tmp_path / "bad.jsonl"))
    cases = [
        (dict(source="web"), r"data.source='web' is invalid; allowed: files, shakespeare, stdlib"),
        (dict(source="files"), r"data.path=None is invalid"),
        (dict(path="x.txt"), r"data.path='x.txt' is only used with data.source='files'"),
        (dict(tokenizer="wordpiece"), r"data.tokenizer='wordpiece' is invalid; allowed: bpe, byte, hf"),
        (dict(seq_len=0), r"data.seq_len=0 is invalid"),
        (dict(eval_fraction=1.0), r"data.eval_fraction=1.0 is invalid"),
        (dict(max_bytes=-1), r"data.max_bytes=-1"),
        (dict(bpe_vocab_size=100), r"data.bpe_vocab_size=100"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            DataConfig(**kw).validate()
    with pytest.raises(ValueError, match="corpus too small"):
        build_data(DataConfig(max_bytes=100, seq_len=64), 256)
    with pytest.raises(ValueError, match="data.seq_len=64 is invalid; allowed: <= the model's block_size=32"):
        build_data(DataConfig(max_bytes=10_000), 256, block_size=32)
    with pytest.raises(ValueError, match="data.tokenizer='hf' needs"):
        build_data(DataConfig(max_bytes=10_000, tokenizer="hf"), 256)


# -- dataset ------------------------------------------------------------------------------
def test_ids_windows_and_disjoint_eval_split():
    tokens = torch.arange(1000)
    tr, ev = split_train_eval(tokens, seq_len=10, eval_fraction=0.1)
    # 99 windows, 10 for eval; eval tokens start after train's last target (token 890).
    assert (len(tr), len(ev)) == (89, 10) and ev.first_id == 89
    assert list(tr.ids) == list(range(89)) and list(ev.ids) == list(range(89, 99))
    assert tr.tokens[-1] == 890 and ev.tokens[0] == 891
    sid, x, y = tr[5]
    assert sid == 5 and x.tolist() == list(range(50, 60)) and y.tolist() == list(range(51, 61))
    sid, x, y = ev[0]
    assert sid == 89
    train_tokens = set(tr.tokens.tolist())
    assert not train_tokens & set(ev.tokens.tolist())  # no token position is shared
    ids, xb, yb = tr.batch(torch.tensor([3, 0, 88]))
    assert xb.dtype == torch.int64 and xb.shape == (3, 10) and ids.tolist() == [3, 0, 88]
    torch.testing.assert_close(xb[0], tr[3][1])
    torch.testing.assert_close(yb[2], tr[88][2])
    ids, xb, _ = ev.batch([90])
    assert xb[0].tolist() == ev[1][1].tolist()
    with pytest.raises(IndexError):
        tr.batch([89])
    with pytest.raises(IndexError):
        ev.batch([0])
    assert split_train_eval(tokens, 10, 0.0)[1].num_windows == 0


# -- sampler ------------------------------------------------------------------------------
def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    n, B, world = 103, 4, 3
    samplers = [ShardedSampler(n, B, r, world, seed=7) for r in range(world)]
    assert len(samplers[0]) == 103 // 12 == 8
    epoch_ids = []
    for step in range(8):
        batches = [s.next_batch() for s in samplers]
        assert all(b.shape == (B,) for b in batches)
        torch.testing.assert_close(torch.cat(batches), samplers[0].global_batch(step))
        epoch_ids += torch.cat(batches).tolist()
    assert len(set(epoch_ids)) == 96 and set(epoch_ids) <= set(range(n))  # disjoint, 7 dropped
    assert samplers[0].epoch == 1 and samplers[0].position == 0
    # Next epoch: a different order, still deterministic given the seed.
    e1 = samplers[0].next_batch()
    assert not torch.equal(e1, samplers[0].global_batch(0)[:B])
    again = ShardedSampler(n, B, 0, world, seed=7)
    torch.testing.assert_close(again.rank_batch(8), e1)
    other = ShardedSampler(n, B, 0, world, seed=8)
    assert not torch.equal(other.global_batch(0), again.global_batch(0))
    # The global stream is independent of how it is sharded.
    single = ShardedSampler(n, B * world, 0, 1, seed=7)
    torch.testing.assert_close(single.next_batch(), again.global_batch(0))


def test_sampler_dataset_ids_and_epoch_iteration():
    ds = TokenDataset(torch.arange(200), seq_len=4, first_id=1000)
    s = ShardedSampler(ds, 5, 0, 1, shuffle=False)
    batches = list(s)
    assert len(batches) == 9 and batches[0].tolist() == [1000, 1001, 1002, 1003, 1004]
    assert s.epoch == 1 and len(list(s)) == 9 and s.epoch == 2


def test_sampler_resume_gives_the_same_batches():
    ref = ShardedSampler(50, 3, 1, 2, seed=3)
    stream = [ref.next_batch() for _ in range(30)]  # crosses several epochs (8 steps each)
    s = ShardedSampler(50, 3, 1, 2, seed=3)
    for _ in range(11):
        s.next_batch()
    state = s.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3
    resumed = ShardedSampler(50, 3, 1, 2, seed=3)
    resumed.load_state_dict(state)
    for want in stream[11:]:
        torch.testing.assert_close(resumed.next_batch(), want)
    # Resuming mid-epoch through the iterator too.
    it = ShardedSampler(50, 3, 1, 2, seed=3)
    first = next(iter(it))
    st = it.state_dict()
    r2 = ShardedSampler(50, 3, 1, 2, seed=3)
    r2.load_state_dict(st)
    torch.testing.assert_close(first, stream[0])
    torch.testing.assert_close(r2.next_batch(), stream[1])
    # Same global batch on a different rank count: allowed, same global stream.
    wide = ShardedSampler(50, 1, 0, 6, seed=3)
    wide.load_state_dict(state)
    torch.testing.assert_close(wide.global_batch(wide.step), ref.global_batch(11))
    with pytest.raises(ValueError, match="seed=3 but this sampler has 4"):
        ShardedSampler(50, 3, 1, 2, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        ShardedSampler(50, 2, 1, 2, seed=3).load_state_dict(state)


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="dp_rank=2 is invalid; allowed: 0..1"):
        ShardedSampler(10, 1, 2, 2)
    with pytest.raises(ValueError, match="larger than the 10 samples"):
        ShardedSampler(10, 6, 0, 2)
    with pytest.raises(ValueError, match="batch_size=0"):
        ShardedSampler(10, 0)


# -- tokenizers ---------------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
    tok = build_tokenizer("byte", "")
    text = "héllo wörld ✓\n"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and len(ids) == len(text.encode()) and tok.decode(ids) == text


def test_bpe_train_cache_and_determinism(tmp_path, no_network):
    text = load_text("stdlib", max_bytes=60_000)
    tok = build_tokenizer("bpe", text, bpe_vocab_size=400, cache_dir=tmp_path / "a")
    assert tok.vocab_size == 400 and tok.path.is_file() and tok.path.parent == tmp_path / "a"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < 0.8 * len(text.encode())  # merges actually compress the byte stream
    mtime = tok.path.stat().st_mtime_ns
    cached = build_tokenizer("bpe", text, bpe_vocab_size=400, cache_dir=tmp_path / "a")
    assert cached.path.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert torch.equal(cached.encode(text), ids)
    fresh = build_tokenizer("bpe", text, bpe_vocab_size=400, cache_dir=tmp_path / "b")
    assert fresh.path.read_text() == tok.path.read_text()  # training is deterministic
    cfg = DataConfig(max_bytes=60_000, tokenizer="bpe", bpe_vocab_size=400, cache_dir=str(tmp_path / "a"), seq_len=16)
    with pytest.raises(ValueError, match="produces 400 token ids but the model's vocab_size is 256"):
        build_data(cfg, model_vocab=256)
    tr, ev, t = build_data(cfg, model_vocab=400)
    assert int(tr.tokens.max()) < 400 and len(tr) > 10 * len(ev) > 0


def test_hf_tokenizer_from_checkpoint_object(tmp_path):
    transformers = pytest.importorskip("transformers")
    from commtrain.data.tokenizer import train_bpe

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_bpe("some text here " * 30, 300))
    tr, ev, tok = build_data(DataConfig(max_bytes=20_000, tokenizer="hf", seq_len=16), 300, hf_tokenizer=hf_tok)
    assert tok.vocab_size == len(hf_tok) and int(tr.tokens.max()) < len(hf_tok)
    assert tok.decode(tr.tokens[:100]) == hf_tok.decode(tr.tokens[:100].tolist())


def test_sticky_sampler_keeps_each_sample_on_one_rank():
    """AC-SGD mode: rank r only ever sees ids = first_id + r (mod dp), reshuffled each epoch."""
    from commtrain.data import ShardedSampler

    n, b, dp = 103, 4, 3
    samplers = [ShardedSampler(n, b, r, dp, seed=5, sticky=True) for r in range(dp)]
    spe = samplers[0].steps_per_epoch
    assert spe == (n // dp) // b
    seen = [set() for _ in range(dp)]
    for step in range(3 * spe):
        batches = [s.rank_batch(step) for s in samplers]
        assert torch.equal(torch.cat(batches), samplers[0].global_batch(step))
        for r, ids in enumerate(batches):
            assert len(ids) == b and all(int(i) % dp == r for i in ids)
            seen[r].update(map(int, ids))
    assert all(not (seen[i] & seen[j]) for i in range(dp) for j in range(i + 1, dp))
    # reshuffled: epoch 1 does not repeat epoch 0's order
    assert not torch.equal(samplers[1].rank_batch(0), samplers[1].rank_batch(spe))
    # resumable, and a sticky state does not load into a non-sticky sampler
    state = samplers[0].state_dict()
    with pytest.raises(ValueError, match="sticky"):
        ShardedSampler(n, b, 0, dp, seed=5).load_state_dict(state)
