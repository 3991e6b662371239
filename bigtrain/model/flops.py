"""Parameter and FLOP counts from the config alone, so a 70B shape can be sized without weights."""

from __future__ import annotations

from dataclasses import dataclass

from bigtrain.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    embedding: int  # the token embedding table
    blocks: int  # all transformer blocks
    head: int  # final norm + LM head (0 for the head matrix when tied)

    @property
    def total(self) -> int:
        return self.embedding + self.blocks + self.head

    @property
    def non_embedding(self) -> int:
        return self.blocks + self.head


def count_params(cfg: ModelConfig) -> ParamCount:
    d, hd = cfg.d_model, cfg.head_dim
    attention = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2  # q, o and k, v
    mlp = 3 * d * cfg.ffn_dim
    block = attention + mlp + 2 * d
    head_matrix = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return ParamCount(embedding=cfg.vocab_size * d, blocks=cfg.n_layers * block, head=d + head_matrix)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N_matmul + 12·n_layers·d_model·seq_len.

    N_matmul counts the weights of every matrix multiply: all blocks' q, k, v, o, gate, up and
    down projections plus the LM head (counted also when tied to the embedding, since the head
    matmul still runs), but not the embedding lookup or the norm weights. 6 = 2 (multiply-add)
    × 3 (forward, backward wrt inputs and wrt weights). The second term is attention's QKᵀ and
    AV, 2·seq_len·d_model FLOPs each per token and layer in the forward, ×3 for training, without
    a discount for the causal mask (the PaLM/nanoGPT convention). MFU divides tokens/s times
    this by the devices' peak FLOP/s (`bigtrain.train.metrics.mfu`).
    """
    d = cfg.d_model
    matmul = count_params(cfg).blocks - 2 * d * cfg.n_layers + cfg.vocab_size * d
    return 6.0 * matmul + 12.0 * cfg.n_layers * d * seq_len
