"""Activation memory of one forward of a tiny model at seq 8192 on one rank of `torchrun`'s world,
which is the sequence-parallel group (world 1: no sequence parallelism). Writes
OUT/sp<world>-rank<rank>.json with the bytes saved for backward and the loss."""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from bigtrain.config import ModelConfig
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.model import Llama
from bigtrain.parallel.deepspeed_ulysses import (
    apply_sequence_parallel,
    sequence_mean,
    sequence_slice,
)

SEQ = 8192


def saved_bytes(run) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd keeps for backward while `run()` builds the graph."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), out


def main(out: Path) -> None:
    deepspeed.init_distributed("gloo")  # DeepSpeed's all-to-all goes through its own comm layer
    rank, sp = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ)
    model = Llama(cfg)
    if sp > 1:
        apply_sequence_parallel(list(model.layers), dist.group.WORLD, PhaseTimer(torch.device("cpu")))
    windows = torch.randint(0, cfg.vocab_size, (1, SEQ + 1), generator=torch.Generator().manual_seed(1))
    tokens = sequence_slice(windows, rank, sp)
    nbytes, loss = saved_bytes(lambda: model(tokens[:, :-1], tokens[:, 1:]))
    if sp > 1:
        loss = sequence_mean(loss, dist.group.WORLD, grads_summed=True)
    loss.backward()
    (out / f"sp{sp}-rank{rank}.json").write_text(json.dumps({"saved_bytes": nbytes, "loss": loss.item()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
