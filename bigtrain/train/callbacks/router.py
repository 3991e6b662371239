"""Mixture-of-Experts routing in every logged record: the auxiliary losses (unscaled, averaged over
MoE blocks), how unevenly the experts were loaded, what capacity dropped, and each block's load
per expert (a histogram in W&B)."""

from __future__ import annotations

from typing import Any

from bigtrain.model.moe import RouterStats
from bigtrain.train.callbacks import Callback, Run

PASSES, AUX, Z, DROPPED, ROUTED = range(len(RouterStats.FIELDS))


class RouterMetrics(Callback):
    def metrics(self, run: Run) -> dict[str, Any]:
        table = run.engine.router_stats()
        if table is None or not bool((table[:, PASSES] > 0).all()):
            return {}
        passes, load = table[:, PASSES], table[:, len(RouterStats.FIELDS):]
        share = load / load.sum(dim=1, keepdim=True)
        record = {
            "moe/aux_loss": float((table[:, AUX] / passes).mean()),
            "moe/z_loss": float((table[:, Z] / passes).mean()),
            "moe/max_load": float((load.max(dim=1).values / load.mean(dim=1)).mean()),
            "moe/dropped_frac": float(table[:, DROPPED].sum() / table[:, ROUTED].sum()),
        }
        for block, row in enumerate(share):
            record[f"moe/expert_load/{block}"] = [round(float(x), 6) for x in row]
        return record
