"""The speed switches of the training step change its speed, never its numbers."""

import pytest
import torch

from bigtrain.config import TrainConfig
from bigtrain.engine.local import LocalEngine, local_engine
from bigtrain.model import Llama
from tests.helpers import small_model_config


def run(steps: int = 3, **switches) -> tuple[LocalEngine, list[float]]:
    torch.manual_seed(0)
    train = TrainConfig(device="cpu", lr=1e-2, **switches)
    engine = local_engine(Llama(small_model_config()), train)
    batch = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))
    return engine, [engine.train_step([batch], 1e-2).loss.item() for _ in range(steps)]


def test_compile_keeps_losses_and_parameter_names_without_breaks_or_recompiles():
    from torch._dynamo.utils import counters

    counters.clear()
    eager, eager_losses = run()
    assert not counters["stats"]  # compile=auto stays eager on the CPU
    compiled, first = run(steps=1, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    batch = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))
    compiled_losses = first + [compiled.train_step([batch], 1e-2).loss.item() for _ in range(2)]
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs  # no recompilation after step 1
    assert not counters["graph_break"]
    blocks = compiled.model.layers[1:-1]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert compiled_losses[-1] < compiled_losses[0] - 0.1  # it learns the batch
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # checkpoints unchanged
    for a, b in zip(compiled.model.parameters(), eager.model.parameters(), strict=True):
        # Adam turns rounding differences of near-zero gradients into ~1e-5 steps (lr 1e-2)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("impl,flags,other", [("fused", ("fused", True), "for-loop"),
                                              ("foreach", ("foreach", True), "for-loop"),
                                              ("for-loop", ("foreach", False), "foreach")])
def test_adamw_kernels_give_the_same_update(impl, flags, other):
    reference, reference_losses = run(adamw_impl=other)  # another kernel: each is checked against a second one
    engine, losses = run(adamw_impl=impl)
    assert engine.optimizer.defaults[flags[0]] is flags[1]
    assert reference.optimizer.defaults != engine.optimizer.defaults
    assert losses == pytest.approx(reference_losses, rel=1e-6)
    for a, b in zip(engine.model.parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

