"""Small shared builders for tests."""

from bigtrain.config import ModelConfig


def small_model_config(**overrides) -> ModelConfig:
    """A 2-layer model with grouped-query attention that runs in milliseconds."""
    shape = {"vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16}
    return ModelConfig(**{**shape, **overrides})
