import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from bigtrain.data.prepare import prepare
from bigtrain.data.shards import (
    load_manifest,
    read_shard_tokens,
    token_dtype,
    verify_dataset,
    write_shard,
)
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError


def _docs(dtype, n=20, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    high = np.iinfo(dtype).max
    return [rng.integers(0, high, size=rng.integers(1, 50), dtype=dtype) for _ in range(n)]


def test_token_dtype_is_narrowest():
    assert token_dtype(8192) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(70000) == np.uint32


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_write_read_round_trip(tmp_path, dtype):
    docs = _docs(dtype)
    entry = write_shard(tmp_path / "shard-00000.arrow", docs, dtype)
    assert entry["file"] == "shard-00000.arrow"
    assert entry["documents"] == 20
    assert entry["tokens"] == sum(len(d) for d in docs)
    data = (tmp_path / "shard-00000.arrow").read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    tokens = read_shard_tokens(tmp_path / "shard-00000.arrow")
    assert tokens.dtype == dtype
    np.testing.assert_array_equal(tokens, np.concatenate(docs))
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000.arrow"]  # no temp file left


def test_read_is_zero_copy(tmp_path):
    docs = _docs(np.uint16, n=200)
    write_shard(tmp_path / "s.arrow", docs, np.uint16)
    allocated = pa.total_allocated_bytes()
    tokens = read_shard_tokens(tmp_path / "s.arrow")
    assert pa.total_allocated_bytes() == allocated
    assert not tokens.flags.owndata
    assert not tokens.flags.writeable  # a read-only memory map, not a private copy
    assert len(tokens) == sum(len(d) for d in docs)


def test_hf_datasets_opens_shard(tmp_path):
    docs = _docs(np.uint16, n=7)
    write_shard(tmp_path / "s.arrow", docs, np.uint16)
    ds = datasets.Dataset.from_file(str(tmp_path / "s.arrow"))
    assert ds.num_rows == 7
    assert ds.column_names == ["tokens"]
    assert [row["tokens"] for row in ds] == [d.tolist() for d in docs]


@pytest.fixture()
def prepared(tmp_path) -> Path:
    texts = [f"document number {i} " * (i % 7 + 1) for i in range(60)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    TextTokenizer.train(texts, vocab_size=300).save(tmp_path / "tok.json")
    prepare([tmp_path / "in.jsonl"], tmp_path / "tok.json", tmp_path / "data", shard_tokens=200)
    return tmp_path / "data"


def test_prepared_shards_open_with_pyarrow_and_hf_datasets(prepared):
    manifest = load_manifest(prepared)
    for entry in manifest["shards"]:
        path = str(prepared / entry["file"])
        table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
        assert table.column_names == ["tokens"] and table.num_rows == entry["documents"]
        assert table.schema.field("tokens").type == pa.list_(pa.uint16())
        ds = datasets.Dataset.from_file(path)
        assert ds.num_rows == entry["documents"]
        assert sum(len(row["tokens"]) for row in ds) == entry["tokens"]
        assert all(row["tokens"][-1] == 0 for row in ds)  # every document ends with EOS


def _shard(prepared: Path, k: int) -> Path:
    return prepared / load_manifest(prepared)["shards"][k]["file"]


def test_verify_passes_then_detects_flipped_byte(prepared):
    manifest = load_manifest(prepared)
    assert manifest["totals"]["shards"] >= 3
    totals = verify_dataset(prepared)
    assert totals == {k: manifest["totals"][k] for k in ("shards", "documents", "tokens")}
    shard = _shard(prepared, 1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(BigtrainError, match=f"shard .*{shard.name} is corrupt: sha256 does not match"):
        verify_dataset(prepared)
    assert shard.read_bytes() == bytes(data)  # reported, never repaired or removed


def test_verify_detects_truncated_and_missing_shards(prepared):
    shard = _shard(prepared, 2)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(BigtrainError, match=f"shard .*{shard.name} is truncated or altered: {len(data) - 100} bytes, manifest says {len(data)}"):
        verify_dataset(prepared)
    shard.unlink()
    with pytest.raises(BigtrainError, match=f"shard .*{shard.name} is missing"):
        verify_dataset(prepared)


def test_load_manifest_errors(tmp_path):
    with pytest.raises(BigtrainError, match="data directory not found: .*nope"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(BigtrainError, match="has no manifest.json: not a prepared dataset"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(BigtrainError, match="manifest.json is not valid JSON"):
        load_manifest(tmp_path)


def test_read_rejects_non_shard(tmp_path):
    (tmp_path / "x.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(BigtrainError, match="x.arrow is not a readable Arrow shard"):
        read_shard_tokens(tmp_path / "x.arrow")


def _word_level_tokenizer(path: Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer with `vocab_size` ids (EOS at 0): cheap to build large."""
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab_size - 1)}, "[UNK]": vocab_size - 1}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(["<|endoftext|>"])
    hf.save(str(path))


def test_a_vocabulary_above_65536_is_stored_as_uint32(tmp_path):
    _word_level_tokenizer(tmp_path / "tok.json", 70_000)
    (tmp_path / "in.txt").write_text("w1 w65535 w65536 w69998 nope")
    manifest = prepare([tmp_path / "in.txt"], tmp_path / "tok.json", tmp_path / "data")
    assert manifest["token_dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == 70_000
    tokens = read_shard_tokens(_shard(tmp_path / "data", 0))
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [1, 65535, 65536, 69998, 69999, 0]
    assert manifest["totals"]["max_token_id"] == 69999
    assert datasets.Dataset.from_file(str(_shard(tmp_path / "data", 0)))[0]["tokens"][2] == 65536
