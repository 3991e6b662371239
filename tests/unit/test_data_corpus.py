import hashlib
import json
import sysconfig
from pathlib import Path

import pytest

from bigtrain.data.corpus import stdlib_sources, write_default_corpus
from bigtrain.errors import BigtrainError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VAL_FRACTION = 0.3
MAX_MB = 2


def _hash(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()


def _paths(jsonl: Path) -> list[str]:
    return [json.loads(line)["path"] for line in jsonl.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    return write_default_corpus(
        tmp_path_factory.mktemp("corpus"), val_fraction=VAL_FRACTION, max_mb=MAX_MB
    )


def test_stdlib_sources_sorted_and_first_party():
    sources = stdlib_sources()
    rels = [p.relative_to(STDLIB).as_posix() for p in sources]
    assert len(rels) > 500
    assert rels == sorted(rels)
    assert all(r.endswith(".py") for r in rels)
    assert not any("site-packages" in r or "dist-packages" in r for r in rels)
    assert "json/decoder.py" in rels


def test_split_is_deterministic_and_disjoint(corpus, tmp_path):
    train, val = corpus
    train_paths, val_paths = _paths(train), _paths(val)
    assert not set(train_paths) & set(val_paths)
    assert all(int(_hash(r)[:8], 16) / 2**32 < VAL_FRACTION for r in val_paths)
    assert all(int(_hash(r)[:8], 16) / 2**32 >= VAL_FRACTION for r in train_paths)
    again = write_default_corpus(tmp_path, val_fraction=VAL_FRACTION, max_mb=MAX_MB)
    assert again[0].read_bytes() == train.read_bytes()
    assert again[1].read_bytes() == val.read_bytes()


def test_val_fraction_of_bytes_as_asked(corpus):
    n_train, n_val = (len(_paths(p)) for p in corpus)
    assert n_train + n_val > 50
    train_bytes, val_bytes = (sum(len(json.loads(x)["text"].encode()) for x in p.open()) for p in corpus)
    # each split fills its share of the byte budget, overshooting by at most one file
    largest = max(p.stat().st_size for p in stdlib_sources())
    assert VAL_FRACTION * MAX_MB * 1e6 <= val_bytes < VAL_FRACTION * MAX_MB * 1e6 + largest
    assert (1 - VAL_FRACTION) * MAX_MB * 1e6 <= train_bytes < (1 - VAL_FRACTION) * MAX_MB * 1e6 + largest


def test_subset_is_the_hash_ordered_prefix_of_each_split(corpus):
    train, val = corpus
    docs = {}
    for path in corpus:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            docs[record["path"]] = record["text"]
    expected, left = [], {True: VAL_FRACTION * MAX_MB * 1e6, False: (1 - VAL_FRACTION) * MAX_MB * 1e6}
    for rel in sorted(
        (p.relative_to(STDLIB).as_posix() for p in stdlib_sources()), key=lambda r: _hash(r)[8:]
    ):
        is_val = int(_hash(rel)[:8], 16) / 2**32 < VAL_FRACTION
        data = (STDLIB / rel).read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if left[is_val] > 0:
            expected.append(rel)
            left[is_val] -= len(data)
    assert sorted(docs) == sorted(expected)
    assert len(_paths(train)) + len(_paths(val)) == len(expected)
    assert all(docs[r] == (STDLIB / r).read_text(encoding="utf-8") for r in expected[:20])


def test_second_call_reuses_files_and_new_args_rewrite(tmp_path):
    train, val = write_default_corpus(tmp_path, val_fraction=0.5, max_mb=0.2)
    stamps = (train.stat().st_mtime_ns, val.stat().st_mtime_ns)
    write_default_corpus(tmp_path, val_fraction=0.5, max_mb=0.2)
    assert (train.stat().st_mtime_ns, val.stat().st_mtime_ns) == stamps
    record = json.loads((tmp_path / "corpus.json").read_text())
    assert record["train_documents"] + record["val_documents"] == len(_paths(train)) + len(
        _paths(val)
    )
    write_default_corpus(tmp_path, val_fraction=0.0, max_mb=0.2)
    assert _paths(val) == []
    assert json.loads((tmp_path / "corpus.json").read_text())["args"]["val_fraction"] == 0.0


def test_refuses_to_overwrite_foreign_files(tmp_path):
    (tmp_path / "train.jsonl").write_text("mine\n")
    with pytest.raises(BigtrainError, match="train.jsonl"):
        write_default_corpus(tmp_path, max_mb=0.1)
    assert (tmp_path / "train.jsonl").read_text() == "mine\n"
