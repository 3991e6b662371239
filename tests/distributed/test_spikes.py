"""Spikes and rollbacks on 2 ranks under DeepSpeed ZeRO-2 (spikes_worker.py): bad data on one rank
makes every rank skip the step together, weights and ZeRO's AdamW partitions stay bitwise, and a
rollback reloads the live engine and skips the data as a run told upfront does."""

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import ranks_config, read_metrics, torchrun


@pytest.fixture(scope="module")
def worker(stdlib_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("spikes")
    (out / "config.yaml").write_text(yaml.safe_dump(ranks_config(stdlib_data, out / "unused", 3)))
    torchrun(2, os.path.join(os.path.dirname(__file__), "spikes_worker.py"), str(out / "config.yaml"), str(out))
    return out, [json.loads((out / f"ranks-{r}.json").read_text()) for r in (0, 1)]


def tensors(tree, prefix=""):
    """Every tensor in a nested dict/list, by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else ()
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def zero_state(checkpoint):
    state = {}
    for part in sorted((checkpoint / "deepspeed").glob("*optim_states.pt")):
        state.update(tensors(torch.load(part, weights_only=False)["optimizer_state_dict"], part.name))
    return state


def test_every_rank_skips_a_spike_on_one_rank_together(worker):
    out, ranks = worker
    spike = [r["spike"] for r in ranks]
    assert spike[0]["skipped"] == spike[1]["skipped"] == [False] * 5 + [True, False, False]
    assert spike[0]["window"] == spike[1]["window"] and spike[0]["window"]["spike_window"]["count"] == 7
    records = [r for r in read_metrics(out / "spike") if "loss" in r]
    assert [r["spike_skips"] for r in records] == [0] * 5 + [1] * 3
    before, after = out / "spike" / "checkpoints" / "step-0000005", out / "spike" / "checkpoints" / "step-0000006"
    a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    za, zb = zero_state(before), zero_state(after)
    assert za.keys() == zb.keys() and len(za) > 0 and all(torch.equal(za[k], zb[k]) for k in za)


def test_a_rollback_reloads_every_rank_and_equals_a_run_told_upfront(worker):
    out, ranks = worker
    skips = json.loads((out / "rollback" / "data_skips.json").read_text())["skips"]
    assert skips == [{"from_step": 4, "steps": 2, "checkpoint": "step-0000003", "rollback_at_step": 6}]
    assert [r for r in read_metrics(out / "rollback") if "rollback" in r][0]["step"] == 6
    for rank in ranks:
        assert rank["rollback"]["skipped"] == [False] * 4 + [True, True] + [False] * 5  # 4 and 5 again, then on
    steps = {r["step"]: r["loss"] for r in read_metrics(out / "rollback") if "loss" in r}
    told = {r["step"]: r["loss"] for r in read_metrics(out / "told") if "loss" in r}
    assert steps == told  # bitwise, every step's last record
    a, b = (load_file(out / run / "checkpoints" / "step-0000008" / "model.safetensors") for run in ("rollback", "told"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_pipeline_stages_skip_a_gradient_norm_spike_together(worker):
    """With parallel.pp > 1 the loss comes after the update: spike_signals=auto watches the norm."""
    out, ranks = worker
    pipe = [r["pipe"] for r in ranks]
    assert pipe[0]["skipped"] == pipe[1]["skipped"] == [False] * 5 + [True, False, False]
    assert pipe[0]["window"] == pipe[1]["window"] and pipe[0]["window"]["spike_window"]["count"] == 7
    assert pipe[0]["window"]["spike_window"]["values"][0][:7] == [None] * 7  # no loss before the update
    assert [r["spike_skips"] for r in read_metrics(out / "pipe") if "loss" in r] == [0] * 5 + [1] * 3
