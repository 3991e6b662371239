"""The head's chunked loss in the activation dtype: in fp32 the same bits as before, under bf16
autocast no fp32 matmul (the logits' gradient cast to bf16 once per chunk and used by both
gradient matmuls), gradients within bf16 tolerance of the fp32 reference; chunks a multiple of
128 tokens; with `compiled`, each chunk's element-wise work one graph for every chunk length."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bigtrain.model.loss import ZLoss, add_z_gradient_, default_chunk, linear_cross_entropy

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default, torch.ops.aten.addmm_.default}


def previous_linear_cross_entropy(hidden, weight, targets, chunk, coeff=0.0):
    """The chunked loss as it was (fp32 upcast gradient, `addmm_` into the fp32 weight gradient):
    the loss summed over chunks and the gradients of that sum."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    total = torch.zeros(())
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk].unsqueeze(-1)
        logits = (h @ weight.t()).float()
        lse = logits.logsumexp(dim=-1) if coeff else None
        log_probs = logits.log_softmax(dim=-1)
        total += F.nll_loss(log_probs, t.squeeze(-1), reduction="sum")
        grad = log_probs.exp_()
        if coeff:
            grad = add_z_gradient_(grad, lse, coeff)
        grad = grad.scatter_add_(-1, t, torch.full_like(t, -1, dtype=log_probs.dtype))
        grad_hidden[start:start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
        grad_weight.addmm_(grad.t(), h.float())
    return total, grad_hidden, grad_weight


def inputs(tokens=300, d=64, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, d, generator=g).requires_grad_()
    weight = (0.1 * torch.randn(vocab, d, generator=g)).requires_grad_()
    return hidden, weight, torch.randint(0, vocab, (tokens,), generator=g)


def test_chunks_are_multiples_of_128_tokens():
    assert default_chunk(32000) == 1024  # was 2**25 // 32000 = 1,048
    assert default_chunk(8192) == 4096
    assert default_chunk(50257) == 640
    assert default_chunk(2**20) == 128  # at least one tile
    assert all(default_chunk(v) % 128 == 0 for v in range(1000, 300000, 997))


@pytest.mark.parametrize("coeff", [0.0, 0.01])
def test_fp32_loss_and_gradients_unchanged_bit_for_bit(coeff):
    hidden, weight, targets = inputs()
    total, grad_hidden, grad_weight = previous_linear_cross_entropy(hidden.detach(), weight.detach(), targets, 128,
                                                                    coeff)
    loss = linear_cross_entropy(hidden, weight, targets, 128, z_loss=ZLoss(coeff) if coeff else None)
    n = targets.numel()
    assert torch.equal(loss, total / n)
    got = torch.autograd.grad(loss, (hidden, weight))
    scale = torch.ones(()) / n  # as `scaled_gradients`
    assert torch.equal(got[0], grad_hidden * scale)
    assert torch.equal(got[1], grad_weight * scale)


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matmul dispatched."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.seen.append((str(func), tuple(a.dtype for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def test_no_fp32_matmul_under_bf16_autocast():
    hidden, weight, targets = inputs(tokens=384)
    with MatmulDtypes() as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, targets, 128)
        loss.backward()
    assert len(mode.seen) == 3 * 3  # per chunk: logits, hidden gradient, weight gradient
    fp32 = [entry for entry in mode.seen if torch.float32 in entry[1][-2:]]
    assert not fp32, fp32
    with MatmulDtypes() as fp32_mode:  # fp32 training keeps fp32 matmuls
        linear_cross_entropy(hidden, weight, targets, 128).backward()
    assert all(dtypes[-2:] == (torch.float32, torch.float32) for _, dtypes in fp32_mode.seen)


def test_bf16_gradients_within_tolerance_of_fp32():
    """Against the fp32 reference: the loss within bf16's relative precision, the gradients
    within 1 % (relative to the gradient's largest entry), as close as the previous fp32
    weight-gradient matmul got to a few times over."""
    hidden, weight, targets = inputs(tokens=1024, d=128, vocab=512)
    ref = linear_cross_entropy(hidden, weight, targets, 128)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear_cross_entropy(hidden, weight, targets, 128)
    low_grads = torch.autograd.grad(low, (hidden, weight))
    assert low.dtype == torch.float32 and low_grads[1].dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=4e-3)
    errors = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(low_grads, ref_grads, strict=True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the previous way: fp32 weight-gradient matmul
        _, _, old_weight = previous_linear_cross_entropy(hidden.detach(), weight.detach(), targets, 128)
    old_error = float((old_weight / targets.numel() - ref_grads[1]).abs().max() / ref_grads[1].abs().max())
    print(f"bf16 vs fp32, max error / max entry: hidden {errors[0]:.2e}, weight {errors[1]:.2e} "
          f"(fp32 weight-gradient matmul: {old_error:.2e})")
    assert max(errors) < 1e-2
    assert errors[1] < 4 * old_error + 1e-3


def test_compiled_chunks_same_numbers_one_graph_no_breaks():
    """Chunks of 128, then a shorter last one, then other batch sizes: one graph, no break."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for tokens, coeff in ((300, 0.01), (300, 0.01), (200, 0.01), (129, 0.01)):
        hidden, weight, targets = inputs(tokens=tokens)
        eager = linear_cross_entropy(hidden, weight, targets, 128, z_loss=ZLoss(coeff))
        eager_grads = torch.autograd.grad(eager, (hidden, weight))
        compiled = linear_cross_entropy(hidden, weight, targets, 128, z_loss=ZLoss(coeff), compiled=True)
        compiled_grads = torch.autograd.grad(compiled, (hidden, weight))
        assert compiled.item() == pytest.approx(eager.item(), rel=1e-6)
        for a, b in zip(compiled_grads, eager_grads, strict=True):
            assert (a - b).abs().max() <= 1e-6 * b.abs().max()
    assert counters["stats"]["unique_graphs"] == 1  # every chunk length: one graph, no recompilation
    assert not counters["graph_break"]
