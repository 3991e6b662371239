"""FP8 training (`train.precision=fp8`): torchao's float8 linears in place of the blocks' linears.

Only the seven projections of each transformer block run their matmuls in float8 (dynamic
tensorwise scaling, torchao's default recipe, as torchtitan applies it); the embedding, the LM
head and everything else stay under bf16 autocast. The swapped modules keep their `weight`
parameters, so checkpoints have the same names and tensors as a bf16 run's.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from bigtrain.model.llama import Block


def float8_eligible(module: nn.Module, name: str) -> bool:
    """A linear whose dimensions float8 matmuls take (multiples of 16, as torchao requires)."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_float8(layers: Iterable[nn.Module]) -> None:
    """Swap the linears of every block in `layers` for torchao `Float8Linear`s, in place."""
    from torchao.float8 import convert_to_float8_training  # optional: pip install 'bigtrain[fp8]'

    for layer in layers:
        if isinstance(layer, Block):
            convert_to_float8_training(layer, module_filter_fn=float8_eligible)
