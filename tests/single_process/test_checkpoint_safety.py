"""Local checkpoints: pickled code refused, damaged files and other model shapes refused in one line,
and the bad-step policy (skip NaN/Inf steps, stop after K in a row; spikes and rollbacks: test_spikes.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from bigtrain.checkpoint.files import file_crc32c
from bigtrain.checkpoint.format import FORMAT_VERSION
from bigtrain.cli import main
from bigtrain.errors import BigtrainError
from bigtrain.train import loop
from tests.helpers import poisoned, read_metrics, tiny_config

STEPS_ONLY = {"validate": False, "verify_checksums": False}  # only the steps matter here


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def saved_run(stdlib_data, tmp_path_factory):
    """A 4-step local run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    cfg = tiny_config(stdlib_data, run_dir, **STEPS_ONLY, steps=4, val_every=1000)
    cfg.checkpoint.every = 2
    loop.train(cfg, console=False)
    return cfg, run_dir / "checkpoints" / "step-0000002"


def resume_from(saved_run, checkpoint, tmp_path):
    cfg = tiny_config((saved_run[0].data.path, None), tmp_path / "resumed", **STEPS_ONLY, steps=4, val_every=1000)
    cfg.run.resume = str(checkpoint)
    return cfg


def copy(checkpoint, tmp_path):
    import shutil

    return shutil.copytree(checkpoint, tmp_path / "copy")


@pytest.mark.parametrize("victim", ["optimizer.pt", "rng-0.pt"])
def test_malicious_pickle_is_refused(victim, saved_run, tmp_path):
    checkpoint = copy(saved_run[1], tmp_path)
    marker = tmp_path / "pwned"
    payload = torch.load(checkpoint / victim, weights_only=True)
    payload["extra"] = Evil(marker)
    torch.save(payload, checkpoint / victim)
    sizes = json.loads((checkpoint / "files.json").read_text())
    sizes[victim] = (checkpoint / victim).stat().st_size  # a forger would fix the list up too
    (checkpoint / "files.json").write_text(json.dumps(sizes))
    with pytest.raises(BigtrainError) as error:
        loop.train(resume_from(saved_run, checkpoint, tmp_path), console=False)
    assert f"{victim} holds a pickled io.open; refusing to unpickle it" in str(error.value)
    assert "\n" not in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_checkpoint_is_refused_in_one_line(damage, saved_run, tmp_path, capsys):
    checkpoint = copy(saved_run[1], tmp_path)
    weights = checkpoint / "model.safetensors"
    written = weights.stat().st_size
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
        expected = f"checkpoint {checkpoint} is damaged: model.safetensors has 1000 bytes, {written} were written"
    else:
        weights.unlink()
        expected = f"checkpoint {checkpoint} is incomplete: model.safetensors is missing"
    with pytest.raises(BigtrainError) as error:
        loop.train(resume_from(saved_run, checkpoint, tmp_path), console=False)
    assert str(error.value) == expected
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep")
    assert main(["convert", "to-hf", str(checkpoint), str(tmp_path / "hf"), "--overwrite"]) == 1
    assert capsys.readouterr().err.strip() == f"bigtrain: error: {expected}"
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["mine.txt"]  # OUT untouched


def test_checkpoint_of_another_model_shape_is_refused(saved_run, tmp_path):
    cfg = resume_from(saved_run, saved_run[1], tmp_path)
    cfg.model.d_model = 32
    with pytest.raises(BigtrainError, match="holds a model with model.d_model=64, but the config has model.d_model=32"):
        loop.train(cfg, console=False)


def poison(monkeypatch, steps, factor=float("nan")):
    """Scale the model's logits by `factor` during the given (1-based) training steps."""
    monkeypatch.setattr(loop, "build_engine", poisoned(loop.build_engine, steps, factor))


