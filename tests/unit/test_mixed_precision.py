"""Mixed precision without waste: RMSNorm, RoPE and SwiGLU keep fp32 only where it matters.

The reference below is the plain-autograd model as it was (norm output and RoPE in fp32, SiLU
output saved): in fp32 the new one gives the same losses and gradients, under bf16 autocast it
saves far fewer bytes for backward and its loss tracks fp32's.
"""

import pytest
import torch
import torch.nn.functional as F

from bigtrain.model import Llama, llama
from tests.helpers import small_model_config


def plain_rms_norm(self, x):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * x32.to(x.dtype)


def plain_rope(x, cos, signed_sin):
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return (x * cos + swapped * signed_sin).to(x.dtype)


def plain_mlp(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.fixture
def plain(monkeypatch):
    """Switch the model back to the plain-autograd norm, RoPE and SwiGLU."""
    def switch():
        monkeypatch.setattr(llama.RMSNorm, "forward", plain_rms_norm)
        monkeypatch.setattr(llama, "apply_rope", plain_rope)
        monkeypatch.setattr(llama.MLP, "forward", plain_mlp)
    return switch


def loss_and_grads(model, tokens, dtype=torch.float32):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_fp32_losses_and_gradients_match_plain_autograd(plain):
    torch.manual_seed(0)
    model = Llama(small_model_config(d_model=64, n_layers=3))
    tokens = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))
    loss, grads = loss_and_grads(model, tokens)
    logits = model(tokens[:, :-1])
    plain()
    ref_loss, ref_grads = loss_and_grads(model, tokens)
    assert torch.equal(model(tokens[:, :-1]), logits)  # the forward is the same bit for bit
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    for (name, _), g, ref in zip(model.named_parameters(), grads, ref_grads, strict=True):
        assert (g - ref).abs().max() <= 1e-6 * ref.abs().max(), name


def activation_bytes_per_token(block, d_model, dtype):
    """Bytes autograd saves for backward per token of one block's forward (weights excluded: the
    difference between two batch sizes leaves what grows with the tokens)."""
    def saved(batch):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.randn(batch, 64, d_model, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast"):
            block(x.to(torch.bfloat16) if dtype == "bf16" else x)
        return sum(storages.values())
    return (saved(4) - saved(2)) / (2 * 64)


@pytest.mark.parametrize("mode,most", [("autocast", 0.7), ("bf16", 0.75), ("fp32", 0.8)])
def test_bytes_saved_for_backward_per_block(plain, mode, most):
    """autocast: the local engine (fp32 weights); bf16: DeepSpeed's bf16 (bf16 weights)."""
    cfg = small_model_config(d_model=256, n_heads=4, n_kv_heads=2, max_seq_len=64)
    block = llama.Block(cfg)
    if mode == "bf16":
        block.to(torch.bfloat16)
    new = activation_bytes_per_token(block, cfg.d_model, mode)
    plain()
    old = activation_bytes_per_token(block, cfg.d_model, mode)
    print(f"{mode}: {old / cfg.d_model:.1f} → {new / cfg.d_model:.1f} bytes per token per d_model")
    assert new <= most * old


def test_bf16_autocast_loss_tracks_fp32():
    """Twenty AdamW steps on one batch: the bf16-autocast loss curve stays within 2 % of fp32's."""
    tokens = torch.randint(0, 97, (8, 17), generator=torch.Generator().manual_seed(1))
    curves = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Llama(small_model_config(d_model=64))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curves[dtype] = []
        for _ in range(20):
            loss, _ = loss_and_grads(model, tokens, dtype)
            opt.step()
            curves[dtype].append(loss.item())
    assert curves[torch.bfloat16][-1] < curves[torch.bfloat16][0] - 0.5  # it learns
    assert curves[torch.bfloat16] == pytest.approx(curves[torch.float32], rel=0.02)
