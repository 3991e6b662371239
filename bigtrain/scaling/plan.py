"""Sweep files → plans: one resolved config per run, plus a table of N, D, C and steps.

A sweep file is YAML over a base config::

    name: cpu-isoflop
    kind: isoflop                 # or: grid
    base: ../tiny.yaml            # relative to the sweep file
    out: runs/sweeps/cpu-isoflop  # the plan directory (default runs/sweeps/<name>)
    overrides: {eval.val_batches: 8}        # dotted keys applied to every run
    # isoflop: every budget C (FLOPs) × every shape; tokens D = C / 6N, steps = D / tokens per step
    budgets: [1.0e+13, 3.0e+13]
    shapes: [{model.d_model: 64, model.n_layers: 2}, {name: wide, model.d_model: 128}]
    params: total                 # the N in C = 6ND: total or non_embedding
    warmup_fraction: 0.1          # warmup = this share of each run's steps (else the base's)
    # grid: the product of the listed values of any config keys
    grid: {train.lr: [1.0e-3, 3.0e-3], data.micro_batch: [8, 16]}
    # a grid axis whose values are mappings sets several keys together (its column: each one's `name`)
    grid: {model.parametrization: [standard, mup], width: [{name: 64, model.d_model: 64, model.n_heads: 4}, ...]}
    #   any config key is an axis, e.g. {train.optimizer: [adamw, muon], train.lr: [...]} compares
    #   optimizers each at its best learning rate (configs/sweeps/tiny-optimizers.yaml)

The plan directory holds `configs/<run>.yaml`, `runs.txt` (one config path per line, relative to
the plan directory: what a Slurm array task reads) and `plan.csv`; the runs live in `runs/<run>/`.
"""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bigtrain.config import Config, load_config, read_yaml_mapping
from bigtrain.errors import BigtrainError
from bigtrain.model.flops import count_params

KEYS = {
    "name", "kind", "base", "out", "overrides",
    "budgets", "shapes", "params", "warmup_fraction",  # isoflop
    "grid",
}
KIND_KEYS = {"isoflop": {"budgets", "shapes"}, "grid": {"grid"}}
PLAN_COLUMNS = ["run", "params", "params_total", "params_non_embedding", "tokens", "flops", "steps",
                "global_batch", "lr", "optimizer"]


@dataclass
class PlannedRun:
    name: str
    config: Config
    row: dict[str, Any]  # the plan table's columns for this run


@dataclass
class Plan:
    name: str
    kind: str
    out: Path
    runs: list[PlannedRun]
    columns: list[str]
    skipped: list[str] = field(default_factory=list)  # (budget, shape) pairs below one step

    @property
    def config_paths(self) -> list[str]:
        return [f"configs/{run.name}.yaml" for run in self.runs]


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep file's top level; the config keys are checked when runs resolve."""
    path = Path(path)
    spec = read_yaml_mapping(path, "sweep file", "sweep keys")
    for key in spec:
        if key not in KEYS:
            near = difflib.get_close_matches(str(key), sorted(KEYS), n=1)
            hint = f"; did you mean {near[0]}?" if near else f"; valid keys: {', '.join(sorted(KEYS))}"
            raise BigtrainError(f"{path}: unknown sweep key {key}{hint}")
    kind = spec.get("kind")
    if kind not in KIND_KEYS:
        raise BigtrainError(f"{path}: kind must be one of {', '.join(KIND_KEYS)}, got {kind!r}")
    for key in KIND_KEYS[kind]:
        if not spec.get(key):
            raise BigtrainError(f"{path}: a {kind} sweep needs a non-empty {key}")
    for other, keys in KIND_KEYS.items():
        for key in keys & spec.keys() if other != kind else ():
            raise BigtrainError(f"{path}: {key} belongs to {other} sweeps, not {kind}")
    if kind == "grid" and ("params" in spec or "warmup_fraction" in spec):
        raise BigtrainError(f"{path}: params and warmup_fraction belong to isoflop sweeps")
    spec.setdefault("name", path.stem)
    spec["base"] = path.parent / spec["base"] if spec.get("base") else None
    return spec


def plan_sweep(path: str | Path) -> Plan:
    """Expand a sweep file into resolved run configs (nothing is written)."""
    spec = load_sweep(path)
    name = str(spec["name"])
    out = Path(spec.get("out") or Path("runs") / "sweeps" / name)
    common = _mapping(spec.get("overrides") or {}, "overrides", path)
    if spec["kind"] == "isoflop":
        plan = _isoflop(spec, common, out, path)
    else:
        plan = _grid(spec, common, out, path)
    names = [run.name for run in plan.runs]
    if len(set(names)) != len(names):
        raise BigtrainError(f"{path}: two runs share a name; give the shapes distinct names")
    return plan


def _mapping(value: Any, what: str, path: str | Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BigtrainError(f"{path}: {what} must be a mapping of dotted config keys, got {value!r}")
    return value


def _resolve(spec: dict, overrides: dict[str, Any], run_name: str, out: Path, path: str | Path) -> Config:
    """The base config with the sweep's overrides and the run's own, validated."""
    items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]  # JSON is YAML: types survive
    items += [f"run.name={json.dumps(run_name)}", f"run.dir={json.dumps(str(out / 'runs' / run_name))}"]
    try:
        return load_config(spec["base"], items)
    except BigtrainError as e:
        raise BigtrainError(f"{path} (run {run_name}): {e}") from None


