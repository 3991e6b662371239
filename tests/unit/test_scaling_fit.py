"""Scaling-law fits: Epoch's Chinchilla replication, recovery of known laws, intervals, the CLI."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from bigtrain.cli import main
from bigtrain.errors import BigtrainError
from bigtrain.scaling.fit import Law, Points, bootstrap, fit_frontier, fit_law, read_points

CHINCHILLA = Path(__file__).parents[1] / "data" / "chinchilla_points.csv"
TRUE = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al.'s own fit


def isoflop_points(law: Law, noise: float, seed: int = 0) -> Points:
    """Six budgets × nine sizes spread around each budget's optimum, log-normal loss noise."""
    rng = np.random.default_rng(seed)
    budgets = np.repeat(np.geomspace(1e18, 1e21, 6), 9)
    params = np.concatenate([law.optimal(c)[0] * np.geomspace(1 / 8, 8, 9) for c in np.unique(budgets)])
    tokens = budgets / (6 * params)
    loss = law.loss(params, tokens) * np.exp(noise * rng.standard_normal(len(params)))
    return Points(params, tokens, loss, budgets)


def write_csv(path: Path, points: Points) -> Path:
    rows = ["budget,params,tokens,loss"] + [
        ",".join(repr(float(v)) for v in row) for row in zip(points.budget, points.params, points.tokens, points.loss,
                                                      strict=True)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_chinchilla_replication_matches_epoch():
    points, column = read_points(CHINCHILLA, exclude_highest=5)
    assert column == "loss" and len(points.loss) == 240
    law = fit_law(points)
    assert law.E == pytest.approx(1.82, abs=0.03)
    assert law.alpha == pytest.approx(0.348, abs=0.01)
    assert law.beta == pytest.approx(0.366, abs=0.01)
    assert law.A == pytest.approx(482, rel=0.10)
    assert law.B == pytest.approx(2085, rel=0.10)


def test_approach3_recovers_a_known_law_from_noisy_runs():
    law = fit_law(isoflop_points(TRUE, noise=0.002))
    assert law.E == pytest.approx(TRUE.E, abs=0.03)
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.02)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.02)
    for c in (1e19, 1e23):  # inside and far beyond the fitted budgets
        assert law.optimal(c)[0] == pytest.approx(TRUE.optimal(c)[0], rel=0.25)


def test_compute_optimal_is_the_minimum_along_the_isoflop_line():
    c = 3e22
    n = np.geomspace(1e8, 1e12, 200001)
    brute = n[np.argmin(TRUE.loss(n, c / (6 * n)))]
    params, tokens = TRUE.optimal(c)
    assert params == pytest.approx(brute, rel=1e-3)
    assert 6 * params * tokens == pytest.approx(c)


def test_approach2_minima_and_exponent():
    points = isoflop_points(TRUE, noise=0.0)
    frontier = fit_frontier(points)
    assert len(frontier.budgets) == 6 and not frontier.dropped
    # parabolas in ln N approximate the true curve: minima within 10 %, exponent β/(α+β) = 0.4516
    np.testing.assert_allclose(frontier.params, TRUE.optimal(frontier.budgets)[0], rtol=0.10)
    assert frontier.a == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), abs=0.01)
    assert frontier.a + frontier.b == 1.0
    np.testing.assert_allclose(6 * frontier.params * frontier.tokens, frontier.budgets)


def test_approach2_drops_budgets_without_an_interior_minimum():
    points = isoflop_points(TRUE, noise=0.0)
    keep = points.params < TRUE.optimal(points.budget)[0] / 1.5  # only sizes below the optimum
    keep[points.budget > 2e20] = True
    frontier = fit_frontier(points.subset(keep))
    assert len(frontier.budgets) == 2
    assert all("outside the sizes tried" in d for d in frontier.dropped) and len(frontier.dropped) == 4


def test_bootstrap_intervals_hold_the_estimate_and_the_truth():
    points = isoflop_points(TRUE, noise=0.005, seed=1)
    law, frontier = fit_law(points), fit_frontier(points)
    intervals = bootstrap(points, law, frontier, resamples=30, seed=0, budget=1e22)
    for key, truth in [("E", TRUE.E), ("alpha", TRUE.alpha), ("beta", TRUE.beta),
                       ("N_opt", TRUE.optimal(1e22)[0]), ("a", 0.4516)]:
        i = intervals[key]
        assert i.low < i.value < i.high, key
        assert i.low < truth < i.high, (key, i, truth)
    assert intervals["alpha"].high - intervals["alpha"].low < 0.1


def test_fit_cli_prints_the_fit_and_writes_plots(tmp_path, capsys):
    csv = write_csv(tmp_path / "results.csv", isoflop_points(TRUE, noise=0.002))
    code = main(["scaling", "fit", str(csv), "--plots", str(tmp_path / "plots"), "--budget", "1e22",
                 "--bootstrap", "5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    law = fit_law(read_points(csv)[0])
    assert re.search(rf"E\s+{law.E:.4g}\s", out) and re.search(rf"α\s+{law.alpha:.4f}\s", out)
    n_opt, d_opt = law.optimal(1e22)
    assert f"Approach 3: N = {n_opt:.3g}" in out and f"{d_opt / n_opt:.1f} tokens/param" in out
    assert "Approach 2: isoFLOP parabola minima over 6 budgets" in out
    for name in ("isoflop_curves.png", "compute_optimal.png", "loss_contours.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, name


@pytest.mark.parametrize("text, message", [
    ("params,loss\n1,2\n", "lacks column(s) tokens or flops"),
    ("params,tokens\n1,2\n", "lacks column(s) loss"),
    ("params,tokens,loss\n" + "1e6,1e9,3.0\n" * 5, "5 points cannot determine the 5 parameters"),
    ("params,tokens,loss\n" + "1e6,1e9,3.0\n" * 5 + "1e6,x,3\n", "column tokens has a non-numeric or empty value"),
    ("params,tokens,loss\n" + "1e6,1e9,-3.0\n" * 7, "column loss must hold positive finite numbers"),
])
def test_bad_results_files_are_one_line_errors(tmp_path, capsys, text, message):
    (tmp_path / "r.csv").write_text(text)
    assert main(["scaling", "fit", str(tmp_path / "r.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigtrain: error: ") and len(err.splitlines()) == 1 and message in err, err


def test_tokens_come_from_flops_when_absent():
    points, _ = read_points(CHINCHILLA)
    assert len(points.loss) == 245
    first = CHINCHILLA.read_text().splitlines()[1].split(",")
    assert points.tokens[0] == pytest.approx(float(first[1]) / (6 * float(first[0])))
    with pytest.raises(BigtrainError, match="results file not found"):
        read_points(CHINCHILLA.with_name("absent.csv"))
    assert math.isclose(points.flops[0], float(first[1]))
