"""A Mixture-of-Experts run logs its routing: the auxiliary losses, the load balance, what capacity
dropped, and each MoE block's load per expert (a histogram over expert indices in W&B)."""

import json

import pytest

from bigtrain.config import from_dict
from bigtrain.train.loop import train
from tests.wandb_records import history

EXPERTS = 4


def test_router_metrics_reach_jsonl_and_wandb(stdlib_data, tmp_path):
    cfg = from_dict({
        "run": {"name": "moe", "dir": str(tmp_path / "run"), "seed": 3},
        "model": {"vocab_size": 512, "d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32,
                  "moe": {"experts": EXPERTS, "top_k": 2, "ffn_hidden": 32, "first_dense": 1, "z_loss": 1e-3,
                          "capacity_factor": 1.0}},
        "data": {"path": str(stdlib_data[0]), "seq_len": 32, "micro_batch": 4},
        "train": {"steps": 4, "warmup_steps": 1, "device": "cpu", "grad_accum": 2},
        "checkpoint": {"every": 1000},
        "log": {"every": 2, "wandb": {"mode": "offline", "project": "moe-test"}},
    })
    train(cfg, console=False)
    records = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(records) == 2
    for r in records:
        loads = [r[f"moe/expert_load/{block}"] for block in range(2)]  # blocks 1 and 2 are MoE
        assert "moe/expert_load/2" not in r
        for load in loads:
            assert len(load) == EXPERTS and sum(load) == pytest.approx(1.0, abs=1e-5)
        assert r["moe/max_load"] == pytest.approx(sum(max(load) * EXPERTS for load in loads) / 2, rel=1e-5)
        assert r["moe/aux_loss"] > 0.9 and r["moe/z_loss"] > 0
        assert 0 < r["moe/dropped_frac"] < 1  # capacity 1.0: the busiest experts drop some copies
    (file,) = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = {row["_step"]: row for row in history(file)}
    last = rows[4]
    assert last["moe/aux_loss"] == pytest.approx(records[-1]["moe/aux_loss"], rel=1e-12)
    key = "moe/expert_load/0"  # a histogram (nested keys): one bin per expert, its share as the value
    assert last[f"{key}/_type"] == "histogram" and last[f"{key}/bins"] == list(range(EXPERTS + 1))
    assert last[f"{key}/values"] == pytest.approx(records[-1][key], rel=1e-6)
