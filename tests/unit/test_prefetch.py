import pytest
import torch

from bigtrain.data.loader import PackedTokens, WindowLoader
from bigtrain.data.prefetch import Prefetcher


def loader(data_dir) -> WindowLoader:
    return WindowLoader(PackedTokens(data_dir, 32), micro_batch=3, grad_accum=2, seed=5)


def test_same_batches_and_resumable_state_as_the_loader(stdlib_data):
    plain, ahead = loader(stdlib_data[0]), Prefetcher(loader(stdlib_data[0]))
    assert ahead.global_batch == 6 and ahead.tokenizer_path == plain.tokenizer_path
    assert ahead.state_dict() == plain.state_dict()
    for _ in range(4):
        expected, got = plain.next_step(), ahead.next_step()
        assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
        # the state is that after the steps handed out, not after the one read ahead
        assert ahead.state_dict() == plain.state_dict()
        assert ahead.state_dict()["consumed_windows"] == ahead.loader.consumed_windows - 6


def test_load_state_drops_the_read_ahead(stdlib_data):
    first = Prefetcher(loader(stdlib_data[0]))
    for _ in range(3):
        first.next_step()
    state = first.state_dict()
    expected = first.next_step()
    resumed = Prefetcher(loader(stdlib_data[0]))
    resumed.next_step()  # reads ahead from position 0 ...
    resumed.load_state_dict(state)  # ... which must not leak into the resumed order
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed.next_step(), strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_are_pinned_for_the_gpu(stdlib_data):
    batches = Prefetcher(loader(stdlib_data[0]), pin_memory=True).next_step()
    assert all(b.is_pinned() for b in batches)
