"""PNG plots of scaling fits (isoFLOP curves, compute-optimal frontier, loss contours) and grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bigtrain.scaling.fit import FitReport  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _colors(n: int) -> list:
    return [plt.get_cmap("viridis")(x) for x in np.linspace(0.0, 0.9, max(n, 1))]


def isoflop_curves(report: FitReport, path: Path) -> Path:
    """Loss vs N for each budget: runs, the Approach 2 parabola and the Approach 3 law at fixed C."""
    p, law, frontier = report.points, report.law, report.frontier
    budgets = np.unique(p.budget)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    parabolas = dict(zip(frontier.budgets, frontier.parabolas, strict=True)) if frontier else {}
    for budget, color in zip(budgets, _colors(len(budgets)), strict=True):
        group = p.budget == budget
        ax.scatter(p.params[group], p.loss[group], color=color, s=18, zorder=3, label=f"C = {budget:.2g}")
        n = np.geomspace(p.params[group].min() / 1.5, p.params[group].max() * 1.5, 100)
        ax.plot(n, law.loss(n, budget / (6 * n)), color=color, lw=1)
        if budget in parabolas:
            x = np.log(n)
            ax.plot(n, np.polyval(parabolas[budget], x), color=color, lw=1, ls="--")
    if frontier:
        ax.scatter(frontier.params, frontier.loss, marker="*", s=120, color="crimson", zorder=4, label="isoFLOP minima")
    span = p.loss.max() - p.loss.min()
    ax.set_ylim(p.loss.min() - 0.1 * span, p.loss.max() + 0.1 * span)  # steep parabola ends leave the frame
    ax.set(xscale="log", xlabel="parameters N", ylabel="final loss",
           title="isoFLOP curves (solid: L(N, D) fit, dashed: per-budget parabola)")
    ax.legend(fontsize=7, ncol=2 if len(budgets) > 8 else 1, loc="upper right")
    return _save(fig, path)


def frontier_plot(report: FitReport, path: Path) -> Path:
    """Compute-optimal N and D vs C: isoFLOP minima with their power laws and the L(N, D) optimum."""
    law, frontier, p = report.law, report.frontier, report.points
    budgets = frontier.budgets if frontier else np.unique(p.budget)
    c = np.geomspace(budgets.min() / 3, budgets.max() * 30, 100)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for what, index, color in (("N", 0, "tab:blue"), ("D", 1, "tab:orange")):
        ax.plot(c, law.optimal(c)[index], color=color, lw=1.5, label=f"{what}_opt from L(N, D)")
        if frontier:
            exponent = frontier.a if index == 0 else frontier.b
            ax.scatter(budgets, (frontier.params, frontier.tokens)[index], color=color, marker="o", zorder=3)
            ax.plot(c, frontier.optimal(c)[index], color=color, ls="--", lw=1,
                    label=f"{what}_opt ∝ C^{exponent:.2f} (isoFLOP minima)")
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="parameters / tokens",
           title="compute-optimal model size and data")
    ax.legend(fontsize=8)
    return _save(fig, path)


def contour_plot(report: FitReport, path: Path) -> Path:
    """The fitted loss over (N, D) with the runs, isoFLOP lines and the compute-optimal frontier."""
    law, p = report.law, report.points
    n = np.geomspace(p.params.min() / 3, p.params.max() * 3, 200)
    d = np.geomspace(p.tokens.min() / 3, p.tokens.max() * 3, 200)
    nn, dd = np.meshgrid(n, d)
    fig, ax = plt.subplots(figsize=(7, 5))
    filled = ax.contourf(nn, dd, law.loss(nn, dd), levels=20, cmap="viridis_r")
    fig.colorbar(filled, ax=ax, label="fitted loss L(N, D)")
    ax.contour(nn, dd, law.loss(nn, dd), levels=10, colors="white", linewidths=0.4)
    for budget in np.unique(p.budget):
        ax.plot(n, budget / (6 * n), color="grey", lw=0.6, ls=":")
    c = 6 * nn.min() * dd.min(), 6 * nn.max() * dd.max()
    on, od = law.optimal(np.geomspace(*c, 200))
    inside = (on >= n[0]) & (on <= n[-1]) & (od >= d[0]) & (od <= d[-1])
    ax.plot(on[inside], od[inside], color="crimson", lw=1.5, label="compute-optimal N, D")
    ax.scatter(p.params, p.tokens, c="black", s=10, label="runs")
    ax.set(xscale="log", yscale="log", xlim=(n[0], n[-1]), ylim=(d[0], d[-1]), xlabel="parameters N",
           ylabel="tokens D", title="loss contours (dotted: isoFLOP lines of the budgets)")
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def fit_plots(report: FitReport, directory: Path) -> list[Path]:
    return [isoflop_curves(report, directory / "isoflop_curves.png"),
            frontier_plot(report, directory / "compute_optimal.png"),
            contour_plot(report, directory / "loss_contours.png")]


def grid_plot(rows: list[dict[str, Any]], keys: list[str], path: Path, loss: str = "val_loss") -> Path:
    """Loss vs the first grid key (log axis when it spans ≥ 10×), one line per other combination."""
    x_key, others = keys[0], keys[1:]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    combos = sorted({tuple(r[k] for k in others) for r in rows}, key=str)
    for combo, color in zip(combos, _colors(len(combos)), strict=True):
        mine = [r for r in rows if tuple(r[k] for k in others) == combo and r[loss] is not None]
        points = sorted((r[x_key], r[loss]) for r in mine)
        label = ", ".join(f"{k}={v}" for k, v in zip(others, combo, strict=True)) or None
        ax.plot(*zip(*points, strict=True), marker="o", color=color, label=label)
        best = min(points, key=lambda xy: xy[1])
        ax.annotate(f"{best[1]:.3f}", best, textcoords="offset points", xytext=(0, -12), ha="center", fontsize=8)
    xs = [r[x_key] for r in rows]
    if min(xs) > 0 and max(xs) >= 10 * min(xs):
        ax.set_xscale("log")
    ax.set(xlabel=x_key, ylabel=loss, title=f"{loss} vs {x_key}")
    if others:
        ax.legend(fontsize=8)
    return _save(fig, path)



def coord_check_figure(results: dict[str, dict[int, list[dict[str, float]]]], base_width: int, path: Path) -> Path:
    """µP coordinate check (as Figure 5 of Tensor Programs V): RMS vs width, one line per step."""
    keys = list(next(iter(next(iter(results.values())).values()))[0])
    fig, axes = plt.subplots(len(results), len(keys), figsize=(2.6 * len(keys), 2.4 * len(results)), squeeze=False)
    for row, (parametrization, by_width) in zip(axes, results.items(), strict=True):
        widths = sorted(by_width)
        steps = len(by_width[widths[0]])
        for ax, key in zip(row, keys, strict=True):
            for t, color in zip(range(steps), _colors(steps), strict=True):
                ax.plot(widths, [by_width[w][t][key] for w in widths], marker="o", ms=3, color=color, label=f"t={t}")
            ax.set(xscale="log", yscale="log", xlabel="width (d_model)", title=f"{parametrization}: {key}")
            ax.set_xticks(widths, [str(w) for w in widths], fontsize=7)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        row[0].set_ylabel("RMS")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(f"coordinate check (µP base width {base_width})", fontsize=9)
    return _save(fig, path)


def transfer_figure(curves: list, loss: str, path: Path) -> Path:
    """Loss vs learning rate, one line per width, a panel per parametrization (as Figure 1 of
    Tensor Programs V); each width's best learning rate starred. Diverged runs are left out."""
    ps = list(dict.fromkeys(c.parametrization for c in curves))
    widths = sorted({c.width for c in curves})
    colors = dict(zip(widths, _colors(len(widths)), strict=True))
    fig, axes = plt.subplots(1, len(ps), figsize=(5 * len(ps), 4), sharey=True, squeeze=False)
    finite = [y for c in curves for y in c.losses if np.isfinite(y)]
    for ax, p in zip(axes[0], ps, strict=True):
        for c in (c for c in curves if c.parametrization == p):
            xs = [x for x, y in zip(c.lrs, c.losses, strict=True) if np.isfinite(y)]
            ys = [y for y in c.losses if np.isfinite(y)]
            ax.plot(xs, ys, marker="o", ms=3, color=colors[c.width], label=f"width {c.width}")
            ax.scatter([c.best[0]], [c.best[1]], marker="*", s=120, color=colors[c.width], zorder=3)
        ax.set(xscale="log", xlabel="learning rate", title=p)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(loss)
    low, high = min(finite), np.percentile(finite, 90)
    axes[0][0].set_ylim(low - 0.05 * (high - low), high + 0.1 * (high - low))
    return _save(fig, path)
