import gc
import json
from pathlib import Path

import numpy as np
import pytest

from bigtrain.config import DataConfig
from bigtrain.data.build import build_train_loader
from bigtrain.data.loader import PackedTokens, WindowLoader
from bigtrain.data.mds import MDS_META, StreamingWindowLoader, prepare_mds, verify_mds, write_mds
from bigtrain.data.prepare import prepare
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError

SEQ_LEN = 16
_WORDS = "pack my box with five dozen liquor jugs how vexingly quick daft zebras jump".split()
_RNG = np.random.default_rng(0)
# Random word sequences, so that no two windows hold the same tokens.
TEXTS = [" ".join(_RNG.choice(_WORDS, size=_RNG.integers(5, 40))) for _ in range(150)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(arrow dir, mds dir as the 'remote'): 3 MDS shards of windows of 17 tokens."""
    root = tmp_path_factory.mktemp("mds")
    (root / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    TextTokenizer.train(TEXTS, vocab_size=300).save(root / "tok.json")
    prepare([root / "in.jsonl"], root / "tok.json", root / "arrow", shard_tokens=1000)
    write_mds(root / "arrow", root / "remote", SEQ_LEN, size_limit=1 << 12)
    return root / "arrow", root / "remote"


def _windows(loader, steps: int) -> list[tuple[int, ...]]:
    return [tuple(row) for _ in range(steps) for batch in loader.next_step() for row in batch.tolist()]


def _streaming(remote: Path, local: Path, **kwargs) -> StreamingWindowLoader:
    gc.collect()  # streaming refuses a cache directory that a live dataset still holds
    return StreamingWindowLoader(str(remote), local, SEQ_LEN, **kwargs)


def test_conversion_record_and_verification(prepared, tmp_path):
    arrow, remote = prepared
    meta = json.loads((remote / MDS_META).read_text())
    data = PackedTokens(arrow, SEQ_LEN)
    assert meta["windows"] == len(data) and meta["seq_len"] == SEQ_LEN
    assert meta["token_dtype"] == "uint16" and meta["tokenizer"] == data.manifest["tokenizer"]
    index = json.loads((remote / "index.json").read_text())
    assert len(index["shards"]) >= 3
    assert verify_mds(remote) == {"shards": len(index["shards"]), "windows": len(data),
                                  "tokens": len(data) * (SEQ_LEN + 1)}
    with pytest.raises(BigtrainError, match="already holds an MDS dataset"):
        write_mds(arrow, remote, SEQ_LEN)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(BigtrainError, match="busy exists and is not an empty directory"):
        write_mds(arrow, tmp_path / "busy", SEQ_LEN)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "x"


def test_corrupt_mds_shard_is_named(prepared, tmp_path):
    _, remote = prepared
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in remote.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = copy / json.loads((copy / "index.json").read_text())["shards"][1]["raw_data"]["basename"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x04
    shard.write_bytes(bytes(data))
    with pytest.raises(BigtrainError, match=f"shard .*{shard.name} is corrupt: sha256 does not match index.json"):
        verify_mds(copy)
    loader = _streaming(copy, tmp_path / "cache", micro_batch=8, shuffle=False)
    with pytest.raises(BigtrainError, match=f"reading .*copy failed: Checksum failure: .*{shard.name} .check it"):
        for _ in range(100):  # streaming checks each shard's sha256 as it fetches it
            loader.next_step()
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(BigtrainError, match=f"shard .*{shard.name} is truncated or altered"):
        verify_mds(copy)
    (copy / MDS_META).unlink()
    with pytest.raises(BigtrainError, match="copy has no bigtrain-mds.json"):
        verify_mds(copy)


def test_both_backends_yield_the_same_windows_per_epoch(prepared, tmp_path):
    arrow, remote = prepared
    n = len(PackedTokens(arrow, SEQ_LEN))
    steps = -(-2 * n // 8)  # two epochs and a bit
    arrow_windows = _windows(WindowLoader(PackedTokens(arrow, SEQ_LEN), 4, 2, seed=9), steps)
    stream_windows = _windows(_streaming(remote, tmp_path / "cache", micro_batch=4, grad_accum=2, seed=9), steps)
    for epoch in range(2):
        a, s = arrow_windows[epoch * n:(epoch + 1) * n], stream_windows[epoch * n:(epoch + 1) * n]
        assert len(set(s)) == n  # every window once
        assert sorted(a) == sorted(s)
    assert stream_windows[:n] != stream_windows[n:2 * n]  # reshuffled per epoch


def test_streaming_resumes_exactly_with_its_own_state(prepared, tmp_path):
    _, remote = prepared
    straight = _windows(_streaming(remote, tmp_path / "a", micro_batch=4, seed=2), 30)
    first = _streaming(remote, tmp_path / "b", micro_batch=4, seed=2)
    head = _windows(first, 12)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["backend"] == "streaming" and state["consumed_windows"] == 48
    assert state["dataset"]["sample_in_epoch"] == 48 and state["dataset"]["shuffle_seed"] == 2
    del first
    second = _streaming(remote, tmp_path / "b", micro_batch=4, seed=2)
    second.load_state_dict(state)
    assert head + _windows(second, 18) == straight  # crosses into the second epoch, too
    with pytest.raises(BigtrainError, match="seed=2 but this run has 3"):
        _streaming(remote, tmp_path / "c", micro_batch=4, seed=3).load_state_dict(state)


def test_streaming_resumption_is_elastic_in_the_dp_size(prepared, tmp_path):
    _, remote = prepared
    n = json.loads((remote / MDS_META).read_text())["windows"]
    seen, state = [], None
    for dp_size, micro_batch in ((2, 4), (1, 8), (4, 2)):  # the global batch stays 8 windows
        states = []
        for rank in range(dp_size):
            loader = _streaming(remote, tmp_path / "cache", micro_batch=micro_batch, dp_rank=rank,
                                dp_size=dp_size, seed=4)
            if state is not None:
                loader.load_state_dict(state)
            seen += _windows(loader, 3)
            states.append(json.loads(json.dumps(loader.state_dict())))
            del loader
        assert all(s == states[0] for s in states)
        state = states[0]
    assert state["consumed_windows"] == 72 and state["dataset"]["initial_physical_nodes"] == 2
    assert len(seen) == 72 <= n and len(set(seen)) == 72  # within one epoch: nothing repeated


def test_streaming_refuses_other_windows_or_tokenizer(prepared, tmp_path):
    _, remote = prepared
    with pytest.raises(BigtrainError, match="holds windows of seq_len 16, data.seq_len is 32; convert again with --seq-len 32"):
        StreamingWindowLoader(str(remote), tmp_path / "c", 32, micro_batch=1)
    with pytest.raises(BigtrainError, match="cannot fetch .*nowhere/bigtrain-mds.json"):
        StreamingWindowLoader(str(tmp_path / "nowhere"), tmp_path / "d", SEQ_LEN, micro_batch=1)
    TextTokenizer.train(TEXTS[:10], vocab_size=270).save(tmp_path / "other.json")
    cfg = DataConfig(backend="streaming", remote=str(remote), local=str(tmp_path / "e"), seq_len=SEQ_LEN,
                     tokenizer=str(tmp_path / "other.json"))
    with pytest.raises(BigtrainError, match="remote was tokenized with tokenizer .* but data.tokenizer"):
        build_train_loader(cfg, 1, 1, 0, 1, 0)


def test_config_selects_the_streaming_backend(prepared, tmp_path):
    arrow, remote = prepared
    cfg = DataConfig(backend="streaming", remote=str(remote), local=str(tmp_path / "cache"), seq_len=SEQ_LEN)
    gc.collect()
    loader = build_train_loader(cfg, micro_batch=2, grad_accum=3, dp_rank=0, dp_size=1, seed=0,
                                model_vocab_size=300)
    assert isinstance(loader, StreamingWindowLoader)
    assert (loader.vocab_size, loader.global_batch) == (300, 6)
    assert loader.tokenizer_path.read_bytes() == (arrow / "tokenizer.json").read_bytes()
    batches = loader.next_step()
    assert [tuple(b.shape) for b in batches] == [(2, SEQ_LEN + 1)] * 3
    assert all(b.dtype == np.int64 or str(b.dtype) == "torch.int64" for b in batches)


def test_prepare_format_mds_resumes_a_cut_conversion(tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    TextTokenizer.train(TEXTS, vocab_size=300).save(tmp_path / "tok.json")
    out = tmp_path / "out"
    (out / ".mds-partial").mkdir(parents=True)  # a conversion that was killed
    (out / ".mds-partial" / "shard.00000.mds").write_bytes(b"half")
    manifest, meta = prepare_mds([tmp_path / "in.jsonl"], tmp_path / "tok.json", out, SEQ_LEN)
    assert sorted(p.name for p in out.iterdir()) == ["arrow", "mds"]
    assert meta["windows"] == len(PackedTokens(out / "arrow", SEQ_LEN))
    assert manifest["totals"]["documents"] == len(TEXTS)
    assert verify_mds(out / "mds")["windows"] == meta["windows"]
    with pytest.raises(BigtrainError, match="already holds a prepared MDS dataset"):
        prepare_mds([tmp_path / "in.jsonl"], tmp_path / "tok.json", out, SEQ_LEN)
