"""Hugging Face Qwen3 and Qwen3-MoE conversion with the installed transformers: logits equal both
ways (tests/hf_parity.py), the architecture each model exports as, and one-line refusals of what
either side cannot express."""

import json

import pytest
import torch

from bigtrain.cli import main
from bigtrain.config import from_dict
from bigtrain.convert.hf import from_hf_weights, to_hf_name, to_hf_weights
from bigtrain.convert.hf_config import hf_config, model_config_from_hf
from bigtrain.model import Llama
from tests import hf_parity

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", list(hf_parity.HF_CASES))
def test_from_hf_logits_equal_transformers(name, tmp_path):
    assert hf_parity.check_from_hf(name, tmp_path) <= 1e-5


@pytest.mark.parametrize("name", list(hf_parity.BIGTRAIN_CASES))
def test_to_hf_logits_equal_bigtrain_and_the_config_round_trips(name, tmp_path):
    assert hf_parity.check_to_hf(name, tmp_path) <= 1e-5


def moe_model(**moe):
    shape = {**hf_parity.BIGTRAIN_SHAPE, "moe": {"experts": 4, "top_k": 2, "ffn_hidden": 16, **moe}}
    return from_dict({"model": shape, "data": {"seq_len": 32}}).model


def test_names_and_stacked_experts_both_ways():
    m = moe_model(first_dense=1)
    assert to_hf_name("layers.2.self_attn.q_norm.weight", 3) == "model.layers.1.self_attn.q_norm.weight"
    assert to_hf_name("layers.2.mlp.router.weight", 3) == "model.layers.1.mlp.gate.weight"
    with pytest.raises(Exception, match="layers.2.mlp.shared_experts.up_proj.weight has no counterpart in Hugging Face's"):
        to_hf_name("layers.2.mlp.shared_experts.up_proj.weight", 3)
    weights = dict(Llama(m, seed=1).state_dict())
    hf = to_hf_weights(weights, 3)
    gate = weights["layers.2.mlp.experts.gate_proj"]  # [experts, ffn, d]
    assert gate.shape == (4, 16, 32) and "model.layers.1.mlp.experts.gate_proj" not in hf
    assert torch.equal(hf["model.layers.1.mlp.experts.3.gate_proj.weight"], gate[3])
    assert hf["model.layers.1.mlp.experts.0.down_proj.weight"].shape == (32, 16)
    assert "model.layers.0.mlp.gate_proj.weight" in hf  # first_dense=1: block 0 is an MLP
    back = from_hf_weights(hf, 3, None)
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)

    # transformers 5.x's own layout: all experts in one tensor, gate and up rows concatenated
    fused = {k: v for k, v in hf.items() if ".experts." not in k}
    for i in (1, 2):
        w = {p: weights[f"layers.{i + 1}.mlp.experts.{p}_proj"] for p in ("gate", "up", "down")}
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w["gate"], w["up"]], dim=1)
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = w["down"]
    back = from_hf_weights(fused, 3, None)
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)


