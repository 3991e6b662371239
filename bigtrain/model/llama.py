"""The Llama-style decoder, written as a flat list of layers: embedding, N blocks, norm + head.

The list form lets one definition serve three engines: run as a plain module here, wrapped by
DeepSpeed ZeRO, or cut into pipeline stages. No parallelism lives in this file. RoPE uses the
"rotate half" layout of Hugging Face's `LlamaForCausalLM`, so weights map to it by name alone.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.model.loss import ZLoss, linear_cross_entropy
from bigtrain.model.mlp import MLP
from bigtrain.model.moe import MoE
from bigtrain.model.mup import attention_scale, init_multiplier, output_multiplier
from bigtrain.model.pointwise import rms_norm
from bigtrain.model.rope import inverse_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape [max_seq_len, head_dim] for rotary position embeddings
    (`model.rope_theta`, scaled by `model.rope_scaling`: bigtrain/model/rope.py).

    The sin table carries rotate-half's sign (negated on the first half), so `apply_rope` needs
    only a flip of the halves, whose gradient is again a flip (no zero-filled slice gradients).
    """
    inv_freq, scale = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([angles, angles], dim=-1).cos(), angles.sin()
    if scale != 1.0:  # YaRN's attention factor, applied to cos and sin as Hugging Face does
        cos, sin = cos * scale, sin * scale
    return cos, torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x ([batch, seq, heads, head_dim]; the tables broadcast to it) by position: x·cos + rotate_half(x)·sin, where
    rotate_half(x) = [−x₂, x₁] is computed as [x₂, x₁] times the signed sin (bit for bit the same)."""
    cos, signed_sin = cos.to(x.dtype), signed_sin.to(x.dtype)  # as Megatron-LM and HF: tables in x's dtype
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return x * cos + swapped * signed_sin


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The document of every token of packed windows [b, t]: documents end with `eos_id` (`prepare`
    ends each with it), so a token's document is the number of EOS tokens before it."""
    eos = (tokens == eos_id).int()
    return eos.cumsum(-1) - eos


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document (from 0 at the window's start for the first) [b, t]."""
    index = torch.arange(documents.shape[-1], device=documents.device).expand_as(documents)
    starts = documents != F.pad(documents, (1, 0), value=-1)[:, :-1]
    return index - torch.where(starts, index, 0).cummax(-1).values


def same_document_causal(documents: torch.Tensor) -> torch.Tensor:
    """The block-diagonal causal mask [b, 1, t, t]: query i sees key j <= i of its own document."""
    t = documents.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=documents.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: torch.Tensor,
                            compiled: bool, scale: float | None = None) -> torch.Tensor:
    """FlexAttention with a document `BlockMask` (q, k, v [b, heads, t, head_dim]): blocks that
    cross no boundary run dense, blocks of other documents are skipped. The mask is built once
    per `documents` tensor (every block of a forward pass gets the same one). `scale`: of the
    scores (None: 1/sqrt(head_dim))."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compiled_flex() if compiled else flex_attention
    return attend(q, k, v, block_mask=_document_block_mask(documents), scale=scale, enable_gqa=q.shape[1] != k.shape[1])


_block_masks: dict[int, tuple[torch.Tensor, object]] = {}


def _document_block_mask(documents: torch.Tensor):
    cached = _block_masks.get(id(documents))
    if cached is not None and cached[0] is documents:
        return cached[1]
    from torch.nn.attention.flex_attention import create_block_mask

    def mask(b, h, q_index, kv_index):
        return (documents[b, q_index] == documents[b, kv_index]) & (q_index >= kv_index)

    t = documents.shape[-1]
    block_mask = create_block_mask(mask, documents.shape[0], None, t, t, device=documents.device)
    _block_masks.clear()  # one forward pass at a time
    _block_masks[id(documents)] = (documents, block_mask)
    return block_mask


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class CausalAttention(nn.Module):
    """The attention core: causal grouped-query `scaled_dot_product_attention` of q, k, v laid out
    [batch, seq, heads, head_dim] (sequence parallelism wraps it in its all-to-all). Given each
    token's `documents` [batch, seq] (document masking), a token attends only to earlier tokens of
    its own document: FlexAttention on CUDA, SDPA with the block-diagonal mask elsewhere. `scale`
    multiplies the scores (None: 1/sqrt(head_dim); µP: 1/head_dim)."""

    def __init__(self, scale: float | None = None):
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = q.shape[1] != k.shape[1]
        if documents is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        elif q.is_cuda:
            y = flex_document_attention(q, k, v, documents, compiled=True, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=same_document_causal(documents), scale=self.scale,
                                               enable_gqa=gqa)
        return y.transpose(1, 2)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads and rotary positions.

    `seq_shard` k says this module sees tokens [k·t, (k+1)·t) of each window (t its input length:
    sequence parallelism gives each rank one such slice), so RoPE rotates by global positions.
    With document masking it gets the whole window's `documents` (and, to restart RoPE at each
    document, `positions`), each [batch, seq_len].
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:  # Qwen3: each head's query and key normalised before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.core = CausalAttention(attention_scale(cfg))
        self.seq_shard = 0

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, documents: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        mine = slice(self.seq_shard * t, (self.seq_shard + 1) * t)
        if positions is None:
            cos, sin = cos[mine, None], sin[mine, None]  # [t, 1, head_dim]: the same for every head
        else:
            cos, sin = cos[positions[:, mine], None], sin[positions[:, mine], None]  # [b, t, 1, head_dim]
        q, k = self.q_proj(x).view(b, t, -1, self.head_dim), self.k_proj(x).view(b, t, -1, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        core = self.core(q, k, v) if documents is None else self.core(q, k, v, documents)
        return self.o_proj(core.reshape(b, t, -1))


class Block(nn.Module):
    """Pre-norm transformer block number `index` (from 0): its feed-forward is a Mixture of Experts
    where `cfg.is_moe_block(index)`, else an MLP. It carries RoPE tables so that it stands alone; in
    a model (or pipeline stage) every block holds the same pair (`share_rope_tables`, the `Materializer`)."""

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg, index) if cfg.is_moe_block(index) else MLP(cfg)
        cos, sin = rope_tables(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, documents: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), self.cos, self.sin, documents, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)


class LMHead(nn.Linear):
    """The projection to vocabulary logits; given targets it returns their mean cross-entropy
    instead, without ever holding the full-vocabulary logits (`linear_cross_entropy`, with the
    logits' `z_loss` if given); `compiled` (set by `compile_blocks`) compiles each chunk's
    element-wise work."""

    compiled = False

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                z_loss: ZLoss | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, targets, z_loss=z_loss, compiled=self.compiled)


class Head(nn.Module):
    """Final RMSNorm and the projection to vocabulary logits (or, given targets, the loss; with
    `z_loss` set, by `set_z_loss`, its gradient carries the logits' z-loss too). Under µP the
    logits carry the output multiplier 1/m, applied to the head's input (the same product, and
    every head, tensor-parallel and chunked loss included, sees it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg)
        self.z_loss: ZLoss | None = None
        self.output_multiplier = output_multiplier(cfg)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)
        if self.output_multiplier != 1.0:
            x = x * self.output_multiplier
        if targets is None:
            return self.lm_head(x)
        return self.lm_head(x, targets) if self.z_loss is None else self.lm_head(x, targets, self.z_loss)


