"""Each change bigtrain makes to DeepSpeed, called directly on plain torch objects (no processes)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bigtrain.distributed.timing import PhaseTimer
from bigtrain.engine.deepspeed import patches


def _stepped(fused: bool, skip: bool) -> tuple[nn.Linear, torch.optim.AdamW, dict]:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()  # state exists before the gated step
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    patches.gate_optimizer_step(optimizer, lambda: torch.tensor(skip))
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    after = {id(p): s for p, s in optimizer.state.items()}
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and all(
        torch.equal(state[i][k], after[i][k]) for i in state for k in state[i])
    return model, optimizer, {"unchanged": unchanged}


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-found_inf"])
def test_gated_step_skips_leaving_weights_and_state_untouched(fused):
    assert _stepped(fused, skip=True)[2]["unchanged"]


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-found_inf"])
def test_gated_step_updates_when_the_gate_lets_it(fused):
    assert not _stepped(fused, skip=False)[2]["unchanged"]


def test_fp32_clipping_records_the_norm_it_clips_with(monkeypatch):
    # DeepSpeed's clip_grad_norm_ reduces over its process groups; torch's does the same on one process
    monkeypatch.setattr(patches, "clip_grad_norm_", lambda params, max_norm, mpu: nn.utils.clip_grad_norm_(params, max_norm))
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().mul(10).backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    engine, recorded = SimpleNamespace(module=model, gradient_clipping=lambda: 1.0, mpu=None), []
    patches.record_grad_norm(engine, recorded.append)
    engine.clip_fp32_gradients()
    assert torch.allclose(torch.as_tensor(recorded[0]), expected)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(clipped, torch.tensor(1.0), atol=1e-4)


def test_activations_are_sent_whole_and_other_pipeline_keys_kept():
    config = {"train_batch_size": 4, "pipeline": {"activation_checkpoint_interval": 1}}
    patched = patches.send_whole_activations(config)
    assert patched["pipeline"] == {"activation_checkpoint_interval": 1, "pipe_partitioned": False,
                                   "grad_partitioned": False}
    assert patched["train_batch_size"] == 4 and "pipe_partitioned" not in config["pipeline"]


@pytest.mark.parametrize("tp_rank, counted", [(0, {"replicated"}), (1, set())])
def test_grad_norm_counts_replicated_parameters_on_tp_rank_0_only(tp_rank, counted):
    stage = nn.Module()
    stage.replicated, stage.sharded = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    stage.sharded.tensor_model_parallel = True
    patches.mark_for_grad_norm(stage, tp_rank)
    assert {n for n, p in stage.named_parameters() if getattr(p, "model_parallel", False)} == counted


def test_pipeline_instructions_are_timed_under_their_phase():
    calls = []
    engine = SimpleNamespace(_INSTRUCTION_MAP={kind: (lambda self, *a: calls.append(a)) for kind in patches.PIPE_PHASES})
    timer = PhaseTimer(torch.device("cpu"))
    patches.time_pipeline_instructions(engine, timer)
    forward = next(kind for kind, phase in patches.PIPE_PHASES.items() if phase == "forward")
    engine._INSTRUCTION_MAP[forward](engine, 7)
    assert calls == [(7,)] and set(timer.read()) == {"forward"}
