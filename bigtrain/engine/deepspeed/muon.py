"""Muon under DeepSpeed: which layouts it runs in, and handing it ZeRO-1/2's flat partitions.

DeepSpeed 0.19.8 ships its own Muon (`MuonWithAuxAdam`, folded into ZeRO's gradient partitioning),
but with Keller Jordan's √max(1, A/B) scale instead of Moonlight's RMS matching, Newton–Schulz in
fp16 (Gram variant) and no tensor parallelism: each tp rank would orthogonalise its shard alone.
bigtrain therefore hands DeepSpeed its own `Muon` as the client optimizer: without ZeRO it gets the
(tensor-parallel) matrices themselves; under ZeRO-1/2 it gets the flat fp32 partitions and gathers
the matrices it needs (`bigtrain/engine/muon.py`).
"""

from __future__ import annotations

from typing import Any

from bigtrain import compat
from bigtrain.config import Config
from bigtrain.engine.muon import Muon


def muon_problem(cfg: Config, ds_config: dict[str, Any]) -> str | None:
    """Why Muon cannot run in this DeepSpeed layout (None: it can)."""
    p = cfg.parallel
    if p.zero_stage == 3:
        return "train.optimizer=muon needs parallel.zero_stage 0, 1 or 2 (ZeRO-3 partitions every matrix; use 1 or 2)"
    if p.pp > 1 or p.ep > 1 or p.sp > 1:
        return "train.optimizer=muon runs with parallel.pp=1, parallel.ep=1 and parallel.sp=1 (tp and dp with ZeRO 0-2)"
    if p.offload_optimizer:
        return "train.optimizer=muon needs parallel.offload_optimizer=false"
    if p.zero_stage == 0 and (ds_config["bf16"]["enabled"] or ds_config["fp16"]["enabled"]):
        return "train.optimizer=muon in bf16/fp16 needs parallel.zero_stage 1 or 2 (DeepSpeed's ZeRO-0 mixed-precision wrapper flattens the matrices)"
    return None


def hand_partitions(wrapper: Any, optimizer: Muon) -> None:
    """Tell `optimizer` how ZeRO-1/2 (`wrapper`) flattened its Muon groups (nothing without ZeRO)."""
    for index, group in enumerate(optimizer.param_groups):
        layout = compat.zero_flat_layout(wrapper, index)
        if group["muon"] and layout is not None:
            optimizer.flatten(index, *layout)
