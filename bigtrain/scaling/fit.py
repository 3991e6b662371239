"""Chinchilla scaling-law fits of final loss against parameters N and tokens D.

Approach 3 fits L(N, D) = E + A/N^α + B/D^β by minimising the Huber loss (δ = 1e-3) between
log L̂ = LSE(a − α·ln N, b − β·ln D, e) and log L, with L-BFGS started from the best points of a
grid (Hoffmann et al. 2022; Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt").
Approach 2 fits a parabola in ln N to each compute budget's losses, takes its minimum N_opt(C),
and fits N_opt ∝ C^a and D_opt = C / 6N_opt ∝ C^b. Both get percentile bootstrap intervals.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from bigtrain.errors import BigtrainError

HUBER_DELTA = 1e-3
# Starting points of Hoffmann et al.: a, b ∈ {0, 5, …, 25}, e ∈ {-1, -.5, …, 1}, α, β ∈ {0, .5, …, 2}.
START_GRID = np.array(list(itertools.product(
    np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5), np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5),
)), dtype=float)
REFINED_STARTS = 8  # L-BFGS runs from the grid's best points; the grid itself is only evaluated


@dataclass
class Points:
    """Final losses of training runs: N parameters, D tokens, and the budget each belongs to."""

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    budget: np.ndarray  # the nominal compute budget (FLOPs) that groups runs into isoFLOP curves

    @property
    def flops(self) -> np.ndarray:
        return 6.0 * self.params * self.tokens

    def subset(self, index: np.ndarray) -> Points:
        return Points(self.params[index], self.tokens[index], self.loss[index], self.budget[index])


def read_points(path: str | Path, loss_column: str | None = None, exclude_highest: int = 0) -> tuple[Points, str]:
    """Read a results CSV: `params`, `tokens` or `flops` (tokens = flops / 6·params), a loss column.

    The loss column defaults to `val_loss` when every row has one, else `loss`. A `budget` column
    groups runs for Approach 2; without it, runs group by FLOPs rounded to 0.1 in log10.
    """
    path = Path(path)
    if not path.is_file():
        raise BigtrainError(f"results file not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    if loss_column is None:
        has_val = "val_loss" in columns and all(r["val_loss"] not in ("", None) for r in rows)
        loss_column = "val_loss" if has_val else "loss"
    missing = [c for c in ("params", loss_column) if c not in columns]
    if "tokens" not in columns and "flops" not in columns:
        missing.append("tokens or flops")
    if missing:
        has = ", ".join(sorted(columns)) or "none"
        raise BigtrainError(f"{path} lacks column(s) {', '.join(missing)} (has: {has})")

    def numbers(column: str) -> np.ndarray:
        try:
            values = np.array([float(r[column]) for r in rows])
        except (TypeError, ValueError):
            raise BigtrainError(f"{path}: column {column} has a non-numeric or empty value") from None
        if not np.all(np.isfinite(values) & (values > 0)):
            raise BigtrainError(f"{path}: column {column} must hold positive finite numbers")
        return values

    params, loss = numbers("params"), numbers(loss_column)
    tokens = numbers("tokens") if "tokens" in columns else numbers("flops") / (6.0 * params)
    budget = numbers("budget") if "budget" in columns else 10 ** np.round(np.log10(6.0 * params * tokens), 1)
    points = Points(params, tokens, loss, budget)
    if exclude_highest:
        points = points.subset(np.sort(np.argsort(loss)[: len(loss) - exclude_highest]))
    if len(points.loss) <= 5:
        raise BigtrainError(f"{path}: {len(points.loss)} points cannot determine the 5 parameters E, A, B, α, β")
    return points, loss_column


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A/N^α + B/D^β."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params: np.ndarray | float, tokens: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)

    def optimal(self, flops: float | np.ndarray) -> tuple[float | np.ndarray, float | np.ndarray]:
        """Compute-optimal (N, D) for C = 6ND: N = G·(C/6)^(β/(α+β)), G = (αA/βB)^(1/(α+β))."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        params = g * np.power(np.asarray(flops) / 6.0, b / (a + b))
        return params, np.asarray(flops) / (6.0 * params)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed Huber loss of log L̂ − log L over (a, b, e, α, β), and its gradient."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    r = top + np.log(total) - log_l
    weights /= total  # ∂ LSE / ∂ term
    small = np.abs(r) <= HUBER_DELTA
    value = np.where(small, 0.5 * r * r, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    g = np.where(small, r, HUBER_DELTA * np.sign(r))
    gw = g * weights
    grad = np.array([gw[0].sum(), gw[1].sum(), gw[2].sum(), -(gw[0] * log_n).sum(), -(gw[1] * log_d).sum()])
    return float(value), grad


def _grid_values(starts: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(starts), len(log_n)))])
    top = terms.max(axis=0)
    r = np.abs(top + np.log(np.exp(terms - top).sum(axis=0)) - log_l)
    return np.where(r <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (r - 0.5 * HUBER_DELTA)).sum(axis=1)


