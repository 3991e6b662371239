"""The parallel layout's one owner: the tensor-parallel plan, stage bounds, the layout check (as the
planner and `convert reshard` use it) and the global-batch arithmetic."""

import math

import pytest
import torch

from bigtrain.config import from_dict
from bigtrain.model import Llama
from bigtrain.parallel import layout, planner
from tests.helpers import small_model_config


def test_every_matrix_has_a_split_and_every_vector_is_replicated():
    model = Llama(small_model_config(n_heads=4, n_kv_heads=2))
    for name, p in model.named_parameters():
        assert (layout.tp_split_dim(name) is not None) == (p.dim() == 2), name


@pytest.mark.parametrize("name, dim", [
    ("layers.0.embed_tokens.weight", 0), ("layers.1.self_attn.q_proj.weight", 0),
    ("layers.1.self_attn.o_proj.weight", 1), ("layers.2.mlp.down_proj.weight", 1),
    ("layers.2.mlp.up_proj.weight", 0), ("layers.3.lm_head.weight", 0), ("layers.3.norm.weight", None),
])
def test_split_dimension_per_weight(name, dim):
    assert layout.tp_split_dim(name) == dim


def test_slices_join_back_to_the_full_tensor():
    model = Llama(small_model_config(n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden=64))
    for name, p in model.named_parameters():
        parts = [layout.tp_slice(p.detach(), name, 2, r) for r in range(2)]
        assert torch.equal(layout.tp_join(name, parts), p.detach()), name
        if layout.tp_split_dim(name) is not None:
            assert parts[0].numel() == p.numel() // 2


@pytest.mark.parametrize("n_layers, pp", [(4, 1), (4, 2), (5, 2), (3, 3), (7, 4), (80, 8), (32, 3)])
def test_stage_bounds_cover_every_layer_once(n_layers, pp):
    bounds = layout.stage_bounds(n_layers, pp)
    assert bounds[0] == 0 and bounds[-1] == n_layers + 2 and len(bounds) == pp + 1
    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
    assert layout.max_blocks_per_stage(n_layers, pp) == math.ceil(n_layers / pp)


def config(**parallel):
    return from_dict({
        "model": {"vocab_size": 512, "d_model": 96, "n_layers": 4, "n_heads": 6, "n_kv_heads": 2, "ffn_hidden": 192},
        "data": {"micro_batch": 2}, "train": {"grad_accum": 4},
        "parallel": {"engine": "deepspeed", **parallel},
    })


def test_global_batch_arithmetic():
    cfg = config(tp=2)
    assert layout.global_batch(cfg, dp=3) == 2 * 4 * 3
    assert layout.world_size_for(cfg) == 2
    cfg.train.global_batch = 24
    assert layout.grad_accum_for(cfg, dp=3) == 4 and layout.world_size_for(cfg) == 2 * 3
    with pytest.raises(Exception, match=r"train.global_batch=24 is not a multiple of data.micro_batch × dp = 2 × 5"):
        layout.grad_accum_for(cfg, dp=5)


def test_planner_candidates_pass_the_layout_check():
    cfg = config()
    candidates = planner.candidate_layouts(cfg, gpus=8, gpus_per_node=8)
    assert candidates
    assert {c.tp for c in candidates} == {1, 2}  # 6 heads and 2 KV heads split only by 1 and 2
    assert all(c.zero <= 1 for c in candidates if c.pp > 1)
    tied = config()
    tied.model.tie_embeddings = True
    assert {c.pp for c in planner.candidate_layouts(tied, gpus=8, gpus_per_node=8)} == {1}


def test_problem_names_keys_a_user_can_set():
    cfg = config(tp=4)
    cfg.model.ffn_hidden = None
    problem = layout.layout_problem(cfg, 4)
    assert problem == "model.n_heads=6 is not divisible by parallel.tp=4"
    cfg = config(tp=2)
    cfg.model.vocab_size = 511
    assert layout.layout_problem(cfg, 2) == "model.vocab_size=511 is not divisible by parallel.tp=2"


def test_sequence_parallelism_needs_a_sequence_divisible_by_tp():
    cfg = config(tp=2)
    cfg.data.seq_len = 255
    assert layout.tp_sequence_parallel(cfg)
    assert layout.layout_problem(cfg, 2) == ("data.seq_len=255 is not divisible by parallel.tp=2, as "
                                             "parallel.tp_sequence_parallel needs (or set "
                                             "parallel.tp_sequence_parallel=false)")
    cfg.parallel.tp_sequence_parallel = False
    assert not layout.tp_sequence_parallel(cfg) and layout.layout_problem(cfg, 2) is None
    assert not layout.tp_sequence_parallel(config(tp=1))  # a property of tp > 1
    cfg = config(tp=2, sp=2)  # with Ulysses too: each sp rank's share of the sequence splits over tp
    cfg.data.seq_len, cfg.model.n_heads, cfg.model.n_kv_heads = 258, 8, 4
    assert layout.layout_problem(cfg, 4).startswith("data.seq_len=258 is not divisible by parallel.sp × parallel.tp = 4")
