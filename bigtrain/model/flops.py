"""Parameter and FLOP counts from the config alone, so a 70B shape can be sized without weights."""

from __future__ import annotations

from dataclasses import dataclass

from bigtrain.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    embedding: int  # the token embedding table
    blocks: int  # all transformer blocks
    head: int  # final norm + LM head (0 for the head matrix when tied)
    active_blocks: int | None = None  # the blocks' parameters one token uses (MoE: top-k of the experts); None: all

    @property
    def total(self) -> int:
        return self.embedding + self.blocks + self.head

    @property
    def active(self) -> int:
        """Parameters one token passes through (all of them in a dense model)."""
        return self.embedding + (self.blocks if self.active_blocks is None else self.active_blocks) + self.head

    @property
    def non_embedding(self) -> int:
        return self.blocks + self.head


def block_params(cfg: ModelConfig, index: int) -> tuple[int, int]:
    """(all, active) parameters of block `index`: attention, norms and the feed-forward, whose
    active part in a Mixture-of-Experts block is the router, top_k experts and the shared ones."""
    d, hd, moe = cfg.d_model, cfg.head_dim, cfg.moe
    attention = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2  # q, o and k, v
    norms = 2 * d + (2 * hd if cfg.qk_norm else 0)
    if not cfg.is_moe_block(index):
        dense = attention + norms + 3 * d * cfg.ffn_dim
        return dense, dense
    expert = 3 * d * cfg.expert_ffn_dim
    shared = attention + norms + d * moe.experts + moe.shared_experts * expert
    return shared + moe.experts * expert, shared + moe.top_k * expert


def count_params(cfg: ModelConfig) -> ParamCount:
    blocks = [block_params(cfg, i) for i in range(cfg.n_layers)]
    head_matrix = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return ParamCount(embedding=cfg.vocab_size * cfg.d_model, blocks=sum(b[0] for b in blocks),
                      head=cfg.d_model + head_matrix, active_blocks=sum(b[1] for b in blocks))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N_matmul + 12·n_layers·n_heads·head_dim·seq_len.

    N_matmul counts the weights of every matrix multiply: all blocks' q, k, v, o, gate, up and
    down projections plus the LM head (counted also when tied to the embedding, since the head
    matmul still runs), but not the embedding lookup or the norm weights. 6 = 2 (multiply-add)
    × 3 (forward, backward wrt inputs and wrt weights). The second term is attention's QKᵀ and
    AV, 2·seq_len·n_heads·head_dim FLOPs each per token and layer in the forward, ×3 for training, without
    a discount for the causal mask (the PaLM/nanoGPT convention). A Mixture-of-Experts block counts
    its active weights only: the router, top_k routed experts and the shared ones. MFU divides
    tokens/s times this by the devices' peak FLOP/s (`bigtrain.train.metrics.mfu`).
    """
    d, hd = cfg.d_model, cfg.head_dim
    norms = (2 * d + (2 * hd if cfg.qk_norm else 0)) * cfg.n_layers
    matmul = count_params(cfg).active_blocks - norms + cfg.vocab_size * d
    return 6.0 * matmul + 12.0 * cfg.n_layers * cfg.n_heads * hd * seq_len
