"""`bigtrain scaling transfer`: each width's best learning rate per parametrization, the optimum's
spread in grid steps, and the plot, from a results CSV."""

import csv

from tests.helpers import run_main as run

LRS = [1e-3, 2e-3, 4e-3, 8e-3]


def _write(path, best_index):
    """Parabolic losses in log lr with the minimum at LRS[best_index[(p, w)]]; one diverged run."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["run", "train.lr", "model.parametrization", "width", "loss", "val_loss"])
        writer.writeheader()
        for (p, w), k in best_index.items():
            for i, lr in enumerate(LRS):
                loss = "nan" if (p, w, i) == ("standard", 128, 3) else 5 + 0.1 * (i - k) ** 2 + 32 / w
                writer.writerow({"run": f"{p}{w}{i}", "train.lr": lr, "model.parametrization": p, "width": w,
                                 "loss": loss, "val_loss": loss})


def test_best_learning_rates_and_their_spread(tmp_path, capsys):
    best = {("standard", 32): 3, ("standard", 64): 2, ("standard", 128): 0,
            ("mup", 32): 2, ("mup", 64): 2, ("mup", 128): 1}
    _write(tmp_path / "r.csv", best)
    code, out, err = run(capsys, "scaling", "transfer", tmp_path / "r.csv", "--plot", tmp_path / "t.png")
    assert code == 0, err
    assert "| width | standard: best lr (val_loss) | mup: best lr (val_loss) |" in out
    assert "| 32 | 0.008 (6.000) | 0.004 (6.000) |" in out
    assert "| 128 | 0.001 (5.250) | 0.002 (5.250) |" in out
    assert "standard: the best learning rate moves 3 grid steps across widths 32–128" in out
    assert "mup: the best learning rate moves 1 grid step across widths 32–128" in out
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_missing_column_is_one_line(tmp_path, capsys):
    _write(tmp_path / "r.csv", {("mup", 32): 1})
    code, _, err = run(capsys, "scaling", "transfer", tmp_path / "r.csv", "--width-column", "d_model")
    assert code == 1 and "no column d_model" in err
