"""Logit parity of `bigtrain convert` with Hugging Face's Llama, Qwen3 and Qwen3-MoE (RoPE scaling
included, and bigtrain's RoPE tables against transformers' rotary embedding), against whichever
transformers is importable: run in-process by tests/unit/test_convert_qwen3.py (the venv's 4.x)
and as `python -m tests.hf_parity` under transformers 5.x (tests/single_process/test_convert.py),
which prints one JSON object: the version and each check's largest logit difference."""

import dataclasses
import inspect
import json
import sys
import tempfile
from pathlib import Path

import torch

from bigtrain.checkpoint import format as fmt
from bigtrain.checkpoint.files import write_file_list
from bigtrain.checkpoint.io import load_trained_model
from bigtrain.cli import main
from bigtrain.config import from_dict
from bigtrain.model import Llama
from bigtrain.model.llama import rope_tables, share_rope_tables
from bigtrain.model.rope import inverse_frequencies

TOLERANCE = 1e-5
SHAPE = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 32, "rope_theta": 50000.0,
         "rms_norm_eps": 1e-6}
# Hugging Face models to read: name → (model_type, config keys beyond SHAPE)
HF_CASES = {
    "llama": ("llama", {}),
    "qwen3": ("qwen3", {}),
    "qwen3-tied": ("qwen3", {"tie_word_embeddings": True}),
    "qwen3-moe": ("qwen3_moe", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                "norm_topk_prob": True, "mlp_only_layers": [0], "router_aux_loss_coef": 0.02}),
    "qwen3-moe-step2": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                      "decoder_sparse_step": 2, "norm_topk_prob": False}),
    # as real Qwen3 checkpoints: heads × head_dim (4 × 32) is wider than hidden_size (64)
    "qwen3-head-dim": ("qwen3", {"hidden_size": 64, "head_dim": 32}),
    "qwen3-moe-head-dim": ("qwen3_moe", {"hidden_size": 64, "head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 16, "norm_topk_prob": True}),
    # RoPE scaling from a context of 8 to 32 (as Llama 3.1 from 8k to 128k; Qwen3's YaRN to 128k)
    "llama-llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
    "llama-yarn": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}}),
    "qwen3-yarn": ("qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                              "beta_fast": 64.0, "beta_slow": 0.5, "truncate": False}}),
}
# bigtrain models to write: name → model config keys beyond the shape
BIGTRAIN_SHAPE = {"vocab_size": 97, "d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 48,
                  "max_seq_len": 32, "rope_theta": 50000.0, "norm_eps": 1e-6, "qk_norm": True}
