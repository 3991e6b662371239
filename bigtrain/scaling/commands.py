"""The `bigtrain sweep …` and `bigtrain scaling fit` commands: glue from parsed arguments to the
planning, running, collecting and fitting modules, and what they print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bigtrain.errors import BigtrainError
from bigtrain.scaling.collect import RESULT_COLUMNS, collect, write_results
from bigtrain.scaling.plan import PLAN_COLUMNS, Plan, format_table, plan_sweep, write_plan
from bigtrain.scaling.run import run_locally, run_state, submit_to_slurm


def _planned(path: str) -> Plan:
    """Plan the sweep and write (or check) its directory; print the table."""
    plan = plan_sweep(path)
    written = write_plan(plan)
    print(format_table([run.row for run in plan.runs], _shown(plan.columns)))
    for skipped in plan.skipped:
        print(f"bigtrain: warning: skipped {skipped}: under one step at this budget", file=sys.stderr)
    state = "wrote" if written else "unchanged:"
    print(f"{state} {len(plan.runs)} run configs, {plan.out / 'runs.txt'} and {plan.out / 'plan.csv'}")
    return plan


def _shown(columns: list[str]) -> list[str]:
    """Table columns: `params` (the N of C = 6ND) repeats one of the two counts shown."""
    return [c for c in columns if c != "params"]


def sweep_plan(args: argparse.Namespace) -> None:
    _planned(args.sweep)


def sweep_run(args: argparse.Namespace) -> None:
    plan = _planned(args.sweep)
    if args.slurm:
        print(submit_to_slurm(plan, args.throttle))
        return
    if args.throttle is not None:
        raise BigtrainError("--throttle applies to --slurm job arrays only")
    outcomes = run_locally(plan)
    trained = [wall for _, wall in outcomes if wall is not None]
    print(f"sweep {plan.name}: trained {len(trained)} runs in {sum(trained) / 60:.1f} min, "
          f"skipped {len(outcomes) - len(trained)} finished; next: bigtrain sweep collect {args.sweep}")


def sweep_status(args: argparse.Namespace) -> None:
    plan = plan_sweep(args.sweep)
    states = [run_state(run) for run in plan.runs]
    rows = [{**run.row, "state": state.label} for run, state in zip(plan.runs, states, strict=True)]
    print(format_table(rows, ["state", *_shown(plan.columns)]))
    done = sum(s.finished for s in states)
    print(f"{done}/{len(states)} runs finished ({plan.out / 'runs'})")


def sweep_collect(args: argparse.Namespace) -> None:
    plan = plan_sweep(args.sweep)
    if args.plot and plan.kind != "grid":
        raise BigtrainError("--plot draws grid sweeps; for isoFLOP sweeps: bigtrain scaling fit RESULTS.csv --plots DIR")
    rows, unfinished = collect(plan)
    if not rows:
        raise BigtrainError(f"no run of {args.sweep} has finished yet; run: bigtrain sweep run {args.sweep}")
    columns = [*plan.columns, *RESULT_COLUMNS]
    print(format_table(rows, [c for c in _shown(columns) if c != "global_batch"]))
    out = Path(args.out or plan.out / "results.csv")
    write_results(rows, columns, out)
    if unfinished:
        names = ", ".join(unfinished)
        print(f"bigtrain: warning: left out {len(unfinished)} unfinished runs: {names}", file=sys.stderr)
    print(f"wrote {len(rows)} runs → {out}")
    if plan.kind == "grid":
        from bigtrain.scaling.plots import grid_plot

        keys = plan.columns[len(PLAN_COLUMNS):]  # the grid's keys
        loss = "val_loss" if all(r["val_loss"] is not None for r in rows) else "loss"
        print(f"wrote {grid_plot(rows, keys, Path(args.plot or plan.out / 'grid.png'), loss)}")


def scaling_fit(args: argparse.Namespace) -> None:
    from bigtrain.scaling.fit import fit, format_report, read_points

    if args.bootstrap < 0 or args.exclude_highest < 0:
        raise BigtrainError("--bootstrap and --exclude-highest must be >= 0")
    if args.budget is not None and not args.budget > 0:
        raise BigtrainError(f"--budget must be a positive number of FLOPs, got {args.budget:g}")
    points, loss_column = read_points(args.results, args.loss, args.exclude_highest)
    print(f"{args.results}: {len(points.loss)} runs, loss column {loss_column}")
    report = fit(points, args.bootstrap, args.budget, args.seed)
    print(format_report(report, args.budget))
    if args.plots:
        from bigtrain.scaling.plots import fit_plots

        for path in fit_plots(report, Path(args.plots)):
            print(f"wrote {path}")


def scaling_coord_check(args: argparse.Namespace) -> None:
    import json

    from bigtrain.config import load_config
    from bigtrain.scaling.coord_check import coord_check, coord_plot, last_step, report

    cfg = load_config(args.config, args.overrides)
    results = coord_check(cfg, args.widths, args.steps)
    plot = coord_plot(results, cfg.model.mup_base_width, Path(args.plot))
    if args.json:
        print(json.dumps(last_step(results)))
        return
    print(report(results))
    print(f"wrote {plot}")


def scaling_transfer(args: argparse.Namespace) -> None:
    from bigtrain.scaling.transfer import format_report, read_curves, transfer_plot

    curves, loss = read_curves(args.results, args.lr_column, args.width_column, args.by, args.loss)
    print(format_report(curves, loss))
    if args.plot:
        print(f"wrote {transfer_plot(curves, loss, Path(args.plot))}")
