"""The vocab-parallel head + loss at vocabulary 32k, seq 2048, micro-batch 4 on 2 gloo ranks:
chunked, it equals the one-process chunked loss and its gradients, and peaks several times lower
per rank than logits + `vocab_parallel_cross_entropy` (peak RSS of forward + backward)."""

import os
import subprocess
import sys

import torch

from bigtrain.model.loss import linear_cross_entropy
from tests.helpers import PEAK_ENV


def test_chunked_vocab_parallel_loss_matches_tp1_and_peaks_lower(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "tp_loss_peak_worker.py")
    env = {**PEAK_ENV, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for mode in ("logits", "chunked"):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        worker, mode, str(tmp_path)], check=True, env=env, capture_output=True, timeout=600)
    logits, chunked = (torch.load(tmp_path / f"{mode}.pt") for mode in ("logits", "chunked"))

    torch.manual_seed(0)  # the workers' tensors, on one process
    hidden = torch.randn(4, 2048, 64, requires_grad=True)
    weight = (0.02 * torch.randn(32000, 64)).requires_grad_()
    targets = torch.randint(0, 32000, (4, 2048))
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    for result in (logits, chunked):
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-6, atol=0)
        for name, expected in (("grad_hidden", hidden.grad), ("grad_weight", weight.grad)):
            # within 1e-6 of the gradient's scale (summation order differs: tokens by chunk, ranks)
            torch.testing.assert_close(result[name], expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    # per rank, [8192, 16000] fp32 logits are 500 MiB, and the softmax/gradient buffer as much again
    assert min(logits["peak_mib"]) > 900
    assert max(chunked["peak_mib"]) < min(logits["peak_mib"]) / 4
    print({"logits_peak_mib": logits["peak_mib"], "chunked_peak_mib": chunked["peak_mib"]})