def set_z_loss(module: nn.Module, z_loss: ZLoss | None) -> None:
    """Make every head in `module` add `z_loss` (an engine's, of `train.z_loss`) to its loss."""
    for layer in module.modules():
        if isinstance(layer, Head):
            layer.z_loss = z_loss


def layer_type(cfg: ModelConfig, index: int) -> type[nn.Module]:
    """The class of layer `index` of the list (0: embedding, 1..n_layers: blocks, n_layers + 1: head)."""
    if index == 0:
        return Embedding
    return Block if index <= cfg.n_layers else Head


def layer_args(cfg: ModelConfig, index: int) -> tuple:
    """The constructor arguments of layer `index` of the list (a block also takes its number)."""
    return (cfg, index - 1) if layer_type(cfg, index) is Block else (cfg,)


def make_layer(cfg: ModelConfig, index: int) -> nn.Module:
    """Layer `index` of the list, freshly built."""
    return layer_type(cfg, index)(*layer_args(cfg, index))


def meta_layer(cfg: ModelConfig, index: int) -> nn.Module:
    """Layer `index` on the meta device: its structure and shapes, no memory."""
    with torch.device("meta"):
        return make_layer(cfg, index)


def parameter_seed(seed: int, name: str) -> int:
    """The seed of parameter `name` (its name in the one-process model) in a run of seed `seed`."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def initial_value(cfg: ModelConfig, name: str, shape: Iterable[int], seed: int) -> torch.Tensor:
    """The initial fp32 value (on the CPU) of parameter `name` of the one-process model: ones for
    norms; Normal(0, init_std) for matrices (and stacked experts), residual outputs scaled by
    1/sqrt(2·n_layers) (GPT-2), and under µP by `init_multiplier` (bigtrain/model/mup.py).
    Drawn from its own generator seeded by (run seed, name), so it does not depend on which
    parameters a rank builds, or in which order."""
    if name.endswith("norm.weight"):
        return torch.ones(tuple(shape))
    std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) else cfg.init_std
    std *= init_multiplier(cfg, name)
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.empty(tuple(shape)).normal_(0.0, std, generator=generator)


def materialize(module: nn.Module, value: Callable[[str, nn.Parameter], torch.Tensor], device: torch.device,
                prefix: str = "") -> None:
    """Replace each meta parameter of `module` in place by `value(name, p)` on `device` (name
    prefixed by `prefix`), keeping the attributes the meta parameter carried; others stay as they are."""
    for name, p in list(module.named_parameters(prefix=prefix, remove_duplicate=False)):
        if not p.is_meta:
            continue
        owner = module.get_submodule(name[len(prefix):].lstrip(".").rpartition(".")[0])
        real = nn.Parameter(value(name, p).to(device), requires_grad=p.requires_grad)
        real.__dict__.update(p.__dict__)
        setattr(owner, name.rpartition(".")[2], real)


def share_rope_tables(layers: Iterable[nn.Module], cfg: ModelConfig, device: torch.device) -> None:
    """Give every block among `layers` the same pair of RoPE tables (one per process, not per block)."""
    cos, sin = rope_tables(cfg, device)
    for layer in layers:
        if isinstance(layer, Block):
            layer.cos, layer.sin = cos, sin


class Llama(nn.Module):
    """The decoder as `layers = [Embedding, Block × n_layers, Head]`, applied in order.

    Given `layers` (already built and initialised, as a distributed stage holds them), it only
    wraps them. Otherwise it builds the full model on the meta device, then each parameter in
    place on `device` (default: torch's default device) from its `initial_value` under `seed` (the
    run seed; None: one drawn from torch's global RNG); on the meta device it stays a skeleton.
    """

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module] | None = None, *, seed: int | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        if layers is not None:
            self.layers = nn.ModuleList(layers)
            return
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.layers = nn.ModuleList([meta_layer(cfg, i) for i in range(cfg.n_layers + 2)])
        real = device.type != "meta"
        seed = int(torch.randint(2**62, ())) if seed is None and real else seed
        for i, layer in enumerate(self.layers):
            if cfg.tie_embeddings and i == cfg.n_layers + 1:
                layer.lm_head.weight = self.layers[0].embed_tokens.weight
            if real:
                materialize(layer, lambda name, p: initial_value(cfg, name, p.shape, seed), device, f"layers.{i}")
        if real:
            share_rope_tables(self.layers, cfg, device)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, documents: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, t, vocab]; given `targets` [b, t], the mean next-token loss instead. Given
        each token's `documents` (and `positions` within them) over the whole windows, attention
        stays inside documents (`DocumentMasking`)."""
        x = tokens
        for layer in self.layers[:-1]:
            x = layer(x, documents, positions) if documents is not None and isinstance(layer, Block) else layer(x)
        return self.layers[-1](x) if targets is None else self.layers[-1](x, targets)


@dataclass(frozen=True)
class DocumentMasking:
    """How engines find the documents of packed windows: `document_ids` from `eos_id`, and with
    `reset_positions` each token's position within its document for RoPE."""

    eos_id: int
    reset_positions: bool = False

    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(documents, positions or None) of input tokens [b, t]: the extra arguments of `Llama.forward`."""
        documents = document_ids(inputs, self.eos_id)
        return documents, document_positions(documents) if self.reset_positions else None


def compile_blocks(layers: Iterable[nn.Module]) -> None:
    """`torch.compile` every block in place (fusing the norms, RoPE and SwiGLU element-wise work).

    Parameter names, and so checkpoints, stay unchanged; the blocks share one compiled graph. Of a
    Mixture-of-Experts block only the attention is compiled (routing has data-dependent shapes). The
    head's chunked loss compiles each chunk's element-wise work (`LMHead.compiled`).
    """
    for layer in layers:
        if isinstance(layer, Block):
            (layer.self_attn if isinstance(layer.mlp, MoE) else layer).compile(dynamic=False)
        elif isinstance(layer, Head) and isinstance(layer.lm_head, LMHead):
            layer.lm_head.compiled = True
