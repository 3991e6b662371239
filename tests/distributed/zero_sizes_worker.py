"""Run under torchrun: one DeepSpeed step, then write what ZeRO holds on this rank as JSON."""

import json
import sys
from pathlib import Path

import torch

from bigtrain.config import load_config
from bigtrain.distributed.deepspeed_engine import DeepSpeedEngine
from bigtrain.distributed.topology import init_topology
from bigtrain.model import Llama, count_params

cfg = load_config(sys.argv[1], sys.argv[3:])
topology = init_topology(cfg)
engine = DeepSpeedEngine(Llama(cfg.model), cfg, topology)
batch = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch, cfg.data.seq_len + 1))
engine.train_step([batch], 1e-3)

zero = engine.engine.optimizer
params = list(engine.model.parameters())
report = {
    "total_params": count_params(cfg.model).total,
    # ZeRO-3 keeps only this rank's partition of each parameter in `ds_tensor`
    "param_elements": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
    # the fp32 master partitions ZeRO-1/2/3 hand to the optimizer (one per parameter group)
    "fp32_partition_elements": sum(
        t.numel() for t in getattr(zero, "single_partition_of_fp32_groups", getattr(zero, "fp32_partitioned_groups_flat", []))
    ),
    "adam_state_elements": sum(s["exp_avg"].numel() for s in zero.optimizer.state.values()),
}
Path(sys.argv[2], f"rank{topology.env.rank}.json").write_text(json.dumps(report))