def test_nan_steps_are_skipped_and_counted(stdlib_data, tmp_path, monkeypatch):
    poison(monkeypatch, {3, 4})
    cfg = tiny_config(stdlib_data, tmp_path / "run", **STEPS_ONLY, steps=6, val_every=1000)
    cfg.log.every, cfg.checkpoint.every = 1, 1
    result = loop.train(cfg, console=False)
    steps = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["skipped_steps"] for r in steps] == [0, 0, 1, 2, 2, 2]
    assert [r["loss"] != r["loss"] for r in steps] == [False, False, True, True, False, False]
    checkpoints = tmp_path / "run" / "checkpoints"
    before, after = (load_file(checkpoints / f"step-000000{s}" / "model.safetensors") for s in (2, 4))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the two updates were not applied
    assert torch.equal(torch.load(checkpoints / "step-0000002" / "optimizer.pt")["state"][0]["exp_avg"],
                       torch.load(checkpoints / "step-0000004" / "optimizer.pt")["state"][0]["exp_avg"])
    assert json.loads((checkpoints / "step-0000006" / "state.json").read_text())["bad_steps"]["total"] == 2
    assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_too_many_bad_steps_stop_with_the_last_good_checkpoint(policy, stdlib_data, tmp_path, monkeypatch):
    poison(monkeypatch, set(range(4, 100)), factor=float("inf"))
    cfg = tiny_config(stdlib_data, tmp_path / "run", **STEPS_ONLY, steps=12, val_every=1000, nonfinite=policy, max_bad_steps=3)
    cfg.log.every, cfg.checkpoint.every = 1, 3
    last_step = 6 if policy == "skip" else 4
    expected = (f"{last_step - 3} bad step\\(s\\) in a row up to step {last_step} .*stopped; the last good checkpoint "
                f"{tmp_path / 'run' / 'checkpoints' / 'step-0000003'} is intact")
    with pytest.raises(BigtrainError, match=expected):
        loop.train(cfg, console=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step-0000003"]


def test_state_records_the_format_version(saved_run):
    assert json.loads((saved_run[1] / "state.json").read_text())["format_version"] == FORMAT_VERSION


READERS = {  # every path that opens a checkpoint: a command line, or a config for `train`
    "resume": lambda ckpt, tmp: {"run.resume": str(ckpt)},
    "init_from": lambda ckpt, tmp: {"model.init_from": str(ckpt)},
    "remote fetch": lambda ckpt, tmp: {"run.resume": "auto", "checkpoint.remote": str(ckpt.parent)},
    "eval": lambda ckpt, tmp: ["eval", str(ckpt)],
    "eval --tasks": lambda ckpt, tmp: ["eval", str(ckpt), "--tasks", "python_next_line", "--limit", "2"],
    "generate": lambda ckpt, tmp: ["generate", str(ckpt), "--prompt", "def "],
    "to-hf": lambda ckpt, tmp: ["convert", "to-hf", str(ckpt), str(tmp / "out")],
    "reshard": lambda ckpt, tmp: ["convert", "reshard", str(ckpt), str(tmp / "out"), "train.lr=1e-3"],
}


@pytest.mark.parametrize("reader", READERS)
def test_unknown_format_version_is_refused_in_one_line_by_every_reader(reader, saved_run, tmp_path, capsys):
    checkpoint = copy(saved_run[1], tmp_path)
    state = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps({**state, "format_version": FORMAT_VERSION + 1}))
    listed = json.loads((checkpoint / "files.json").read_text())
    listed["state.json"] = {"bytes": (checkpoint / "state.json").stat().st_size,
                            "crc32c": file_crc32c(checkpoint / "state.json")}
    (checkpoint / "files.json").write_text(json.dumps(listed))
    (tmp_path / "latest").write_text("copy\n")  # tmp_path is also a remote holding this checkpoint
    expected = f"has checkpoint format_version {FORMAT_VERSION + 1}; this bigtrain reads version {FORMAT_VERSION}"
    use = READERS[reader](checkpoint, tmp_path)
    if isinstance(use, dict):
        cfg = resume_from(saved_run, checkpoint, tmp_path)
        cfg.run.resume = None
        for key, value in use.items():
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
        with pytest.raises(BigtrainError) as error:
            loop.train(cfg, console=False)
        message = str(error.value)
        assert not (tmp_path / "resumed" / "checkpoints" / "latest").exists()  # nothing trained or saved
    else:
        assert main(use) != 0
        message = capsys.readouterr().err.strip().removeprefix("bigtrain: error: ")
        assert not (tmp_path / "out").exists()
    assert expected in message and "\n" not in message, message


