"""Under DeepSpeed the loop issues no collective of its own between logging steps: the stop and
time checks and the loss average wait for a logging step (DeepSpeed's own collectives are not
counted), and the per-step losses still equal the single-process ones."""

import json
import os

import pytest
import yaml

from bigtrain.config import from_dict
from bigtrain.train.loop import train
from tests.helpers import parity_config, torchrun

STEPS, LOG_EVERY = 8, 4


def test_no_collectives_of_the_loop_between_logging_steps(stdlib_data, tmp_path):
    cfg = parity_config(stdlib_data, tmp_path / "local")
    cfg["train"]["steps"] = STEPS
    cfg["log"]["every"] = LOG_EVERY
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    torchrun(2, os.path.join(os.path.dirname(__file__), "collectives_worker.py"), str(tmp_path / "config.yaml"),
             str(tmp_path))
    reference = train(from_dict(cfg), console=False).losses
    for layout in ("zero2", "pp2"):
        counted = json.loads((tmp_path / f"collectives-{layout}.json").read_text())
        per_step = {int(step): n for step, n in counted["per_step"].items()}
        quiet = [s for s in range(1, STEPS) if s % LOG_EVERY]
        assert all(per_step.get(s, 0) == 0 for s in quiet), (layout, per_step)
        assert per_step.get(LOG_EVERY, 0) > 0  # the logging step: the counter does see bigtrain's own
        assert counted["losses"] == pytest.approx(reference, rel=1e-5)
