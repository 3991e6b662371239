"""`train.master_weights` on the CPU's bf16: through the training loop, an asynchronous save and a
resume from it continue the uninterrupted run bit for bit (checkpoints hold fp32); compiled
blocks read the bf16 weights with no graph break or recompile."""

import pytest
import torch
from safetensors.torch import load_file

from bigtrain.engine import local
from bigtrain.train import loop
from tests.helpers import tiny_config


def run(data, run_dir, resume=None):
    cfg = tiny_config(data, run_dir, validate=False, verify_checksums=False, steps=4, val_every=1000,
                      master_weights=True)
    cfg.log.every, cfg.checkpoint.every, cfg.checkpoint.async_save = 1, 2, True
    cfg.run.resume = resume
    return loop.train(cfg, console=False)


def test_resume_continues_bit_for_bit_from_fp32_masters(stdlib_data, tmp_path, monkeypatch):
    monkeypatch.setattr(local, "resolve_precision", lambda *args: "bf16")
    straight = run(stdlib_data, tmp_path / "straight")
    resumed = run(stdlib_data, tmp_path / "resumed", str(tmp_path / "straight/checkpoints/step-0000002"))
    assert resumed.losses[-2:] == straight.losses[2:]
    assert straight.losses[-1] < straight.losses[0]
    a, b = (load_file(r.checkpoint / "model.safetensors") for r in (straight, resumed))
    assert {t.dtype for t in a.values()} == {torch.float32}
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(r.checkpoint / "optimizer.pt")["state"] for r in (straight, resumed))
    assert all(torch.equal(v, sb[i][k]) for i, s in sa.items() for k, v in s.items())


def test_compiled_blocks_read_the_bf16_weights_without_breaks_or_recompiles(monkeypatch):
    from torch._dynamo.utils import counters

    from tests.unit.test_master_weights import batches, engine

    monkeypatch.setattr(local, "resolve_precision", lambda *args: "bf16")
    micro = batches(2)
    eager = engine(master_weights=True)
    eager_losses = [eager.train_step(micro, 3e-3).loss.item() for _ in range(3)]
    counters.clear()
    compiled = engine(master_weights=True, compile=True)
    losses = [compiled.train_step(micro, 3e-3).loss.item()]
    graphs = counters["stats"]["unique_graphs"]
    losses += [compiled.train_step(micro, 3e-3).loss.item() for _ in range(2)]
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    assert losses == pytest.approx(eager_losses, rel=1e-4)  # bf16 roundings of fused kernels
