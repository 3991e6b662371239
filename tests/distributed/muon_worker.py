"""Run under torchrun: one Muon step of the DeepSpeed engine on a fixed batch, then one skipped step.

Writes JSON (rank 0): for every hidden matrix, how far the full weight after the step is from
Keller Jordan's Muon with Moonlight's RMS matching applied to the one-process gradient of the same
batch, and how far from AdamW's first step; and whether the skipped step left every weight and
the whole optimizer state (Muon's momentum included) bitwise alone.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.engine.muon import is_hidden_matrix
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.model import Llama
from bigtrain.parallel.layout import tp_split_dim
from bigtrain.train.loop import build_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.helpers
from tests.helpers import muon_reference_step  # noqa: E402

LR, WD, BETA = 0.01, 0.1, 0.95

cfg = load_config(sys.argv[1], sys.argv[3:])
engine = build_engine(cfg, UpdateGate())
topology = engine.topology
windows = torch.randint(cfg.model.vocab_size, (8, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(5))

reference = Llama(cfg.model, seed=cfg.run.seed)
before = {n: p.detach().clone() for n, p in reference.named_parameters()}
reference(windows[:, :-1], windows[:, 1:]).backward()
grads = {n: p.grad.clone() for n, p in reference.named_parameters()}


def full_weights() -> dict[str, torch.Tensor]:
    out = {}
    for p in engine.model.parameters():
        name = engine.param_names[id(p)]
        t, dim = p.detach().float().clone(), tp_split_dim(name)
        if topology.tp > 1 and dim is not None:
            parts = [torch.empty_like(t) for _ in range(topology.tp)]
            dist.all_gather(parts, t.contiguous(), group=topology.tp_group)
            t = torch.cat(parts, dim=dim)
        out[name] = t
    return out


mine = windows.chunk(topology.dp)[topology.dp_rank]
assert all(torch.equal(before[n], w) for n, w in full_weights().items()), "the engine starts from other weights"
engine.train_step([mine], LR)
after = full_weights()
report = {"matrices": {}}
for name, p in reference.named_parameters():
    if is_hidden_matrix(name, p):
        adamw = before[name] * (1 - LR * WD) - LR * grads[name].sign()
        report["matrices"][name] = [float((after[name] - muon_reference_step(before[name], grads[name], torch.zeros_like(grads[name]), LR, WD, BETA)[0]).abs().max()),
                                    float((after[name] - adamw).abs().max())]

optimizer = engine._client_optimizer
state = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(optimizer.state.values())}
report["momenta"] = sum("momentum_buffer" in s for s in state.values())
engine.gate.skip = lambda loss, norm: torch.tensor(True)
engine.train_step([mine], LR)
report["skip_kept_weights"] = all(torch.equal(after[n], w) for n, w in full_weights().items())
report["skip_kept_state"] = all(torch.equal(v, state[i][k]) for i, s in enumerate(optimizer.state.values())
                                for k, v in s.items())
if dist.get_rank() == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(report, f)
