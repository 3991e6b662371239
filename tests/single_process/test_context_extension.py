"""Extending the context (docs/distributed.md): a run at 32 tokens continued at 128 with
`model.init_from`, `model.rope_scaling` (YaRN, factor 4) and a longer `model.max_seq_len`."""

import math

import pytest
import torch
from safetensors.torch import load_file

from bigtrain.checkpoint.io import load_trained_model
from bigtrain.config import RopeScalingConfig
from bigtrain.train import loop
from tests.helpers import tiny_config


def test_a_short_context_checkpoint_continues_at_four_times_the_context(stdlib_data, tmp_path):
    short = tiny_config(stdlib_data, tmp_path / "short", validate=False, verify_checksums=False, steps=2, val_every=1000)
    short.model.max_seq_len = short.data.seq_len = 32
    start = loop.train(short, console=False).checkpoint

    # max_seq_len and rope_scaling change no weight shape, so init_from takes the checkpoint; an lr
    # too small to move an fp32 weight shows that every weight was read from it
    long = tiny_config(stdlib_data, tmp_path / "long", validate=False, verify_checksums=False, steps=1, val_every=1000,
                       lr=1e-30, warmup_steps=0)
    long.model.max_seq_len = long.data.seq_len = 128
    long.model.rope_scaling = RopeScalingConfig("yarn", 4.0, 32)
    long.model.init_from = str(start)
    long.validate()
    result = loop.train(long, console=False)
    assert result.step == 1 and len(result.losses) == 1 and math.isfinite(result.losses[0])
    before, after = load_file(start / "model.safetensors"), load_file(result.checkpoint / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    model, cfg, _ = load_trained_model(result.checkpoint, torch.device("cpu"))
    assert (cfg.model.max_seq_len, cfg.model.rope_scaling) == (128, RopeScalingConfig("yarn", 4.0, 32))
    cos = model.layers[1].cos
    assert cos.shape == (128, 16) and cos[0, 0].item() == pytest.approx(0.1 * math.log(4) + 1)
