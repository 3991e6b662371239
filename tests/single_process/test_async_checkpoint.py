"""`checkpoint.async`: the same checkpoints as a synchronous run, byte for byte, while the loop
waits only for the copy into host memory; one save in flight at a time."""

import json

from bigtrain.checkpoint.io import latest_checkpoint
from bigtrain.train import loop
from tests.helpers import read_metrics, tiny_config

STEPS, EVERY = 7, 2
TENSOR_FILES = ("model.safetensors", "optimizer.pt", "rng-0.pt")


def run(stdlib_data, run_dir, async_save):
    cfg = tiny_config(stdlib_data, run_dir, validate=False, verify_checksums=False, steps=STEPS, val_every=1000)
    cfg.checkpoint.every, cfg.checkpoint.async_save, cfg.log.every = EVERY, async_save, 3
    return loop.train(cfg, console=False)


def test_asynchronous_checkpoints_equal_synchronous_ones(stdlib_data, tmp_path):
    sync, asynchronous = run(stdlib_data, tmp_path / "sync", False), run(stdlib_data, tmp_path / "async", True)
    assert asynchronous.losses == sync.losses
    assert asynchronous.checkpoint == latest_checkpoint(tmp_path / "async") == tmp_path / "async/checkpoints/step-0000007"
    names = sorted(p.name for p in (tmp_path / "sync/checkpoints").glob("step-*"))
    assert names == ["step-0000002", "step-0000004", "step-0000006", "step-0000007"]
    assert sorted(p.name for p in (tmp_path / "async/checkpoints").iterdir()) == ["latest", *names]  # no .tmp left
    for name in names:
        listed = [json.loads((tmp_path / run_dir / "checkpoints" / name / "files.json").read_text())
                  for run_dir in ("sync", "async")]
        assert listed[0].keys() == listed[1].keys()
        for file in TENSOR_FILES:  # same sizes and crc32c: the same bytes
            assert listed[0][file] == listed[1][file], (name, file)
    saves = [r for r in read_metrics(tmp_path / "async") if "checkpoint" in r]
    assert [r["checkpoint"] for r in saves] == names
    # a save is finished at the first logging step where it is done, else before the next save
    assert all(r["step"] >= int(r["checkpoint"][5:]) for r in saves)
    assert all(0 < r["checkpoint_stall_s"] <= r["checkpoint_write_s"] for r in saves)
    for r in read_metrics(tmp_path / "sync"):
        if "checkpoint" in r:
            assert r["checkpoint_stall_s"] == r["checkpoint_write_s"] and r["step"] == int(r["checkpoint"][5:])
