"""Ulysses sequence parallelism: what a rank keeps for backward at a long sequence, and the
refusals of layouts it cannot run (parity with the single process is in test_parity.py)."""

import json
import os

import pytest

from tests.helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "sp_memory_worker.py")


def test_two_ranks_keep_at_most_55_percent_of_the_activations_at_seq_8192(tmp_path):
    torchrun(1, WORKER, str(tmp_path))
    torchrun(2, WORKER, str(tmp_path))
    alone = json.loads((tmp_path / "sp1-rank0.json").read_text())
    split = [json.loads((tmp_path / f"sp2-rank{r}.json").read_text()) for r in range(2)]
    for rank in split:
        assert rank["saved_bytes"] <= 0.55 * alone["saved_bytes"], (rank["saved_bytes"], alone["saved_bytes"])
        assert rank["loss"] == pytest.approx(alone["loss"], rel=1e-5)  # the same windows' mean loss
    print(f"saved for backward at seq 8192: sp=1 {alone['saved_bytes'] / 2**20:.1f} MiB, "
          f"sp=2 {split[0]['saved_bytes'] / 2**20:.1f} MiB per rank")
