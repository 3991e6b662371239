import json
from pathlib import Path

import numpy as np
import pytest

from bigtrain.config import DataConfig, SourceConfig
from bigtrain.data.build import build_train_loader, build_val_data
from bigtrain.data.loader import ConcatWindows, Mixture, PackedTokens, WindowLoader, eval_batches
from bigtrain.data.prepare import prepare
from bigtrain.data.shards import load_manifest
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError

SEQ_LEN = 16
TEXTS = [f"record {i}: " + "the quick brown fox " * (i % 5 + 1) for i in range(200)]


def _prepare(root: Path, texts: list[str], tokenizer: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare([root / "in.jsonl"], tokenizer, root / "data", shard_tokens=400)
    return root / "data"


@pytest.fixture()
def tokenizer(tmp_path) -> Path:
    TextTokenizer.train(TEXTS, vocab_size=300).save(tmp_path / "tok.json")
    return tmp_path / "tok.json"


@pytest.fixture()
def data_dir(tmp_path, tokenizer) -> Path:
    return _prepare(tmp_path / "a", TEXTS, tokenizer)


def test_one_dataset(data_dir, tokenizer):
    cfg = DataConfig(path=str(data_dir), seq_len=SEQ_LEN, tokenizer=str(tokenizer))
    loader = build_train_loader(cfg, micro_batch=4, grad_accum=2, dp_rank=1, dp_size=2, seed=3,
                                model_vocab_size=300)
    assert isinstance(loader, WindowLoader) and isinstance(loader.data, PackedTokens)
    assert (loader.vocab_size, loader.global_batch) == (300, 16)
    assert loader.tokenizer_path == data_dir / "tokenizer.json"
    assert loader.max_token_id == load_manifest(data_dir)["totals"]["max_token_id"]
    direct = WindowLoader(PackedTokens(data_dir, SEQ_LEN), 4, 2, 1, 2, seed=3)
    for _ in range(3):
        got, want = loader.next_step(), direct.next_step()
        assert [b.shape for b in got] == [(4, SEQ_LEN + 1)] * 2
        assert all((g == w).all() for g, w in zip(got, want, strict=True))
    assert build_val_data(cfg, SEQ_LEN) is None


def test_weighted_sources_make_a_mixture(tmp_path, data_dir, tokenizer):
    other = _prepare(tmp_path / "b", TEXTS[:80], tokenizer)
    cfg = DataConfig(sources=[SourceConfig(str(data_dir), 3.0), SourceConfig(str(other), 1.0)],
                     seq_len=SEQ_LEN)
    loader = build_train_loader(cfg, 8, 1, 0, 1, seed=0)
    assert isinstance(loader.data, Mixture)
    assert loader.mixture.weights == [0.75, 0.25]
    assert [s.data_dir for s in loader.mixture.sources] == [data_dir, other]
    ids = np.concatenate([loader.step_window_ids(s) for s in range(50)])
    share = (ids < loader.mixture.offsets[1]).mean()
    assert abs(share - 0.75) < 0.01


def test_validation_from_a_directory_or_a_held_out_fraction(tmp_path, data_dir, tokenizer):
    val_dir = _prepare(tmp_path / "v", TEXTS[:50], tokenizer)
    cfg = DataConfig(path=str(data_dir), val_path=str(val_dir), seq_len=SEQ_LEN)
    val = build_val_data(cfg, SEQ_LEN)
    assert isinstance(val, PackedTokens) and val.data_dir == val_dir
    assert sum(b.shape[0] for b in eval_batches(val, 8)) == len(val)

    cfg = DataConfig(path=str(data_dir), val_fraction=0.1, seq_len=SEQ_LEN)
    loader = build_train_loader(cfg, 4, 1, 0, 1, seed=0)
    val = build_val_data(cfg, SEQ_LEN)
    full = PackedTokens(data_dir, SEQ_LEN)
    train_tokens = loader.data.total_tokens
    assert train_tokens + val.total_tokens == full.total_tokens
    assert abs(val.total_tokens / full.total_tokens - 0.1) < 0.02
    # every training window lies before the cut, every validation window after it
    last_train = loader.data.window(len(loader.data) - 1)
    np.testing.assert_array_equal(last_train, full.window(len(loader.data) - 1))
    assert (len(loader.data) - 1) * SEQ_LEN + SEQ_LEN + 1 <= train_tokens
    stream = np.concatenate([full.window(i)[:-1] for i in range(len(full))])
    np.testing.assert_array_equal(val.window(0), stream[train_tokens:train_tokens + SEQ_LEN + 1])
    assert stream[train_tokens - 1] == 0  # the cut follows an EOS: no document is split

    two = DataConfig(sources=[SourceConfig(str(data_dir)), SourceConfig(str(val_dir))], val_fraction=0.2,
                     seq_len=SEQ_LEN)
    val = build_val_data(two, SEQ_LEN)
    assert isinstance(val, ConcatWindows) and len(val.parts) == 2


def test_config_conflicts_are_refused(data_dir):
    cases = [
        (DataConfig(path=str(data_dir), val_path=str(data_dir), val_fraction=0.1), "set data.val_path or data.val_fraction, not both"),
        (DataConfig(path=str(data_dir), val_fraction=1.5), r"data.val_fraction must be in \[0, 1\), got 1.5"),
        (DataConfig(backend="streaming", remote=str(data_dir)), "data.backend=streaming needs data.local"),
        (DataConfig(backend="streaming", local="x", val_fraction=0.1), "data.val_fraction needs data.backend=arrow; use data.val_path"),
        (DataConfig(sources=[SourceConfig("")]), r"data.sources\[0\].path is not set"),
        (DataConfig(sources=[SourceConfig(str(data_dir), 0.0)]), r"data.sources\[0\].weight must be positive, got 0.0"),
    ]
    for cfg, message in cases:
        with pytest.raises(BigtrainError, match=message):
            build_train_loader(cfg, 1, 1, 0, 1, 0)


def test_data_from_another_tokenizer_is_refused(tmp_path, data_dir, tokenizer):
    TextTokenizer.train(TEXTS[:20], vocab_size=280).save(tmp_path / "other.json")
    cfg = DataConfig(path=str(data_dir), seq_len=SEQ_LEN, tokenizer=str(tmp_path / "other.json"))
    with pytest.raises(BigtrainError, match=r"a/data/manifest.json was tokenized with tokenizer \w{12}, but data.tokenizer .*other.json is"):
        build_train_loader(cfg, 1, 1, 0, 1, 0)
    foreign = _prepare(tmp_path / "f", TEXTS[:50], tmp_path / "other.json")
    cfg = DataConfig(sources=[SourceConfig(str(data_dir)), SourceConfig(str(foreign))], seq_len=SEQ_LEN)
    with pytest.raises(BigtrainError, match=r"f/data/manifest.json was tokenized with .* but the tokenizer of .*a/data/manifest.json is"):
        build_train_loader(cfg, 1, 1, 0, 1, 0)
    cfg = DataConfig(path=str(data_dir), val_path=str(foreign), seq_len=SEQ_LEN)
    with pytest.raises(BigtrainError, match=r"f/data/manifest.json was tokenized with"):
        build_val_data(cfg, SEQ_LEN)


def test_a_model_vocab_below_the_largest_token_id_is_refused(data_dir):
    cfg = DataConfig(path=str(data_dir), seq_len=SEQ_LEN)
    top = load_manifest(data_dir)["totals"]["max_token_id"]
    assert 250 < top < 300
    build_train_loader(cfg, 1, 1, 0, 1, 0, model_vocab_size=top + 1)
    with pytest.raises(BigtrainError, match=f"a/data holds token id {top}; model.vocab_size={top} is too small"):
        build_train_loader(cfg, 1, 1, 0, 1, 0, model_vocab_size=top)


def _shard(data_dir: Path, k: int = 1) -> Path:
    return data_dir / load_manifest(data_dir)["shards"][k]["file"]


def test_corrupt_truncated_or_unprepared_data_is_refused_by_name(tmp_path, data_dir):
    cfg = DataConfig(path=str(data_dir), seq_len=SEQ_LEN)
    shard = _shard(data_dir)
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0x10  # a token value: Arrow still reads it, only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(BigtrainError, match=f"shard .*{shard.name} is corrupt: sha256 does not match"):
        build_train_loader(cfg, 1, 1, 0, 1, 0)
    assert len(build_train_loader(DataConfig(path=str(data_dir), seq_len=SEQ_LEN, verify_checksums=False),
                                  1, 1, 0, 1, 0).data) > 0
    shard.write_bytes(bytes(data[:-1000]))
    with pytest.raises(BigtrainError, match=f"shard .*{shard.name} is truncated or altered"):
        build_train_loader(cfg, 1, 1, 0, 1, 0)
    assert shard.stat().st_size == len(data) - 1000  # nothing repaired or deleted
    (tmp_path / "raw").mkdir()
    with pytest.raises(BigtrainError, match="raw has no manifest.json: not a prepared dataset"):
        build_train_loader(DataConfig(path=str(tmp_path / "raw")), 1, 1, 0, 1, 0)
