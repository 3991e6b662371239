import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigtrain.data.loader import PackedTokens
from bigtrain.eval.perplexity import evaluate
from bigtrain.model import Llama, lm_loss
from tests.helpers import small_model_config


def test_perplexity_is_exp_of_hand_computed_mean_nll(stdlib_data):
    torch.manual_seed(0)
    model = Llama(small_model_config(vocab_size=512, max_seq_len=16)).eval()
    data = PackedTokens(stdlib_data[1], seq_len=16)
    windows = torch.from_numpy(np.stack([data.window(i) for i in range(7)]))
    with torch.no_grad():
        logits = model(windows[:, :-1])
        by_hand = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum").item() / (7 * 16)

    def batch_loss(batch):
        with torch.no_grad():
            return lm_loss(model(batch[:, :-1]), batch[:, 1:])

    result = evaluate(batch_loss, data, micro_batch=3, max_windows=7)  # batches of 3, 3 and 1
    assert result.tokens == 7 * 16
    assert result.loss == pytest.approx(by_hand, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(by_hand), rel=1e-6)
    # two data-parallel ranks that sum their totals see the same mean
    halves = [evaluate(batch_loss, data, 3, 7, dp_rank=r, dp_size=2) for r in range(2)]
    combined = sum(h.loss * h.tokens for h in halves) / sum(h.tokens for h in halves)
    assert combined == pytest.approx(by_hand, rel=1e-6)
