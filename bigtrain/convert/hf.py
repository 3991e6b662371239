"""Hugging Face Llama, Qwen3 and Qwen3-MoE ↔ bigtrain: a table of weight names, the stacked
experts split per expert (and stacked back), and a config translation (`hf_config`).

bigtrain's RoPE already uses the "rotate half" layout of `LlamaForCausalLM` and its q/k/v are
separate projections, so no weight is permuted or split: conversion is renaming (plus dropping
`lm_head` when embeddings are tied). A MoE block's experts, stacked in bigtrain, are written as one
`nn.Linear` weight per expert (the layout of transformers 4.x, which 5.x converts when loading);
reading also takes 5.x's fused `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`.
A µP model's multipliers are folded into its weights (`fold_mup`), so the export is a plain model.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import safetensors.torch
import torch

from bigtrain.checkpoint import format as fmt
from bigtrain.checkpoint.files import write_file_list
from bigtrain.checkpoint.io import open_checkpoint
from bigtrain.config import Config, DataConfig, ModelConfig, from_dict, load_config
from bigtrain.convert.consolidate import consolidate
from bigtrain.convert.hf_config import hf_config, model_config_from_hf
from bigtrain.convert.output import output_dir, refuse_existing
from bigtrain.convert.progress import status, track
from bigtrain.data.tokenizer import EOS_TOKEN
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from bigtrain.model.mup import attention_scale, output_multiplier

BLOCK = re.compile(r"layers\.(\d+)\.(.+)")
HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")
BLOCK_WEIGHTS = {  # the same names on both sides, inside a block
    "input_layernorm.weight", "post_attention_layernorm.weight",
    *(f"self_attn.{p}_proj.weight" for p in "qkvo"), *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
}
RENAMED = {"mlp.router.weight": "mlp.gate.weight"}  # bigtrain → Hugging Face, inside a block
HF_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")  # one expert's nn.Linear
HF_FUSED = re.compile(r"mlp\.experts\.(gate_up_proj|down_proj)")  # transformers 5.x: all experts, stacked
EXPERTS = re.compile(r"mlp\.experts\.(gate|up|down)_proj")  # bigtrain: stacked [experts, out, in]


def to_hf_name(name: str, n_layers: int) -> str:
    """`layers.0.embed_tokens.weight` → `model.embed_tokens.weight`, block i → `model.layers.{i-1}`, …"""
    index, rest = BLOCK.fullmatch(name).groups()
    index = int(index)
    if index == 0 and rest == "embed_tokens.weight":
        return "model.embed_tokens.weight"
    if index == n_layers + 1 and rest in ("norm.weight", "lm_head.weight"):
        return "lm_head.weight" if rest == "lm_head.weight" else "model.norm.weight"
    if 0 < index <= n_layers and (rest in BLOCK_WEIGHTS or rest in RENAMED):
        return f"model.layers.{index - 1}.{RENAMED.get(rest, rest)}"
    raise BigtrainError(f"weight {name} has no counterpart in Hugging Face's Llama or Qwen3 models; to-hf cannot express it")


def from_hf_name(name: str, n_layers: int) -> str:
    if name == "model.embed_tokens.weight":
        return "layers.0.embed_tokens.weight"
    if name in ("model.norm.weight", "lm_head.weight"):
        return f"layers.{n_layers + 1}.{name.removeprefix('model.')}"
    block = HF_BLOCK.fullmatch(name)
    renamed = {hf: ours for ours, hf in RENAMED.items()}
    if block is None or (block.group(2) not in BLOCK_WEIGHTS and block.group(2) not in renamed):
        raise BigtrainError(f"Hugging Face weight {name} has no counterpart in a bigtrain model")
    return f"layers.{int(block.group(1)) + 1}.{renamed.get(block.group(2), block.group(2))}"


def to_hf_weights(weights: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face's tensors for bigtrain's one-process weights: renamed, stacked experts split."""
    out = {}
    for name, w in weights.items():
        index, rest = BLOCK.fullmatch(name).groups()
        experts = EXPERTS.fullmatch(rest)
        if experts and 0 < int(index) <= n_layers:
            for e, expert in enumerate(w.unbind(0)):
                out[f"model.layers.{int(index) - 1}.mlp.experts.{e}.{experts.group(1)}_proj.weight"] = expert.contiguous()
        else:
            out[to_hf_name(name, n_layers)] = w.contiguous()
    return out


