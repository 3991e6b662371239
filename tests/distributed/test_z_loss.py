"""The logits' z-loss (`train.z_loss`) under parallel layouts: the loss and `z_loss` curves (and
gradient norms, which the z-loss's gradient moves) equal the single-process run's (fp32, CPU,
gloo): tensor parallelism with and without sequence parallelism (the vocab-parallel chunked
loss), pipeline stages (the loss on logits), Ulysses sequence parallelism and ZeRO data parallelism."""

import json

import pytest
import yaml

from bigtrain.config import from_dict
from bigtrain.train.loop import train
from tests.helpers import parity_config, torchrun

STEPS, GLOBAL_BATCH, Z_LOSS = 4, 8, 1e-2


def z_config(data, run_dir, z_loss: float = Z_LOSS) -> dict:
    cfg = parity_config(data, run_dir, STEPS, GLOBAL_BATCH)
    cfg["train"]["z_loss"] = z_loss
    cfg["eval"]["val_every"] = STEPS  # validation before and after: the cross-entropy alone
    return cfg


def curves(run_dir) -> dict[str, list[float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {"loss": [r["loss"] for r in steps], "z_loss": [r["z_loss"] for r in steps],
            "grad_norm": [r["grad_norm"] for r in steps], "val_loss": [r["val_loss"] for r in records if "val_loss" in r]}


@pytest.fixture(scope="module")
def reference(stdlib_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("z-local")
    train(from_dict(z_config(stdlib_data, run_dir)), console=False)
    return curves(run_dir)


def test_reference_z_loss_is_a_separate_term_of_the_objective(reference, stdlib_data, tmp_path):
    """Without the z-loss the first step's loss is the same (it is the cross-entropy in both), the
    z-loss is logged apart and its gradient changes the gradient norm and so the later steps."""
    train(from_dict(z_config(stdlib_data, tmp_path / "off", z_loss=0.0)), console=False)
    records = [json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    off = [r for r in records if "loss" in r]
    assert all("z_loss" not in r for r in off)
    assert off[0]["loss"] == reference["loss"][0]
    assert all(z > 0.1 for z in reference["z_loss"])  # log Z of a fresh 512-token vocabulary is about 6
    assert abs(off[0]["grad_norm"] - reference["grad_norm"][0]) > 1e-3 * off[0]["grad_norm"]
    assert off[-1]["loss"] != reference["loss"][-1]


LAYOUTS = {
    "tp2": (2, ["parallel.tp=2", "parallel.tp_sequence_parallel=false"]),
    "tp2-sp": (2, ["parallel.tp=2"]),  # Megatron sequence parallelism: on by default with tp > 1
    "pp2": (2, ["parallel.pp=2", "data.micro_batch=4", "train.grad_accum=2"]),
    "sp2": (2, ["parallel.sp=2"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2", "data.micro_batch=2", "train.grad_accum=2"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_z_loss_layout_matches_single_process(layout, reference, stdlib_data, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(z_config(stdlib_data, tmp_path / "run")))
    torchrun(nproc, "-m", "bigtrain", "train", str(tmp_path / "config.yaml"), "parallel.engine=deepspeed", *overrides)
    got = curves(tmp_path / "run")
    assert len(got["loss"]) == STEPS and len(got["val_loss"]) == 2
    for key in ("loss", "z_loss", "val_loss"):
        assert got[key] == pytest.approx(reference[key], rel=1e-5), key
    assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
