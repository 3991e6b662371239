"""`parallelize` on one process: a stage's blocks are checkpointed by their place in the whole
model's list, a tied head is tied again, and nothing else changes the layers."""

import functools

import torch

from bigtrain.config import Config, ParallelConfig
from bigtrain.model import Llama
from bigtrain.parallel.parallelize import parallelize
from tests.helpers import small_model_config


def test_a_stage_checkpoints_the_blocks_the_whole_model_would():
    model_cfg = small_model_config(n_layers=4)
    cfg = Config(model=model_cfg, parallel=ParallelConfig(activation_checkpointing=True, activation_checkpointing_every=2))
    layers = list(Llama(model_cfg).layers)
    whole = parallelize(list(Llama(model_cfg).layers), cfg, fp8=False, compile=False)
    stage = parallelize(layers[2:5], cfg, fp8=False, compile=False, first=2)
    checkpointed = [isinstance(layer.__dict__.get("forward"), functools.partial) for layer in whole]
    assert checkpointed == [False, True, False, True, False, False]
    assert [isinstance(layer.__dict__.get("forward"), functools.partial) for layer in stage] == checkpointed[2:5]


def test_the_head_is_tied_to_the_embedding_and_the_numbers_stay():
    model_cfg = small_model_config(tie_embeddings=True)
    torch.manual_seed(0)
    model = Llama(model_cfg)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 9))
    before = model(tokens[:, :-1], tokens[:, 1:])
    layers = parallelize(model.layers, Config(model=model_cfg), fp8=False, compile=False)
    assert layers[-1].lm_head.weight is layers[0].embed_tokens.weight
    assert torch.equal(Llama(model_cfg, layers)(tokens[:, :-1], tokens[:, 1:]), before)
