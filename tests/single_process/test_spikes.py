"""Spikes and rollbacks with injected bad data: a step whose loss or gradient norm leaves the
rolling window is skipped (weights and AdamW state bitwise unchanged) and counted; the window
resumes bitwise; K bad steps in a row roll the run back to its last checkpoint and skip their
data, as a run told of the skip upfront would, also after a requeue."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from bigtrain.errors import BigtrainError
from bigtrain.train import loop
from tests.helpers import poisoned, poisoned_windows, read_metrics, step_windows, tiny_config

STEPS_ONLY = {"validate": False, "verify_checksums": False, "val_every": 1000}
SPIKES = {"spike_window": 8, "spike_sigma": 6.0}  # judges from the 5th accepted step on


def spiky_config(data, run_dir, **train):
    cfg = tiny_config(data, run_dir, **STEPS_ONLY, **train)
    cfg.log.every = 1
    return cfg


def poison(monkeypatch, cfg, steps, factor):
    """The windows of the given (0-based) steps of `cfg`'s run become bad data (loss × `factor`)."""
    monkeypatch.setattr(loop, "build_engine", poisoned_windows(loop.build_engine, step_windows(cfg, steps), factor))


def step_records(run_dir):
    """The last record of every trained step (a rollback replays some), in step order."""
    records = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    return [records[s] for s in sorted(records)]


def checkpoint_tensors(checkpoint):
    return load_file(checkpoint / "model.safetensors"), torch.load(checkpoint / "optimizer.pt", weights_only=True)


def same_update_state(a, b) -> bool:
    (wa, oa), (wb, ob) = checkpoint_tensors(a), checkpoint_tensors(b)
    moments_equal = all(torch.equal(sa[k], sb[k])
                        for sa, sb in zip(oa["state"].values(), ob["state"].values(), strict=True) for k in sa)
    return all(torch.equal(wa[k], wb[k]) for k in wa) and moments_equal


@pytest.mark.parametrize("signals", ["both", "loss", "grad_norm"])
def test_a_spike_is_skipped_and_counted_leaving_weights_and_adamw_bitwise(signals, stdlib_data, tmp_path, monkeypatch):
    cfg = spiky_config(stdlib_data, tmp_path / "run", steps=8, spike_signals=signals, **SPIKES)
    cfg.checkpoint.every = 1
    poison(monkeypatch, cfg, {6}, 30.0)  # finite, far above the window: a spike at step 7
    poison(monkeypatch, cfg, {2}, float("nan"))  # a non-finite step: skipped, not a spike
    loop.train(cfg, console=False)
    steps = step_records(tmp_path / "run")
    assert [r["skipped_steps"] for r in steps] == [0, 0, 1, 1, 1, 1, 2, 2]
    assert [r["spike_skips"] for r in steps] == [0, 0, 0, 0, 0, 0, 1, 1]
    assert steps[6]["loss"] > 20 * steps[5]["loss"] and steps[6]["grad_norm"] > 10 * steps[5]["grad_norm"]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert same_update_state(checkpoints / "step-0000006", checkpoints / "step-0000007")  # step, moments, weights
    assert same_update_state(checkpoints / "step-0000002", checkpoints / "step-0000003")
    assert not same_update_state(checkpoints / "step-0000007", checkpoints / "step-0000008")
    state = json.loads((checkpoints / "step-0000008" / "state.json").read_text())["bad_steps"]
    assert (state["total"], state["spikes"], state["spike_window"]["count"]) == (2, 1, 6)
    windows = state["spike_window"]["values"]  # the accepted steps' losses and norms, none of the bad ones
    assert windows[0][:6] == [pytest.approx(r["loss"], rel=1e-6) for i, r in enumerate(steps) if i not in (2, 6)]


