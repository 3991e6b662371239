"""Activation checkpointing (`full`, `selective`, every k-th block) changes memory and recompute,
never the numbers: same loss and gradients; FLOPs measured against none (peak memory:
tests/single_process/test_peak_memory.py)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bigtrain.model import Llama
from bigtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from tests.helpers import small_model_config

MODES = [("none", 1), ("full", 1), ("full", 2), ("selective", 1), ("selective", 3)]


def loss_and_grads(mode, every):
    torch.manual_seed(0)
    model = Llama(small_model_config(n_layers=4))
    apply_activation_checkpointing(model.layers, mode, every)
    tokens = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as flops:
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
    return loss.item(), [p.grad for p in model.parameters()], flops.get_total_flops()


@pytest.fixture(scope="module")
def reference():
    return loss_and_grads("none", 1)


@pytest.mark.parametrize("mode, every", MODES[1:])
def test_same_loss_and_gradients(mode, every, reference):
    loss, grads, _ = loss_and_grads(mode, every)
    assert loss == reference[0]
    for a, b in zip(grads, reference[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_recompute_cost_in_flops(reference):
    none = reference[2]
    full, half, selective = (loss_and_grads(mode, every)[2] for mode, every in (("full", 1), ("full", 2),
                                                                                  ("selective", 1)))
    assert selective == none  # the matmuls and attention are kept: nothing costly is recomputed
    assert half - none == pytest.approx((full - none) / 2, rel=0.01)  # every 2nd block of 4
    block_forward = full - none  # a second forward of every block
    assert 0.2 < block_forward / none < 1 / 3  # blocks are most of the 3 passes; the head is not recomputed
