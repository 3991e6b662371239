"""`bigtrain sweep plan|run|status|collect`: plans checked by numbers, refusals, Slurm's command."""

import csv
import os
import stat

import pytest

from bigtrain.config import load_config
from bigtrain.model.flops import count_params
from bigtrain.scaling import run as sweep_run
from bigtrain.scaling.plan import plan_files, plan_sweep
from tests.helpers import run_main as run
from tests.helpers import write_sweep


def test_isoflop_plan_derives_tokens_steps_and_flops(tmp_path, capsys):
    path = write_sweep(tmp_path)
    code, out, _ = run(capsys, "sweep", "plan", path)
    assert code == 0 and "wrote 4 run configs" in out
    plan_dir = tmp_path / "sweep"
    lines = (plan_dir / "runs.txt").read_text().splitlines()
    assert lines == ["configs/C1e09-small.yaml", "configs/C1e09-large.yaml",
                     "configs/C3e09-small.yaml", "configs/C3e09-large.yaml"]
    rows = list(csv.DictReader(open(plan_dir / "plan.csv")))
    for line, row in zip(lines, rows, strict=True):
        cfg = load_config(plan_dir / line)
        n = count_params(cfg.model).total
        budget, steps = float(row["budget"]), int(row["steps"])
        tokens_per_step = cfg.data.micro_batch * cfg.data.seq_len
        assert steps == cfg.train.steps == round(budget / (6 * n * tokens_per_step))
        assert int(row["params"]) == n and int(row["tokens"]) == steps * tokens_per_step
        assert float(row["flops"]) == pytest.approx(6 * n * steps * tokens_per_step)
        assert abs(float(row["flops"]) - budget) <= 0.5 * 6 * n * tokens_per_step  # whole steps
        assert cfg.train.warmup_steps == round(0.1 * steps)
        assert cfg.run.dir == str(plan_dir / "runs" / cfg.run.name)
    assert load_config(plan_dir / lines[1]).model.n_layers == 2
    assert [int(r["steps"]) for r in rows] == [44, 10, 132, 29]

    code, out, _ = run(capsys, "sweep", "plan", path)  # the same plan again: nothing changes
    assert code == 0 and "unchanged: 4 run configs" in out


def test_a_changed_plan_never_overwrites_the_old_one(tmp_path, capsys):
    path = write_sweep(tmp_path)
    assert run(capsys, "sweep", "plan", path)[0] == 0
    before = (tmp_path / "sweep" / "configs" / "C1e09-small.yaml").read_text()
    write_sweep(tmp_path, budgets=[2e9, 3e9])
    code, _, err = run(capsys, "sweep", "plan", path)
    assert code == 1 and "already holds a different plan (configs/C2e09-small.yaml differs)" in err
    assert (tmp_path / "sweep" / "configs" / "C1e09-small.yaml").read_text() == before
    assert not (tmp_path / "sweep" / "configs" / "C2e09-small.yaml").exists()


def test_grid_plan_is_the_product_of_the_values(tmp_path):
    path = write_sweep(tmp_path, kind="grid", budgets=None, shapes=None, warmup_fraction=None,
                       grid={"train.lr": [1e-3, 1e-2], "data.micro_batch": [2, 4, 8]}, overrides={"train.steps": 7})
    plan = plan_sweep(path)
    assert [r.name for r in plan.runs][:3] == ["lr0.001-micro_batch2", "lr0.001-micro_batch4", "lr0.001-micro_batch8"]
    assert len(plan.runs) == 6 and plan.columns[-2:] == ["train.lr", "data.micro_batch"]
    last = plan.runs[-1]
    assert (last.config.train.lr, last.config.data.micro_batch, last.config.train.steps) == (1e-2, 8, 7)
    assert last.row["tokens"] == 7 * 8 * 32


def test_optimizer_is_a_sweep_axis(tmp_path):
    path = write_sweep(tmp_path, kind="grid", budgets=None, shapes=None, warmup_fraction=None,
                       grid={"train.optimizer": ["adamw", "muon"], "train.lr": [1e-3, 1e-2]})
    plan = plan_sweep(path)
    assert [r.name for r in plan.runs] == ["optimizeradamw-lr0.001", "optimizeradamw-lr0.01",
                                           "optimizermuon-lr0.001", "optimizermuon-lr0.01"]
    assert [r.config.train.optimizer for r in plan.runs] == ["adamw", "adamw", "muon", "muon"]
    assert [r.row["optimizer"] for r in plan.runs] == ["adamw", "adamw", "muon", "muon"]
    assert "optimizer" in plan_files(plan)["plan.csv"].splitlines()[0].split(",")


