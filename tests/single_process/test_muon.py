"""Muon in the local engine: its update is Muon's, NaN steps leave weights and momentum alone,
resume is bitwise, and `convert reshard` refuses a Muon checkpoint in one line."""


import pytest
import torch
from safetensors.torch import load_file

from bigtrain.convert.reshard import reshard
from bigtrain.engine.local import local_engine
from bigtrain.engine.muon import is_hidden_matrix
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from bigtrain.train import loop
from tests.helpers import muon_reference_step, poisoned, tiny_config

STEPS_ONLY = {"validate": False, "verify_checksums": False, "optimizer": "muon"}


def test_local_engine_applies_muons_update(stdlib_data, tmp_path):
    cfg = tiny_config(stdlib_data, tmp_path, **STEPS_ONLY, weight_decay=0.1, grad_clip=None)
    tokens = torch.randint(512, (4, 65), generator=torch.Generator().manual_seed(0))
    reference = Llama(cfg.model, seed=7)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    reference(tokens[:, :-1], tokens[:, 1:]).backward()
    engine = local_engine(Llama(cfg.model, seed=7), cfg.train)
    engine.train_step([tokens], lr=0.01)
    checked = 0
    for name, p in engine.model.named_parameters():
        if is_hidden_matrix(name, p):
            g = dict(reference.named_parameters())[name].grad
            assert torch.allclose(p.detach(), muon_reference_step(before[name], g, torch.zeros_like(g), 0.01, 0.1)[0], rtol=0, atol=1e-6), name
            adamw = before[name] * (1 - 0.01 * 0.1) - 0.01 * g.sign()
            assert (p.detach() - adamw).abs().max() > 1e-3
            checked += 1
    assert checked == 2 * 7


def test_nan_steps_leave_weights_and_momentum_alone(stdlib_data, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "build_engine", poisoned(loop.build_engine, {3, 4}))
    cfg = tiny_config(stdlib_data, tmp_path / "run", **STEPS_ONLY, steps=5, val_every=1000)
    cfg.log.every, cfg.checkpoint.every = 1, 1
    result = loop.train(cfg, console=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    before, after = (load_file(checkpoints / f"step-000000{s}" / "model.safetensors") for s in (2, 4))
    assert all(torch.equal(before[k], after[k]) for k in before)
    states = [torch.load(checkpoints / f"step-000000{s}" / "optimizer.pt")["state"] for s in (2, 4)]
    momenta = [k for k, s in states[0].items() if "momentum_buffer" in s]
    assert momenta and all(torch.equal(states[0][k]["momentum_buffer"], states[1][k]["momentum_buffer"]) for k in momenta)
    assert result.losses[-1] == result.losses[-1]  # training continues finite


def test_resume_is_bitwise_and_reshard_refuses(stdlib_data, tmp_path):
    cfg = tiny_config(stdlib_data, tmp_path / "straight", **STEPS_ONLY, steps=4, val_every=1000)
    cfg.log.every, cfg.checkpoint.every = 1, 2
    straight = loop.train(cfg, console=False)
    resumed_cfg = tiny_config(stdlib_data, tmp_path / "resumed", **STEPS_ONLY, steps=4, val_every=1000)
    resumed_cfg.log.every, resumed_cfg.checkpoint.every = 1, 2
    resumed_cfg.run.resume = str(tmp_path / "straight" / "checkpoints" / "step-0000002")
    resumed = loop.train(resumed_cfg, console=False)
    assert resumed.losses[-2:] == straight.losses[2:]
    a, b = (load_file(r.checkpoint / "model.safetensors") for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(r.checkpoint / "optimizer.pt")["state"] for r in (straight, resumed))
    assert all(torch.equal(v, sb[i][k]) for i, s in sa.items() for k, v in s.items())
    with pytest.raises(BigtrainError, match="convert reshard carries AdamW state only, not Muon's"):
        reshard(straight.checkpoint, tmp_path / "out", ["parallel.tp=2", "parallel.engine=deepspeed"])
