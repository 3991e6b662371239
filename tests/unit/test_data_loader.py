import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtrain.data.loader import Mixture, PackedTokens, WindowLoader, eval_batches
from bigtrain.data.permutation import Permutation
from bigtrain.data.shards import FORMAT, write_manifest, write_shard
from bigtrain.errors import BigtrainError

SEQ_LEN = 8
SHARD_SIZES = [41, 5, 54, 100]  # the 5-token shard is shorter than a window


def _make_dataset(root: Path, sizes: list[int]) -> Path:
    """Shards whose concatenated tokens are 0, 1, 2, ... so window contents are predictable."""
    root.mkdir()
    entries, start = [], 0
    for k, size in enumerate(sizes):
        tokens = np.arange(start, start + size, dtype=np.uint16)
        docs = np.array_split(tokens, 3) if size >= 3 else [tokens]
        entries.append(write_shard(root / f"shard-{k:05d}.arrow", docs, np.uint16))
        start += size
    write_manifest(
        root,
        {
            "format": FORMAT,
            "tokenizer": {
                "sha256": "-",
                "vocab_size": 65536,
                "eos_id": 0,
                "file": "tokenizer.json",
            },
            "token_dtype": "uint16",
            "shards": entries,
            "totals": {
                "documents": sum(e["documents"] for e in entries),
                "tokens": start,
                "empty_documents_skipped": 0,
                "shards": len(entries),
            },
        },
    )
    return root


@pytest.fixture()
def data(tmp_path) -> PackedTokens:
    return PackedTokens(_make_dataset(tmp_path / "d", SHARD_SIZES), SEQ_LEN)


def test_windows_are_overlapping_token_slices(data, tmp_path):
    total = sum(SHARD_SIZES)
    assert len(data) == (total - 1) // SEQ_LEN == 24
    for i in range(len(data)):
        window = data.window(i)
        assert window.dtype == np.int64
        np.testing.assert_array_equal(window, np.arange(i * SEQ_LEN, i * SEQ_LEN + SEQ_LEN + 1))
    # Window 5 is tokens 40..48: the last of shard 0, all of shard 1 (41..45), 3 of shard 2.
    np.testing.assert_array_equal(data.window(5), np.arange(40, 49))
    np.testing.assert_array_equal(data.window(12), np.arange(96, 105))  # shards 2 and 3
    assert data.vocab_size == 65536 and data.eos_id == 0
    assert data.tokenizer_path == tmp_path / "d" / "tokenizer.json"
    with pytest.raises(IndexError):
        data.window(24)


def test_too_few_tokens(tmp_path):
    root = _make_dataset(tmp_path / "small", [5, 3])
    with pytest.raises(BigtrainError, match="holds 8 tokens, fewer than one window of seq_len"):
        PackedTokens(root, seq_len=8)
    assert len(PackedTokens(root, seq_len=7)) == 1


def test_epoch_visits_every_window_once(data):
    n = len(data)
    loader = WindowLoader(data, micro_batch=5, seed=3)  # G=5 does not divide n=24
    ids = np.concatenate([loader.step_window_ids(s) for s in range(10)])  # 50 positions
    assert sorted(ids[:n]) == list(range(n))
    assert sorted(ids[n : 2 * n]) == list(range(n))
    assert not np.array_equal(ids[:n], np.arange(n))
    assert not np.array_equal(ids[:n], ids[n : 2 * n])
    in_order = WindowLoader(data, micro_batch=5, shuffle=False)
    assert np.concatenate([in_order.step_window_ids(s) for s in range(5)]).tolist() == [
        p % n for p in range(25)
    ]


def test_ranks_are_disjoint_and_cover_the_global_batch(data):
    single = WindowLoader(data, micro_batch=3, grad_accum=2, seed=1)
    ranks = [WindowLoader(data, micro_batch=3, dp_rank=r, dp_size=2, seed=1) for r in range(2)]
    for step in range(6):
        a, b = (r.step_window_ids(step) for r in ranks)
        assert len(a) == len(b) == 3 and not set(a) & set(b)
        assert np.concatenate([a, b]).tolist() == single.step_window_ids(step).tolist()