def test_the_spike_window_resumes_bitwise(stdlib_data, tmp_path, monkeypatch):
    """8 steps + save + resume + 8 steps = 16 straight steps, with a spike on each side of the save."""
    straight = spiky_config(stdlib_data, tmp_path / "straight", steps=16, **SPIKES)
    straight.checkpoint.every = 8
    poison(monkeypatch, straight, {6, 11}, 30.0)
    loop.train(straight, console=False)
    resumed = spiky_config(stdlib_data, tmp_path / "resumed", steps=16, **SPIKES)
    resumed.run.resume = str(tmp_path / "straight" / "checkpoints" / "step-0000008")
    loop.train(resumed, console=False)
    a, b = step_records(tmp_path / "straight"), step_records(tmp_path / "resumed")
    assert [r["spike_skips"] for r in a] == [0] * 6 + [1] * 5 + [2] * 5
    assert [r["loss"] for r in b] == [r["loss"] for r in a[8:]]  # bitwise: the spike at step 12 skipped alike
    assert [r["spike_skips"] for r in b] == [r["spike_skips"] for r in a[8:]]
    final = [json.loads((tmp_path / run / "checkpoints" / "step-0000016" / "state.json").read_text())["bad_steps"]
             for run in ("straight", "resumed")]
    assert final[0] == final[1] and final[0]["spike_window"]["count"] == 14
    assert same_update_state(*(tmp_path / run / "checkpoints" / "step-0000016" for run in ("straight", "resumed")))


ROLLBACK = {"steps": 12, "rollback_after": 2}


def rollback_config(data, run_dir):
    cfg = spiky_config(data, run_dir, **ROLLBACK)
    cfg.checkpoint.every = 4
    return cfg


def test_a_rollback_skips_the_bad_data_as_a_run_told_upfront_and_a_requeue_do(stdlib_data, tmp_path, monkeypatch):
    """Steps 6 and 7 draw bad data: after them the run goes back to step 4, replays step 5, skips
    the two bad steps' batches and goes on; that equals a run given data_skips.json from the start,
    and a requeue from before the rollback (step 4) or after it (step 8) continues the same way."""
    cfg = rollback_config(stdlib_data, tmp_path / "run")
    poison(monkeypatch, cfg, {5, 6}, float("nan"))
    result = loop.train(cfg, console=False)
    assert result.step == 12
    records = read_metrics(tmp_path / "run")
    rollback = [r for r in records if "rollback" in r]
    assert rollback == [{"step": 7, "rollback": "step-0000004", "rollbacks": 1, "bad_steps_in_a_row": 2,
                         "skipped_data_from_step": 5, "skipped_data_steps": 2}]
    assert [r for r in records if "skipped_data_steps" in r and "rollback" not in r] == [
        {"step": 5, "skipped_data_from_step": 5, "skipped_data_steps": 2}]
    trained = [r["step"] for r in records if "loss" in r]
    assert trained == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10, 11, 12]
    rolled = step_records(tmp_path / "run")
    assert all(r["loss"] == r["loss"] for r in rolled) and rolled[-1]["rollbacks"] == 1
    assert (rolled[-1]["skipped_steps"], rolled[-1]["spike_skips"]) == (2, 0)  # counted, though rolled back
    skips = json.loads((tmp_path / "run" / "data_skips.json").read_text())["skips"]
    assert skips == [{"from_step": 5, "steps": 2, "checkpoint": "step-0000004", "rollback_at_step": 7}]

    told = rollback_config(stdlib_data, tmp_path / "told")
    (tmp_path / "told").mkdir()
    shutil.copy(tmp_path / "run" / "data_skips.json", tmp_path / "told")
    loop.train(told, console=False)
    upfront = step_records(tmp_path / "told")
    assert [r["loss"] for r in upfront] == [r["loss"] for r in rolled]
    assert upfront[-1]["skipped_steps"] == 0 and upfront[-1]["rollbacks"] == 0
    assert same_update_state(tmp_path / "run" / "checkpoints" / "step-0000012",
                             tmp_path / "told" / "checkpoints" / "step-0000012")

    for start in (4, 8):  # a requeue from the checkpoint before the rollback, and from one after the skip
        requeued = tmp_path / f"requeued-{start}"
        shutil.copytree(tmp_path / "run", requeued, ignore=shutil.ignore_patterns("metrics.jsonl"))
        for later in range(start + 4, 13, 4):
            shutil.rmtree(requeued / "checkpoints" / f"step-{later:07d}")
        (requeued / "checkpoints" / "latest").write_text(f"step-{start:07d}\n")
        again = rollback_config(stdlib_data, requeued)
        again.run.resume = "auto"
        loop.train(again, console=False)
        assert [r["loss"] for r in step_records(requeued)] == [r["loss"] for r in rolled[start:]]
        assert same_update_state(tmp_path / "run" / "checkpoints" / "step-0000012",
                                 requeued / "checkpoints" / "step-0000012")