def _row(cfg: Config, params_key: str) -> dict[str, Any]:
    counts = count_params(cfg.model)
    batch = global_batch(cfg)
    tokens = cfg.train.steps * batch * cfg.data.seq_len
    n = counts.total if params_key == "total" else counts.non_embedding
    return {"run": cfg.run.name, "params": n, "params_total": counts.total,
            "params_non_embedding": counts.non_embedding, "tokens": tokens, "flops": 6.0 * n * tokens,
            "steps": cfg.train.steps, "global_batch": batch, "lr": cfg.train.lr,
            "optimizer": cfg.train.optimizer}


def global_batch(cfg: Config) -> int:
    """Windows per step: train.global_batch when set (multi-process runs), else one process's."""
    return cfg.train.global_batch or cfg.data.micro_batch * cfg.train.grad_accum


def _isoflop(spec: dict, common: dict, out: Path, path: str | Path) -> Plan:
    params_key = spec.get("params", "total")
    if params_key not in ("total", "non_embedding"):
        raise BigtrainError(f"{path}: params must be total or non_embedding, got {params_key!r}")
    warmup = spec.get("warmup_fraction")
    if warmup is not None and not (isinstance(warmup, (int, float)) and 0 <= warmup < 1):
        raise BigtrainError(f"{path}: warmup_fraction must be a number in [0, 1), got {warmup!r}")
    budgets = [_positive_float(b, "budgets", path) for b in spec["budgets"]]
    if not isinstance(spec["shapes"], list):
        raise BigtrainError(f"{path}: shapes must be a list of mappings of dotted config keys")
    runs, skipped = [], []
    for budget in budgets:
        feasible = 0
        for shape in spec["shapes"]:
            shape = dict(_mapping(shape, "each shape", path))
            label = str(shape.pop("name", None) or _shape_label(shape))
            name = f"C{budget:.0e}-{label}".replace("+", "")
            cfg = _resolve(spec, {**common, **shape}, name, out, path)
            counts = count_params(cfg.model)
            n = counts.total if params_key == "total" else counts.non_embedding
            steps = round(budget / (6.0 * n) / (global_batch(cfg) * cfg.data.seq_len))
            if steps < 1:
                step_flops = 6.0 * n * global_batch(cfg) * cfg.data.seq_len
                skipped.append(f"{name} (N={n:,} needs {step_flops:.2g} FLOPs a step)")
                continue
            cfg.train.steps = steps
            if warmup is not None:
                cfg.train.warmup_steps = round(warmup * steps)
            if cfg.train.warmup_steps >= steps:
                raise BigtrainError(f"{path}: run {name} has {steps} steps but train.warmup_steps="
                                    f"{cfg.train.warmup_steps}; set warmup_fraction")
            feasible += 1
            runs.append(PlannedRun(name, cfg.validate(), {"budget": budget, **_row(cfg, params_key)}))
        if not feasible:
            raise BigtrainError(f"{path}: budget {budget:.3g} FLOPs is too small for every shape (under one step)")
    return Plan(str(spec["name"]), "isoflop", out, runs, ["budget", *PLAN_COLUMNS], skipped)


def _grid(spec: dict, common: dict, out: Path, path: str | Path) -> Plan:
    grid = _mapping(spec["grid"], "grid", path)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise BigtrainError(f"{path}: grid.{key} must be a non-empty list of values")
    runs = []
    for values in itertools.product(*grid.values()):
        point, keys = {}, {}
        for axis, value in zip(grid, values, strict=True):
            if isinstance(value, dict):  # several keys at once, labelled by its name
                value = dict(value)
                label = value.pop("name", None)
                point[axis] = label if label is not None else _shape_label(value)
                keys.update(value)
            else:
                point[axis] = value
                keys[axis] = value
        name = "-".join(f"{key.rsplit('.', 1)[-1]}{_short(v)}" for key, v in point.items())
        cfg = _resolve(spec, {**common, **keys}, name, out, path)
        runs.append(PlannedRun(name, cfg, {**_row(cfg, "total"), **point}))
    return Plan(str(spec["name"]), "grid", out, runs, [*PLAN_COLUMNS, *grid])


def _positive_float(value: Any, what: str, path: str | Path) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not number > 0:
        raise BigtrainError(f"{path}: {what} must hold positive numbers, got {value!r}")
    return number


def _shape_label(shape: dict[str, Any]) -> str:
    return "-".join(f"{key.rsplit('.', 1)[-1].replace('_', '')}{_short(v)}" for key, v in shape.items()) or "base"


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plan_files(plan: Plan) -> dict[str, str]:
    """The plan directory's files (relative path → text)."""
    files = {path: yaml.safe_dump(run.config.to_dict(), sort_keys=False)
             for path, run in zip(plan.config_paths, plan.runs, strict=True)}
    files["runs.txt"] = "".join(p + "\n" for p in plan.config_paths)
    table = io.StringIO()
    writer = csv.DictWriter(table, plan.columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(run.row for run in plan.runs)
    files["plan.csv"] = table.getvalue()
    return files


def write_plan(plan: Plan) -> bool:
    """Write the plan directory; True if written, False if the same plan is already there.

    A different plan already in the directory is an error: its runs may belong to it.
    """
    files = plan_files(plan)
    if (plan.out / "runs.txt").exists():
        for rel, text in files.items():
            existing = plan.out / rel
            if not existing.is_file() or existing.read_text() != text:
                raise BigtrainError(f"{plan.out} already holds a different plan ({rel} differs); "
                                    "set another out in the sweep file")
        return False
    for rel, text in files.items():
        (plan.out / rel).parent.mkdir(parents=True, exist_ok=True)
        (plan.out / rel).write_text(text)
    return True


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table; numbers in compact engineering form."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    for row in cells:  # the run name left-aligned, numbers right-aligned
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e5 or abs(value) < 1e-2 else f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10**6:
        return f"{value / 1e6:.2f}M"
    return str(value)
