"""The Mixture-of-Experts layer against a token-by-token reference: routing, shared experts,
capacity, the auxiliary losses' gradients and statistics, parameter counts and layout checks."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bigtrain.config import ModelConfig, MoEConfig, from_dict
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama, count_params, flops_per_token
from bigtrain.model.moe import MoE, grouped_mm, take_router_stats
from bigtrain.parallel.layout import layout_problem


def moe_cfg(**moe) -> ModelConfig:
    spec = {"experts": 4, "top_k": 2, "ffn_hidden": 24, **moe}
    return ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                       moe=MoEConfig(**spec))


def layer(**moe) -> MoE:
    torch.manual_seed(0)
    moe_layer = MoE(moe_cfg(**moe))
    for p in moe_layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe_layer


def reference(moe_layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the softmax router's top-k experts, each a plain SwiGLU, weighted and summed."""
    e = moe_layer.experts
    out = []
    for h in x.reshape(-1, x.shape[-1]):
        probs = (moe_layer.router.weight @ h).softmax(-1)
        weights, chosen = probs.topk(moe_layer.top_k)
        if moe_layer.normalize:
            weights = weights / weights.sum()
        y = sum(w * (e.down_proj[i] @ (F.silu(e.gate_proj[i] @ h) * (e.up_proj[i] @ h))) for w, i in zip(weights, chosen, strict=True))
        if moe_layer.shared_experts is not None:
            y = y + moe_layer.shared_experts(h)
        out.append(y)
    return torch.stack(out).view(x.shape)


def test_grouped_matmul_equals_the_loop_over_experts():
    torch.manual_seed(0)
    x, w = torch.randn(11, 8, requires_grad=True), torch.randn(3, 8, 12, requires_grad=True)  # 16-byte strides
    counts = torch.tensor([4, 0, 7])
    loop, grouped = grouped_mm(x, w, counts, grouped=False), grouped_mm(x, w, counts, grouped=True)
    torch.testing.assert_close(grouped, loop, rtol=0, atol=1e-6)
    torch.testing.assert_close(loop[:4], x[:4] @ w[0])
    assert torch.autograd.grad(loop.square().sum(), w)[0][1].abs().sum() == 0  # an expert without rows


@pytest.mark.parametrize("moe", [{}, {"normalize_top_k": False}, {"shared_experts": 2}, {"top_k": 1}])
def test_moe_equals_the_token_by_token_reference(moe):
    moe_layer = layer(**moe).eval()
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(moe_layer(x), reference(moe_layer, x), rtol=1e-5, atol=1e-6)


def test_auxiliary_losses_reach_the_router_gradient_as_if_added_to_the_loss():
    """out.sum() through the layer in training mode (aux 0.1, z 0.01, scale 0.5) gives the router
    the gradient of out.sum() + 0.5·(0.1·balance + 0.01·z) computed by hand."""
    moe_layer, x = layer(aux_loss=0.1, z_loss=0.01), torch.randn(3, 4, 32)
    moe_layer.loss_scale = 0.5
    moe_layer.train()
    moe_layer(x).sum().backward()
    got = moe_layer.router.weight.grad.clone()

    moe_layer.zero_grad()
    moe_layer.eval()  # no auxiliary terms
    logits = x.reshape(-1, 32) @ moe_layer.router.weight.t()
    probs = logits.softmax(-1)
    counts = torch.bincount(probs.topk(2).indices.flatten(), minlength=4).float()
    n = probs.shape[0]
    balance = 4 / (n * n * 2) * (counts * probs.sum(0)).sum()
    z = logits.logsumexp(-1).square().mean()
    (moe_layer(x).sum() + 0.5 * (0.1 * balance + 0.01 * z)).backward()
    torch.testing.assert_close(got, moe_layer.router.weight.grad, rtol=1e-5, atol=1e-5)
    moe_layer.zero_grad()
    moe_layer(x).sum().backward()  # without the auxiliary terms the gradient is another
    assert (got - moe_layer.router.weight.grad).abs().max() > 1e-3


