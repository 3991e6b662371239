"""Muon: Newton–Schulz, the update rule against a hand reference, skipped steps, state round trip."""


import pytest
import torch

from bigtrain.config import from_dict
from bigtrain.engine.muon import Muon, is_hidden_matrix, newton_schulz, rms_scale
from bigtrain.engine.optimizer import build_optimizer
from bigtrain.model import Llama
from tests.helpers import muon_reference_step

MODEL = {"vocab_size": 64, "d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 8}


def config(**train):
    return from_dict({"model": MODEL, "data": {"seq_len": 8},
                      "train": {"optimizer": "muon", "device": "cpu", "lr": 0.01, **train}})


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16)])
def test_newton_schulz_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(newton_schulz(g))
    assert s.min() > 0.6 and s.max() < 1.25  # Keller Jordan's quintic: roughly Uniform(0.7, 1.2)
    # the directions are G's: O ≈ U·Vᵀ up to those singular values
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(newton_schulz(g).flatten(), (u @ vt).flatten(), dim=0) > 0.97


def test_hidden_matrices_are_the_blocks_linear_weights():
    model = Llama(config().model)
    chosen = [n for n, p in model.named_parameters() if is_hidden_matrix(n, p)]
    assert sorted(n.split(".")[-2] for n in chosen) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert is_hidden_matrix("layers.1.mlp.shared_experts.gate_proj.weight", torch.zeros(2, 2)) is False


def one_step(cfg, grads, found_inf=None):
    model = Llama(cfg.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg.train)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    if found_inf is not None:
        opt.found_inf = torch.tensor(found_inf)
    opt.step()
    return model, opt, before


@pytest.mark.parametrize("impl", ["fused", "for-loop"])
def test_one_step_matches_the_formula_not_adamw(impl):
    cfg = config(weight_decay=0.1, adamw_impl=impl)
    model = Llama(cfg.model)
    gen = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    model, opt, before = one_step(cfg, grads)
    assert isinstance(opt, Muon)
    for n, p in model.named_parameters():
        if is_hidden_matrix(n, p):
            expected, m = muon_reference_step(before[n], grads[n], torch.zeros_like(p), 0.01, 0.1, 0.95)
            assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-6), n
            assert torch.equal(opt.state[p]["momentum_buffer"], m)
            adamw_first = before[n] * (1 - 0.01 * 0.1) - 0.01 * grads[n].sign()  # AdamW's first step: ±lr
            assert (p.detach() - adamw_first).abs().max() > 1e-4
        else:  # AdamW's first step: -lr·sign(g) (decay on matrices only)
            decay = 0.1 if p.dim() == 2 else 0.0
            expected = before[n] * (1 - 0.01 * decay) - 0.01 * grads[n] / (grads[n].abs() + 1e-8)
            assert torch.allclose(p.detach(), expected, atol=1e-6), n


def test_two_steps_match_the_formula():
    cfg = config(weight_decay=0.0)
    model = Llama(cfg.model)
    opt = build_optimizer(model, cfg.train)
    name, p = next((n, p) for n, p in model.named_parameters() if is_hidden_matrix(n, p))
    w, m = p.detach().clone(), torch.zeros_like(p)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        g = torch.randn(p.shape, generator=gen)
        for q in model.parameters():
            q.grad = torch.zeros_like(q)
        p.grad = g.clone()
        opt.step()
        w, m = muon_reference_step(w, g, m, 0.01, 0.0, 0.95)
    assert torch.allclose(p.detach(), w, atol=1e-6)


def test_rms_matching_gives_adamw_like_update_rms():
    o = newton_schulz(torch.randn(256, 64, generator=torch.Generator().manual_seed(3)))
    rms = float((o * rms_scale(o.shape)).pow(2).mean().sqrt())
    assert 0.15 < rms < 0.25  # Moonlight: about 0.2, AdamW's typical update RMS


def test_skipped_step_leaves_weights_and_state_alone():
    cfg = config(weight_decay=0.1)
    model = Llama(cfg.model)
    grads = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    model, opt, _ = one_step(cfg, grads)  # a real step first: momentum and moments exist
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {k: {s: v.clone() for s, v in st.items()} for k, st in opt.state.items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
    for k, st in opt.state.items():
        for s, v in st.items():
            assert torch.equal(v, state[k][s]), s


def test_state_dict_round_trip_is_bitwise():
    cfg = config(weight_decay=0.1)
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    model = Llama(cfg.model)
    twin = Llama(cfg.model)
    twin.load_state_dict(model.state_dict())
    opt, opt2 = build_optimizer(model, cfg.train), build_optimizer(twin, cfg.train)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
        for p, q, g in zip(model.parameters(), twin.parameters(), grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
        if step == 1:  # twin resumes from a saved state dict
            saved = opt2.state_dict()
            opt2 = build_optimizer(twin, cfg.train)
            opt2.load_state_dict(saved)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("overrides, message", [
    ({"zero_stage": 3}, "needs parallel.zero_stage 0, 1 or 2"),
    ({"pp": 2}, "runs with parallel.pp=1"),
    ({"offload_optimizer": True, "zero_stage": 2}, "needs parallel.offload_optimizer=false"),
])
def test_deepspeed_layouts_muon_refuses_in_one_line(overrides, message):
    from bigtrain.engine.deepspeed.muon import muon_problem

    cfg = config()
    for key, value in overrides.items():
        setattr(cfg.parallel, key, value)
    fp32 = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    assert message in muon_problem(cfg, fp32) and "\n" not in muon_problem(cfg, fp32)
    cfg.parallel.zero_stage, cfg.parallel.pp, cfg.parallel.offload_optimizer = 1, 1, False
    assert muon_problem(cfg, fp32) is None
    cfg.parallel.zero_stage = 0
    assert "needs parallel.zero_stage 1 or 2" in muon_problem(cfg, {"bf16": {"enabled": True}, "fp16": {"enabled": False}})


def test_grad_scale_divides_the_gradients_as_fused_adamw_does():
    cfg = config(weight_decay=0.1)
    grads = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(6))
             for n, p in Llama(cfg.model).named_parameters()}
    torch.manual_seed(0)
    plain, _, _ = one_step(cfg, grads)
    torch.manual_seed(0)
    model = Llama(cfg.model)
    opt = build_optimizer(model, cfg.train)
    for n, p in model.named_parameters():
        p.grad = grads[n] * 4
    opt.grad_scale = torch.tensor(4.0)  # what the local engine sets when it folds clipping in
    opt.step()
    for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_mup_learning_rate_scales_reach_the_muon_groups():
    cfg = from_dict({"model": {**MODEL, "d_model": 32, "head_dim": 8, "parametrization": "mup", "mup_base_width": 16},
                     "data": {"seq_len": 8}, "train": {"optimizer": "muon", "device": "cpu"}})
    model = Llama(cfg.model)
    opt = build_optimizer(model, cfg.train)
    muon = [g for g in opt.param_groups if g["muon"]]
    assert muon and all(g.get("lr_scale", 1.0) == pytest.approx(0.5) for g in muon)  # 1/m, m = 32/16
    assert sum(len(g["params"]) for g in muon) == 7
