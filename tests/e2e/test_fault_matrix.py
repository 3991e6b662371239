"""The faults a cluster produces, on 2 ranks (DeepSpeed ZeRO-2 under torchrun): each case breaks a
run, lets it recover as an operator would, and checks that the stitched loss curve equals the
uninterrupted run's bit for bit and that no two processes logged steps into metrics.jsonl at once.

| fault | what happens |
|---|---|
| a second launch on a running run's directory | refused in one line naming the holder, on every rank, in seconds |
| a requeued launch with `--wait-lock` while the old one still trains | every rank waits, then all resume from the one checkpoint the old run left last |
| SIGTERM to a launch still waiting for the lock | every rank exits at once with one line; the running job goes on |
| `kill -9` of the torchrun agent alone, just before a save | its workers exit without committing the checkpoint or a metrics line; a relaunch resumes |
| `kill -9` of everything while a checkpoint is written | `latest` names the previous one; resume |
| a flipped byte in the newest checkpoint | resume refused naming file and previous checkpoint |
| the disk fills during a save | one line; `latest` unchanged, no partial directory |
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import CPU_RANKS_ENV, ranks_config

pytestmark = pytest.mark.distributed
STEPS, EVERY = 8, 2


def write_config(stdlib_data, directory: Path) -> Path:
    cfg = ranks_config(stdlib_data, directory / "run")
    cfg["train"]["steps"], cfg["checkpoint"]["every"] = STEPS, EVERY
    cfg["train"]["schedule"] = "constant"  # a launch with train.steps=4 then trains the first 4 steps exactly
    cfg["run"]["resume"] = "auto"
    cfg["parallel"] = {"engine": "deepspeed", "zero_stage": 2}
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg))
    return directory / "config.yaml"


SLOW_TRAINER = """
import os, sys, time
from bigtrain.train import loop
from bigtrain.checkpoint import files as checkpoint
from bigtrain.distributed import launcher_watch
step, fsync, pause = loop.Trainer.train_step, checkpoint.fsync_path, float(os.environ["STEP_S"])
launcher_watch.POLL_S = float(os.environ.get("WATCH_S", launcher_watch.POLL_S))  # a late watcher thread
loop.Trainer.train_step = lambda self: (time.sleep(pause), step(self))[1]  # seconds per step: time to act
checkpoint.fsync_path = lambda path: (time.sleep(0.05), fsync(path))  # saves slow enough to be caught in
from bigtrain.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def launch(config_path: Path, *args: str, file_limit: int | None = None, slow: float = 0,
           watch_s: float | None = None) -> subprocess.Popen:
    """torchrun of `bigtrain train` on 2 CPU ranks, in a session of its own; `slow`: seconds per step,
    `watch_s`: how often the launcher watch thread looks (with `slow`)."""
    def limit_files():
        if file_limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    trainer = ["-m", "bigtrain", "train"]
    if slow:
        (config_path.parent / "slow_trainer.py").write_text(SLOW_TRAINER)
        trainer = [str(config_path.parent / "slow_trainer.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *trainer,
           str(config_path), *args]
    proc = subprocess.Popen(cmd, env={**CPU_RANKS_ENV, "STEP_S": str(slow), **({"WATCH_S": str(watch_s)} if watch_s else {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=limit_files)
    proc.started = time.monotonic()
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def completes(config_path: Path, *args: str) -> None:
    code, err = finish(launch(config_path, *args))
    assert code == 0, err[-2000:]


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r] if path.exists() else []


def wait_until(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def check_recovered(run_dir: Path, straight: list[float], launches: int) -> None:
    """The stitched curve (later records win) equals the straight one, and metrics.jsonl reads as
    launches one after another: each record follows the previous step or, at most once per later
    launch, goes back to just after a checkpoint (two writers at once would interleave)."""
    logged = records(run_dir)
    assert {r["step"]: r["loss"] for r in logged} == dict(enumerate(straight, 1))
    restarts = [b["step"] for a, b in zip(logged, logged[1:], strict=False) if b["step"] != a["step"] + 1]
    assert len(restarts) < launches and all((step - 1) % EVERY == 0 for step in restarts), restarts
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


@pytest.fixture(scope="module")
def straight(stdlib_data, tmp_path_factory) -> list[float]:
    directory = tmp_path_factory.mktemp("straight")
    completes(write_config(stdlib_data, directory))
    losses = [r["loss"] for r in records(directory / "run")]
    assert len(losses) == STEPS
    return losses


def test_second_launch_is_refused_while_the_first_trains(stdlib_data, tmp_path, straight):
    config_path = write_config(stdlib_data, tmp_path)
    first = launch(config_path, slow=3.0)
    wait_until(lambda: len(records(tmp_path / "run")) >= 1, first)
    second = launch(config_path)
    code, err = finish(second)
    refused = time.monotonic()
    holder = json.loads((tmp_path / "run" / ".lock").read_text())["pid"]
    refusal = f"{tmp_path / 'run'} is in use by pid {holder} on "
    lines = sorted(line for line in err.splitlines() if line.startswith("bigtrain: error: "))
    assert len(lines) == 2, err
    assert lines[0].startswith(f"bigtrain: error: {refusal}")  # rank 0
    assert lines[1].startswith(f"bigtrain: error: rank 0: {refusal}")  # rank 1 names rank 0
    assert "received SIGTERM" not in err  # no rank mistook torchrun's stop for a preemption
    assert code != 0 and first.poll() is None  # refused while the first one trains
    assert finish(first)[0] == 0
    assert refused - second.started < 20  # 7.6 s measured; torchrun's 30 s grace period no longer runs
    check_recovered(tmp_path / "run", straight, launches=1)


def test_a_requeued_launch_waits_for_the_lock_then_continues_the_curve(stdlib_data, tmp_path, straight):
    """The Slurm requeue case: the second launch starts while the first still trains and saves;
    every rank of it waits for the lock, and all resume from the checkpoint the first left last."""
    config_path = write_config(stdlib_data, tmp_path)
    first = launch(config_path, "train.steps=6", slow=2.0)
    wait_until(lambda: len(records(tmp_path / "run")) >= 1, first)
    second = launch(config_path, "--wait-lock", "300")
    assert finish(first)[0] == 0
    assert finish(second)[0] == 0
    check_recovered(tmp_path / "run", straight, launches=2)
    assert [r["step"] for r in records(tmp_path / "run")] == list(range(1, STEPS + 1))  # the second began at 7


def test_a_signal_while_waiting_for_the_lock_ends_the_launch_at_once(stdlib_data, tmp_path, straight):
    """SIGTERM to a launch whose ranks still wait for the lock: every rank leaves at once with one
    line and the preemption code (there is nothing to save), and the running job is untouched."""
    config_path = write_config(stdlib_data, tmp_path)
    first = launch(config_path, slow=3.0)
    wait_until(lambda: len(records(tmp_path / "run")) >= 1, first)
    second = launch(config_path, "--wait-lock", "300")
    wait_until(lambda: len(children(second.pid)) == 2, second)
    time.sleep(5)  # the workers are through their imports and poll rank 0's verdict
    os.kill(second.pid, signal.SIGTERM)  # torchrun passes it on to its workers
    signalled = time.monotonic()
    code, err = finish(second)
    assert time.monotonic() - signalled < 10
    assert err.count("received SIGTERM before training started; exiting (nothing to save)") == 2, err
    assert code != 0 and first.poll() is None
    assert finish(first)[0] == 0
    check_recovered(tmp_path / "run", straight, launches=1)


def test_killing_the_agent_alone_commits_nothing_more(stdlib_data, tmp_path, straight):
    """Even when the watch thread is late (here: it looks once an hour), a worker checks for its
    launcher before a checkpoint becomes latest and before each metrics record."""
    config_path = write_config(stdlib_data, tmp_path)
    root = tmp_path / "run" / "checkpoints"
    first = launch(config_path, slow=1.0, watch_s=3600)
    wait_until(lambda: (root / "latest").exists() and any(root.glob(".tmp-*")), first)  # a save under way
    workers = children(first.pid)
    assert len(workers) == 2
    latest, logged = (root / "latest").read_text(), records(tmp_path / "run")
    os.kill(first.pid, signal.SIGKILL)  # the agent only: its workers run in sessions of their own
    first.wait()
    deadline = time.monotonic() + 10
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers)), "the workers outlived their launcher"
    assert (root / "latest").read_text() == latest  # the save under way never became latest
    assert records(tmp_path / "run") == logged  # and nothing was logged after the kill
    completes(config_path, "--wait-lock", "30")
    check_recovered(tmp_path / "run", straight, launches=2)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_minus_nine_while_writing_a_checkpoint(async_save, stdlib_data, tmp_path, straight):
    """Asynchronously, the kill lands while the background threads write and training goes on;
    `straight` is a synchronous run."""
    config_path = write_config(stdlib_data, tmp_path)
    root = tmp_path / "run" / "checkpoints"
    first = launch(config_path, f"checkpoint.async={async_save}", slow=1.0)
    wait_until(lambda: (root / "latest").exists() and any(root.glob(".tmp-*")), first)
    os.killpg(first.pid, signal.SIGKILL)  # the agent and both workers at once
    first.wait()
    assert any(root.glob(".tmp-*")), "the kill did not land while a checkpoint was written"
    latest = (root / "latest").read_text().strip()
    assert (root / latest / "files.json").is_file()
    completes(config_path, f"checkpoint.async={async_save}")
    check_recovered(tmp_path / "run", straight, launches=2)


def test_flipped_byte_is_refused_and_the_previous_checkpoint_resumes(stdlib_data, tmp_path, straight):
    config_path = write_config(stdlib_data, tmp_path)
    root = tmp_path / "run" / "checkpoints"
    completes(config_path, "train.steps=4")
    damaged = root / "step-0000004"
    victim = sorted((damaged / "deepspeed").glob("*optim_states.pt"))[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    code, err = finish(launch(config_path))
    assert code != 0
    assert (f"bigtrain: error: checkpoint {damaged} is damaged: {victim.relative_to(damaged)} does not match the "
            f"crc32c it was written with; the previous checkpoint is {root / 'step-0000002'}: resume with "
            f"run.resume={root / 'step-0000002'}") in err
    shutil.move(damaged, tmp_path / "damaged")  # set the damaged checkpoint aside, as the docs say
    completes(config_path, f"run.resume={root / 'step-0000002'}")
    check_recovered(tmp_path / "run", straight, launches=2)


def test_a_full_disk_during_a_save_keeps_latest(stdlib_data, tmp_path, straight):
    config_path = write_config(stdlib_data, tmp_path)
    root = tmp_path / "run" / "checkpoints"
    completes(config_path, "train.steps=4")
    code, err = finish(launch(config_path, file_limit=200_000))  # optimizer shards no longer fit
    assert code != 0
    assert f"bigtrain: error: cannot save checkpoint {root / 'step-0000006'}: " in err
    assert "checkpoints/latest still names step-0000004" in err
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002", "step-0000004"]
    completes(config_path)
    check_recovered(tmp_path / "run", straight, launches=3)
