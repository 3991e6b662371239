"""bigtrain's `model` section ↔ the config.json of Hugging Face's `LlamaForCausalLM`,
`Qwen3ForCausalLM` and `Qwen3MoeForCausalLM`.

The architecture follows from the model: a Mixture of Experts is Qwen3-MoE, per-head q/k norms
alone are Qwen3, otherwise Llama. Reading accepts config.json as transformers 4.x and 5.x write it
(5.x: `rope_parameters` in place of `rope_theta` and `rope_scaling`, `num_local_experts` for
`num_experts`), RoPE scaling of types llama3 and yarn included, and refuses, in one line naming
the key, every feature bigtrain cannot express.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigtrain.config import ModelConfig, RopeScalingConfig
from bigtrain.errors import BigtrainError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def hf_model_type(m: ModelConfig) -> str:
    """The Hugging Face `model_type` that expresses `m`; refuses what none of them can."""
    if m.moe.experts == 0:
        return "qwen3" if m.qk_norm else "llama"
    if not m.qk_norm:
        raise BigtrainError("model.qk_norm=false: Qwen3MoeForCausalLM always normalises q and k, so to-hf of a "
                            "Mixture of Experts needs model.qk_norm=true")
    if m.moe.shared_experts:
        raise BigtrainError(f"model.moe.shared_experts={m.moe.shared_experts}: Qwen3MoeForCausalLM has no shared "
                            "experts, so to-hf cannot express it")
    return "qwen3_moe"


def hf_config(m: ModelConfig) -> dict[str, Any]:
    """config.json of the Hugging Face model that `m` converts to (see `hf_model_type`)."""
    model_type = hf_model_type(m)
    config = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim, "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_scaling": _rope_scaling_to_hf(m.rope_scaling), "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": m.tie_embeddings and m.parametrization != "mup",  # µP: untied (`fold_mup`) "initializer_range": m.init_std,
        "bos_token_id": None, "eos_token_id": 0, "pad_token_id": None, "torch_dtype": "float32",
    }
    if model_type == "llama":
        return {**config, "mlp_bias": False}
    config.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layers)
    if model_type == "qwen3_moe":  # HF's routing is dropless: a capacity_factor and the z-loss stay behind
        moe = m.moe
        config.update(num_experts=moe.experts, num_experts_per_tok=moe.top_k,
                      moe_intermediate_size=m.expert_ffn_dim, decoder_sparse_step=moe.every,
                      mlp_only_layers=list(range(moe.first_dense)), norm_topk_prob=moe.normalize_top_k,
                      router_aux_loss_coef=moe.aux_loss, output_router_logits=False)
    return config


def _rope_scaling_to_hf(r: RopeScalingConfig | None) -> dict[str, Any] | None:
    """transformers' `rope_scaling` (4.x's key, which 5.x reads into `rope_parameters`) for `r`."""
    if r is None:
        return None
    default = RopeScalingConfig(r.type, r.factor, r.original_max_seq_len)
    extra = {key: getattr(r, key) for key in RopeScalingConfig.PARAMETERS[r.type]  # llama3 requires both of its
             if r.type == "llama3" or getattr(r, key) != getattr(default, key)}
    return {"rope_type": r.type, "factor": r.factor, "original_max_position_embeddings": r.original_max_seq_len, **extra}


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling parameters) of a 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`) config."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta), params


def _rope_scaling_from_hf(hf: dict[str, Any], params: dict[str, Any], source: Path) -> dict[str, Any] | None:
    """bigtrain's `model.rope_scaling` for a config's RoPE parameters; refuses types other than llama3 and yarn."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in RopeScalingConfig.PARAMETERS:
        key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        raise BigtrainError(f"{source}: {key} of rope_type {rope_type!r} cannot be expressed by a bigtrain model "
                            "(only llama3 and yarn)")
    max_len = hf.get("max_position_embeddings", 2048)
    original = params.get("original_max_position_embeddings") or max_len  # transformers' fallback
    scaling = {"type": rope_type, "factor": float(params.get("factor") or max_len / original),
               "original_max_seq_len": original}
    for key in RopeScalingConfig.PARAMETERS[rope_type]:
        if params.get(key) is not None:
            scaling[key] = params[key] if key == "truncate" else float(params[key])
    return scaling


def _moe_from_hf(hf: dict[str, Any], source: Path) -> dict[str, Any]:
    """bigtrain's `model.moe` for a Qwen3-MoE config; its MoE blocks must be every k-th block after
    a leading run of dense ones (`mlp_only_layers` a prefix, in effect)."""
    experts = hf.get("num_experts", hf.get("num_local_experts", 0))
    if not experts:
        return {}
    layers, every = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
    dense = set(hf.get("mlp_only_layers") or [])
    first_dense = next(i for i in range(layers + 1) if i not in dense)
    theirs = [i for i in range(layers) if i not in dense and (i + 1) % every == 0]
    ours = [i for i in range(layers) if i >= first_dense and (i + 1) % every == 0]
    if theirs != ours:
        raise BigtrainError(f"{source}: mlp_only_layers={sorted(dense)!r} cannot be expressed by a bigtrain model "
                            "(only a leading run of dense blocks: model.moe.first_dense)")
    return {"experts": experts, "top_k": hf.get("num_experts_per_tok", 8),
            "ffn_hidden": hf.get("moe_intermediate_size", 768), "every": every, "first_dense": first_dense,
            "normalize_top_k": bool(hf.get("norm_topk_prob", False)),
            "aux_loss": float(hf.get("router_aux_loss_coef", 0.001))}


def model_config_from_hf(hf: dict[str, Any], source: Path) -> dict[str, Any]:
    """bigtrain's `model` section for a Llama, Qwen3 or Qwen3-MoE config.json; features it cannot
    express are refused."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise BigtrainError(f"{source}: model_type is {model_type!r}; only {', '.join(map(repr, ARCHITECTURES))} convert")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    theta, rope = _rope(hf)
    head_dim = hf.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads)  # transformers' defaults
    layer_types = hf.get("layer_types") or []
    unsupported = [
        ("hidden_act", hf.get("hidden_act", "silu") != "silu"),
        ("attention_bias", bool(hf.get("attention_bias"))),
        ("mlp_bias", bool(hf.get("mlp_bias"))),
        ("use_sliding_window", bool(hf.get("use_sliding_window"))),
        ("layer_types", any(t != "full_attention" for t in layer_types)),
    ]
    for key, bad in unsupported:
        if bad:
            raise BigtrainError(f"{source}: {key}={hf.get(key)!r} cannot be expressed by a bigtrain model")
    model = {
        "vocab_size": hf["vocab_size"], "d_model": hidden, "n_layers": hf["num_hidden_layers"],
        "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
        **({"head_dim": head_dim} if head_dim * heads != hidden else {}),
        "ffn_hidden": hf["intermediate_size"], "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": theta, "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)), "qk_norm": model_type != "llama",
    }
    scaling = _rope_scaling_from_hf(hf, rope, source)
    if scaling:
        model["rope_scaling"] = scaling
    moe = _moe_from_hf(hf, source) if model_type == "qwen3_moe" else {}
    return {**model, "moe": moe} if moe else model
