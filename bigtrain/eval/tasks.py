"""Which lm-eval tasks `--tasks` / `eval.tasks` mean: the tasks bigtrain ships, task YAMLs and
directories of them on disk, or names of the harness's own registry.

Task files are lm-eval's own YAML format. Relative `data_files` (and a relative `dataset_path`
that names an existing directory) are read relative to the YAML file, so a task directory can be
copied anywhere. Hugging Face hubs are offline unless the environment says otherwise: tasks read
local files.
"""

from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path
from typing import Any

from bigtrain import compat
from bigtrain.errors import BigtrainError

SHIPPED = Path(__file__).parent / "task_files"  # one directory per task
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def offline_by_default() -> None:
    """No hub downloads unless the environment asks for them (`HF_DATASETS_OFFLINE=0`). Call
    before `datasets` is imported: it reads these variables once."""
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")


def shipped_tasks() -> dict[str, Path]:
    """Task name → YAML of the tasks in `bigtrain/eval/task_files`."""
    return {path.stem: path for path in sorted(SHIPPED.glob("*/*.yaml"))}


def _first_line(e: BaseException) -> str:
    mark = getattr(e, "problem_mark", None)  # a YAML syntax error: say what and where
    if mark is not None and getattr(e, "problem", None):
        return f"{e.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec or spec.startswith(".")


def _resolve_relative(cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    """`data_files` (a string, list or split → files mapping) and a `dataset_path` directory,
    made absolute against `base` when they are relative."""
    def absolute(value: Any) -> Any:
        if isinstance(value, str):
            return value if Path(value).is_absolute() or "://" in value else str(base / value)
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if isinstance(value, dict):
            return {k: absolute(v) for k, v in value.items()}
        return value

    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        cfg["dataset_kwargs"] = {**kwargs, "data_files": absolute(kwargs["data_files"])}
    path = cfg.get("dataset_path")
    if isinstance(path, str) and not Path(path).is_absolute() and (base / path).is_dir():
        cfg["dataset_path"] = str(base / path)
    return cfg


def _read(path: Path) -> dict[str, Any]:
    try:
        return compat.read_task_yaml(path)
    except Exception as e:  # yaml.YAMLError, a missing include, an unimportable !function, not a mapping
        raise BigtrainError(f"task file {path} does not parse: {_first_line(e)}") from None


def task_config(path: Path, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """One task YAML (already read: `cfg`) as the config dict lm-eval takes, `include` and
    `!function` resolved."""
    cfg = _read(path) if cfg is None else cfg
    if "group" in cfg and "task" not in cfg:
        raise BigtrainError(f"{path} is a group of tasks; give the task YAMLs or their directory instead")
    if not isinstance(cfg.get("task"), str):
        raise BigtrainError(f"{path} is not an lm-eval task file: it has no `task:` name")
    return _resolve_relative(cfg, path.parent)


@functools.cache
def registry() -> Any:
    """The harness's `TaskManager` over its own task registry (indexing it takes seconds: once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def manager_for(resolved: list[str | dict[str, Any]]) -> Any:
    """A `TaskManager` that loads `resolved`: the registry's when a name is among them."""
    from lm_eval.tasks import TaskManager

    return registry() if any(isinstance(s, str) for s in resolved) else TaskManager(include_defaults=False)


def resolve(specs: list[str]) -> list[str | dict[str, Any]]:
    """Each spec as lm-eval takes it: a config dict for a shipped task or a file, one per task
    YAML of a directory, or the name itself for the harness's registry. Unknown names, missing
    paths and files that do not parse are refused in one line."""
    shipped = shipped_tasks()
    resolved: list[str | dict[str, Any]] = []
    names = []
    for spec in (s.strip() for s in specs):
        if not spec:
            continue
        path = Path(spec).expanduser()
        if spec in shipped and not path.exists():
            resolved.append(task_config(shipped[spec]))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml"))
            # files without a task name are bases for `include:`, or groups
            configs = [task_config(file, cfg) for file in files if isinstance((cfg := _read(file)).get("task"), str)]
            if not configs:
                raise BigtrainError(f"{path} holds no lm-eval task YAML (a file with a `task:` name)")
            resolved += configs
        elif path.is_file():
            resolved.append(task_config(path))
        elif _looks_like_path(spec):
            raise BigtrainError(f"task file not found: {spec}")
        else:
            resolved.append(spec)
            names.append(spec)
    if not resolved:
        raise BigtrainError("no tasks given")
    if names:
        known = set(registry().all_tasks)
        for name in names:
            if name not in known:
                near = difflib.get_close_matches(name, sorted(known) + list(shipped), n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else ""
                raise BigtrainError(f"unknown task {name!r}: not shipped with bigtrain ({', '.join(shipped)}), "
                                    f"not in lm-eval's registry and not a path{hint}")
    return resolved
