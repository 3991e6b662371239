import json
from pathlib import Path

import numpy as np
import pytest

from bigtrain.data.prepare import prepare
from bigtrain.data.shards import read_shard_tokens
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError

JSONL_TEXTS = ["first line doc", "", "second\nmultiline doc é", "third ✓", ""]
TXT_TEXT = "a whole text file\nis one document.\n" * 5


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, Path, TextTokenizer]:
    """Inputs in sorted order: a.txt, empty.txt, sub/b.jsonl (2 empty docs + 1 blank line)."""
    root = tmp_path / "raw"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(TXT_TEXT)
    (root / "empty.txt").write_text("")
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(JSONL_TEXTS)]
    (root / "sub" / "b.jsonl").write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
    (root / "ignored.csv").write_text("not,an,input\n")
    tok = TextTokenizer.train([TXT_TEXT, *JSONL_TEXTS], vocab_size=300)
    tok.save(tmp_path / "tok.json")
    return root, tmp_path / "tok.json", tok


def test_totals_and_token_stream(corpus, tmp_path):
    root, tok_path, tok = corpus
    manifest = prepare([root], tok_path, tmp_path / "out", shard_tokens=12)
    docs = [t for t in [TXT_TEXT, "", *JSONL_TEXTS] if t]
    expected = np.concatenate([np.array([*tok.encode(t), 0]) for t in docs])
    totals = manifest["totals"]
    assert totals["documents"] == 4
    assert totals["empty_documents_skipped"] == 3
    assert totals["tokens"] == sum(len(tok.encode(t)) + 1 for t in docs) == len(expected)
    assert totals["shards"] == len(manifest["shards"]) >= 3
    stream = [read_shard_tokens(tmp_path / "out" / s["file"]) for s in manifest["shards"]]
    assert [s["file"] for s in manifest["shards"]][:2] == ["shard-00000.arrow", "shard-00001.arrow"]
    assert all(len(s) >= 12 for s in stream[:-1])
    np.testing.assert_array_equal(np.concatenate(stream), expected)
    assert manifest["token_dtype"] == "uint16"
    assert manifest["tokenizer"] == {
        "sha256": tok.sha256,
        "vocab_size": 300,
        "eos_id": 0,
        "file": "tokenizer.json",
    }
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    assert [Path(s).name for s in manifest["sources"]] == ["a.txt", "empty.txt", "b.jsonl"]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest


def test_refuses_to_overwrite_prepared_dir(corpus, tmp_path):
    root, tok_path, _ = corpus
    prepare([root], tok_path, tmp_path / "out")
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    with pytest.raises(BigtrainError, match="already holds a prepared dataset"):
        prepare([root / "a.txt"], tok_path, tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before


def test_refuses_leftovers_of_unfinished_prepare(corpus, tmp_path):
    root, tok_path, _ = corpus
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard-00000.arrow").write_bytes(b"partial")
    with pytest.raises(BigtrainError, match="unfinished prepare"):
        prepare([root], tok_path, tmp_path / "out")
    assert (tmp_path / "out" / "shard-00000.arrow").read_bytes() == b"partial"


def test_empty_corpus_raises_and_writes_nothing(corpus, tmp_path):
    _, tok_path, _ = corpus
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(BigtrainError, match=r"no text found in inputs .*blank.jsonl \(2 documents"):
        prepare([tmp_path / "blank.jsonl"], tok_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_name_the_culprit(corpus, tmp_path):
    _, tok_path, _ = corpus
    with pytest.raises(BigtrainError, match="input not found: .*missing.txt"):
        prepare([tmp_path / "missing.txt"], tok_path, tmp_path / "out")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(BigtrainError, match="no .txt or .jsonl files under .*nothing"):
        prepare([tmp_path / "nothing"], tok_path, tmp_path / "out")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(BigtrainError, match="bad.jsonl line 2: not a JSON object with a 'text'"):
        prepare([tmp_path / "bad.jsonl"], tok_path, tmp_path / "out")
    with pytest.raises(BigtrainError, match="tokenizer file not found"):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "nope.json", tmp_path / "out2")


def test_custom_text_field(corpus, tmp_path):
    _, tok_path, tok = corpus
    (tmp_path / "c.jsonl").write_text('{"body": "hello there"}\n')
    manifest = prepare([tmp_path / "c.jsonl"], tok_path, tmp_path / "out", text_field="body")
    assert manifest["totals"]["tokens"] == len(tok.encode("hello there")) + 1
