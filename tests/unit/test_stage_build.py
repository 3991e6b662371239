"""The stage builder on one process, then `parallelize`: the whole model, bit for bit `Llama(cfg)`; `init_from` files
that do not match the model are refused in one line."""

import dataclasses
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from bigtrain.config import Config, ModelConfig
from bigtrain.engine.deepspeed.stages import build_layers
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from bigtrain.parallel.parallelize import parallelize

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
ONE_RANK = SimpleNamespace(tp=1, pp=1, grid=SimpleNamespace(get_stage_id=lambda: 0))  # no process group needed


def build_stage(cfg: ModelConfig, topology, init_file=None) -> list:
    """The layers as the DeepSpeed path builds and parallelizes them (tp = 1: parallelize ties the head)."""
    return parallelize(build_layers(cfg, topology, init_file), Config(model=cfg), fp8=False, compile=False)


@pytest.mark.parametrize("tied", [False, True])
def test_one_stage_is_the_model_bit_for_bit(tied):
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    torch.manual_seed(7)
    built = Llama(cfg, build_stage(cfg, ONE_RANK))
    after_build = torch.get_rng_state()
    torch.manual_seed(7)
    reference = Llama(cfg)
    assert torch.equal(after_build, torch.get_rng_state())
    assert built.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in built.state_dict().items())
    assert (built.layers[-1].lm_head.weight is built.layers[0].embed_tokens.weight) == tied


def test_init_from_file_must_match_the_model(tmp_path):
    state = Llama(CFG).state_dict()
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v for k, v in state.items() if k != "layers.1.mlp.up_proj.weight"}, str(file))
    with pytest.raises(BigtrainError, match="missing layers.1.mlp.up_proj.weight"):
        build_stage(CFG, ONE_RANK, file)
    safetensors.torch.save_file({**state, "extra.weight": torch.zeros(2)}, str(file))
    with pytest.raises(BigtrainError, match=r"unexpected \['extra.weight'\]"):
        build_stage(CFG, ONE_RANK, file)
    safetensors.torch.save_file({**state, "layers.0.embed_tokens.weight": torch.zeros(3, 32)}, str(file))
    with pytest.raises(BigtrainError, match=r"layers.0.embed_tokens.weight has shape \(3, 32\)"):
        build_stage(CFG, ONE_RANK, file)
    file.write_bytes(b"not safetensors")
    with pytest.raises(BigtrainError, match="cannot load weights"):
        build_stage(CFG, ONE_RANK, file)
