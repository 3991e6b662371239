"""Layers built on the meta device and materialised by `parallelize`: bit for bit `Llama(cfg)`
of the same seed, whatever layers a rank builds and in whatever order; `init_from` files that do
not match the model are refused in one line before any tensor is read."""

import dataclasses

import pytest
import safetensors.torch
import torch

from bigtrain.config import Config, ModelConfig
from bigtrain.engine.materialize import Materializer
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from bigtrain.model.llama import meta_layer
from bigtrain.parallel.parallelize import parallelize

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16)
CPU = torch.device("cpu")


def build(cfg: ModelConfig, indices, seed=5, init_file=None) -> list:
    """Layers `indices` as the engines build them: on the meta device, materialised by `parallelize`."""
    layers = (meta_layer(cfg, i) for i in indices)
    return parallelize(layers, Config(model=cfg), fp8=False, compile=False, first=indices[0],
                       materialize=Materializer(cfg, CPU, seed, init_file))


@pytest.mark.parametrize("tied", [False, True])
def test_built_layers_are_the_model_bit_for_bit(tied):
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    built, reference = Llama(cfg, build(cfg, range(cfg.n_layers + 2))), Llama(cfg, seed=5)
    assert built.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in built.state_dict().items())
    assert (built.layers[-1].lm_head.weight is built.layers[0].embed_tokens.weight) == tied
    blocks = built.layers[1:-1]
    assert all(b.cos is blocks[0].cos and b.sin is blocks[0].sin for b in blocks)  # one RoPE table pair
    assert torch.equal(blocks[0].cos, reference.layers[1].cos)


def test_a_parameter_s_value_depends_on_the_seed_and_its_name_only():
    whole = Llama(CFG, seed=5).state_dict()
    stage = Llama(CFG, build(CFG, [2, 3], seed=5)).state_dict()  # a later pipeline stage, built alone
    assert all(torch.equal(v, whole[k.replace("layers.0.", "layers.2.").replace("layers.1.", "layers.3.")])
               for k, v in stage.items())
    other = Llama(CFG, seed=6).state_dict()
    q = "layers.1.self_attn.q_proj.weight"
    assert not torch.equal(other[q], whole[q])
    assert not torch.equal(whole[q], whole["layers.2.self_attn.q_proj.weight"])  # each name its own stream
    assert torch.equal(whole["layers.1.input_layernorm.weight"], torch.ones(CFG.d_model))


def test_init_from_reads_the_file_and_checks_it_first(tmp_path):
    state = Llama(CFG, seed=9).state_dict()
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, str(file))
    loaded = Llama(CFG, build(CFG, range(CFG.n_layers + 2), init_file=file)).state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.items())
    safetensors.torch.save_file({k: v for k, v in state.items() if k != "layers.1.mlp.up_proj.weight"}, str(file))
    with pytest.raises(BigtrainError, match="missing layers.1.mlp.up_proj.weight"):
        build(CFG, [0], init_file=file)
    safetensors.torch.save_file({**state, "extra.weight": torch.zeros(2)}, str(file))
    with pytest.raises(BigtrainError, match=r"unexpected \['extra.weight'\]"):
        build(CFG, [0], init_file=file)
    safetensors.torch.save_file({**state, "layers.0.embed_tokens.weight": torch.zeros(3, 32)}, str(file))
    with pytest.raises(BigtrainError, match=r"layers.0.embed_tokens.weight has shape \(3, 32\)"):
        build(CFG, [0], init_file=file)
    file.write_bytes(b"not safetensors")
    with pytest.raises(BigtrainError, match="cannot load weights"):
        build(CFG, [0], init_file=file)
