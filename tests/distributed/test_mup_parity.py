"""µP keeps its per-parameter scaling in every layout: tensor-parallel shards, pipeline stages and
ZeRO partitions (parameter groups are built from names) reproduce the single-process µP loss curve
(fp32, CPU, gloo), as tests/distributed/test_parity.py does for standard parametrization."""

import json
import os

import pytest
import yaml

from bigtrain.config import from_dict
from bigtrain.train.loop import train
from tests.helpers import curve, parity_config, torchrun

STEPS, GLOBAL_BATCH = 5, 8
MUP = {"parametrization": "mup", "mup_base_width": 16}  # d_model 64: width multiplier 4


def _config(data, run_dir, **model) -> dict:
    cfg = parity_config(data, run_dir, STEPS, GLOBAL_BATCH)
    cfg["model"].update(model)
    return cfg


@pytest.fixture(scope="module")
def reference(stdlib_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mup-local")
    train(from_dict(_config(stdlib_data, run_dir, **MUP)), console=False)
    standard_dir = tmp_path_factory.mktemp("standard-local")
    train(from_dict(_config(stdlib_data, standard_dir)), console=False)
    return curve(run_dir), curve(standard_dir)


LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "dp2-zero1": ["parallel.zero_stage=1", "data.micro_batch=4"],
    "pp2": ["parallel.pp=2", "data.micro_batch=4", "train.grad_accum=2"],
}


@pytest.fixture(scope="module")
def runs(stdlib_data, tmp_path_factory):
    """Every layout in one 2-rank launch (layouts_worker.py)."""
    out = tmp_path_factory.mktemp("mup-layouts")
    config = _config(stdlib_data, out / "unused", **MUP)
    config["parallel"] = {"engine": "deepspeed"}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    torchrun(2, os.path.join(os.path.dirname(__file__), "layouts_worker.py"), str(out / "config.yaml"), str(out),
             json.dumps(LAYOUTS))
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mup_layout_matches_single_process(layout, reference, runs):
    (ref_losses, ref_norms, ref_val), (standard_losses, _, _) = reference
    assert ref_losses[1:] != pytest.approx(standard_losses[1:], rel=1e-3)  # µP is in effect
    losses, norms, val = curve(runs / layout)
    assert len(losses) == STEPS
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert norms == pytest.approx(ref_norms, rel=1e-4)
    assert val == pytest.approx(ref_val, rel=1e-5)
