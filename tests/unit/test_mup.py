"""µP (bigtrain/model/mup.py): initialisation, per-group learning rates, the output multiplier and
the attention scale, and that at width multiplier 1 it is standard parametrization but for 1/head_dim."""

import math

import pytest
import torch

from bigtrain.checkpoint.format import parameter_names
from bigtrain.config import Config, load_config
from bigtrain.engine.optimizer import build_adamw, scheduled_lr
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from bigtrain.model.llama import CausalAttention
from tests.helpers import small_model_config as small

HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _set_attention_scale(model: Llama, scale: float | None) -> None:
    for module in model.modules():
        if isinstance(module, CausalAttention):
            module.scale = scale


def test_at_base_width_mup_is_standard_but_for_the_attention_scale():
    standard, mup = small(), small(parametrization="mup", mup_base_width=32)
    a, b = Llama(standard, seed=3), Llama(mup, seed=3)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    tokens = torch.randint(0, 97, (2, 12))
    assert not torch.allclose(a(tokens), b(tokens))  # 1/head_dim vs 1/sqrt(head_dim)
    _set_attention_scale(b, None)
    assert torch.equal(a(tokens), b(tokens))
    groups = build_adamw(b, Config(model=mup).train).param_groups
    assert {g["lr_scale"] for g in groups} == {1.0}


def test_wider_model_init_std_and_output_multiplier():
    cfg = small(d_model=128, n_heads=16, n_kv_heads=8, parametrization="mup", mup_base_width=32, init_std=0.02)
    assert cfg.head_dim == 8
    model = Llama(cfg, seed=5)
    weights = dict(model.named_parameters())
    m = 4.0
    assert weights["layers.1.self_attn.q_proj.weight"].std().item() == pytest.approx(0.02 / math.sqrt(m), rel=0.05)
    assert weights["layers.1.self_attn.o_proj.weight"].std().item() == pytest.approx(0.02 / math.sqrt(m * 4), rel=0.05)
    assert weights["layers.0.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert weights["layers.3.lm_head.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[-1].output_multiplier == 1 / m
    # the same weights under standard parametrization with µP's attention scale: logits m times larger
    plain = Llama(small(d_model=128, n_heads=16, n_kv_heads=8), seed=5)
    plain.load_state_dict(model.state_dict())
    _set_attention_scale(plain, 1 / 8)
    tokens = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(plain(tokens), model(tokens) * m)
    # the loss path (chunked cross-entropy) sees the multiplier too
    targets = torch.randint(0, 97, (2, 12))
    expected = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model(tokens, targets), expected)


def test_adam_learning_rates_per_group_keep_the_checkpoint_order():
    cfg = Config(model=small(d_model=64, n_heads=8, n_kv_heads=4, parametrization="mup", mup_base_width=16))
    model = Llama(cfg.model, seed=1)
    optimizer = build_adamw(model, cfg.train)
    names = {id(p): n for n, p in model.named_parameters()}
    flat = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert flat == parameter_names(cfg)  # optimizer.pt indexes them as before
    for group in optimizer.param_groups:
        for p in group["params"]:
            hidden = any(f"{h}.weight" in names[id(p)] for h in HIDDEN)
            assert scheduled_lr(group, 1e-2) == pytest.approx(1e-2 / 4 if hidden else 1e-2), names[id(p)]
    decayed = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decayed["layers.1.input_layernorm.weight"] == 0.0 and decayed["layers.1.mlp.up_proj.weight"] > 0
    standard = build_adamw(Llama(small(), seed=1), cfg.train).param_groups
    assert len(standard) == 2 and "lr_scale" not in standard[0]


def test_attention_scale_reaches_the_document_masked_path():
    cfg = small(d_model=64, n_heads=4, n_kv_heads=2, parametrization="mup", mup_base_width=16)
    model = Llama(cfg, seed=2)
    tokens = torch.randint(1, 97, (2, 12))  # no EOS (0): one document per window
    documents = torch.zeros_like(tokens)
    torch.testing.assert_close(model(tokens, documents=documents), model(tokens))


def test_parametrization_is_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {parametrization: mu}\n")
    with pytest.raises(BigtrainError, match="parametrization"):
        load_config(path)


def test_widened_keeps_head_dim_and_grouping():
    from bigtrain.model.mup import widened

    cfg = small(d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=192, mup_base_width=64)
    wide = widened(cfg, 256, "mup")
    assert (wide.d_model, wide.n_heads, wide.kv_heads, wide.head_dim, wide.ffn_dim) == (256, 16, 8, 16, 768)
    assert (wide.parametrization, wide.mup_base_width) == ("mup", 64)
    with pytest.raises(ValueError, match="multiple of"):
        widened(cfg, 48)
