import gzip
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bigtrain
import bigtrain.data.prepare as prepare_module
from bigtrain.data.prepare import iter_documents, prepare
from bigtrain.data.shards import load_manifest, read_shard_tokens, verify_dataset
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError
from tests.helpers import BAD_JSONL, DOCS, JSONL_TEXTS, TXT_TEXT, raw_corpus


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, Path, TextTokenizer]:
    return raw_corpus(tmp_path)


def _stream(out: Path) -> np.ndarray:
    manifest = load_manifest(out)
    return np.concatenate([read_shard_tokens(out / s["file"]) for s in manifest["shards"]])


def _expected(tok: TextTokenizer, texts: list[str]) -> np.ndarray:
    return np.concatenate([np.array([*tok.encode(t), 0]) for t in texts if t])


def test_totals_and_token_stream(corpus, tmp_path):
    root, tok_path, tok = corpus
    manifest = prepare([root], tok_path, tmp_path / "out", shard_tokens=12)
    docs = [t for t in [TXT_TEXT, "", *JSONL_TEXTS] if t]
    expected = _expected(tok, docs)
    totals = manifest["totals"]
    assert totals["documents"] == 4
    assert totals["empty_documents_skipped"] == 3
    assert totals["bad_records_skipped"] == 0 and totals["documents_with_invalid_utf8"] == 0
    assert totals["tokens"] == sum(len(tok.encode(t)) + 1 for t in docs) == len(expected)
    assert totals["max_token_id"] == int(expected.max())
    assert totals["input_bytes"] == sum(p.stat().st_size for p in root.rglob("*.*") if p.suffix != ".csv")
    assert totals["shards"] == len(manifest["shards"]) >= 3
    stream = [read_shard_tokens(tmp_path / "out" / s["file"]) for s in manifest["shards"]]
    # One unit (a small input): shards -0000, -0001, ... each of at least 12 tokens but the last.
    assert [s["file"] for s in manifest["shards"]][:2] == ["shard-000000-0000.arrow", "shard-000000-0001.arrow"]
    assert all(len(s) >= 12 for s in stream[:-1])
    np.testing.assert_array_equal(np.concatenate(stream), expected)
    assert manifest["token_dtype"] == "uint16"
    assert manifest["tokenizer"] == {
        "sha256": tok.sha256,
        "vocab_size": 300,
        "eos_id": 0,
        "file": "tokenizer.json",
    }
    assert manifest["bigtrain_version"] == bigtrain.__version__
    assert manifest["args"]["shard_tokens"] == 12 and manifest["args"]["text_field"] == "text"
    for entry in manifest["shards"]:
        assert set(entry) == {"file", "documents", "tokens", "bytes", "sha256", "max_token_id"}
        assert entry["bytes"] == (tmp_path / "out" / entry["file"]).stat().st_size
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    assert [Path(s["path"]).name for s in manifest["sources"]] == ["a.txt", "empty.txt", "b.jsonl"]
    assert [s["format"] for s in manifest["sources"]] == ["txt", "txt", "jsonl"]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []


def test_every_input_format_gives_the_same_tokens(corpus, tmp_path):
    _, tok_path, tok = corpus
    records = [{"text": t} for t in DOCS]
    raw = "".join(json.dumps(r) + "\n" for r in records).encode()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(raw)
    (src / "b.jsonl.gz").write_bytes(gzip.compress(raw))
    with pa.CompressedOutputStream(str(src / "c.jsonl.zst"), "zstd") as f:
        f.write(raw)
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), src / "d.parquet",
                   row_group_size=25)
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(src / "hf"))
    expected = _expected(tok, DOCS)
    for i, inputs in enumerate([[src / "a.jsonl"], [src / "b.jsonl.gz"], [src / "c.jsonl.zst"],
                                [src / "d.parquet"], [src / "hf"], [str(src / "hf" / "*.arrow")]]):
        manifest = prepare(inputs, tok_path, tmp_path / f"out{i}")
        assert manifest["totals"]["documents"] == len(DOCS), inputs
        np.testing.assert_array_equal(_stream(tmp_path / f"out{i}"), expected)
    # A directory holds every format: each file's documents, in sorted file order.
    manifest = prepare([src], tok_path, tmp_path / "all")
    assert [s["format"] for s in manifest["sources"]] == ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow"]
    np.testing.assert_array_equal(_stream(tmp_path / "all"), np.tile(expected, 5))
    assert list(iter_documents([src / "d.parquet"])) == DOCS


