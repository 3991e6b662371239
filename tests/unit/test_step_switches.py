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



@pytest.mark.parametrize("grad_clip", [0.05, 1e6, None])  # clipping every step, never, switched off
def test_clipping_folded_into_fused_adamw_gives_the_same_update(grad_clip):
    """With `fold_clip` (CUDA's default) fused AdamW divides each gradient by the inverse clip
    coefficient as it reads it, instead of a pass of its own multiplying by it: the same norms,
    the same clipped gradients (AdamW's moments) within 1e-6, the weights within 1e-4 of a step
    (AdamW's m / sqrt(v) magnifies last-bit differences of tiny gradients); bit for bit where the
    coefficient is 1."""
    def steps(fold: bool):
        torch.manual_seed(0)
        engine = local_engine(Llama(small_model_config()), TrainConfig(device="cpu", lr=1e-2, grad_clip=grad_clip))
        assert engine.fold_clip is False  # the CPU default: in place, as torch's clip_grad_norm_
        engine.fold_clip = fold
        batch = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))
        norms = [engine.train_step([batch], 1e-2).grad_norm.item() for _ in range(3)]
        moments = [state[key].clone() for state in engine.optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
        return norms, moments, [p.detach().clone() for p in engine.model.parameters()]

    (norms, moments, weights), (folded_norms, folded_moments, folded_weights) = steps(False), steps(True)
    if grad_clip == 0.05:
        assert min(norms) > 0.05  # every step is clipped
        assert folded_norms == pytest.approx(norms, rel=1e-6)
        for i, (a, b) in enumerate(zip(folded_moments, moments, strict=True)):  # m, then v (squares: 2×)
            assert (a - b).abs().max() <= (1 + i % 2) * 1e-6 * b.abs().max()
        for a, b in zip(folded_weights, weights, strict=True):
            assert (a - b).abs().max() <= 1e-4 * 1e-2
    else:
        assert folded_norms == norms
        assert all(torch.equal(a, b) for a, b in zip(folded_moments + folded_weights, moments + weights, strict=True))
