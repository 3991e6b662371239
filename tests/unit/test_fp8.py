"""train.precision=fp8: refused in one line where it cannot run; on the model, exactly the block
linears become torchao float8 linears and checkpoint names stay the same."""

from pathlib import Path

import pytest
import torch
from torch import nn

from bigtrain.engine import device as device_policy
from bigtrain.engine.device import resolve_precision
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from tests.helpers import small_model_config

CONFIGS = Path(__file__).parents[2] / "configs"
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA device of the given compute capability (nothing runs on it)."""
    def with_capability(major, minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Pretend GPU")
        return torch.device("cuda")
    return with_capability


def test_refused_on_cpu_and_before_hopper_or_ada(gpu):
    with pytest.raises(BigtrainError, match=r"train.precision=fp8 needs a CUDA GPU of compute capability >= 8.9"):
        resolve_precision("fp8", torch.device("cpu"), "local")
    with pytest.raises(BigtrainError, match=r"Pretend GPU has 8.0; use bf16"):
        resolve_precision("fp8", gpu(8, 0), "local")  # A100
    with pytest.raises(BigtrainError, match="parallel.engine=local only"):
        resolve_precision("fp8", gpu(9, 0), "deepspeed")
    assert resolve_precision("fp8", gpu(8, 9), "local") == "fp8"  # Ada
    assert resolve_precision("fp8", gpu(9, 0), "local") == "fp8"  # Hopper


def test_missing_torchao_names_the_extra(gpu, monkeypatch):
    monkeypatch.setattr(device_policy.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BigtrainError, match=r"needs torchao: pip install 'bigtrain\[fp8\]'"):
        resolve_precision("fp8", gpu(9, 0), "local")


def test_float8_swaps_exactly_the_block_linears_and_keeps_checkpoint_names():
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    from bigtrain.parallel.float8 import apply_float8

    torch.manual_seed(0)
    model = Llama(small_model_config(d_model=64, n_heads=4, n_kv_heads=2, tie_embeddings=False))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    apply_float8(model.layers)
    converted = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    expected = {f"layers.{i}.{part}.{proj}" for i in (1, 2) for part, projs in
                (("self_attn", BLOCK_LINEARS[:4]), ("mlp", BLOCK_LINEARS[4:])) for proj in projs}
    assert converted == expected
    assert type(model.layers[-1].lm_head).__name__ == "LMHead"
    assert type(model.layers[0].embed_tokens) is nn.Embedding
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