def test_rollbacks_that_do_not_get_past_the_bad_steps_stop_in_one_line(stdlib_data, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "build_engine", poisoned(loop.build_engine, set(range(6, 1000)), float("inf")))
    cfg = rollback_config(stdlib_data, tmp_path / "run")
    cfg.train.max_rollbacks = 2
    with pytest.raises(BigtrainError) as error:
        loop.train(cfg, console=False)
    message = str(error.value)
    assert "2 bad step(s) in a row up to step 6" in message and "\n" not in message  # the third time
    assert f"stopped after train.max_rollbacks=2 rollbacks to step-0000004; the last good checkpoint " \
           f"{tmp_path / 'run' / 'checkpoints' / 'step-0000004'} is intact" in message
    skips = json.loads((tmp_path / "run" / "data_skips.json").read_text())["skips"]
    assert [(s["from_step"], s["steps"]) for s in skips] == [(5, 2), (4, 2)]  # every step from the 6th call on is bad
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step-0000004"]


def test_a_rollback_without_a_checkpoint_stops_in_one_line(stdlib_data, tmp_path, monkeypatch):
    cfg = rollback_config(stdlib_data, tmp_path / "run")
    cfg.checkpoint.every = 1000
    poison(monkeypatch, cfg, {1, 2}, float("nan"))
    with pytest.raises(BigtrainError, match=r"^2 bad step\(s\) in a row up to step 3 .*: cannot roll back; "
                                            r"no checkpoint was written; lower train.lr or check the data$"):
        loop.train(cfg, console=False)


def test_a_bad_run_seen_first_at_a_save_rolls_back_instead_of_saving(stdlib_data, tmp_path, monkeypatch):
    """Logs every 10 steps: the bad steps 6-8 are seen at step 8's save, which is not written."""
    cfg = rollback_config(stdlib_data, tmp_path / "run")
    cfg.log.every = 10
    poison(monkeypatch, cfg, {5, 6, 7}, float("nan"))
    assert loop.train(cfg, console=False).step == 12
    records = read_metrics(tmp_path / "run")
    assert [(r["step"], r["skipped_data_from_step"], r["skipped_data_steps"]) for r in records if "rollback" in r] == [
        (8, 5, 3)]
    assert [r["step"] for r in records if "checkpoint" in r] == [4, 8, 12]  # step 8 saved once, after the replay
    assert [(r["step"], r["skipped_steps"]) for r in records if "loss" in r] == [(10, 3), (12, 3)]


def test_a_rollback_with_an_asynchronous_save_in_flight_rolls_back_to_it(stdlib_data, tmp_path, monkeypatch):
    """With `checkpoint.async` the step-4 save may still be written when the bad run is seen: the
    rollback waits for it and reloads it, as the synchronous run does."""
    runs = {}
    for mode in ("sync", "async"):
        cfg = rollback_config(stdlib_data, tmp_path / mode)
        cfg.checkpoint.async_save = mode == "async"
        poison(monkeypatch, cfg, {5, 6}, float("nan"))
        loop.train(cfg, console=False)
        runs[mode] = read_metrics(tmp_path / mode)
    rollbacks = [[r for r in runs[mode] if "rollback" in r] for mode in ("sync", "async")]
    assert rollbacks[0] == rollbacks[1] and rollbacks[0][0]["rollback"] == "step-0000004"
    assert [r["loss"] for r in step_records(tmp_path / "async")] == [r["loss"] for r in step_records(tmp_path / "sync")]