def test_units_workers_and_byte_ranges_do_not_change_the_output(corpus, tmp_path, monkeypatch):
    _, tok_path, tok = corpus
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS * 3))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "t.parquet", row_group_size=10)
    monkeypatch.setattr(prepare_module, "MIN_UNIT_BYTES", 2000)  # cut the inputs into many units
    one = prepare([src, tmp_path / "t.parquet"], tok_path, tmp_path / "one", shard_tokens=500)
    two = prepare([src, tmp_path / "t.parquet"], tok_path, tmp_path / "two", shard_tokens=500, workers=2)
    assert one["args"]["unit_bytes"] == 2000
    units = {s["file"].split("-")[1] for s in one["shards"]}
    assert len(units) >= 10  # the .jsonl was cut at byte offsets, the .parquet at row groups
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert one["totals"] == two["totals"]
    np.testing.assert_array_equal(_stream(tmp_path / "two"), _expected(tok, DOCS * 4))


class _Killed(Exception):
    pass


def test_killed_prepare_resumes_and_skips_finished_units(corpus, tmp_path, monkeypatch):
    _, tok_path, _ = corpus
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS * 2))
    monkeypatch.setattr(prepare_module, "MIN_UNIT_BYTES", 2000)
    reference = prepare([src], tok_path, tmp_path / "reference", shard_tokens=300)
    n_units = len({s["file"].split("-")[1] for s in reference["shards"]})
    assert n_units >= 4

    real_run_unit, calls, kill = prepare_module.run_unit, [], [True]

    def dies_on_third_unit(job, progress=None):
        calls.append(job.index)
        if kill[0] and len(calls) == 3:
            raise _Killed
        return real_run_unit(job, progress)

    out = tmp_path / "out"
    monkeypatch.setattr(prepare_module, "run_unit", dies_on_third_unit)
    with pytest.raises(_Killed):
        prepare([src], tok_path, out, shard_tokens=300)
    assert not (out / "manifest.json").exists()
    with pytest.raises(BigtrainError, match="has no manifest.json: not a prepared dataset"):
        load_manifest(out)
    finished = {p: p.stat().st_mtime_ns for p in out.glob("shard-00000[01]-*.arrow")}
    assert finished and all(int(p.name.split("-")[1]) < 2 for p in finished)

    calls.clear()
    kill[0] = False
    manifest = prepare([src], tok_path, out, shard_tokens=300)
    assert calls == list(range(2, n_units))  # units 0 and 1 were not tokenized again
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert verify_dataset(out)["tokens"] == reference["totals"]["tokens"]
    assert not (out / ".prepare").exists()


def test_resume_with_other_arguments_is_refused(corpus, tmp_path, monkeypatch):
    _, tok_path, _ = corpus
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    monkeypatch.setattr(prepare_module, "MIN_UNIT_BYTES", 2000)

    def dies(job, progress=None):
        raise _Killed

    monkeypatch.setattr(prepare_module, "run_unit", dies)
    with pytest.raises(_Killed):
        prepare([src], tok_path, tmp_path / "out", shard_tokens=300)
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    with pytest.raises(BigtrainError, match="out holds an unfinished prepare with other shard_tokens"):
        prepare([src], tok_path, tmp_path / "out", shard_tokens=301)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before


