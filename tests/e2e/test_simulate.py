"""`bigtrain info --simulate`: one rank of a layout built for real in a fake process group, its
parameters, gradients, optimizer state and buffers within 10 % of the planner's figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import one_line_error

CONFIGS = Path(__file__).parents[2] / "configs"
FIGURES = ("parameters", "gradients", "optimizer", "buffers")


def simulate(*args):
    return subprocess.run([sys.executable, "-m", "bigtrain", "info", CONFIGS / "tiny.yaml", "--simulate", "--json",
                           "parallel.engine=deepspeed", "model.d_model=512", "model.n_layers=6", *map(str, args)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("layout", [
    ("--gpus", 8, "parallel.zero_stage=3"),  # each rank holds 1/8 of the weights from construction on
    ("--gpus", 4, "parallel.zero_stage=2"),
    ("--gpus", 8, "--rank", 5, "parallel.zero_stage=1", "parallel.tp=2", "parallel.pp=2", "train.grad_accum=2"),
    ("--gpus", 4, "parallel.zero_stage=2", "parallel.ep=2", "model.moe.experts=8", "model.moe.ffn_hidden=256"),
], ids=["dp8-zero3", "dp4-zero2", "tp2-pp2-dp2-zero1-rank5", "moe-ep2-dp4-zero2"])
def test_built_bytes_match_the_plan(layout):
    proc = simulate(*layout)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"planned", "built"} and set(result["planned"]) == set(result["built"]) == set(FIGURES)
    for name in FIGURES:
        assert result["built"][name] == pytest.approx(result["planned"][name], rel=0.10), name
    assert result["built"]["parameters"] > 0 and result["built"]["optimizer"] > 0


def test_a_layout_that_does_not_fit_is_refused_before_building():
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "info", CONFIGS / "70b.yaml", "--gpus", "8", "--simulate",
                           "parallel.engine=deepspeed"], capture_output=True, text=True)
    one_line_error(proc, "dp=8 tp=1 pp=1 zero=0", "does not fit", "GiB planned per GPU of 80 GiB")


def test_simulate_options_alone_are_refused():
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "info", CONFIGS / "tiny.yaml", "--json"],
                          capture_output=True, text=True)
    one_line_error(proc, "--json and --rank go with --simulate")
