"""Hugging Face conversion: weight names without a counterpart, and refusals that leave OUT untouched."""


import pytest

from bigtrain.cli import main
from tests.helpers import random_hf_llama

transformers = pytest.importorskip("transformers")


def test_weights_without_a_hugging_face_counterpart_are_refused():
    from bigtrain.convert.hf import to_hf_name

    assert to_hf_name("layers.2.self_attn.k_proj.weight", 2) == "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(Exception, match="layers.1.mlp.shared_experts.gate_proj.weight has no counterpart in Hugging Face's"):
        to_hf_name("layers.1.mlp.shared_experts.gate_proj.weight", 2)


def test_refusals_leave_out_untouched(stdlib_data, tmp_path, capsys):
    random_hf_llama(tmp_path / "scaled", rope_scaling={"rope_type": "dynamic", "factor": 8.0})
    assert main(["convert", "from-hf", str(tmp_path / "scaled"), str(tmp_path / "a")]) == 1
    assert "rope_scaling of rope_type 'dynamic' cannot be expressed" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    random_hf_llama(tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "taken")]) == 1
    assert capsys.readouterr().err.strip() == f"bigtrain: error: {tmp_path / 'taken'} already exists; pass --overwrite to replace it"
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "taken"), "--overwrite"]) == 0
    assert (tmp_path / "taken" / "model.safetensors").is_file() and not (tmp_path / "taken" / "notes.txt").exists()

    assert main(["convert", "reshard", str(tmp_path / "taken"), str(tmp_path / "b"), "parallel.tp=2"]) == 1
    assert "parallel.tp, parallel.pp, parallel.sp, parallel.ep and parallel.zero_stage need parallel.engine=deepspeed" in capsys.readouterr().err
    assert main(["convert", "reshard", str(tmp_path / "taken"), str(tmp_path / "b"), "parallel.engine=deepspeed",
                 "parallel.tp=3"]) == 1
    assert capsys.readouterr().err.strip() == "bigtrain: error: model.n_heads=4 is not divisible by parallel.tp=3"
    assert main(["convert", "reshard", str(tmp_path / "taken"), str(tmp_path / "b"), "parallel.tp=1"]) == 1
    assert "holds no readable AdamW state (a weights-only checkpoint" in capsys.readouterr().err
    assert main(["convert", "to-hf", str(tmp_path / "taken"), str(tmp_path / "hf-again")]) == 0  # weights suffice
    assert "wrote" in capsys.readouterr().err
    assert main(["convert", "to-hf", str(tmp_path / "nowhere"), str(tmp_path / "c")]) == 1
    assert capsys.readouterr().err.strip() == f"bigtrain: error: checkpoint not found: {tmp_path / 'nowhere'}"