BIGTRAIN_CASES = {
    "llama": {"qk_norm": False},
    "qwen3": {"tie_embeddings": True},
    "qwen3-moe": {"moe": {"experts": 8, "top_k": 2, "ffn_hidden": 16, "first_dense": 1, "aux_loss": 0.02}},
    "qwen3-moe-every2": {"moe": {"experts": 6, "top_k": 2, "ffn_hidden": 24, "every": 2, "normalize_top_k": False}},
    "qwen3-head-dim": {"d_model": 64, "head_dim": 32},
    "qwen3-moe-head-dim": {"d_model": 64, "head_dim": 32, "moe": {"experts": 4, "top_k": 2, "ffn_hidden": 16}},
    "llama-llama3": {"qk_norm": False, "rope_scaling": {"type": "llama3", "factor": 4.0, "original_max_seq_len": 8,
                                                        "low_freq_factor": 2.0, "high_freq_factor": 8.0}},
    "llama-yarn": {"qk_norm": False, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_seq_len": 8}},
    "qwen3-yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_seq_len": 8, "attention_factor": 1.25,
                                    "beta_slow": 0.5, "truncate": False}},
    # µP (width multiplier 4 and 2): output multiplier and 1/head_dim folded into the weights
    "llama-mup": {"qk_norm": False, "parametrization": "mup", "mup_base_width": 8},
    "qwen3-mup-tied": {"tie_embeddings": True, "parametrization": "mup", "mup_base_width": 16},
    "qwen3-moe-mup": {"parametrization": "mup", "mup_base_width": 8,
                      "moe": {"experts": 4, "top_k": 2, "ffn_hidden": 16, "first_dense": 1}},
}
# RoPE tables against Hugging Face's rotary embedding: name → (head_dim, rope_theta, max_seq_len, rope_scaling)
ROPE_CASES = {
    "llama3-8": (128, 500000.0, 16384, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3-32": (64, 500000.0, 16384, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0,
                                        "high_freq_factor": 8.0, "original_max_position_embeddings": 512}),
    "llama3-2": (128, 10000.0, 8192, {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 4096}),
    "yarn-4": (128, 1000000.0, 16384, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
    "yarn-8": (64, 10000.0, 16384, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048,
                                    "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}),
    "yarn-16-mscale": (128, 10000.0, 16384, {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 1024,
                                             "mscale": 1.0, "mscale_all_dim": 0.5}),
    "yarn-2-attention": (64, 50000.0, 8192, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096,
                                             "attention_factor": 1.2}),
}
ARCHITECTURE = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def tokens(vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def perturb(named_parameters) -> None:
    """Norm weights away from their initial ones (so that a swapped or dropped norm shows in the
    logits) and routers away from near-uniform (transformers 5.x even starts them at zero: every
    expert tied), so that each token's top-k is clear."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in named_parameters:
            if "norm" in name:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=generator))
            elif name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.copy_(torch.empty(p.shape).normal_(0.0, 0.5, generator=generator))


def random_hf_model(name: str):
    """A seeded fp32 Qwen3 or Qwen3-MoE of `HF_CASES[name]`, built by transformers."""
    import transformers

    model_type, extra = HF_CASES[name]
    config = transformers.AutoConfig.for_model(model_type, **{**SHAPE, **extra})
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb(model.named_parameters())
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_from_hf(name: str, tmp: Path, fused: bool = False) -> float:
    """from-hf of a random Hugging Face model: bigtrain's logits against transformers'; `fused`:
    saved in transformers 5.x's own layout (stacked experts) rather than the per-expert one."""
    hf = random_hf_model(name)
    hf.save_pretrained(tmp / "hf", **({"save_original_format": False} if fused else {}))
    assert main(["convert", "from-hf", str(tmp / "hf"), str(tmp / "bt")]) == 0
    model, cfg, _ = load_trained_model(tmp / "bt", torch.device("cpu"))
    model_type, extra = HF_CASES[name]
    m = cfg.model
    scaling = extra.get("rope_scaling")
    assert (m.rope_scaling is None if scaling is None else (m.rope_scaling.type, m.rope_scaling.factor, m.rope_scaling.original_max_seq_len)
            == (scaling["rope_type"], scaling["factor"], scaling["original_max_position_embeddings"]))
    assert (m.qk_norm, m.tie_embeddings, m.d_model, m.head_dim, m.rope_theta) == (
        model_type != "llama", extra.get("tie_word_embeddings", False), extra.get("hidden_size", 32),
        extra.get("head_dim", 8), 50000.0)
    if model_type == "qwen3_moe":
        dense = extra.get("mlp_only_layers", [])
        assert (m.moe.experts, m.moe.top_k, m.moe.ffn_hidden, m.moe.every, m.moe.first_dense, m.moe.normalize_top_k) == (
            extra["num_experts"], 2, extra["moe_intermediate_size"], extra.get("decoder_sparse_step", 1), len(dense),
            extra["norm_topk_prob"])
        assert m.moe.aux_loss == extra.get("router_aux_loss_coef", 0.001)
        assert [m.is_moe_block(i) for i in range(3)] == [hf.model.layers[i].mlp.__class__.__name__ == "Qwen3MoeSparseMoeBlock"
                                                          for i in range(3)]
    else:
        assert m.moe.experts == 0
    with torch.no_grad():
        diff = max_diff(model(tokens()), hf(tokens()).logits)
        if scaling is not None:  # the scaling shows in the logits: without it they are far off
            share_rope_tables(model.layers, dataclasses.replace(m, rope_scaling=None), torch.device("cpu"))
            assert max_diff(model(tokens()), hf(tokens()).logits) > 1e-3
    assert diff <= TOLERANCE, diff
    return diff


def write_checkpoint(model: Llama, cfg, directory: Path) -> None:
    """A weights-only bigtrain checkpoint of `model` (what from-hf writes)."""
    directory.mkdir()
    fmt.save_weights(model, directory)
    fmt.write_config(directory, cfg)
    fmt.write_state(directory, {"step": 0, "tokens": 0})
    write_file_list(directory)


def check_to_hf(name: str, tmp: Path) -> float:
    """to-hf of a random bigtrain model: transformers' logits against bigtrain's, the architecture
    named in config.json, and from-hf of the export giving back the same model config."""
    import transformers

    cfg = from_dict({"model": {**BIGTRAIN_SHAPE, **BIGTRAIN_CASES[name]}, "data": {"seq_len": 32}})
    model = Llama(cfg.model, seed=11).eval()
    perturb(model.named_parameters())
    write_checkpoint(model, cfg, tmp / "bt")
    assert main(["convert", "to-hf", str(tmp / "bt"), str(tmp / "hf")]) == 0
    model_type = "qwen3_moe" if cfg.model.moe.experts else "qwen3" if cfg.model.qk_norm else "llama"
    config = json.loads((tmp / "hf" / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == ([ARCHITECTURE[model_type]], model_type)
    scaling = cfg.model.rope_scaling
    assert (config["rope_scaling"] or {}).get("rope_type") == (scaling and scaling.type)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32, local_files_only=True).eval()
    assert type(hf).__name__ == ARCHITECTURE[model_type]
    with torch.no_grad():
        diff = max_diff(hf(tokens()).logits, model(tokens()))
    assert diff <= TOLERANCE, diff

    assert main(["convert", "from-hf", str(tmp / "hf"), str(tmp / "again")]) == 0
    _, again, _ = load_trained_model(tmp / "again", torch.device("cpu"))
    exported = cfg.model  # a µP model comes back as the standard-parametrization model it exported as
    if exported.parametrization == "mup":
        exported = dataclasses.replace(exported, parametrization="standard", mup_base_width=256, tie_embeddings=False)
    assert dataclasses.asdict(again.model) == dataclasses.asdict(exported)
    return diff


def check_rope(name: str, tmp: Path | None = None) -> float:
    """bigtrain's RoPE tables (`rope_tables`) against the cos and sin of transformers'
    `LlamaRotaryEmbedding` for `ROPE_CASES[name]`, and the inverse frequencies and attention factor
    against its own: the largest difference."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_dim, theta, max_len, scaling = ROPE_CASES[name]
    hf_cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=max_len, rope_theta=theta, rope_scaling=dict(scaling))
    rotary = LlamaRotaryEmbedding(hf_cfg)
    ours = {"type": scaling["rope_type"], "original_max_seq_len": scaling["original_max_position_embeddings"],
            **{k: v for k, v in scaling.items() if k not in ("rope_type", "original_max_position_embeddings")}}
    m = from_dict({"model": {"n_heads": 4, "d_model": 4 * head_dim, "max_seq_len": max_len, "rope_theta": theta,
                             "rope_scaling": ours}}).model
    inv_freq, factor = inverse_frequencies(m.head_dim, m.rope_theta, m.rope_scaling)
    assert abs(factor - rotary.attention_scaling) <= 1e-12, (factor, rotary.attention_scaling)
    cos, signed_sin = rope_tables(m)
    with torch.no_grad():
        hf_cos, hf_sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(max_len)[None])
    sign = torch.cat([-torch.ones(head_dim // 2), torch.ones(head_dim // 2)])
    return max(max_diff(inv_freq, rotary.inv_freq), max_diff(cos, hf_cos[0]), max_diff(signed_sin * sign, hf_sin[0]))


def run_all() -> dict:
    """Every check in a fresh directory: {"transformers": version, check name: largest logit difference}."""
    import transformers

    fused = "save_original_format" in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters
    checks = {f"from-hf {n}": lambda tmp, n=n: check_from_hf(n, tmp) for n in HF_CASES}
    if fused:
        checks.update({f"from-hf {n} fused": lambda tmp, n=n: check_from_hf(n, tmp, fused=True)
                       for n in HF_CASES if "moe" in n})
    checks.update({f"to-hf {n}": lambda tmp, n=n: check_to_hf(n, tmp) for n in BIGTRAIN_CASES})
    checks.update({f"rope {n}": lambda tmp, n=n: check_rope(n) for n in ROPE_CASES})
    results = {"transformers": transformers.__version__}
    for check, function in checks.items():
        with tempfile.TemporaryDirectory() as tmp:
            results[check] = function(Path(tmp))
    return results


if __name__ == "__main__":
    print(json.dumps(run_all()))
    sys.exit(0)