def test_exported_configs_name_the_architecture_and_moe_keys():
    assert hf_config(from_dict({"model": {}}).model)["architectures"] == ["LlamaForCausalLM"]
    assert hf_config(from_dict({"model": {"qk_norm": True}}).model)["model_type"] == "qwen3"
    config = hf_config(moe_model(first_dense=2, every=2, normalize_top_k=False, aux_loss=0.003, z_loss=0.1))
    assert {k: config[k] for k in ("architectures", "model_type", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                    "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "router_aux_loss_coef",
                                    "head_dim", "attention_bias", "intermediate_size")} == {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 16, "decoder_sparse_step": 2, "mlp_only_layers": [0, 1], "norm_topk_prob": False,
        "router_aux_loss_coef": 0.003, "head_dim": 8, "attention_bias": False, "intermediate_size": 48}
    # transformers 5.x writes rope_parameters and num_local_experts
    five = {**config, "rope_parameters": {"rope_type": "default", "rope_theta": 3e5}, "num_local_experts": 4}
    del five["rope_theta"], five["rope_scaling"], five["num_experts"]
    model = model_config_from_hf(five, "hf")
    assert (model["rope_theta"], model["moe"]["experts"], model["moe"]["first_dense"], model["moe"]["every"]) == (3e5, 4, 2, 2)
    # mlp_only_layers that are no leading run but dense blocks anyway: still a prefix in effect
    assert model_config_from_hf({**config, "mlp_only_layers": [0, 1, 2]}, "hf")["moe"]["first_dense"] == 3
    assert model_config_from_hf({**config, "decoder_sparse_step": 1, "mlp_only_layers": []}, "hf")["moe"]["first_dense"] == 0
    # Qwen3's head_dim defaults to 128, not hidden / heads
    qwen3 = {k: v for k, v in hf_config(from_dict({"model": {"qk_norm": True, "d_model": 512}}).model).items() if k != "head_dim"}
    assert model_config_from_hf(qwen3, "hf")["d_model"] == 512  # 4 heads of 128
    assert "head_dim" not in model_config_from_hf(qwen3, "hf")  # d_model / n_heads: left to the rule
    eight = model_config_from_hf({**qwen3, "num_attention_heads": 8}, "hf")  # 8 heads of 128: wider than d_model
    assert (eight["d_model"], eight["n_heads"], eight["head_dim"]) == (512, 8, 128)
    assert from_dict({"model": eight}).model.head_dim == 128
    assert hf_config(from_dict({"model": eight}).model)["head_dim"] == 128
    assert model_config_from_hf({**qwen3, "model_type": "llama", "head_dim": None}, "hf")["n_heads"] == 4


@pytest.mark.parametrize(("change", "error"), [
    ({"mlp_only_layers": [1]}, "mlp_only_layers=[1] cannot be expressed by a bigtrain model (only a leading run"),
    ({"attention_bias": True}, "attention_bias=True cannot be expressed"),
    ({"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window=True cannot be expressed"),
    ({"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "layer_types=["),
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "rope_scaling of rope_type 'linear' cannot be expressed "
     "by a bigtrain model (only llama3 and yarn)"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters of rope_type 'longrope'"),
    ({"model_type": "qwen2_moe"}, "model_type is 'qwen2_moe'; only 'llama', 'qwen3', 'qwen3_moe' convert"),
])
def test_from_hf_refuses_what_bigtrain_cannot_express(change, error, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    config = {**hf_config(moe_model()), **change}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "bt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bigtrain: error: {tmp_path / 'hf'}: ") and error in err and "\n" not in err
    assert not (tmp_path / "bt").exists()


@pytest.mark.parametrize(("model", "error"), [
    ({"shared_experts": 1}, "model.moe.shared_experts=1: Qwen3MoeForCausalLM has no shared experts, so to-hf cannot express it"),
    ({"qk_norm": False}, "model.qk_norm=false: Qwen3MoeForCausalLM always normalises q and k, so to-hf of a Mixture of "
                         "Experts needs model.qk_norm=true"),
])
def test_to_hf_refuses_what_qwen3_moe_cannot_express(model, error, tmp_path, capsys):
    moe = {k: v for k, v in model.items() if k != "qk_norm"}
    cfg = from_dict({"model": {**hf_parity.BIGTRAIN_SHAPE, "qk_norm": model.get("qk_norm", True),
                               "moe": {"experts": 4, "ffn_hidden": 16, **moe}}, "data": {"seq_len": 32}})
    hf_parity.write_checkpoint(Llama(cfg.model, seed=1), cfg, tmp_path / "bt")
    assert main(["convert", "to-hf", str(tmp_path / "bt"), str(tmp_path / "hf")]) == 1
    assert capsys.readouterr().err.strip() == f"bigtrain: error: {error}"
    assert not (tmp_path / "hf").exists()
