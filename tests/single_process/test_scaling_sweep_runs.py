"""`bigtrain sweep run|status|collect` with real local runs: an interrupted run resumed, finished
runs skipped, results collected (isoFLOP and grid) and read by the fit."""

import copy
import csv
import json

import pytest

from bigtrain.checkpoint import io as ckpt
from bigtrain.scaling.plan import plan_sweep
from tests.helpers import SWEEP_SHAPES as SHAPES
from tests.helpers import run_main as run
from tests.helpers import write_sweep


def test_local_sweep_runs_resumes_skips_and_collects(tmp_path, capsys, stdlib_data):
    path = write_sweep(tmp_path, stdlib_data, budgets=[1e9], shapes=SHAPES + [{"name": "mid", "model.d_model": 32}])
    plan = plan_sweep(path)
    interrupted = copy.deepcopy(plan.runs[0].config)  # out of time at its first (logging) step
    interrupted.train.max_minutes, interrupted.log.every = 0.0, 1
    from bigtrain.train.loop import train

    train(interrupted, console=False)
    capsys.readouterr()

    code, out, err = run(capsys, "sweep", "run", path)
    assert code == 0, err
    assert "C1e09-small: resuming from step 1 (44 steps)" in out and "C1e09-large: starting (10 steps)" in out
    for r in plan.runs:
        assert ckpt.read_state(ckpt.latest_checkpoint(r.config.run.path))["step"] == r.config.train.steps

    metrics = {r.name: (r.config.run.path / "metrics.jsonl").read_text() for r in plan.runs}
    code, out, _ = run(capsys, "sweep", "run", path)  # everything is finished: nothing trains
    assert code == 0 and out.count("finished, skipped") == 3 and "trained 0 runs" in out
    assert metrics == {r.name: (r.config.run.path / "metrics.jsonl").read_text() for r in plan.runs}

    code, out, _ = run(capsys, "sweep", "status", path)
    assert "3/3 runs finished" in out and out.count("done") == 3

    code, out, _ = run(capsys, "sweep", "collect", path)
    assert code == 0 and "wrote 3 runs" in out
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "sweep" / "results.csv"))}
    small = plan.runs[0]
    records = [json.loads(x) for x in metrics[small.name].splitlines()]
    train_records = {r["step"]: r for r in records if "loss" in r}
    last_tenth = [r["loss"] for s, r in train_records.items() if s > 0.9 * 44]
    assert float(rows[small.name]["loss"]) == pytest.approx(sum(last_tenth) / len(last_tenth))
    assert float(rows[small.name]["val_loss"]) == [r for r in records if "val_loss" in r][-1]["val_loss"]
    assert int(rows[small.name]["tokens"]) == train_records[44]["tokens"] == 44 * 4 * 32
    assert float(rows[small.name]["wall_s"]) > 0 and float(rows[small.name]["tokens_per_s"]) > 0
    # the fit reads the collected CSV (3 points of one budget are too few for five parameters)
    code, _, err = run(capsys, "scaling", "fit", tmp_path / "sweep" / "results.csv")
    assert code == 1 and "3 points cannot determine the 5 parameters" in err


def test_grid_collect_plots_loss_against_the_first_key(tmp_path, capsys, stdlib_data):
    path = write_sweep(tmp_path, stdlib_data, kind="grid", budgets=None, shapes=None, warmup_fraction=None,
                       grid={"train.lr": [1e-4, 1e-2]}, overrides={"train.steps": 6})
    assert run(capsys, "sweep", "collect", path)[0] == 1  # nothing has run yet
    assert run(capsys, "sweep", "run", path)[0] == 0
    code, out, _ = run(capsys, "sweep", "collect", path)
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))
    assert [float(r["train.lr"]) for r in rows] == [1e-4, 1e-2]
    assert float(rows[1]["val_loss"]) < float(rows[0]["val_loss"])  # 6 steps at 1e-4 barely move
    assert (tmp_path / "sweep" / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_parametrization_sweep_subset_runs_collects_and_reports_transfer(tmp_path, capsys, stdlib_data):
    """A 2 × 2 corner of configs/sweeps/cpu-mup-transfer.yaml: learning rate × parametrization."""
    width = [{"name": 64, "model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 2}]
    path = write_sweep(tmp_path, stdlib_data, kind="grid", budgets=None, shapes=None, warmup_fraction=None,
                       grid={"train.lr": [1e-3, 1e-2], "model.parametrization": ["standard", "mup"], "width": width},
                       overrides={"train.steps": 6, "model.head_dim": 16, "model.mup_base_width": 32})
    assert run(capsys, "sweep", "run", path)[0] == 0
    code, out, _ = run(capsys, "sweep", "collect", path)
    assert code == 0 and "wrote 4 runs" in out
    rows = {(r["train.lr"], r["model.parametrization"]): float(r["val_loss"])
            for r in csv.DictReader(open(tmp_path / "sweep" / "results.csv"))}
    assert len(set(rows.values())) == 4  # µP trains differently from standard at width 64 (m = 2)
    code, out, err = run(capsys, "scaling", "transfer", tmp_path / "sweep" / "results.csv",
                         "--plot", tmp_path / "transfer.png")
    assert code == 0, err
    for p in ("standard", "mup"):
        best = min(("0.001", "0.01"), key=lambda lr, p=p: rows[(lr, p)])
        assert f"{p}: the best learning rate moves 0 grid steps" in out
        assert f"{float(best):g} ({rows[(best, p)]:.3f})" in out
    # the Chinchilla tools read the same results (one model size cannot be fitted: a one-line refusal)
    code, _, err = run(capsys, "scaling", "fit", tmp_path / "sweep" / "results.csv")
    assert code == 1 and "points cannot determine" in err
