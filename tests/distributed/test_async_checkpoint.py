"""`checkpoint.async` under DeepSpeed layouts on 2 ranks (ZeRO-3, tensor, pipeline and expert
parallelism): every checkpoint holds exactly the tensors a synchronous save writes (DeepSpeed's
own files go through the same staging as bigtrain's), and the losses are the same."""

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import parity_config, torchrun

STEPS = 3
MOE = ["model.moe.experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden=48", "model.moe.first_dense=1"]
LAYOUTS = {
    "dp2-zero3": ["parallel.zero_stage=3", "train.grad_accum=2"],
    "tp2-zero1": ["parallel.tp=2", "parallel.zero_stage=1", "train.grad_accum=4"],
    "pp2": ["parallel.pp=2", "train.grad_accum=4"],
    "ep2-zero2": [*MOE, "parallel.ep=2", "parallel.zero_stage=2", "train.grad_accum=2"],
}


def load(file):
    return load_file(file) if file.suffix == ".safetensors" else torch.load(file, weights_only=False)


def assert_same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")


@pytest.fixture(scope="module")
def runs(stdlib_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("async")
    cfg = parity_config(stdlib_data, out / "unused", steps=STEPS)
    cfg["checkpoint"]["every"], cfg["data"]["micro_batch"] = 1, 2
    cfg["parallel"] = {"engine": "deepspeed"}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    runs = {f"{name}-{mode}": [*overrides, f"checkpoint.async={mode == 'async'}"]
            for name, overrides in LAYOUTS.items() for mode in ("sync", "async")}
    torchrun(2, os.path.join(os.path.dirname(__file__), "layouts_worker.py"), str(out / "config.yaml"), str(out),
             json.dumps(runs))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_asynchronous_checkpoints_hold_what_synchronous_ones_hold(layout, runs):
    sync, asynchronous = runs / f"{layout}-sync", runs / f"{layout}-async"
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
              for d in (sync, asynchronous)]
    assert len(losses[0]) == STEPS and losses[0] == losses[1]
    for step in range(1, STEPS + 1):
        name = f"checkpoints/step-{step:07d}"
        listed = [json.loads((d / name / "files.json").read_text()) for d in (sync, asynchronous)]
        assert listed[0].keys() == listed[1].keys()
        tensor_files = [f for f in listed[0] if f.endswith((".pt", ".safetensors"))]
        assert any(f.startswith("deepspeed/") for f in tensor_files) or layout.startswith("ep2")
        for file in tensor_files:
            assert_same(load(sync / name / file), load(asynchronous / name / file), f"{layout} {name}/{file}")
    assert (asynchronous / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:07d}"
