"""Learning-rate transfer across width (Tensor Programs V, Figure 1): from a grid sweep's results
(learning rate × width × parametrization), each width's best learning rate and how far the
optimum moves across widths, in steps of the learning-rate grid."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from bigtrain.errors import BigtrainError


@dataclass
class Curve:
    """Loss against learning rate of one (parametrization, width)."""

    parametrization: str
    width: int
    lrs: list[float]
    losses: list[float]  # nan where a run diverged

    @property
    def best(self) -> tuple[float, float]:
        """(learning rate, loss) of the lowest finite loss."""
        finite = [(loss, lr) for lr, loss in zip(self.lrs, self.losses, strict=True) if math.isfinite(loss)]
        if not finite:
            return math.nan, math.nan
        loss, lr = min(finite)
        return lr, loss


def _number(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_curves(path: str | Path, lr_column: str, width_column: str, by_column: str,
                loss: str | None = None) -> tuple[list[Curve], str]:
    """The curves of a results CSV (`bigtrain sweep collect`), and the loss column read (default
    val_loss when every row has one, else loss)."""
    path = Path(path)
    if not path.is_file():
        raise BigtrainError(f"{path}: no such results file")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise BigtrainError(f"{path}: no rows")
    if loss is None:
        loss = "val_loss" if all(r.get("val_loss") not in (None, "") for r in rows) else "loss"
    for column in (lr_column, width_column, loss):
        if column not in rows[0]:
            raise BigtrainError(f"{path}: no column {column} (columns: {', '.join(rows[0])})")
    groups: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in rows:
        key = (r.get(by_column) or "-", int(float(r[width_column])))
        groups.setdefault(key, []).append((float(r[lr_column]), _number(r[loss])))
    curves = []
    for (p, w), points in sorted(groups.items(), key=lambda kv: (kv[0][0] != "standard", kv[0])):
        points.sort()
        curves.append(Curve(p, w, [x for x, _ in points], [y for _, y in points]))
    return curves, loss


def optimum_spread(curves: list[Curve]) -> dict[str, int]:
    """Per parametrization: how many steps of the learning-rate grid separate the widths' optima."""
    spread = {}
    for p in dict.fromkeys(c.parametrization for c in curves):
        mine = [c for c in curves if c.parametrization == p]
        grid = sorted({lr for c in mine for lr in c.lrs})
        steps = [grid.index(c.best[0]) for c in mine if math.isfinite(c.best[0])]
        spread[p] = max(steps) - min(steps) if steps else 0
    return spread


def format_report(curves: list[Curve], loss: str) -> str:
    """A markdown table (width × parametrization: best lr and its loss) and the optimum's spread."""
    ps = list(dict.fromkeys(c.parametrization for c in curves))
    widths = sorted({c.width for c in curves})
    by = {(c.parametrization, c.width): c for c in curves}
    header = "| width | " + " | ".join(f"{p}: best lr ({loss})" for p in ps) + " |"
    lines = [header, "|---|" + "---|" * len(ps)]
    for w in widths:
        cells = []
        for p in ps:
            lr, best = by[(p, w)].best if (p, w) in by else (math.nan, math.nan)
            cells.append(f"{lr:g} ({best:.3f})")
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    spread = optimum_spread(curves)
    lines.append("")
    lines += [f"{p}: the best learning rate moves {s} grid step{'s' if s != 1 else ''} across widths {widths[0]}–{widths[-1]}"
              for p, s in spread.items()]
    for p in ps:  # what tuning at the narrowest width and reusing its lr would cost each width
        base_lr = by[(p, widths[0])].best[0] if (p, widths[0]) in by else math.nan
        costs = []
        for w in widths:
            c = by.get((p, w))
            if c is not None and base_lr in c.lrs:
                costs.append(f"{w} {c.losses[c.lrs.index(base_lr)] - c.best[1]:+.3f}")
        lines.append(f"{p}: loss at width {widths[0]}'s best lr ({base_lr:g}) above each width's best: {', '.join(costs)}")
    return "\n".join(lines)


def transfer_plot(curves: list[Curve], loss: str, path: Path) -> Path:
    from bigtrain.scaling.plots import transfer_figure

    return transfer_figure(curves, loss, path)
