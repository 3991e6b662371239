"""Dependencies point one way: cli → jobs (train, eval, convert, scaling, …) → engine → checkpoint →
parallel → distributed → model / data → config, errors, compat, object_store (docs/architecture.md).
DeepSpeed is imported only where a module's path names it (and in compat.py), and model/ knows
nothing of processes. Every import of every module is read with `ast`, lazy ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "bigtrain"
LEVEL = {  # a module may import only modules of a lower level (or its own package)
    "errors": 0, "config": 0, "compat": 0, "object_store": 0,
    "model": 1, "data": 1,
    "distributed": 2,
    "parallel": 3,
    "checkpoint": 4,
    "engine": 5,
    "train": 6, "eval": 6, "convert": 6, "scaling": 6, "info": 6, "simulate": 6, "quickstart": 6,
    "cli": 7, "__main__": 7,
}
JOBS_ORDER = ["eval", "train", "convert", "scaling", "info", "simulate", "quickstart"]  # a job may use the ones before it


def group_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def bigtrain_imports(path: Path) -> list[tuple[str, int]]:
    """(imported bigtrain module, line) of every import in `path`, at any depth."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            found.append((base, node.lineno))
    return [(name, line) for name, line in found if name == "bigtrain" or name.startswith("bigtrain.")]


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_has_a_level():
    groups = {group_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in modules()}
    assert groups - {"__init__"} <= set(LEVEL), f"no level for {sorted(groups - set(LEVEL) - {'__init__'})}"


def edge_problem(source: str, target: str) -> str | None:
    a, b = group_of(source), group_of(target)
    if a in ("", "__init__") or b in ("", "__init__") or a == b:
        return None
    if LEVEL[b] > LEVEL[a]:
        return f"{source} (level {LEVEL[a]}) imports {target} (level {LEVEL[b]})"
    if LEVEL[b] == LEVEL[a] == 1:
        return f"{source} imports {target}: model/ and data/ know nothing of each other"
    if LEVEL[b] == LEVEL[a] == 6 and JOBS_ORDER.index(b) > JOBS_ORDER.index(a):
        return f"{source} imports {target}, against the order {' → '.join(reversed(JOBS_ORDER))}"
    return None


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_point_down(path):
    source = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    problems = [f"line {line}: {edge_problem(source, target)}" for target, line in bigtrain_imports(path)
                if edge_problem(source, target)]
    assert not problems, "\n".join(problems)


def external_imports(path: Path) -> set[str]:
    """Top-level names of the non-bigtrain modules `path` imports (`torch.distributed` kept whole)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for name in names:
            found.add("torch.distributed" if name.startswith("torch.distributed") else name.split(".")[0])
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_deepspeed_only_where_the_path_says_so(path):
    if "deepspeed" not in str(path.relative_to(PACKAGE)) and path.name != "compat.py":
        assert "deepspeed" not in external_imports(path)


@pytest.mark.parametrize("path", sorted((PACKAGE / "model").rglob("*.py")), ids=lambda p: p.name)
def test_the_model_knows_nothing_of_processes(path):
    assert "torch.distributed" not in external_imports(path)


@pytest.mark.parametrize("source, target", [
    ("bigtrain.engine.deepspeed.full_state", "bigtrain.convert.consolidate"),  # the cycle this test was written for
    ("bigtrain.model.llama", "bigtrain.parallel.layout"),
    ("bigtrain.data.loader", "bigtrain.model"),
    ("bigtrain.train.loop", "bigtrain.convert.hf"),
    ("bigtrain.config", "bigtrain.model.llama"),
])
def test_the_rule_catches_upward_edges(source, target):
    assert edge_problem(source, target)



def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """module → the bigtrain modules it imports (a name imported from a package is the package)."""
    names = {module_name(p) for p in modules()}
    graph = {}
    for path in modules():
        targets = set()
        for target, _ in bigtrain_imports(path):
            while target and target not in names:
                target = target.rpartition(".")[0]
            targets.add(target)
        graph[module_name(path)] = targets - {module_name(path), ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle as the modules on it (depth-first search, one cycle per back edge)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles_anywhere():
    """Inside a package or across, lazy imports included (`train.checkpoint` ↔ `train.mirror` was one)."""
    assert not cycles(import_graph()), "\n".join(" → ".join(c) for c in cycles(import_graph()))


def test_the_cycle_search_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
