from pathlib import Path

import pytest
import torch

from bigtrain.config import Config, load_config
from bigtrain.model import Llama, count_params, flops_per_token, lm_loss
from tests.helpers import small_model_config as small

CONFIGS = Path(__file__).parents[2] / "configs"


def test_output_shape_and_layer_list():
    cfg = small()
    model = Llama(cfg)
    assert len(model.layers) == cfg.n_layers + 2
    logits = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97)


@pytest.mark.parametrize("tied", [False, True])
def test_param_formula_equals_built_model(tied):
    cfg = small(tie_embeddings=tied)
    model = Llama(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    if tied:
        assert model.layers[-1].lm_head.weight is model.layers[0].embed_tokens.weight


@pytest.mark.parametrize("name", ["125m", "350m", "1b", "7b", "13b", "70b", "olmoe-1b-7b", "qwen3-30b-a3b"])
def test_real_configs_count_on_meta_device(name):
    cfg = load_config(CONFIGS / f"{name}.yaml").model
    with torch.device("meta"):
        built = sum(p.numel() for p in Llama(cfg).parameters())
    assert built == count_params(cfg).total


def test_7b_matches_llama2():
    total = count_params(load_config(CONFIGS / "7b.yaml").model).total
    assert abs(total - 6.74e9) / 6.74e9 < 0.005
    assert total == 6_738_415_616  # the exact Llama-2-7B count


@pytest.mark.parametrize(("name", "total", "active"), [
    ("olmoe-1b-7b", 6_919_100_416, 1_281_955_840),  # OLMoE-1B-7B: 6.92B total, 1.28B active
    ("qwen3-30b-a3b", 30_532_122_624, 3_353_032_704),  # Qwen3-30B-A3B: 30.5B total, 3.3B active
])
def test_moe_configs_match_the_published_counts(name, total, active):
    counts = count_params(load_config(CONFIGS / f"{name}.yaml").model)
    assert (counts.total, counts.active) == (total, active)


def test_head_dim_wider_than_d_model_over_heads():
    cfg = small(d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, qk_norm=True)  # attention width 64 ≠ 32
    attn = Llama(cfg).layers[1].self_attn
    assert (attn.q_proj.weight.shape, attn.k_proj.weight.shape, attn.o_proj.weight.shape) == ((64, 32), (32, 32), (32, 64))
    assert attn.q_norm.weight.shape == (16,)
    assert count_params(cfg).total == sum(p.numel() for p in Llama(cfg).parameters())
    d, L, V, f, seq = 32, 2, 97, cfg.ffn_dim, 16
    matmul = L * (d * 64 * 2 + d * 32 * 2 + 3 * d * f) + V * d  # q,o: 4 heads×16; k,v: 2 heads×16
    assert flops_per_token(cfg, seq) == 6 * matmul + 12 * L * 64 * seq
    assert Llama(cfg)(torch.randint(0, 97, (2, 16))).shape == (2, 16, 97)


def test_causality():
    torch.manual_seed(0)
    model = Llama(small())
    tokens = torch.randint(0, 97, (1, 12))
    base = model(tokens)
    changed = tokens.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 97
    out = model(changed)
    assert torch.equal(out[:, :7], base[:, :7])
    assert not torch.allclose(out[:, 7:], base[:, 7:])


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    cfg = small()
    tokens = torch.randint(0, 97, (4, 16))
    loss = lm_loss(Llama(cfg)(tokens[:, :-1]), tokens[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.1


def test_flops_per_token_by_hand():
    cfg = small()
    d, L, V, f, seq = 32, 2, 97, cfg.ffn_dim, 16
    matmul = L * (d * 32 * 2 + d * 16 * 2 + 3 * d * f) + V * d  # q,o: 4 heads×8; k,v: 2 heads×8
    assert flops_per_token(cfg, seq) == 6 * matmul + 12 * L * d * seq
    assert Config().model.head_dim == 64
