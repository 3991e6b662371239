"""`bigtrain scaling coord-check`: µP's coordinate check (Tensor Programs V, Figure 5). Under µP
the logits' RMS after a few Adam steps stays within 2× across an 8× range of widths; under
standard parametrization it grows with width."""

import json

import yaml

from tests.helpers import run_main as run


def test_coord_check_mup_logits_stay_flat_standard_grows(tmp_path, capsys, stdlib_data):
    config = {
        "run": {"seed": 3},
        "model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
                  "max_seq_len": 64, "mup_base_width": 32},
        "data": {"path": str(stdlib_data[0]), "seq_len": 64, "micro_batch": 4},
        "train": {"lr": 5e-3, "device": "cpu"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    plot = tmp_path / "coord.png"
    code, out, err = run(capsys, "scaling", "coord-check", str(tmp_path / "c.yaml"), "--widths", "32", "64", "128",
                         "256", "--steps", "5", "--plot", str(plot), "--json")
    assert code == 0, err
    last = json.loads(out)
    assert set(last) == {"standard", "mup"} and set(last["mup"]) == {"32", "64", "128", "256"}
    assert set(last["mup"]["32"]) == {"logits", "block.1", "block.2"}
    mup = [last["mup"][w]["logits"] for w in ("32", "64", "128", "256")]
    standard = [last["standard"][w]["logits"] for w in ("32", "64", "128", "256")]
    assert 0.5 <= mup[-1] / mup[0] <= 2.0, mup
    assert standard[-1] / standard[0] > 3.0, standard  # 8× wider: logits several times larger
    assert all(b > a for a, b in zip(standard, standard[1:], strict=False)), standard
    # hidden activations too: the last block's output grows under standard parametrization only
    mup_block = [last["mup"][w]["block.2"] for w in ("32", "256")]
    standard_block = [last["standard"][w]["block.2"] for w in ("32", "256")]
    assert mup_block[1] / mup_block[0] < standard_block[1] / standard_block[0]
    assert plot.stat().st_size > 10_000
    print(json.dumps({"mup": mup, "standard": standard, "mup_block": mup_block, "standard_block": standard_block}))
