"""RoPE scaling (`model.rope_scaling`): tables equal to transformers' rotary embedding, plain RoPE
unchanged, the config's one-line refusals, and the Hugging Face config keys both ways."""

import math

import pytest
import torch

from bigtrain.config import from_dict, load_config, save_config
from bigtrain.convert.hf_config import hf_config, model_config_from_hf
from bigtrain.errors import BigtrainError
from bigtrain.model.llama import rope_tables
from bigtrain.model.rope import inverse_frequencies
from tests import hf_parity


def model(max_seq_len=64, **scaling):
    return from_dict({"model": {"d_model": 64, "n_heads": 4, "max_seq_len": max_seq_len, "rope_theta": 50000.0,
                                **({"rope_scaling": scaling} if scaling else {})}, "data": {"seq_len": 32}}).model


@pytest.mark.parametrize("name", list(hf_parity.ROPE_CASES))
def test_tables_equal_transformers_rotary_embedding(name):
    pytest.importorskip("transformers")
    assert hf_parity.check_rope(name) <= 1e-6


def test_plain_rope_is_unchanged_and_factor_one_changes_nothing():
    cos, sin = rope_tables(model())
    inv = 1.0 / 50000.0 ** (torch.arange(0, 16, 2) / 16)
    angles = torch.outer(torch.arange(64.0), inv)
    assert torch.equal(cos, torch.cat([angles, angles], -1).cos())
    assert torch.equal(sin, torch.cat([-angles.sin(), angles.sin()], -1))
    for kind in ("llama3", "yarn"):
        scaled = rope_tables(model(type=kind, factor=1.0, original_max_seq_len=16))
        assert torch.allclose(scaled[0], cos, atol=1e-6) and torch.allclose(scaled[1], sin, atol=1e-6)


def test_scaled_frequencies_by_hand():
    # llama3, original 32: wavelength 2π (< 32/4) kept, 2π·50000^(14/16) (> 32/1) divided by 8, and
    # 2π·50000^(2/16) ≈ 24.3 blended: s·f + (1 − s)·f/8 with s = (32/wavelength − 1) / (4 − 1)
    m = model(type="llama3", factor=8.0, original_max_seq_len=32)
    inv, scale = inverse_frequencies(16, 50000.0, m.rope_scaling)
    plain, _ = inverse_frequencies(16, 50000.0)
    assert scale == 1.0 and inv[0] == plain[0] and torch.allclose(inv[-1], plain[-1] / 8)
    s = (32 * plain[1] / (2 * math.pi) - 1) / 3
    assert 0 < s < 1 and torch.allclose(inv[1], s * plain[1] + (1 - s) * plain[1] / 8)
    # yarn: the fastest dimension is kept, the slowest interpolated; cos and sin scaled by 0.1·ln(8) + 1
    m = model(type="yarn", factor=8.0, original_max_seq_len=16)
    inv, scale = inverse_frequencies(16, 50000.0, m.rope_scaling)
    assert scale == pytest.approx(0.1 * math.log(8) + 1) and inv[0] == plain[0]
    assert torch.allclose(inv[-1], plain[-1] / 8)
    cos, _ = rope_tables(m)
    assert cos[0, 0].item() == pytest.approx(scale)


@pytest.mark.parametrize(("override", "message"), [
    ("model.rope_scaling={type: yarn, factor: 4}", "config key model.rope_scaling.original_max_seq_len is required"),
    ("model.rope_scaling={factor: 4, original_max_seq_len: 64}", "config key model.rope_scaling.type is required"),
    ("model.rope_scaling={type: ntk, factor: 4, original_max_seq_len: 64}",
     "model.rope_scaling.type must be one of llama3, yarn, got 'ntk'"),
    ("model.rope_scaling={type: yarn, factor: 0.5, original_max_seq_len: 64}", "model.rope_scaling.factor=0.5 must be >= 1"),
    ("model.rope_scaling={type: yarn, factor: 8, original_max_seq_len: 512}",
     "model.rope_scaling.original_max_seq_len=512 exceeds model.max_seq_len=256"),
    ("model.rope_scaling={type: llama3, factor: 8, original_max_seq_len: 64, beta_fast: 16}",
     "model.rope_scaling.beta_fast does not apply to type llama3"),
    ("model.rope_scaling={type: yarn, factor: 8, original_max_seq_len: 64, low_freq_factor: 2}",
     "model.rope_scaling.low_freq_factor does not apply to type yarn"),
    ("model.rope_scaling={type: llama3, factor: 8, original_max_seq_len: 64, low_freq_factor: 4}",
     "model.rope_scaling.high_freq_factor must exceed model.rope_scaling.low_freq_factor"),
    ("model.rope_scaling={type: yarn, factor: 8, original_max_seq_len: 64, beta_fast: 1}",
     "model.rope_scaling.beta_fast must exceed model.rope_scaling.beta_slow"),
])
def test_mistakes_are_one_line_naming_the_key(override, message):
    with pytest.raises(BigtrainError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_overrides_set_the_section_key_by_key(tmp_path):
    cfg = load_config(None, ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=8",
                             "model.rope_scaling.original_max_seq_len=32", "model.rope_scaling.beta_fast=16"])
    r = cfg.model.rope_scaling
    assert (r.type, r.factor, r.original_max_seq_len, r.beta_fast, r.beta_slow, r.truncate) == ("yarn", 8.0, 32, 16.0, 1.0, True)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert load_config(None, ["model.rope_scaling=null"]).model.rope_scaling is None


def test_hugging_face_config_keys_both_ways():
    # a Llama 3.1 config.json (as 4.x writes it) imports with its scaling
    llama31 = {**hf_config(model()), "max_position_embeddings": 131072, "rope_theta": 500000.0,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    m = model_config_from_hf(llama31, "hf")
    assert m["rope_scaling"] == {"type": "llama3", "factor": 8.0, "original_max_seq_len": 8192,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert hf_config(from_dict({"model": m}).model)["rope_scaling"] == llama31["rope_scaling"]
    # 5.x: rope_parameters holds theta and scaling; a yarn factor may be left to the context ratio
    five = {**llama31, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "original_max_position_embeddings": 4096,
                                "beta_fast": 32, "mscale": 1, "mscale_all_dim": 1, "truncate": False}}
    del five["rope_theta"], five["rope_scaling"]
    m = model_config_from_hf(five, "hf")
    assert m["rope_theta"] == 1e6 and m["rope_scaling"] == {
        "type": "yarn", "factor": 8.0, "original_max_seq_len": 4096, "beta_fast": 32.0, "mscale": 1.0,
        "mscale_all_dim": 1.0, "truncate": False}
    # to-hf writes only yarn's parameters that differ from transformers' defaults
    assert hf_config(from_dict({"model": m}).model)["rope_scaling"] == {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
        "mscale_all_dim": 1.0, "truncate": False}
    assert hf_config(model())["rope_scaling"] is None
    assert "rope_scaling" not in model_config_from_hf({**llama31, "rope_scaling": {"rope_type": "default"}}, "hf")
