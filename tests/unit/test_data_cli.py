"""`bigtrain prepare` and `bigtrain data inspect|verify|to-mds`, run in-process through `main`."""

import json
import re
from pathlib import Path

import pytest

from bigtrain.cli import main
from bigtrain.data.shards import load_manifest
from bigtrain.data.tokenizer import TextTokenizer

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (i % 5 + 1) for i in range(80)]


@pytest.fixture()
def inputs(tmp_path) -> tuple[Path, Path]:
    lines = [json.dumps({"body": t}) for t in TEXTS]
    lines.insert(3, "{not json")
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    TextTokenizer.train(TEXTS, vocab_size=300).save(tmp_path / "tok.json")
    return tmp_path / "in.jsonl", tmp_path / "tok.json"


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bigtrain: error: "), err
    return lines[0]


def test_prepare_inspect_verify(capsys, inputs, tmp_path):
    src, tok = inputs
    code, out, err = run(capsys, "prepare", "--input", src, "--tokenizer", tok, "--out", tmp_path / "d",
                         "--text-field", "body", "--shard-tokens", 2000, "--workers", 1)
    assert code == 0, err
    totals = load_manifest(tmp_path / "d")["totals"]
    assert f"wrote {totals['shards']} shards, 80 documents, {totals['tokens']:,} tokens" in out
    assert "skipped 0 empty documents and 1 bad records" in out
    assert err.strip() == f"bigtrain: warning: {src.resolve()}:4: not valid JSON; skipped"

    code, out, err = run(capsys, "data", "inspect", tmp_path / "d", "--samples", 2)
    assert code == 0, err
    assert f"documents {totals['documents']:,}, tokens {totals['tokens']:,}" in out
    counts = [int(c.replace(",", "")) for c in re.findall(r"\)\s+([\d,]+)\s+█", out)]
    assert sum(counts) == 80  # the length histogram covers every document
    assert f"sample 0  {TEXTS[0].splitlines()[0]}" in out and "sample 1" in out and "sample 2" not in out
    assert f"problem   {src.resolve()}:4: not valid JSON; skipped" in out

    code, out, err = run(capsys, "data", "verify", tmp_path / "d")
    assert code == 0 and out.startswith(f"ok: {tmp_path / 'd'} (arrow, ")
    assert json.loads(out[out.index("{"):out.rindex("}") + 1])["documents"] == 80

    shard = tmp_path / "d" / load_manifest(tmp_path / "d")["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-30] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run(capsys, "data", "verify", tmp_path / "d")
    assert code == 1 and shard.name in one_error_line(err) and "is corrupt" in err


def test_strict_and_bad_arguments_fail_with_one_line(capsys, inputs, tmp_path):
    src, tok = inputs
    code, _, err = run(capsys, "prepare", "--input", src, "--tokenizer", tok, "--out", tmp_path / "d",
                       "--text-field", "body", "--strict", "--workers", 1)
    assert code == 1
    assert one_error_line(err).endswith(f"{src.resolve()}:4: not valid JSON (--strict)")
    code, _, err = run(capsys, "prepare", "--input", src, "--tokenizer", tok, "--out", tmp_path / "m",
                       "--format", "mds")
    assert code == 1 and "--format mds needs --seq-len" in one_error_line(err)
    code, _, err = run(capsys, "data", "verify", tmp_path / "nothing")
    assert code == 1 and "data directory not found" in one_error_line(err)
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "data", "inspect", tmp_path / "empty")
    assert code == 1 and "empty has no manifest.json or bigtrain-mds.json" in one_error_line(err)
    assert list((tmp_path / "empty").iterdir()) == []


def test_mds_from_prepare_and_to_mds(capsys, inputs, tmp_path):
    src, tok = inputs
    code, out, err = run(capsys, "prepare", "--input", src, "--tokenizer", tok, "--out", tmp_path / "p",
                         "--text-field", "body", "--format", "mds", "--seq-len", 32, "--workers", 1)
    assert code == 0, err
    windows = json.loads((tmp_path / "p" / "mds" / "bigtrain-mds.json").read_text())["windows"]
    assert f"wrote {windows:,} windows of 33 tokens as MDS → {tmp_path / 'p' / 'mds'}" in out
    code, out, err = run(capsys, "data", "verify", tmp_path / "p")
    assert code == 0, err
    assert [line.split(" (")[1].split(",")[0] for line in out.splitlines()] == ["arrow", "mds"]

    code, out, err = run(capsys, "data", "to-mds", tmp_path / "p" / "arrow", tmp_path / "m2", "--seq-len", 32)
    assert code == 0, err
    assert f"wrote {windows:,} windows of 33 tokens as MDS" in out
    code, out, err = run(capsys, "data", "inspect", tmp_path / "m2", "--samples", 1)
    assert code == 0, err
    assert f"windows {windows:,}, seq_len 32" in out and "sample 0  def f0(x):" in out
    code, _, err = run(capsys, "data", "to-mds", tmp_path / "p" / "arrow", tmp_path / "m2", "--seq-len", 32)
    assert code == 1 and "m2 already holds an MDS dataset" in one_error_line(err)
