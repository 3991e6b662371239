"""Run under torchrun (2 ranks): the head + vocab-parallel loss at vocabulary 32k, seq 2048,
micro-batch 4, forward + backward, as logits then `vocab_parallel_cross_entropy` (`logits`) or
chunk by chunk (`chunked`). Writes OUT/<mode>.pt (rank 0): the loss, the full gradients of the
hidden states and of the weight, and every rank's peak RSS growth in MiB."""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bigtrain.engine.memory import peak_rss_kib
from bigtrain.parallel.vocab_parallel_loss import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

mode, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, tp = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
vocab, d = 32000, 64
hidden = torch.randn(4, 2048, d, requires_grad=True)
full_weight = 0.02 * torch.randn(vocab, d)
targets = torch.randint(0, vocab, (4, 2048))
weight = full_weight.chunk(tp)[rank].clone().requires_grad_()
del full_weight
before = peak_rss_kib()
if mode == "logits":
    loss = vocab_parallel_cross_entropy(F.linear(hidden, weight), targets, dist.group.WORLD)
else:
    loss = vocab_parallel_linear_cross_entropy(hidden, weight, targets, dist.group.WORLD)
loss.backward()
peak = torch.tensor([(peak_rss_kib() - before) / 1024])
peaks = [torch.zeros(1) for _ in range(tp)]
dist.all_gather(peaks, peak)
dist.all_reduce(hidden.grad)  # the head's region entry sums the shards' parts
weight_grads = [torch.empty_like(weight.grad) for _ in range(tp)]
dist.all_gather(weight_grads, weight.grad)
if rank == 0:
    torch.save({"loss": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": torch.cat(weight_grads),
                "peak_mib": torch.cat(peaks).tolist()}, f"{out}/{mode}.pt")
dist.destroy_process_group()
