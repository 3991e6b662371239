"""Hugging Face Llama ↔ bigtrain: a table of weight names and a config translation.

bigtrain's RoPE already uses the "rotate half" layout of `LlamaForCausalLM` and its q/k/v are
separate projections, so no weight is permuted or split: conversion is renaming (plus dropping
`lm_head` when embeddings are tied).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from bigtrain.checkpoint import format as fmt
from bigtrain.checkpoint.files import write_file_list
from bigtrain.config import Config, DataConfig, ModelConfig, from_dict, load_config
from bigtrain.convert.consolidate import consolidate
from bigtrain.convert.output import output_dir, refuse_existing
from bigtrain.convert.progress import status, track
from bigtrain.data.tokenizer import EOS_TOKEN
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama

BLOCK = re.compile(r"layers\.(\d+)\.(.+)")
HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")
BLOCK_WEIGHTS = {  # the same names on both sides, inside a block
    "input_layernorm.weight", "post_attention_layernorm.weight",
    *(f"self_attn.{p}_proj.weight" for p in "qkvo"), *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
}


def to_hf_name(name: str, n_layers: int) -> str:
    """`layers.0.embed_tokens.weight` → `model.embed_tokens.weight`, block i → `model.layers.{i-1}`, …"""
    index, rest = BLOCK.fullmatch(name).groups()
    index = int(index)
    if index == 0 and rest == "embed_tokens.weight":
        return "model.embed_tokens.weight"
    if index == n_layers + 1 and rest in ("norm.weight", "lm_head.weight"):
        return "lm_head.weight" if rest == "lm_head.weight" else "model.norm.weight"
    if 0 < index <= n_layers and rest in BLOCK_WEIGHTS:
        return f"model.layers.{index - 1}.{rest}"
    raise BigtrainError(f"weight {name} has no counterpart in Hugging Face's LlamaForCausalLM; to-hf cannot express it")


def from_hf_name(name: str, n_layers: int) -> str:
    if name == "model.embed_tokens.weight":
        return "layers.0.embed_tokens.weight"
    if name in ("model.norm.weight", "lm_head.weight"):
        return f"layers.{n_layers + 1}.{name.removeprefix('model.')}"
    block = HF_BLOCK.fullmatch(name)
    if block is None or block.group(2) not in BLOCK_WEIGHTS:
        raise BigtrainError(f"Hugging Face weight {name} has no counterpart in a bigtrain Llama")
    return f"layers.{int(block.group(1)) + 1}.{block.group(2)}"


def hf_config(m: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim, "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
        "bos_token_id": None, "eos_token_id": 0, "pad_token_id": None, "torch_dtype": "float32",
    }


def model_config_from_hf(hf: dict[str, Any], source: Path) -> dict[str, Any]:
    """bigtrain's `model` section for an HF Llama config; features it cannot express are refused."""
    if hf.get("model_type") != "llama":
        raise BigtrainError(f"{source}: model_type is {hf.get('model_type')!r}; only 'llama' converts")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    unsupported = [
        ("rope_scaling", hf.get("rope_scaling") not in (None, {}) and hf["rope_scaling"].get("rope_type", hf["rope_scaling"].get("type")) != "default"),
        ("hidden_act", hf.get("hidden_act", "silu") != "silu"),
        ("attention_bias", bool(hf.get("attention_bias"))),
        ("mlp_bias", bool(hf.get("mlp_bias"))),
        ("head_dim", hf.get("head_dim") not in (None, hidden // heads)),
    ]
    for key, bad in unsupported:
        if bad:
            raise BigtrainError(f"{source}: {key}={hf.get(key)!r} cannot be expressed by a bigtrain Llama")
    return {
        "vocab_size": hf["vocab_size"], "d_model": hidden, "n_layers": hf["num_hidden_layers"],
        "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "ffn_hidden": hf["intermediate_size"], "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": float(hf.get("rope_theta", 10000.0)), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


def parse_size(text: str) -> int:
    """Bytes in `5GB`, `500MB`, `100KB` or a plain number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not match:
        raise BigtrainError(f"--max-shard-size {text!r} is not a size like 5GB, 500MB or 100KB")
    return int(float(match.group(1)) * 1024 ** " KMG".index(match.group(2) or " "))


def to_hf(checkpoint: str | Path, out: str | Path, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
    """Write a Hugging Face Llama directory (weights, configs, tokenizer) for a bigtrain checkpoint."""
    refuse_existing(Path(out), overwrite)
    full = consolidate(checkpoint)
    m = full.config.model
    tensors = {to_hf_name(name, m.n_layers): w.contiguous() for name, w in full.weights.items()}
    with output_dir(out, overwrite) as tmp:
        write_safetensors(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config(m), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": None}, indent=2))
        tokenizer = full.path / fmt.TOKENIZER
        if tokenizer.is_file():
            write_tokenizer_files(tokenizer, tmp, m.max_seq_len)
    status(f"wrote {out}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} parameters")
    return Path(out)


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` plus the index HF reads when larger."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        safetensors.torch.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(track(shards, "writing safetensors shards"), 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        safetensors.torch.save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer_files(tokenizer: Path, directory: Path, max_len: int) -> None:
    """bigtrain's `tokenizers` JSON plus the configs that make `AutoTokenizer` load it as a
    `PreTrainedTokenizerFast` with `<|endoftext|>` as EOS."""
    shutil.copyfile(tokenizer, directory / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "model_max_length": max_len,
              "clean_up_tokenization_spaces": False, "split_special_tokens": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS_TOKEN}, indent=2))


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise BigtrainError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")
    weights: dict[str, torch.Tensor] = {}
    for file in track(files, "reading safetensors"):
        weights.update(safetensors.torch.load_file(str(hf_dir / file)))
    return weights


def from_hf(hf_dir: str | Path, out: str | Path, overrides: list[str] = (), overwrite: bool = False) -> Path:
    """Make a bigtrain checkpoint (step 0, weights only) of a Hugging Face Llama directory, e.g. for
    `model.init_from`; `overrides` (`key=value`) set the rest of its config."""
    hf_dir, out = Path(hf_dir), Path(out)
    refuse_existing(out, overwrite)
    if not (hf_dir / "config.json").is_file():
        raise BigtrainError(f"{hf_dir} has no config.json (not a Hugging Face model directory)")
    model = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()), hf_dir)
    status(f"reading {hf_dir}")
    hf_weights = read_hf_weights(hf_dir)
    with output_dir(out, overwrite) as tmp:
        seq_len = min(DataConfig().seq_len, model["max_seq_len"])
        fmt.write_config(tmp, from_dict({"model": model, "data": {"seq_len": seq_len}}))
        cfg = load_config(tmp / fmt.CONFIG, list(overrides))  # overrides apply over the HF shape
        llama = _bigtrain_model(hf_weights, cfg, hf_dir)
        fmt.save_weights(llama, tmp)
        fmt.write_config(tmp, cfg)
        fmt.write_state(tmp, {"step": 0, "tokens": 0, "converted_from": str(hf_dir)})
        if (hf_dir / "tokenizer.json").is_file():
            shutil.copyfile(hf_dir / "tokenizer.json", tmp / fmt.TOKENIZER)
        write_file_list(tmp)
    status(f"wrote {out}: {sum(p.numel() for p in llama.parameters()):,} parameters")
    return out


def _bigtrain_model(hf_weights: dict[str, torch.Tensor], cfg: Config, hf_dir: Path) -> Llama:
    n = cfg.model.n_layers
    weights = {from_hf_name(k, n): v.float() for k, v in hf_weights.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.model.tie_embeddings:
        weights.pop(f"layers.{n + 1}.lm_head.weight", None)
    expected = set(fmt.parameter_names(cfg))
    if set(weights) != expected:
        raise BigtrainError(f"{hf_dir}: weights do not match its config.json: missing "
                            f"{sorted(expected - set(weights))[:3]}, unexpected {sorted(set(weights) - expected)[:3]}")
    llama = Llama(cfg.model)
    shapes = {name: tuple(p.shape) for name, p in llama.named_parameters()}
    for name, tensor in weights.items():
        if tuple(tensor.shape) != shapes[name]:
            raise BigtrainError(f"{hf_dir}: {name} has shape {tuple(tensor.shape)}, but the config implies {shapes[name]}")
    llama.load_state_dict(weights, strict=False)
    return llama
