"""Sequence-length warmup: lengths double along a linear ramp, and a step's short windows cover
exactly the (input, target) pairs of the loader's windows."""

import pytest
import torch

from bigtrain.config import from_dict
from bigtrain.data.seq_len_warmup import cut_windows, window_length
from bigtrain.errors import BigtrainError
from bigtrain.parallel.layout import layout_problem


def test_lengths_double_along_the_ramp_then_stay():
    data = from_dict({"model": {"max_seq_len": 256}, "data": {"seq_len": 256, "seq_len_warmup": {"start": 32, "steps": 8}}}).data
    # ramp: 32 + 224 · step / 8 = 32, 60, 88, 116, 144, 172, 200, 228, then 256
    assert [window_length(step, data) for step in range(10)] == [32, 32, 64, 64, 128, 128, 128, 128, 256, 256]


def test_short_windows_cover_the_same_pairs():
    windows = torch.arange(2 * 17).reshape(2, 17)
    short = cut_windows(windows, 4)
    assert short.shape == (8, 5)
    pairs = {(int(a), int(b)) for w in windows for a, b in zip(w[:-1], w[1:], strict=True)}
    assert {(int(a), int(b)) for w in short for a, b in zip(w[:-1], w[1:], strict=True)} == pairs
    assert cut_windows(windows, 16) is windows


def test_a_model_loss_over_short_windows_is_the_mean_over_the_same_targets():
    from bigtrain.model import Llama
    from tests.helpers import small_model_config

    model = Llama(small_model_config(max_seq_len=16), seed=0)
    windows = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    short = cut_windows(windows, 8)
    per_token = [model(w[None, :-1]).log_softmax(-1)[0].gather(-1, w[1:, None]).mean() for w in short]
    torch.testing.assert_close(model(short[:, :-1], short[:, 1:]), -torch.stack(per_token).mean())


@pytest.mark.parametrize("data, parallel, message", [
    ({"seq_len": 96, "seq_len_warmup": {"start": 32}}, {}, "data.seq_len / data.seq_len_warmup.start must be a power of two"),
    ({"seq_len": 64, "seq_len_warmup": {"start": 2}}, {"engine": "deepspeed", "sp": 4}, "data.seq_len_warmup.start=2 is not divisible"),
])
def test_impossible_warmups_are_one_line(data, parallel, message):
    config = {"model": {"max_seq_len": 128, "n_heads": 4, "n_kv_heads": 4}, "data": data, "parallel": parallel}
    try:
        problem = layout_problem(from_dict(config), 4)
    except BigtrainError as e:
        problem = str(e)
    assert message in problem