def flip_byte(file, offset=None):
    data = bytearray(file.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt"])
def test_a_flipped_byte_is_refused_naming_the_file_and_the_previous_checkpoint(victim, saved_run, tmp_path, capsys):
    run_dir = saved_run[1].parent.parent
    import shutil

    shutil.copytree(run_dir, tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step-0000004"
    flip_byte(newest / victim)
    cfg = tiny_config((saved_run[0].data.path, None), tmp_path / "run", **STEPS_ONLY, steps=6, val_every=1000)
    cfg.run.resume = "auto"
    previous = tmp_path / "run" / "checkpoints" / "step-0000002"
    expected = (f"checkpoint {newest} is damaged: {victim} does not match the crc32c it was written with; "
                f"the previous checkpoint is {previous}: resume with run.resume={previous}")
    with pytest.raises(BigtrainError) as error:
        loop.train(cfg, console=False)
    assert str(error.value) == expected
    assert main(["eval", str(newest)]) == 1
    assert capsys.readouterr().err.strip() == f"bigtrain: error: {expected}"
    cfg.checkpoint.verify = False  # the check can be turned off (the flipped byte then goes unnoticed)
    assert loop.train(cfg, console=False).step == 6


def test_files_json_holds_sizes_and_crc32c(saved_run):
    from bigtrain.checkpoint.files import file_crc32c

    listed = json.loads((saved_run[1] / "files.json").read_text())
    assert {"model.safetensors", "optimizer.pt", "rng-0.pt", "state.json", "config.yaml"} <= set(listed)
    for name, entry in listed.items():
        assert entry == {"bytes": (saved_run[1] / name).stat().st_size, "crc32c": file_crc32c(saved_run[1] / name)}
    assert not list(saved_run[1].glob(".files-*"))


FULL_DISK_TRAINER = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # files larger than this fail to write (EFBIG)
from bigtrain.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_save_that_runs_out_of_space_ends_the_run_and_keeps_latest(async_save, stdlib_data, tmp_path):
    """Asynchronously, the write fails in the background thread; the run ends with the same line."""
    import subprocess
    import sys

    import yaml

    cfg = tiny_config(stdlib_data, tmp_path / "run", **STEPS_ONLY, steps=4, val_every=1000)
    cfg.checkpoint.every, cfg.log.every, cfg.run.resume = 2, 1, "auto"
    cfg.checkpoint.async_save = async_save
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    straight = loop.train(tiny_config(stdlib_data, tmp_path / "straight", **STEPS_ONLY, steps=4, val_every=1000), console=False)

    def run(limit, *extra):
        return subprocess.run([sys.executable, "-c", FULL_DISK_TRAINER, str(limit), str(tmp_path / "config.yaml"),
                               *extra], capture_output=True, text=True, timeout=600)

    first = run(2**40, "train.steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    full = run(100_000)  # the next checkpoint's weights do not fit
    root = tmp_path / "run" / "checkpoints"
    assert full.returncode == 1
    error = full.stderr.strip().splitlines()[-1]
    assert error.startswith(f"bigtrain: error: cannot save checkpoint {root / 'step-0000004'}: ")
    assert "File too large" in error and error.endswith("; checkpoints/latest still names step-0000002")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002"]  # no half-written directory
    again = run(2**40)
    assert again.returncode == 0, again.stderr[-2000:]
    stitched = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r}
    assert [stitched[s] for s in range(1, 5)] == straight.losses