def _take(loaders: list[WindowLoader], steps: int) -> list[int]:
    """Run every rank `steps` steps; check tensors hold the expected windows; return ids."""
    seen = []
    for _ in range(steps):
        for loader in loaders:
            ids = loader.step_window_ids(loader.consumed_windows // loader.global_batch)
            micro = loader.next_step()
            assert len(micro) == loader.grad_accum
            batch = torch.cat(micro)
            assert batch.dtype == torch.int64
            assert batch.shape == (len(ids), SEQ_LEN + 1)
            expected = np.stack([loader.data.window(int(i)) for i in ids])
            assert torch.equal(batch, torch.from_numpy(expected))
            seen += ids.tolist()
    return seen


def test_resume_with_a_different_dp_size(data):
    reference = WindowLoader(data, micro_batch=8, seed=7)
    expected = np.concatenate([reference.step_window_ids(s) for s in range(12)]).tolist()

    run = [
        WindowLoader(data, micro_batch=2, grad_accum=2, dp_rank=r, dp_size=2, seed=7)
        for r in range(2)
    ]
    seen = _take(run, 3)
    state = json.loads(json.dumps(run[0].state_dict()))
    assert state["consumed_windows"] == 24 and run[1].state_dict() == run[0].state_dict()

    run = [WindowLoader(data, micro_batch=4, grad_accum=2, seed=7)]
    run[0].load_state_dict(state)
    seen += _take(run, 4)
    state = json.loads(json.dumps(run[0].state_dict()))

    run = [
        WindowLoader(data, micro_batch=1, grad_accum=2, dp_rank=r, dp_size=4, seed=7)
        for r in range(4)
    ]
    for loader in run:
        loader.load_state_dict(state)
    seen += _take(run, 5)
    assert seen == expected  # 96 positions = 4 epochs: nothing repeated early, nothing skipped


def test_grad_accum_sees_the_same_windows_as_a_bigger_micro_batch(data):
    accum = WindowLoader(data, micro_batch=2, grad_accum=4, seed=5)
    wide = WindowLoader(data, micro_batch=8, grad_accum=1, seed=5)
    for _ in range(4):
        micro = accum.next_step()
        (whole,) = wide.next_step()
        assert [m.shape[0] for m in micro] == [2, 2, 2, 2]
        assert torch.equal(torch.cat(micro), whole)


def test_load_state_rejects_a_different_order(data):
    state = WindowLoader(data, micro_batch=2, seed=1).state_dict()
    with pytest.raises(BigtrainError, match="seed=1 but this run has 2"):
        WindowLoader(data, micro_batch=2, seed=2).load_state_dict(state)


def test_argument_validation(data):
    with pytest.raises(BigtrainError, match="dp_rank 2 is not in"):
        WindowLoader(data, micro_batch=1, dp_rank=2, dp_size=2)
    with pytest.raises(BigtrainError, match="micro_batch must be positive"):
        WindowLoader(data, micro_batch=0)


def test_eval_batches_in_fixed_order(data):
    batches = list(eval_batches(data, micro_batch=5, max_batches=None))
    assert [b.shape[0] for b in batches] == [5, 5, 5, 5, 4]
    expected = np.stack([data.window(i) for i in range(len(data))])
    assert torch.equal(torch.cat(batches), torch.from_numpy(expected))
    assert [b.tolist() for b in eval_batches(data, 5, 2)] == [b.tolist() for b in batches[:2]]


@pytest.mark.parametrize("n", [1, 2, 3, 24, 1000, 4097, 123_457])
def test_permutation_is_a_seeded_bijection(n):
    perm = Permutation(n, [7, 0, 1])
    out = perm(np.arange(n))
    assert np.array_equal(np.sort(out), np.arange(n))
    assert np.array_equal(Permutation(n, [7, 0, 1])(np.arange(n)), out)
    if n >= 24:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(Permutation(n, [7, 0, 2])(np.arange(n)), out)
        # positions are spread: neighbours in the input land far apart on average
        assert np.abs(np.diff(out)).mean() > n / 5


def _mixture(tmp_path, sizes, weights):
    tmp_path.mkdir(parents=True, exist_ok=True)
    sources = [PackedTokens(_make_dataset(tmp_path / f"m{k}", [s]), SEQ_LEN) for k, s in enumerate(sizes)]
    return Mixture(sources, weights)


def test_mixture_realises_its_weights_within_one_percent(tmp_path):
    mix = _mixture(tmp_path, [801, 401, 161], [0.5, 0.3, 0.2])  # 100, 50, 20 windows
    loader = WindowLoader(mix, micro_batch=50, grad_accum=2, seed=3)
    ids = np.concatenate([loader.step_window_ids(s) for s in range(100)])  # 10k windows
    source = np.searchsorted(mix.offsets, ids, side="right") - 1
    shares = np.bincount(source, minlength=3) / len(ids)
    assert np.abs(shares - [0.5, 0.3, 0.2]).max() < 0.01
    for n in (100, 1000, 3333):  # also over any prefix, not just the whole run
        prefix = np.bincount(source[:n], minlength=3) / n
        assert np.abs(prefix - [0.5, 0.3, 0.2]).max() < 0.01 + 3 / n
    # each source repeats only after it went through all of its windows (its own epochs)
    for s, n_windows in enumerate([100, 50, 20]):
        seen = ids[source == s] - mix.offsets[s]
        assert sorted(seen[:n_windows]) == list(range(n_windows))
    assert [len(s) for s in mix.sources] == [100, 50, 20] and len(mix) == 170
    np.testing.assert_array_equal(mix.window(149), mix.sources[1].window(49))
    np.testing.assert_array_equal(mix.window(150), mix.sources[2].window(0))
    again = WindowLoader(_mixture(tmp_path / "again", [801, 401, 161], [5, 3, 2]), 50, 2, seed=3)
    assert np.array_equal(np.concatenate([again.step_window_ids(s) for s in range(100)]), ids)


def test_mixture_resumes_across_dp_sizes_by_window_ids(tmp_path):
    mix = _mixture(tmp_path, [401, 201], [0.7, 0.3])
    reference = WindowLoader(mix, micro_batch=8, seed=5)
    expected = np.concatenate([reference.step_window_ids(s) for s in range(20)]).tolist()
    run = [WindowLoader(mix, micro_batch=2, grad_accum=2, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    seen = _take(run, 6)
    state = json.loads(json.dumps(run[0].state_dict()))
    run = [WindowLoader(mix, micro_batch=8, seed=5)]
    run[0].load_state_dict(state)
    seen += _take(run, 5)
    state = json.loads(json.dumps(run[0].state_dict()))
    run = [WindowLoader(mix, micro_batch=1, grad_accum=2, dp_rank=r, dp_size=4, seed=5) for r in range(4)]
    for loader in run:
        loader.load_state_dict(state)
    seen += _take(run, 9)
    assert seen == expected
    with pytest.raises(BigtrainError, match="weights=.*but this run has"):
        WindowLoader(_mixture(tmp_path / "w", [401, 201], [0.6, 0.4]), 8, seed=5).load_state_dict(state)


def test_held_out_split_cuts_at_a_document_end(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    docs = [np.array([*range(1, n), 0], dtype=np.uint16) for n in (30, 45, 12, 60, 33, 50, 20)]
    entries = [write_shard(root / "a.arrow", docs[:4], np.uint16), write_shard(root / "b.arrow", docs[4:], np.uint16)]
    write_manifest(root, {"format": FORMAT, "tokenizer": {"sha256": "-", "vocab_size": 100, "eos_id": 0,
                   "file": "tokenizer.json"}, "token_dtype": "uint16", "shards": entries, "totals": {}})
    data = PackedTokens(root, SEQ_LEN)
    train, val = data.split(0.3)
    stream = np.concatenate(docs)
    ends = np.cumsum([len(d) for d in docs])  # 30 75 87 147 180 230 250
    cut = ends[np.searchsorted(ends, 0.7 * 250)]  # first document end at or after 175 tokens
    assert cut == 180
    assert (train.total_tokens, val.total_tokens) == (180, 70)
    assert len(train) == (180 - 1) // SEQ_LEN and len(val) == (70 - 1) // SEQ_LEN
    np.testing.assert_array_equal(train.window(0), stream[:SEQ_LEN + 1])
    np.testing.assert_array_equal(val.window(0), stream[180:180 + SEQ_LEN + 1])
    last = val.window(len(val) - 1)
    assert last[-1] == stream[180 + len(val) * SEQ_LEN]
    last_train = train.window(len(train) - 1)
    assert (len(train) * SEQ_LEN) < 180  # the last train window ends inside the train part
    np.testing.assert_array_equal(last_train, stream[(len(train) - 1) * SEQ_LEN: len(train) * SEQ_LEN + 1])
    with pytest.raises(BigtrainError, match="fewer than one window .* change data.val_fraction"):
        data.split(0.01)
