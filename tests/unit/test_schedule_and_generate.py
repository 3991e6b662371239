import math

import pytest
import torch

from bigtrain.config import TrainConfig
from bigtrain.eval.generate import filter_logits, generate
from bigtrain.model import Llama
from bigtrain.train.schedule import lr_at
from tests.helpers import small_model_config as small


def test_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_linear_and_constant():
    linear = TrainConfig(lr=2.0, warmup_steps=0, steps=100, min_lr_ratio=0.0, schedule="linear")
    assert lr_at(25, linear) == pytest.approx(1.5)
    constant = TrainConfig(lr=2.0, warmup_steps=4, steps=100, schedule="constant")
    assert lr_at(1, constant) == pytest.approx(1.0) and lr_at(50, constant) == 2.0


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=None)).tolist() == [False, False, True, True]
    # top-p 0.7: 0.5 alone is below 0.7, 0.5 + 0.25 crosses it → keep two tokens
    assert torch.isinf(filter_logits(logits, top_k=None, top_p=0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, top_k=None, top_p=0.5)).tolist() == [False, True, True, True]


def test_generation_is_seeded_and_stops_at_eos():
    torch.manual_seed(0)
    model = Llama(small())

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return generate(model, [1, 2, 3], 10, 16, eos_id=None, temperature=1.0, top_k=20, generator=generator)

    assert run(1) == run(1) and len(run(1)) == 10  # the same seed samples the same tokens
    assert run(2) != run(1) and run(3) != run(1)  # and the seed matters: other seeds sample other tokens
    greedy = generate(model, [1, 2, 3], 10, 16, eos_id=None, temperature=0)
    eos = greedy[2]
    stopped = generate(model, [1, 2, 3], 10, 16, eos_id=eos, temperature=0)
    assert stopped == greedy[: greedy.index(eos)]