def fit_law(points: Points, starts: np.ndarray | None = None, refine: int = REFINED_STARTS) -> Law:
    """Approach 3: the Huber fit from the `refine` best of `starts` (default: Hoffmann's grid)."""
    data = (np.log(points.params), np.log(points.tokens), np.log(points.loss))
    starts = START_GRID if starts is None else np.atleast_2d(starts)
    if len(starts) > refine:
        starts = starts[np.argsort(_grid_values(starts, *data))[:refine]]
    best = None
    for start in starts:
        result = minimize(_objective, start, args=data, jac=True, method="L-BFGS-B",
                          options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12})
        if np.all(np.isfinite(result.x)) and (best is None or result.fun < best.fun):
            best = result
    if best is None:
        raise BigtrainError("the scaling-law fit diverged from every starting point")
    a, b, e, alpha, beta = best.x
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))


@dataclass(frozen=True)
class Frontier:
    """Approach 2: isoFLOP minima and the power laws N_opt = k_N·C^a, D_opt = k_D·C^b."""

    budgets: np.ndarray
    params: np.ndarray  # N_opt per budget
    loss: np.ndarray  # the parabola's minimum loss per budget
    parabolas: tuple[np.ndarray, ...]  # loss = p[0]·x² + p[1]·x + p[2] with x = ln N, per budget
    a: float
    log_kn: float
    dropped: tuple[str, ...]  # budgets without a usable minimum, and why

    @property
    def tokens(self) -> np.ndarray:
        return self.budgets / (6.0 * self.params)

    @property
    def b(self) -> float:
        return 1.0 - self.a  # D_opt = C / 6N_opt

    def optimal(self, flops: float | np.ndarray) -> tuple[float | np.ndarray, float | np.ndarray]:
        params = np.exp(self.log_kn) * np.power(np.asarray(flops), self.a)
        return params, np.asarray(flops) / (6.0 * params)


def fit_frontier(points: Points) -> Frontier | None:
    """Approach 2, or None when fewer than two budgets have an interior parabola minimum."""
    budgets, params, losses, parabolas, dropped = [], [], [], [], []
    for budget in np.unique(points.budget):
        group = points.budget == budget
        x, y = np.log(points.params[group]), points.loss[group]
        if len(np.unique(x)) < 3:
            dropped.append(f"{budget:.3g}: fewer than 3 model sizes")
            continue
        p = np.polyfit(x, y, 2)
        x_min = -p[1] / (2 * p[0]) if p[0] > 0 else math.nan
        if not x.min() <= x_min <= x.max():
            dropped.append(f"{budget:.3g}: the loss minimum lies outside the sizes tried")
            continue
        budgets.append(budget)
        params.append(math.exp(x_min))
        losses.append(np.polyval(p, x_min))
        parabolas.append(p)
    if len(budgets) < 2:
        return None
    a, log_kn = np.polyfit(np.log(budgets), np.log(params), 1)
    return Frontier(np.array(budgets), np.array(params), np.array(losses), tuple(parabolas), float(a), float(log_kn),
                    tuple(dropped))


@dataclass
class Interval:
    value: float
    low: float
    high: float


@dataclass
class FitReport:
    points: Points
    law: Law
    frontier: Frontier | None
    intervals: dict[str, Interval]  # E, A, B, alpha, beta, a (Approach 2), and per-budget predictions
    resamples: int


def _percentiles(value: float, samples: list[float]) -> Interval:
    if not samples:
        return Interval(value, math.nan, math.nan)
    low, high = np.percentile(samples, [2.5, 97.5])
    return Interval(value, float(low), float(high))


