"""Mixture-of-Experts layouts reproduce the local engine's curve (fp32, CPU, gloo): expert
parallelism alone, with ZeRO-2 data parallelism, with tensor (sequence) parallelism, with Ulysses
sequence parallelism, with pipeline stages, and MoE without ep under Ulysses, pipeline and ZeRO-3; their router metrics agree too. An ep2 checkpoint resumes bit for bit,
reshards to one process and back, consolidates, and converts to a Qwen3-MoE with the same logits.
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bigtrain.checkpoint.io import load_trained_model
from bigtrain.config import from_dict, load_config
from bigtrain.convert.consolidate import consolidate
from bigtrain.convert.hf import to_hf
from bigtrain.convert.reshard import reshard
from bigtrain.train.loop import train
from tests.helpers import parity_config, torchrun

STEPS, MICRO_BATCHES = 5, 4  # the reference: 4 micro-batches of 2 windows a step, as 2 or 4 ranks split them
MOE = {"experts": 4, "top_k": 2, "ffn_hidden": 48, "first_dense": 1, "aux_loss": 0.01, "z_loss": 0.001}
ROUTER_KEYS = ("moe/aux_loss", "moe/z_loss", "moe/max_load")


def moe_config(data, run_dir, steps: int = STEPS) -> dict:
    cfg = parity_config(data, run_dir, steps)
    cfg["model"]["moe"] = MOE
    cfg["model"]["qk_norm"] = True  # as Qwen3-MoE, so that checkpoints convert to Hugging Face
    cfg["data"]["micro_batch"] = 2
    return cfg


def records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def reference(stdlib_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("moe-local")
    cfg = from_dict(moe_config(stdlib_data, run_dir))
    cfg.train.grad_accum = MICRO_BATCHES
    result = train(cfg, console=False)
    return records(run_dir), load_file(result.checkpoint / "model.safetensors")


LAYOUTS = {
    "ep2": (2, ["parallel.ep=2", "train.grad_accum=2"]),
    "ep2-dp2-zero2": (4, ["parallel.ep=2", "parallel.zero_stage=2", "train.grad_accum=1"]),
    "ep2-pp2-zero1": (4, ["parallel.ep=2", "parallel.pp=2", "parallel.zero_stage=1", "train.grad_accum=2"]),
    "ep2-tp2-zero1": (4, ["parallel.ep=2", "parallel.tp=2", "parallel.zero_stage=1", "train.grad_accum=2"]),
    "ep2-sp2-zero2": (4, ["parallel.ep=2", "parallel.sp=2", "parallel.zero_stage=2", "train.grad_accum=2"]),
    "tp2-without-sequence-parallel": (2, ["parallel.tp=2", "parallel.tp_sequence_parallel=false", "train.grad_accum=4"]),
    "sp2": (2, ["parallel.sp=2", "train.grad_accum=4"]),
    "pp2": (2, ["parallel.pp=2", "train.grad_accum=4"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3", "train.grad_accum=2"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_moe_layout_matches_single_process(layout, reference, stdlib_data, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(moe_config(stdlib_data, tmp_path / "run")))
    torchrun(nproc, "-m", "bigtrain", "train", str(tmp_path / "config.yaml"), "parallel.engine=deepspeed", *overrides)
    got, (expected, ref_weights) = records(tmp_path / "run"), reference
    assert len(got) == STEPS
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-4)
    for key in ROUTER_KEYS:
        assert [r[key] for r in got] == pytest.approx([r[key] for r in expected], rel=1e-5), key
    assert expected[-1]["loss"] < expected[0]["loss"] - 0.1 and expected[-1]["moe/aux_loss"] > 0.9
    assert all(r["moe/dropped_frac"] == 0 for r in got)  # dropless
    weights_file = tmp_path / "run" / "checkpoints" / f"step-{STEPS:07d}" / "model.safetensors"
    if "pp2" in overrides or layout == "pp2":
        assert layout == "pp2" or weights_file.exists()  # ep: gathered over stages and experts
    if weights_file.exists():
        weights = load_file(weights_file)
        assert weights.keys() == ref_weights.keys()
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, ref_weights[name], rtol=1e-4, atol=5e-5)


def test_ep2_checkpoint_resumes_exactly_and_reshards_both_ways(stdlib_data, tmp_path):
    """Resumed from step 2, an ep2 ZeRO-2 run repeats the uninterrupted losses exactly; its step-4
    checkpoint, resharded to one process, continues the curve there, and resharded back to ep2 too."""
    cfg = moe_config(stdlib_data, tmp_path / "straight", steps=6)
    cfg["checkpoint"]["every"] = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    ep2 = [str(tmp_path / "config.yaml"), "parallel.engine=deepspeed", "parallel.ep=2", "parallel.zero_stage=2",
           "train.grad_accum=2"]
    torchrun(2, "-m", "bigtrain", "train", *ep2)
    straight = [r["loss"] for r in records(tmp_path / "straight")]
    checkpoints = tmp_path / "straight" / "checkpoints"
    torchrun(2, "-m", "bigtrain", "train", *ep2, f"run.dir={tmp_path / 'resumed'}",
             f"run.resume={checkpoints / 'step-0000002'}")
    assert [r["loss"] for r in records(tmp_path / "resumed")] == straight[2:]  # bitwise: the same floats

    reshard(checkpoints / "step-0000004", tmp_path / "one", ["parallel.engine=local", "parallel.ep=1",
                                                             "parallel.zero_stage=0", "train.grad_accum=4"])
    one = load_config(tmp_path / "one" / "config.yaml", [f"run.dir={tmp_path / 'local'}", f"run.resume={tmp_path / 'one'}"])
    assert train(one, console=False).losses == pytest.approx(straight[4:], rel=1e-5, abs=0)
    reshard(tmp_path / "one", tmp_path / "back", ["parallel.engine=deepspeed", "parallel.ep=2", "parallel.zero_stage=2",
                                                  "train.grad_accum=2"])
    torchrun(2, "-m", "bigtrain", "train", str(tmp_path / "back" / "config.yaml"), f"run.dir={tmp_path / 'again'}",
             f"run.resume={tmp_path / 'back'}")
    assert [r["loss"] for r in records(tmp_path / "again")] == pytest.approx(straight[4:], rel=1e-5, abs=0)

    full = consolidate(checkpoints / "step-0000006")
    assert full.weights["layers.2.mlp.experts.gate_proj"].shape == (4, 48, 64)  # every expert, both ranks'
    assert set(full.moments) == set(full.weights)
    transformers = pytest.importorskip("transformers")
    to_hf(checkpoints / "step-0000006", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    model, _, _ = load_trained_model(checkpoints / "step-0000006", torch.device("cpu"))
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=0, atol=1e-5)
