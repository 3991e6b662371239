"""bf16 parameters with fp32 master weights (`train.master_weights`), checked on the CPU's bf16.

The update must be exactly AdamW on fp32 masters given the fp32 sum of the micro-batches' bf16
gradients; checkpoints hold the masters, in the unchanged format; the loss tracks fp32's within
bf16's tolerance, as bf16 autocast over fp32 weights (the other bf16 mode) does.
"""

import pytest
import safetensors.torch
import torch

from bigtrain.checkpoint import format as fmt
from bigtrain.checkpoint.writes import Direct
from bigtrain.config import TrainConfig, load_config
from bigtrain.engine import local
from bigtrain.engine.local import local_engine
from bigtrain.engine.optimizer import build_adamw
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from tests.helpers import small_model_config

CFG = small_model_config(d_model=64, n_layers=3)


@pytest.fixture
def cpu_bf16(monkeypatch):
    """The local engine's bf16 (a CUDA precision) on the CPU, whose autocast has bf16 too."""
    monkeypatch.setattr(local, "resolve_precision", lambda *args: "bf16")


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (4, 17), generator=gen) for _ in range(n)]


def engine(**train):
    torch.manual_seed(0)
    return local_engine(Llama(CFG), TrainConfig(device="cpu", lr=1e-2, **train))


def test_the_update_is_adamw_on_fp32_masters_of_the_summed_bf16_gradients(cpu_bf16):
    run = engine(master_weights=True)
    assert {p.dtype for p in run.model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in run.model.buffers()} == {torch.float32}  # RoPE tables stay as they were
    masters = [m.detach().clone() for m in run.masters.masters]

    torch.manual_seed(0)
    reference = Llama(CFG)  # the fp32 masters, updated by hand from the gradients of their bf16 twin
    torch.manual_seed(0)
    twin = Llama(CFG)
    for p in twin.parameters():
        p.data = p.data.to(torch.bfloat16)
    micro = batches(3)
    for batch in micro:
        twin.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = twin(batch[:, :-1], batch[:, 1:]) / len(micro)
        loss.backward()
        for fp32, bf16 in zip(reference.parameters(), twin.parameters(), strict=True):
            assert bf16.grad.dtype == torch.bfloat16
            fp32.grad = bf16.grad.float() if fp32.grad is None else fp32.grad + bf16.grad.float()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    optimizer = build_adamw(reference, TrainConfig(lr=1e-2))
    optimizer.step()

    out = run.train_step(micro, 1e-2)
    assert torch.equal(out.grad_norm, norm)
    for mine, theirs, param in zip(run.masters.masters, reference.parameters(), run.model.parameters(), strict=True):
        assert mine.dtype == torch.float32 and torch.equal(mine, theirs)
        assert torch.equal(param, theirs.to(torch.bfloat16))
        assert param.grad is None  # each micro-batch's bf16 gradient went into the master's at once
    assert all(not torch.equal(a, b) for a, b in zip(masters, run.masters.masters, strict=True))


def test_checkpoints_hold_the_masters_and_resume_bit_for_bit(cpu_bf16, tmp_path):
    run = engine(master_weights=True)
    micro = batches(2)
    for _ in range(2):
        run.train_step(micro, 1e-2)
    run.save(tmp_path, Direct())
    saved = safetensors.torch.load_file(str(tmp_path / fmt.WEIGHTS))
    by_name = dict(run.model.named_parameters())
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, run.masters.master_of[id(by_name[name])])
    assert all(p.dtype == torch.bfloat16 for p in run.model.parameters())  # bf16 again after the save

    resumed = engine(master_weights=True)
    resumed.load(tmp_path)
    plain = engine()  # fp32 weights under bf16 autocast read the same checkpoint
    plain.load(tmp_path)
    for a, b, c in zip(resumed.masters.masters, run.masters.masters, plain.model.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(c, b)
    more = batches(2, seed=2)
    assert torch.equal(resumed.train_step(more, 1e-2).loss, run.train_step(more, 1e-2).loss)
    for a, b in zip(resumed.masters.masters, run.masters.masters, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_losses_track_fp32_as_closely_as_bf16_autocast(monkeypatch, optimizer):
    micro = batches(2)

    def curve(precision, **train):
        monkeypatch.setattr(local, "resolve_precision", lambda *args: precision)
        run = engine(optimizer=optimizer, **train)
        return [run.train_step(micro, 3e-3).loss.item() for _ in range(12)]
    fp32, autocast, masters = curve("fp32"), curve("bf16"), curve("bf16", master_weights=True)
    assert autocast == pytest.approx(fp32, rel=0.01)  # bf16's tolerance, for both modes
    assert masters == pytest.approx(fp32, rel=0.01)
    assert masters != autocast  # bf16 residual stream and norm weights: another rounding
    assert masters[-1] < masters[0] - 1.5  # it learns the batch


def test_master_weights_need_bf16_and_the_local_engine():
    with pytest.raises(BigtrainError, match="train.master_weights needs bf16 .* this run trains in fp32"):
        engine(master_weights=True)  # auto is fp32 on the CPU
    with pytest.raises(BigtrainError, match="train.master_weights is for parallel.engine=local"):
        load_config(None, ["train.master_weights=true", "parallel.engine=deepspeed"])
