import json
import sysconfig
from pathlib import Path

import pytest

from bigtrain.data.tokenizer import EOS_TOKEN, TextTokenizer
from bigtrain.errors import BigtrainError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
UNICODE = "café über naïve — 中文字符 😀🚀\n\ttab\r\n  two  spaces\u00a0nbsp \x00 end "


@pytest.fixture(scope="module")
def stdlib_text() -> str:
    return (STDLIB / "textwrap.py").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok(stdlib_text) -> TextTokenizer:
    other = (STDLIB / "json" / "decoder.py").read_text(encoding="utf-8")
    return TextTokenizer.train([stdlib_text, other], vocab_size=400)


def test_vocab_and_eos(tok):
    assert tok.eos_id == 0
    assert tok.hf.token_to_id(EOS_TOKEN) == 0
    assert tok.vocab_size == 400


def test_round_trip_on_stdlib_source(tok, stdlib_text):
    ids = tok.encode(stdlib_text)
    assert tok.decode(ids) == stdlib_text
    assert 0 not in ids
    # Merges were learned: far fewer tokens than bytes.
    assert len(ids) < 0.6 * len(stdlib_text.encode())


def test_round_trip_on_unicode_and_whitespace(tok):
    ids = tok.encode(UNICODE)
    assert all(0 < i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == UNICODE
    assert tok.encode("") == []


def test_literal_eos_text_is_not_a_boundary(tok):
    text = f"a{EOS_TOKEN}b"
    ids = tok.encode(text)
    assert tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_id]) == text + EOS_TOKEN


def test_encode_batch_matches_encode(tok, stdlib_text):
    texts = [stdlib_text[:500], UNICODE, "", "x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_sha256_stable_across_save_and_load(tok, tmp_path, stdlib_text):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = TextTokenizer.load(path)
    assert len(tok.sha256) == 64
    assert loaded.sha256 == tok.sha256
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode(UNICODE + stdlib_text) == tok.encode(UNICODE + stdlib_text)
    assert loaded.encode(f"x{EOS_TOKEN}") == tok.encode(f"x{EOS_TOKEN}")


def test_save_refuses_to_overwrite(tok, tmp_path):
    path = tmp_path / "tok.json"
    path.write_text("precious")
    with pytest.raises(BigtrainError, match="tok.json"):
        tok.save(path)
    assert path.read_text() == "precious"


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(BigtrainError, match="not found: .*missing.json"):
        TextTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BigtrainError, match="bad.json is not a valid tokenizer"):
        TextTokenizer.load(bad)


def test_load_rejects_tokenizer_without_eos_at_zero(tok, tmp_path):
    spec = json.loads(tok.hf.to_str())
    spec["added_tokens"] = []
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items() if v != 0}
    path = tmp_path / "noeos.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(BigtrainError, match="noeos.json has no"):
        TextTokenizer.load(path)


def test_train_rejects_tiny_vocab():
    with pytest.raises(BigtrainError, match="at least 257"):
        TextTokenizer.train(["abc"], vocab_size=100)