def test_balance_loss_is_one_under_uniform_routing_and_stats_count_training_passes_once():
    moe_layer = layer()
    torch.nn.init.zeros_(moe_layer.router.weight)
    x = torch.randn(2, 6, 32, requires_grad=True)
    moe_layer.train()
    checkpoint(moe_layer, x, use_reentrant=False).sum().backward()  # the recompute records nothing
    with torch.no_grad():
        moe_layer(x)  # nor does a forward without gradients (evaluation)
    passes, aux, z, dropped, routed, *load = moe_layer.stats.take().tolist()
    assert (passes, dropped, routed) == (1, 0, 24) and aux == pytest.approx(1.0)
    assert z == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    assert sorted(load) == [0, 0, 12, 12]  # all ties: two experts take every token
    assert moe_layer.stats.take() is None


def test_capacity_drops_the_copies_beyond_each_experts_share():
    moe_layer = layer(capacity_factor=0.5, top_k=1)
    with torch.no_grad():
        moe_layer.router.weight.zero_()
        moe_layer.router.weight[2, 0] = 10.0  # every token prefers expert 2
    x = torch.randn(1, 8, 32)
    x[..., 0] = 1.0
    moe_layer.train()
    out = moe_layer(x)
    capacity = 1  # ceil(0.5 · 8 tokens · top-1 / 4 experts)
    assert (out[0, capacity:] == 0).all() and (out[0, :capacity] != 0).any()  # later tokens dropped
    passes, aux, z, dropped, routed, *load = moe_layer.stats.take().tolist()
    assert (dropped, routed) == (7, 8)


@pytest.mark.parametrize("moe", [{}, {"shared_experts": 1, "first_dense": 1}, {"every": 2}])
def test_parameter_counts_match_the_built_model(moe):
    cfg = moe_cfg(**moe)
    cfg.qk_norm = True
    model = Llama(cfg, device="meta")
    counts = count_params(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert counts.total - counts.active == experts // 2  # top 2 of 4 experts are active
    dense = dataclasses.replace(cfg, moe=MoEConfig())  # its MLPs are wider than two 24-wide experts
    assert flops_per_token(cfg, 16) < flops_per_token(dense, 16)


def test_router_stats_table_has_a_row_per_moe_block():
    cfg = moe_cfg(first_dense=1)
    cfg.n_layers = 3
    model = Llama(cfg, seed=0)
    model(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))).backward()
    table = take_router_stats(model, cfg)
    assert table.shape == (2, 5 + 4) and (table[:, 0] == 1).all() and (table[:, 4] == 32).all()


@pytest.mark.parametrize("overrides, message", [
    ({"model": {"moe": {"experts": 2, "top_k": 3}}}, "model.moe.top_k=3 exceeds model.moe.experts=2"),
    ({"model": {"moe": {"experts": 6}}, "parallel": {"ep": 4}}, "model.moe.experts=6 is not divisible by parallel.ep=4"),
    ({"parallel": {"ep": 2}}, "parallel.ep > 1 needs model.moe.experts > 0"),
    ({"model": {"moe": {"experts": 4}}, "train": {"precision": "fp16"}}, "model.moe needs train.precision bf16 or fp32"),
])
def test_impossible_moe_configs_are_one_line(overrides, message):
    with pytest.raises(BigtrainError, match=message.replace(".", r"\.")):
        from_dict(overrides)


@pytest.mark.parametrize("parallel, world, fragment", [
    ({"ep": 4}, 2, "parallel.ep=4 does not divide the data-parallel size 2"),
    ({"ep": 2, "zero_stage": 3}, 2, "parallel.zero_stage <= 2"),
    ({"ep": 2, "engine": "local"}, 1, "parallel.ep and parallel.zero_stage need parallel.engine=deepspeed"),
])
def test_impossible_moe_layouts_are_one_line(parallel, world, fragment):
    cfg = from_dict({"model": {"moe": {"experts": 4}}, "parallel": {"engine": "deepspeed", **parallel}})
    assert fragment in layout_problem(cfg, world)
    assert layout_problem(from_dict({"model": {"moe": {"experts": 4}}, "parallel": {"engine": "deepspeed", "ep": 2}}), 4) is None
