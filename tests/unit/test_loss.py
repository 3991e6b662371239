"""The chunked linear + cross-entropy: the same loss and gradients as logits + `lm_loss`, at a
fraction of the memory (measured as peak RSS of forward+backward at vocabulary 32k, seq 2048,
micro-batch 4, in tests/single_process/test_peak_memory.py)."""

import pytest
import torch

from bigtrain.model import Llama
from bigtrain.model.loss import linear_cross_entropy, lm_loss
from tests.helpers import small_model_config


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_same_loss_and_gradients_as_full_logits(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(4, 50, 32, requires_grad=True)
    weight = (0.1 * torch.randn(97, 32)).requires_grad_()
    targets = torch.randint(0, 97, (4, 50))
    full = lm_loss(hidden @ weight.t(), targets)
    chunked = linear_cross_entropy(hidden, weight, targets, chunk)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(3.0 * chunked, (hidden, weight)),
                    torch.autograd.grad(3.0 * full, (hidden, weight)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_model_computes_its_loss_in_the_head():
    model = Llama(small_model_config(tie_embeddings=True))
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    fused = model(inputs, targets)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    full = lm_loss(model(inputs), targets)
    full_grads = torch.autograd.grad(full, list(model.parameters()))
    torch.testing.assert_close(fused, full, rtol=1e-6, atol=0)
    for a, b in zip(fused_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
