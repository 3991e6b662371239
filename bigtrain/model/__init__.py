"""The decoder, its loss, and parameter/FLOP counting."""

from bigtrain.model.flops import ParamCount, count_params, flops_per_token
from bigtrain.model.llama import Llama, compile_blocks
from bigtrain.model.loss import linear_cross_entropy, lm_loss

__all__ = ["Llama", "compile_blocks", "lm_loss", "linear_cross_entropy", "ParamCount", "count_params", "flops_per_token"]