def test_grid_axis_of_mappings_sets_keys_together_and_parametrization_is_an_axis(tmp_path):
    widths = [{"name": 16, "model.d_model": 16, "model.n_heads": 1}, {"name": 64, "model.d_model": 64, "model.n_heads": 4}]
    path = write_sweep(tmp_path, kind="grid", budgets=None, shapes=None, warmup_fraction=None,
                       grid={"model.parametrization": ["standard", "mup"], "width": widths},
                       overrides={"train.steps": 5, "model.head_dim": 16, "model.mup_base_width": 16})
    plan = plan_sweep(path)
    assert [r.name for r in plan.runs] == ["parametrizationstandard-width16", "parametrizationstandard-width64",
                                           "parametrizationmup-width16", "parametrizationmup-width64"]
    assert plan.columns[-2:] == ["model.parametrization", "width"]
    last = plan.runs[-1]
    assert (last.config.model.parametrization, last.config.model.d_model, last.config.model.n_heads) == ("mup", 64, 4)
    assert (last.row["model.parametrization"], last.row["width"]) == ("mup", 64)


@pytest.mark.parametrize("change, message", [
    ({"budget": [1e9]}, "unknown sweep key budget; did you mean budgets?"),
    ({"kind": "isoflops"}, "kind must be one of isoflop, grid"),
    ({"shapes": [{"model.d_modle": 16}]}, "unknown config key model.d_modle; did you mean model.d_model?"),
    ({"budgets": [1e6]}, "budget 1e+06 FLOPs is too small for every shape (under one step)"),
    ({"budgets": ["lots"]}, "budgets must hold positive numbers, got 'lots'"),
    ({"grid": {"train.lr": [1e-3]}}, "grid belongs to grid sweeps, not isoflop"),
    ({"warmup_fraction": None}, "has 1 steps but train.warmup_steps=2; set warmup_fraction"),
    ({"base": "missing.yaml"}, "config file not found"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, capsys, change, message):
    if change.get("warmup_fraction", 0) is None:
        change = {**change, "budgets": [3e7]}
    path = write_sweep(tmp_path, **change)
    code, _, err = run(capsys, "sweep", "plan", path)
    assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "sweep").exists()


def test_slurm_submits_one_throttled_array(tmp_path, capsys, monkeypatch):
    path = write_sweep(tmp_path)
    repo = tmp_path / "repo"
    monkeypatch.setattr(sweep_run, "REPO_ROOT", repo)
    code, _, err = run(capsys, "sweep", "run", path, "--slurm")
    assert code == 1 and f"{repo}/slurm/sweep.sbatch not found" in err

    (repo / "slurm").mkdir(parents=True)
    (repo / "slurm" / "sweep.sbatch").write_text("#!/bin/bash\n")
    plan = plan_sweep(path)
    assert sweep_run.slurm_command(plan, 2) == [
        "sbatch", "--array=0-3%2", str(repo / "slurm" / "sweep.sbatch"), str((tmp_path / "sweep").resolve())]
    assert sweep_run.slurm_command(plan)[1] == "--array=0-3"

    bin_dir = tmp_path / "bin"  # a stand-in sbatch that records its arguments
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\necho "Submitted batch job 42"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, out, _ = run(capsys, "sweep", "run", path, "--slurm", "--throttle", 3)
    assert code == 0 and out.strip().endswith("Submitted batch job 42")
    assert ["sbatch", *(tmp_path / "args").read_text().split()] == sweep_run.slurm_command(plan, 3)
    assert run(capsys, "sweep", "run", path, "--throttle", 3)[0] == 1  # throttle needs --slurm


def test_shapes_under_one_step_are_skipped_with_a_warning(tmp_path, capsys):
    path = write_sweep(tmp_path, budgets=[3e7])
    code, out, err = run(capsys, "sweep", "plan", path)
    assert code == 0 and "wrote 1 run configs" in out and "C3e07-small" in out
    assert "skipped C3e07-large" in err and "under one step" in err
    assert (tmp_path / "sweep" / "runs.txt").read_text() == "configs/C3e07-small.yaml\n"
