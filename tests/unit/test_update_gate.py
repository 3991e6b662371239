"""The bad-step gate on the GPU path, without a run: its decision reaches fused AdamW as found_inf."""

import torch

from bigtrain.engine.update_gate import UpdateGate


def test_fused_adamw_skips_on_the_device():
    """The GPU path: the decision goes to fused AdamW as found_inf, with no host sync."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    gate = UpdateGate(spike_factor=None)
    for norm, expect_change in ((float("nan"), False), (1.0, True)):
        weight.grad = torch.ones(3)
        before = weight.detach().clone()
        optimizer.found_inf = gate.skip(torch.tensor(1.0), torch.tensor(norm)).float()
        optimizer.step()
        assert (not torch.equal(before, weight.detach())) == expect_change
    assert optimizer.state[weight]["step"].item() == 1  # the skipped step was not counted
