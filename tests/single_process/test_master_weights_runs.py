"""`train.master_weights` through the training loop (on the CPU's bf16): an asynchronous save,
then a resume from it, continues the uninterrupted run bit for bit; the checkpoints hold fp32."""

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