def bootstrap(points: Points, law: Law, frontier: Frontier | None, resamples: int, seed: int = 0,
              budget: float | None = None) -> dict[str, Interval]:
    """95 % percentile intervals from refits on resampled points (Approach 2: within each budget)."""
    rng = np.random.default_rng(seed)
    start = np.log([law.A, law.B, law.E]).tolist() + [law.alpha, law.beta]
    estimates: dict[str, Callable[[Law | Frontier], float]] = {
        name: (lambda f, name=name: getattr(f, name)) for name in ("E", "A", "B", "alpha", "beta")
    }
    predictions = {} if budget is None else {
        "N_opt": lambda f: float(f.optimal(budget)[0]), "D_opt": lambda f: float(f.optimal(budget)[1]),
    }
    samples: dict[str, list[float]] = {k: [] for k in [*estimates, *predictions, "a", *(f"2:{k}" for k in predictions)]}
    groups = [np.flatnonzero(points.budget == b) for b in np.unique(points.budget)]
    for _ in range(resamples):
        refit = fit_law(points.subset(rng.integers(0, len(points.loss), len(points.loss))), np.array([start]))
        for name, get in {**estimates, **predictions}.items():
            samples[name].append(get(refit))
        if frontier is not None:
            index = np.concatenate([rng.choice(g, len(g)) for g in groups])
            resampled = fit_frontier(points.subset(index))
            if resampled is not None:
                samples["a"].append(resampled.a)
                for name, get in predictions.items():
                    samples[f"2:{name}"].append(get(resampled))
    intervals = {name: _percentiles(get(law), samples[name]) for name, get in {**estimates, **predictions}.items()}
    if frontier is not None:
        intervals["a"] = _percentiles(frontier.a, samples["a"])
        intervals.update({f"2:{n}": _percentiles(get(frontier), samples[f"2:{n}"]) for n, get in predictions.items()})
    return intervals


def fit(points: Points, resamples: int = 100, budget: float | None = None, seed: int = 0) -> FitReport:
    law = fit_law(points)
    frontier = fit_frontier(points)
    return FitReport(points, law, frontier, bootstrap(points, law, frontier, resamples, seed, budget), resamples)


def format_report(report: FitReport, budget: float | None = None) -> str:
    """The fitted laws with 95 % intervals, and the compute-optimal model for `budget`."""
    law, iv = report.law, report.intervals

    def line(label: str, key: str, fmt: str) -> str:
        i = iv[key]
        return f"  {label:<6} {i.value:{fmt}}   [{i.low:{fmt}}, {i.high:{fmt}}]"

    lines = [
        f"Approach 3: L(N, D) = E + A/N^α + B/D^β over {len(report.points.loss)} runs "
        f"(Huber δ={HUBER_DELTA:g} on log loss, L-BFGS; 95% intervals from {report.resamples} bootstrap resamples)",
        line("E", "E", ".4g"), line("A", "A", ".4g"), line("B", "B", ".4g"),
        line("α", "alpha", ".4f"), line("β", "beta", ".4f"),
        f"  N_opt ∝ C^{law.beta / (law.alpha + law.beta):.3f}, D_opt ∝ C^{law.alpha / (law.alpha + law.beta):.3f}",
    ]
    frontier = report.frontier
    if frontier is None:
        lines.append("Approach 2: skipped (needs two budgets, each with 3+ sizes and its loss minimum inside them)")
    else:
        a = iv["a"]
        lines.append(f"Approach 2: isoFLOP parabola minima over {len(frontier.budgets)} budgets")
        lines.append(f"  N_opt ∝ C^a  a = {a.value:.3f}   [{a.low:.3f}, {a.high:.3f}]")
        lines.append(f"  D_opt ∝ C^b  b = {frontier.b:.3f}   [{1 - a.high:.3f}, {1 - a.low:.3f}]")
        for c, n, loss in zip(frontier.budgets, frontier.params, frontier.loss, strict=True):
            lines.append(f"  C={c:.3g}: N_opt={n:.3g}, D_opt={c / (6 * n):.3g}, loss {loss:.4f}")
        lines += [f"  dropped budget {d}" for d in frontier.dropped]
    if budget is not None:
        lines.append(f"compute-optimal at C = {budget:.3g} FLOPs (95% intervals):")
        rows = [("Approach 3", "")] + ([("Approach 2", "2:")] if frontier is not None else [])
        for label, prefix in rows:
            n, d = iv[prefix + "N_opt"], iv[prefix + "D_opt"]
            fitted_loss = law.loss(n.value, d.value)
            lines.append(f"  {label}: N = {n.value:.3g} [{n.low:.3g}, {n.high:.3g}], D = {d.value:.3g} "
                         f"[{d.low:.3g}, {d.high:.3g}], {d.value / n.value:.1f} tokens/param, "
                         f"L(N, D) = {fitted_loss:.4f}")
    return "\n".join(lines)
