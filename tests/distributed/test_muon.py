"""Muon under DeepSpeed: the update really is Muon's in every engine, skipped steps leave it alone,
ZeRO-1/2 and tensor parallelism reproduce the single-process curve, and ZeRO-2 resumes bitwise."""

import json
import os

import pytest
import yaml
from safetensors.torch import load_file

from bigtrain.config import from_dict
from bigtrain.train.loop import train
from tests.helpers import curve, parity_config, torchrun

STEPS, GLOBAL_BATCH = 10, 8
MUON = ["train.optimizer=muon"]
LAYOUTS = {
    "dp2-zero1": (2, ["parallel.zero_stage=1", "data.micro_batch=4"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2", "data.micro_batch=4"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-dp2-zero1": (4, ["parallel.tp=2", "parallel.zero_stage=1", "data.micro_batch=4"]),
}


def write_config(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def reference(stdlib_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local")
    raw = parity_config(stdlib_data, run_dir, STEPS, GLOBAL_BATCH)
    raw["train"]["optimizer"] = "muon"
    result = train(from_dict(raw), console=False)
    return (*curve(run_dir), load_file(result.checkpoint / "model.safetensors"))


@pytest.mark.parametrize("layout", ["dp2-zero1", "dp2-zero2", "tp2"])
def test_muon_step_is_muons_and_a_skipped_step_keeps_it(layout, stdlib_data, tmp_path):
    """One step on a fixed batch: every hidden matrix moves exactly as Muon says for the one-process
    gradient (not as AdamW would); then a skipped step leaves weights and momentum bitwise alone."""
    nproc, overrides = LAYOUTS[layout]
    raw = {"run": {"seed": 3}, "model": parity_config(stdlib_data, tmp_path)["model"],
           "data": {"seq_len": 32, "micro_batch": 8 // (2 if "zero" in layout else 1)},
           "train": {"device": "cpu", "optimizer": "muon", "weight_decay": 0.1, "grad_clip": None, "global_batch": 8}}
    config = write_config(tmp_path / "config.yaml", raw)
    worker = os.path.join(os.path.dirname(__file__), "muon_worker.py")
    torchrun(nproc, worker, config, str(tmp_path / "out.json"), "parallel.engine=deepspeed", *overrides[:1])
    report = json.loads((tmp_path / "out.json").read_text())
    assert len(report["matrices"]) == 4 * 7  # q k v o gate up down of every block
    for name, (muon_error, adamw_distance) in report["matrices"].items():
        assert muon_error < 1e-6, name
        assert adamw_distance > 1e-3, name
    assert report["momenta"] >= 1
    assert report["skip_kept_weights"] and report["skip_kept_state"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_muon_layout_matches_single_process(layout, reference, stdlib_data, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    config = write_config(tmp_path / "config.yaml", parity_config(stdlib_data, tmp_path / "run", STEPS, GLOBAL_BATCH))
    torchrun(nproc, "-m", "bigtrain", "train", config, "parallel.engine=deepspeed", *MUON, *overrides)
    losses, norms, val = curve(tmp_path / "run")
    ref_losses, ref_norms, ref_val, ref_weights = reference
    assert len(losses) == STEPS
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert norms == pytest.approx(ref_norms, rel=1e-4)
    assert val == pytest.approx(ref_val, rel=1e-5)
    assert ref_losses[-1] < ref_losses[0] - 0.1


def test_zero2_resume_is_bitwise(stdlib_data, tmp_path):
    """N steps, save, resume, N steps == 2N straight steps: losses and weights bitwise."""
    raw = parity_config(stdlib_data, tmp_path / "straight", 4, GLOBAL_BATCH)
    raw["checkpoint"]["every"] = 2
    config = write_config(tmp_path / "config.yaml", raw)
    zero2 = ["parallel.engine=deepspeed", *MUON, *LAYOUTS["dp2-zero2"][1]]
    torchrun(2, "-m", "bigtrain", "train", config, *zero2)
    middle = tmp_path / "straight" / "checkpoints" / "step-0000002"
    torchrun(2, "-m", "bigtrain", "train", config, *zero2, f"run.dir={tmp_path / 'resumed'}", f"run.resume={middle}")
    straight, resumed = curve(tmp_path / "straight")[0], curve(tmp_path / "resumed")[0]
    assert resumed[-2:] == straight[2:]
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-0000004" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