def test_refuses_to_overwrite_prepared_dir(corpus, tmp_path):
    root, tok_path, _ = corpus
    prepare([root], tok_path, tmp_path / "out")
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    with pytest.raises(BigtrainError, match="already holds a prepared dataset"):
        prepare([root / "a.txt"], tok_path, tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before


def test_refuses_files_it_did_not_write(corpus, tmp_path):
    root, tok_path, _ = corpus
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard-00000.arrow").write_bytes(b"partial")
    with pytest.raises(BigtrainError, match="out is not empty .shard-00000.arrow. and holds no unfinished prepare"):
        prepare([root], tok_path, tmp_path / "out")
    assert (tmp_path / "out" / "shard-00000.arrow").read_bytes() == b"partial"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["shard-00000.arrow"]


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
    with pytest.raises(BigtrainError, match="no .txt, .jsonl, .* files under .*nothing"):
        prepare([tmp_path / "nothing"], tok_path, tmp_path / "out")
    with pytest.raises(BigtrainError, match="no input files match .*nothing/\\*.jsonl"):
        prepare([str(tmp_path / "nothing" / "*.jsonl")], tok_path, tmp_path / "out")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(BigtrainError, match="unsupported input .*x.csv"):
        prepare([tmp_path / "x.csv"], tok_path, tmp_path / "out")
    (tmp_path / "ok.jsonl").write_text('{"text": "ok"}\n')
    with pytest.raises(BigtrainError, match="tokenizer file not found"):
        prepare([tmp_path / "ok.jsonl"], tmp_path / "nope.json", tmp_path / "out2")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(BigtrainError, match="p.parquet has no column 'text' .columns: body.; pass --text-field"):
        prepare([tmp_path / "p.parquet"], tok_path, tmp_path / "out3")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(BigtrainError, match="bad.parquet is not a readable Parquet file"):
        prepare([tmp_path / "bad.parquet"], tok_path, tmp_path / "out4")
    assert not any((tmp_path / f"out{s}").exists() for s in ("", "2", "3", "4"))




def test_bad_jsonl_lines_are_skipped_counted_and_located(corpus, tmp_path):
    _, tok_path, tok = corpus
    (tmp_path / "bad.jsonl").write_bytes(BAD_JSONL)
    manifest = prepare([tmp_path / "bad.jsonl"], tok_path, tmp_path / "out")
    assert manifest["totals"]["documents"] == 2
    assert manifest["totals"]["bad_records_skipped"] == 3
    where = str((tmp_path / "bad.jsonl").resolve())
    assert manifest["problems"] == [
        f"{where}:2: not valid JSON; skipped",
        f"{where}:3: not a JSON object; skipped",
        f"{where}:4: no string field 'text'; skipped",
    ]
    np.testing.assert_array_equal(_stream(tmp_path / "out"), _expected(tok, ["good one", "good two"]))


def test_line_numbers_are_right_in_byte_ranges(corpus, tmp_path, monkeypatch):
    _, tok_path, _ = corpus
    lines = [json.dumps({"text": t}) for t in DOCS]
    lines[100] = "{broken"
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(prepare_module, "MIN_UNIT_BYTES", 1000)
    manifest = prepare([tmp_path / "in.jsonl"], tok_path, tmp_path / "out")
    assert manifest["totals"]["documents"] == len(DOCS) - 1
    assert manifest["problems"] == [f"{(tmp_path / 'in.jsonl').resolve()}:101: not valid JSON; skipped"]


def test_strict_stops_at_the_first_bad_line_and_deletes_nothing(corpus, tmp_path, monkeypatch):
    _, tok_path, _ = corpus
    (tmp_path / "bad.jsonl").write_bytes(BAD_JSONL)
    with pytest.raises(BigtrainError, match=r"bad.jsonl:2: not valid JSON \(--strict\)$"):
        prepare([tmp_path / "bad.jsonl"], tok_path, tmp_path / "out", strict=True)
    assert (tmp_path / "bad.jsonl").read_bytes() == BAD_JSONL
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "more.jsonl").write_text('{"text": "fine"}\n')
    monkeypatch.setattr(prepare_module, "MIN_UNIT_BYTES", 10)  # several units, so a pool runs them
    with pytest.raises(BigtrainError, match=r"bad.jsonl:2: not valid JSON \(--strict\)$"):  # from a worker process
        prepare([tmp_path / "more.jsonl", tmp_path / "bad.jsonl"], tok_path, tmp_path / "out2", strict=True, workers=2)


def test_undecodable_bytes_are_replaced_and_counted(corpus, tmp_path):
    _, tok_path, tok = corpus
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 latin-1 text")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "bad \xff byte"}\n{"text": "lone \\udcff surrogate"}\n{"text": "fine"}\n')
    manifest = prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], tok_path, tmp_path / "out")
    assert manifest["totals"]["documents"] == 4
    assert manifest["totals"]["documents_with_invalid_utf8"] == 3
    assert manifest["totals"]["bad_records_skipped"] == 0
    texts = ["caf\ufffd latin-1 text", "bad \ufffd byte", "lone ? surrogate", "fine"]
    np.testing.assert_array_equal(_stream(tmp_path / "out"), _expected(tok, texts))
    assert manifest["problems"][0].endswith("a.txt: invalid UTF-8 at byte 3 replaced with U+FFFD")
    assert manifest["problems"][1].endswith("b.jsonl:1: invalid UTF-8 at byte 14 replaced with U+FFFD")
    assert manifest["problems"][2].endswith("b.jsonl:2: lone surrogate escape replaced")


def test_custom_text_field(corpus, tmp_path):
    _, tok_path, tok = corpus
    (tmp_path / "c.jsonl").write_text('{"body": "hello there"}\n')
    manifest = prepare([tmp_path / "c.jsonl"], tok_path, tmp_path / "out", text_field="body")
    assert manifest["totals"]["tokens"] == len(tok.encode("hello there")) + 1


def test_truncated_compressed_input_names_the_file(corpus, tmp_path):
    _, tok_path, _ = corpus
    data = gzip.compress(b'{"text": "x"}\n' * 1000)
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(BigtrainError, match="cut.jsonl.gz is not a readable .jsonl.gz file"):
        prepare([tmp_path / "cut.jsonl.gz"], tok_path, tmp_path / "out")
