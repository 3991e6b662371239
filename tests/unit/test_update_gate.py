"""The update gate without a run: its decision reaches fused AdamW as found_inf, and its spike
window (mean + sigma × std of the last accepted losses and gradient norms) decides exactly as the
rule says, also after a JSON round trip of its state."""

import json
from collections import deque

import pytest
import torch

from bigtrain.config import TrainConfig
from bigtrain.engine.update_gate import UpdateGate, min_values


def test_fused_adamw_skips_on_the_device():
    """The GPU path: the decision goes to fused AdamW as found_inf, with no host sync."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    gate = UpdateGate(window=4)
    for norm, expect_change in ((float("nan"), False), (1.0, True)):
        weight.grad = torch.ones(3)
        before = weight.detach().clone()
        optimizer.found_inf = gate.skip(torch.tensor(1.0), torch.tensor(norm)).float()
        optimizer.step()
        assert (not torch.equal(before, weight.detach())) == expect_change
    assert optimizer.state[weight]["step"].item() == 1  # the skipped step was not counted


def reference(window, sigma, signals=("loss", "grad_norm")):
    """The rule written plainly: deques of accepted values, torch.std_mean over them."""
    kept = {"loss": deque(maxlen=window), "grad_norm": deque(maxlen=window)}
    accepted = 0

    def decide(loss, norm):
        nonlocal accepted
        values = {"loss": loss, "grad_norm": norm}
        if not (torch.isfinite(torch.tensor(loss)) and torch.isfinite(torch.tensor(norm))):
            return True, False
        spike = False
        if accepted >= min_values(window):
            for name in signals:
                std, mean = torch.std_mean(torch.tensor(list(kept[name])))
                spike |= bool(torch.tensor(values[name]) > mean + sigma * std)
        if not spike:
            accepted += 1
            for name in kept:
                kept[name].append(torch.tensor(values[name]).item())
        return spike, spike

    return decide


def sequence(n, seed=0):
    """Noisy, slowly falling losses and norms with spikes and a few NaN/Inf."""
    g = torch.Generator().manual_seed(seed)
    loss = 5 - torch.arange(n) / n + 0.05 * torch.randn(n, generator=g)
    norm = 1 + 0.1 * torch.randn(n, generator=g)
    loss[[7, 30, 31, 55]] *= torch.tensor([3.0, 2.0, 2.0, 1.5])
    norm[[12, 40, 70]] *= torch.tensor([10.0, 4.0, 3.0])
    loss[20], norm[50] = float("nan"), float("inf")
    return loss, norm


@pytest.mark.parametrize("window, sigma, signals", [(8, 3.0, ("loss", "grad_norm")), (16, 4.0, ("loss", "grad_norm")),
                                                    (8, 3.0, ("grad_norm",))])
def test_the_window_decides_as_the_rule_says(window, sigma, signals):
    loss, norm = sequence(90)
    gate, rule = UpdateGate(window, sigma, signals), reference(window, sigma, signals)
    decisions = []
    for i in range(len(loss)):
        skip = gate.skip(loss[i], norm[i])
        expected_skip, expected_spike = rule(loss[i].item(), norm[i].item())
        assert (bool(skip), bool(gate.spiked)) == (expected_skip, expected_spike), i
        decisions.append((bool(skip), bool(gate.spiked)))
    spikes = [i for i, (_, spiked) in enumerate(decisions) if spiked]
    assert 12 in spikes and 40 in spikes  # the gradient-norm spikes
    assert (7 in spikes) == (("loss" in signals) and window // 2 <= 7)  # the early loss spike: only once warm
    assert not decisions[3][0]  # not before min_values(window) accepted steps
    assert [i for i, (skip, spiked) in enumerate(decisions) if skip and not spiked] == [20, 50]  # non-finite


def test_the_window_resumes_bitwise_through_json():
    loss, norm = sequence(90, seed=1)
    straight, first = UpdateGate(8, 3.0), UpdateGate(8, 3.0)
    for i in range(45):
        straight.skip(loss[i], norm[i])
        first.skip(loss[i], norm[i])
    resumed = UpdateGate(8, 3.0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert torch.equal(resumed.values, straight.values) and int(resumed.count) == int(straight.count)
    for i in range(45, 90):
        assert bool(resumed.skip(loss[i], norm[i])) == bool(straight.skip(loss[i], norm[i]))
    assert torch.equal(resumed.values, straight.values)


def test_the_pipeline_engine_watches_the_gradient_norm_alone():
    auto = UpdateGate.from_config(TrainConfig(spike_window=8), pipelined=True)
    assert auto.signals == ("grad_norm",) and not auto.watches_loss
    assert UpdateGate.from_config(TrainConfig(spike_window=8, spike_signals="loss"), pipelined=True).watches_loss
    assert not UpdateGate.from_config(TrainConfig()).watches_loss  # off by default: no per-step loss all-reduce
    gate = UpdateGate(8, 3.0, ("grad_norm",))
    for _ in range(8):
        assert not gate.skip(None, torch.tensor(1.0 + 0.01 * _))
    assert gate.skip(None, torch.tensor(5.0)) and gate.spiked


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_window_decides_on_the_gpu_without_a_host_sync():
    loss, norm = (t.cuda() for t in sequence(90))
    gate, cpu = UpdateGate(8, 3.0), UpdateGate(8, 3.0)
    decisions = [gate.skip(loss[0], norm[0])]  # the first call moves the window onto the device
    torch.cuda.set_sync_debug_mode("error")  # any host sync from here on raises
    try:
        decisions += [gate.skip(loss[i], norm[i]) for i in range(1, 90)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [bool(d) for d in decisions] == [bool(cpu.skip(loss[i].cpu(), norm[i].cpu())) for i in range(90)]