def from_hf_weights(hf_weights: dict[str, torch.Tensor], n_layers: int, hf_dir: Path) -> dict[str, torch.Tensor]:
    """bigtrain's weights (fp32) for Hugging Face's tensors: renamed, per-expert ones stacked."""
    weights, per_expert = {}, {}
    for name, w in hf_weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        block = HF_BLOCK.fullmatch(name)
        expert = block and HF_EXPERT.fullmatch(block.group(2))
        fused = block and HF_FUSED.fullmatch(block.group(2))
        prefix = f"layers.{int(block.group(1)) + 1}.mlp.experts" if block else ""
        if expert:
            per_expert.setdefault(f"{prefix}.{expert.group(2)}_proj", {})[int(expert.group(1))] = w
        elif fused and fused.group(1) == "gate_up_proj":  # [experts, 2·ffn, d]: gate rows, then up rows
            weights[f"{prefix}.gate_proj"], weights[f"{prefix}.up_proj"] = w.float().chunk(2, dim=1)
        elif fused:
            weights[f"{prefix}.down_proj"] = w.float()
        else:
            weights[from_hf_name(name, n_layers)] = w.float()
    for name, tensors in per_expert.items():
        if sorted(tensors) != list(range(len(tensors))):
            raise BigtrainError(f"{hf_dir}: the experts of {name} are numbered {sorted(tensors)}, not 0..{len(tensors) - 1}")
        weights[name] = torch.stack([tensors[e].float() for e in range(len(tensors))])
    return weights


def parse_size(text: str) -> int:
    """Bytes in `5GB`, `500MB`, `100KB` or a plain number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not match:
        raise BigtrainError(f"--max-shard-size {text!r} is not a size like 5GB, 500MB or 100KB")
    return int(float(match.group(1)) * 1024 ** " KMG".index(match.group(2) or " "))


def to_hf(checkpoint: str | Path, out: str | Path, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
    """Write a Hugging Face Llama, Qwen3 or Qwen3-MoE directory (weights, configs, tokenizer) for a
    bigtrain checkpoint."""
    refuse_existing(Path(out), overwrite)
    config = hf_config(fmt.read_config(open_checkpoint(checkpoint)).model)  # refusals come before reading weights
    full = consolidate(checkpoint)
    m = full.config.model
    tensors = to_hf_weights(fold_mup(full.weights, m), m.n_layers)
    with output_dir(out, overwrite) as tmp:
        write_safetensors(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": None}, indent=2))
        tokenizer = full.path / fmt.TOKENIZER
        if tokenizer.is_file():
            write_tokenizer_files(tokenizer, tmp, m.max_seq_len)
    status(f"wrote {out}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} parameters")
    return Path(out)


def fold_mup(weights: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of the standard-parametrization model that computes what µP model `m` does:
    the output multiplier 1/m folded into `lm_head` (a tied head is untied: the embedding keeps its
    values; `hf_config` then says untied), and the attention scale 1/head_dim into the queries
    (times sqrt(head_dim), as Hugging Face scales by 1/sqrt(head_dim); a linear factor on q commutes
    with RoPE): into `q_norm` with qk-norm (which would undo a factor on `q_proj`), else `q_proj`."""
    if m.parametrization != "mup":
        return weights
    out = dict(weights)
    head = f"layers.{m.n_layers + 1}.lm_head.weight"
    out[head] = out.get(head, weights["layers.0.embed_tokens.weight"]) * output_multiplier(m)
    q_factor = attention_scale(m) * math.sqrt(m.head_dim)
    for i in range(1, m.n_layers + 1):
        q = f"layers.{i}.self_attn.{'q_norm' if m.qk_norm else 'q_proj'}.weight"
        out[q] = weights[q] * q_factor
    return out


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
    """Make a bigtrain checkpoint (step 0, weights only) of a Hugging Face Llama, Qwen3 or Qwen3-MoE
    directory, e.g. for `model.init_from`; `overrides` (`key=value`) set the rest of its config."""
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
    weights = from_hf_weights(hf_weights, n, hf_dir)
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
