"""The chunked linear + cross-entropy: the same loss and gradients as logits + `lm_loss`, at a
fraction of the memory (measured as peak RSS of forward+backward at vocabulary 32k, seq 2048,
micro-batch 4, in tests/single_process/test_peak_memory.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from bigtrain.config import TrainConfig
from bigtrain.engine.local import local_engine
from bigtrain.model import Llama
from bigtrain.model.loss import ZLoss, linear_cross_entropy, lm_loss
from tests.helpers import small_model_config


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_same_loss_and_gradients_as_full_logits(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(4, 50, 32, requires_grad=True)
    weight = (0.1 * torch.randn(97, 32)).requires_grad_()
    targets = torch.randint(0, 97, (4, 50))
    full = lm_loss(hidden @ weight.t(), targets)
    chunked = linear_cross_entropy(hidden, weight, targets, chunk)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(3.0 * chunked, (hidden, weight)),
                    torch.autograd.grad(3.0 * full, (hidden, weight)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_model_computes_its_loss_in_the_head():
    model = Llama(small_model_config(tie_embeddings=True))
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    fused = model(inputs, targets)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    full = lm_loss(model(inputs), targets)
    full_grads = torch.autograd.grad(full, list(model.parameters()))
    torch.testing.assert_close(fused, full, rtol=1e-6, atol=0)
    for a, b in zip(fused_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _reference(hidden, weight, targets, coeff):
    """Full logits through plain autograd: the cross-entropy, the z-loss, and the gradients of
    3 × (cross-entropy + z-loss) for `hidden` and `weight`."""
    logits = hidden @ weight.t()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    z = coeff * logits.logsumexp(dim=-1).square().mean()
    return ce, z, torch.autograd.grad(3.0 * (ce + z), (hidden, weight), retain_graph=True)


def _inputs():
    torch.manual_seed(0)
    hidden = torch.randn(4, 50, 32, requires_grad=True)
    weight = (0.3 * torch.randn(97, 32) + 0.05).requires_grad_()  # a bias: log-sum-exp well away from 0
    return hidden, weight, torch.randint(0, 97, (4, 50))


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_z_loss_value_and_gradients_match_full_logits(chunk):
    hidden, weight, targets = _inputs()
    coeff = 0.05
    ce, z, expected = _reference(hidden, weight, targets, coeff)
    z_loss = ZLoss(coeff)
    loss = linear_cross_entropy(hidden, weight, targets, chunk, z_loss=z_loss)
    torch.testing.assert_close(loss, ce, rtol=1e-6, atol=0)  # the value stays the cross-entropy
    passes, summed = z_loss.take()
    assert passes == 1 and summed == pytest.approx(z.item(), rel=1e-6)
    assert z.item() > 0.05 * ce.item()  # a term that moves the gradients (checked next)
    got = torch.autograd.grad(3.0 * loss, (hidden, weight))
    ce_only = torch.autograd.grad(3.0 * ce, (hidden, weight))
    for a, b, c in zip(got, expected, ce_only, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert (b - c).abs().max() > 100 * (a - b).abs().max()


def test_z_loss_on_logits_matches_full_logits():
    """`lm_loss` with a z-loss (the pipeline's last stage, which gets logits)."""
    hidden, weight, targets = _inputs()
    ce, z, expected = _reference(hidden, weight, targets, 0.05)
    z_loss = ZLoss(0.05)
    loss = lm_loss(hidden @ weight.t(), targets, z_loss)
    torch.testing.assert_close(loss, ce, rtol=0, atol=0)
    assert z_loss.take()[1] == pytest.approx(z.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(3.0 * loss, (hidden, weight)), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_z_loss_records_training_passes_only():
    hidden, weight, targets = _inputs()
    z_loss = ZLoss(1e-2)
    linear_cross_entropy(hidden, weight, targets, z_loss=z_loss)
    linear_cross_entropy(hidden, weight, targets, z_loss=z_loss)
    with torch.no_grad():  # validation
        linear_cross_entropy(hidden, weight, targets, z_loss=z_loss)
        lm_loss(hidden @ weight.t(), targets, z_loss)
    passes, summed = z_loss.take()
    assert passes == 2
    assert z_loss.take() is None  # taken


def test_zero_z_loss_changes_nothing():
    """train.z_loss=0 (the default): no z-loss anywhere; a zero coefficient leaves the chunked
    loss and its gradients bit for bit as they are without one."""
    hidden, weight, targets = _inputs()
    plain = linear_cross_entropy(hidden, weight, targets, 7)
    zero = linear_cross_entropy(hidden, weight, targets, 7, z_loss=ZLoss(0.0))
    assert torch.equal(plain, zero)
    for a, b in zip(torch.autograd.grad(plain, (hidden, weight)), torch.autograd.grad(zero, (hidden, weight)),
                    strict=True):
        assert torch.equal(a, b)
    engine = local_engine(Llama(small_model_config()), TrainConfig(device="cpu"))
    assert engine.z_loss is None and engine.model.layers[-1].z_loss is None
    engine.train_step([torch.randint(0, 97, (2, 17))], 1e-3)
    assert engine.take_z_loss() is None


def test_local_engine_trains_on_loss_plus_z_loss_and_reports_both():
    """One step: the reported loss is the cross-entropy and `take_z_loss` the z-loss of the step's
    two micro-batches, both as full logits give them; the update follows their sum."""
    tokens = torch.randint(0, 97, (2, 4, 17), generator=torch.Generator().manual_seed(2))
    coeff = 0.05

    def engine_with(z_loss: float):
        torch.manual_seed(0)
        cfg = TrainConfig(device="cpu", z_loss=z_loss, grad_clip=None, weight_decay=0.0)
        return local_engine(Llama(small_model_config(), seed=5), cfg)

    engine, plain = engine_with(coeff), engine_with(0.0)
    reference = copy.deepcopy(engine.model)
    ce = z = 0.0
    for batch in tokens:
        logits = reference(batch[:, :-1]).reshape(-1, 97)
        ce = ce + F.cross_entropy(logits, batch[:, 1:].reshape(-1)) / 2
        z = z + coeff * logits.logsumexp(-1).square().mean() / 2
    expected_grads = torch.autograd.grad(ce + z, list(reference.parameters()))
    out = engine.train_step(list(tokens), 1e-3)
    plain_out = plain.train_step(list(tokens), 1e-3)
    assert out.loss.item() == pytest.approx(ce.item(), rel=1e-6) == plain_out.loss.item()
    assert engine.take_z_loss() == pytest.approx(z.item(), rel=1e-6)
    assert engine.take_z_loss() is None  # taken
    # AdamW's first step from zero moments moves each weight by about lr · sign(gradient)
    moved_apart = 0
    for before, after, other, grad in zip(reference.parameters(), engine.model.parameters(), plain.model.parameters(),
                                          expected_grads, strict=True):
        big = grad.abs() > 1e-6
        assert torch.equal(torch.sign(before - after)[big], torch.sign(grad)[big])
        moved_apart += int((after != other).sum())
    assert moved_apart > 0
