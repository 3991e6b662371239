import gc
import json
from pathlib import Path

import numpy as np
import pytest

from bigtrain.config import DataConfig, SourceConfig, load_config
from bigtrain.data.build import build_train_loader
from bigtrain.data.loader import PackedTokens, WindowLoader
from bigtrain.data.mds import (
    MDS_META,
    StreamingWindowLoader,
    cache_dir,
    prepare_mds,
    verify_mds,
    write_mds,
)
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
    with pytest.raises(BigtrainError, match="cannot read .*nowhere/bigtrain-mds.json"):
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


WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def mixture(prepared, tmp_path_factory) -> tuple[list[str], list[set]]:
    """Three MDS 'remotes' of different sizes sharing the tokenizer, and each one's window set."""
    arrow, remote = prepared
    root = tmp_path_factory.mktemp("mix")
    remotes = [str(remote)]
    for k, docs in ((1, 80), (2, 40)):
        rng = np.random.default_rng(k)
        texts = [" ".join(rng.choice(_WORDS, size=rng.integers(5, 40))) for _ in range(docs)]
        (root / f"{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        prepare([root / f"{k}.jsonl"], arrow / "tokenizer.json", root / f"arrow{k}")
        write_mds(root / f"arrow{k}", root / f"bucket{k}", SEQ_LEN, size_limit=1 << 12)
        remotes.append(str(root / f"bucket{k}"))
    dirs = [arrow, root / "arrow1", root / "arrow2"]
    windows = [{tuple(w) for w in PackedTokens(d, SEQ_LEN).windows(np.arange(len(PackedTokens(d, SEQ_LEN))))}
               for d in dirs]
    return remotes, windows


def _mix(remotes, local, weights=WEIGHTS, **kwargs) -> StreamingWindowLoader:
    gc.collect()
    return StreamingWindowLoader(list(zip(remotes, weights, strict=True)), local, SEQ_LEN, **kwargs)


def test_streaming_mixture_realises_its_weights(mixture, tmp_path):
    remotes, windows = mixture
    sizes = [len(w) for w in windows]
    assert sizes[0] > sizes[1] > sizes[2] > 20
    assert not (windows[0] & windows[1] or windows[0] & windows[2] or windows[1] & windows[2])
    loader = _mix(remotes, tmp_path / "cache", micro_batch=100, seed=3)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        cache_dir(tmp_path / "cache", r).name for r in remotes)
    seen = _windows(loader, 100)  # 10k windows
    source = np.array([next(k for k, w in enumerate(windows) if s in w) for s in seen])
    assert np.abs(np.bincount(source, minlength=3) / len(seen) - WEIGHTS).max() < 0.01
    epoch = sum(sizes)  # streaming's epoch: as many windows as all sources hold together
    for e in range(len(seen) // epoch):  # each whole epoch gives each source its share exactly
        counts = np.bincount(source[e * epoch:(e + 1) * epoch], minlength=3)
        assert np.abs(counts - np.array(WEIGHTS) * epoch).max() <= 1
    # the large source shows a different subset each epoch, the small ones repeat whole
    first, second = (set(seen[e * epoch:(e + 1) * epoch]) & windows[0] for e in (0, 1))
    assert first != second
    assert windows[2] <= set(seen[:epoch])


def test_streaming_mixture_resumes_exactly(mixture, tmp_path):
    remotes, _ = mixture
    straight = _windows(_mix(remotes, tmp_path / "a", micro_batch=4, grad_accum=2, seed=5), 90)
    first = _mix(remotes, tmp_path / "b", micro_batch=4, grad_accum=2, seed=5)
    head = _windows(first, 45)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["weights"] == pytest.approx(WEIGHTS) and len(state["windows"]) == 3
    del first
    second = _mix(remotes, tmp_path / "b", micro_batch=4, grad_accum=2, seed=5)
    second.load_state_dict(state)
    assert head + _windows(second, 45) == straight
    assert len(head) < sum(state["windows"]) < len(straight)  # cut mid-epoch, runs into the next
    tail = []  # on 2 data-parallel ranks instead: the same windows in each global batch
    for rank in range(2):
        loader = _mix(remotes, tmp_path / "b", micro_batch=2, grad_accum=2, dp_rank=rank, dp_size=2, seed=5)
        loader.load_state_dict(state)
        tail.append(_windows(loader, 45))
        del loader
    for step in range(45):
        batch = tail[0][4 * step:4 * step + 4] + tail[1][4 * step:4 * step + 4]
        assert sorted(batch) == sorted(straight[len(head) + 8 * step:len(head) + 8 * step + 8])
    with pytest.raises(BigtrainError, match=r"state has weights=\[0.5, 0.3.* but this run has \[0.6"):
        _mix(remotes, tmp_path / "c", [0.6, 0.2, 0.2], micro_batch=8).load_state_dict(state)
    with pytest.raises(BigtrainError, match="state has windows=.* but this run has"):
        _streaming(remotes[0], tmp_path / "d", micro_batch=8).load_state_dict(state)


def test_streaming_mixture_refuses_bad_sources(prepared, mixture, tmp_path):
    remotes, _ = mixture
    cfg = load_config(None, ["data.backend=streaming", "data.sources=[{remote: s3://corpus/web, weight: 3}]"])
    assert (cfg.data.sources[0].remote, cfg.data.sources[0].weight, cfg.data.sources[0].path) == ("s3://corpus/web", 3.0, "")

    def build(sources, **kwargs):
        gc.collect()
        cfg = DataConfig(backend="streaming", local=str(tmp_path / "cache"), seq_len=SEQ_LEN,
                         sources=[SourceConfig(remote=r, weight=w) for r, w in sources], **kwargs)
        return build_train_loader(cfg, 1, 1, 0, 1, 0)

    TextTokenizer.train(TEXTS[:30], vocab_size=280).save(tmp_path / "other.json")
    (tmp_path / "o.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:30]))
    prepare([tmp_path / "o.jsonl"], tmp_path / "other.json", tmp_path / "oarrow")
    write_mds(tmp_path / "oarrow", tmp_path / "other", SEQ_LEN)
    with pytest.raises(BigtrainError, match=r"^\S*other was tokenized with tokenizer \w{12}, but the tokenizer of "
                       rf"{remotes[0]} is \w{{12}}; prepare the data again"):
        build([(remotes[0], 1), (str(tmp_path / "other"), 1)])
    with pytest.raises(BigtrainError, match=r"^\S*other was tokenized with .* but data.tokenizer"):
        build([(str(tmp_path / "other"), 1)], tokenizer=str(remotes[1] + "/tokenizer.json"))
    with pytest.raises(BigtrainError, match=r"^cannot read \S*nowhere/bigtrain-mds.json: "):
        build([(remotes[0], 1), (str(tmp_path / "nowhere"), 1)])
    write_mds(prepared[0], tmp_path / "long", 32)
    with pytest.raises(BigtrainError, match=r"^\S*long holds windows of seq_len 32, data.seq_len is 16"):
        build([(remotes[0], 1), (str(tmp_path / "long"), 1)])
    for sources, message in [
        ([(remotes[0], 1), (remotes[1], 0.0)], r"data.sources\[1\].weight must be positive, got 0.0"),
        ([(remotes[0], 1), (remotes[1], -1.0)], r"data.sources\[1\].weight must be positive, got -1.0"),
        ([(remotes[0], 1), (None, 1)], r"data.sources\[1\].remote is not set \(data.backend=streaming\)"),
    ]:
        with pytest.raises(BigtrainError, match=message):
            build(sources)
    with pytest.raises(BigtrainError, match="set data.remote or data.sources, not both"):
        build([(remotes[0], 1)], remote=remotes[1])
    cfg = DataConfig(backend="streaming", local="x", sources=[SourceConfig(path="data/web")])
    with pytest.raises(BigtrainError, match=r"data.sources\[0\].remote is not set"):
        build_train_loader(cfg, 1, 1, 0, 1, 0)
    with pytest.raises(BigtrainError, match=r"data.sources\[0\].remote is not used with data.backend=arrow"):
        build_train_loader(DataConfig(sources=[SourceConfig("a", remote="s3://b/c")]), 1, 1, 0, 1, 0)
    with pytest.raises(BigtrainError, match=r"mixture weights must be positive, got \[1.0, 0.0\]"):
        _mix(remotes[:2], tmp_path / "e", [1, 0], micro_batch=1)
