"""slurm/train.sbatch and slurm/sweep.sbatch against a real Slurm: training, preemption with
requeue and resume, job arrays, and the mistakes a user makes in a job script."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from bigtrain.config import from_dict
from bigtrain.train.loop import train
from tests.helpers import small_model_config

from .conftest import REPO, StartWatch, finished, job_info, sbatch, srun, wait_for

STEPS = 300  # a few seconds of tiny steps: long enough to preempt mid-run


def write_config(path, data, run_dir, **train):
    config = {
        "run": {"name": "slurm", "dir": str(run_dir), "seed": 11},
        "model": dataclasses.asdict(small_model_config(vocab_size=512)),
        "data": {"path": str(data[0]), "val_path": str(data[1]), "seq_len": 16, "micro_batch": 4},
        "train": {"steps": STEPS, "lr": 3e-3, "warmup_steps": 1, "device": "cpu", **train},
        "eval": {"val_every": 1000, "val_batches": 1},
        "parallel": {"engine": "deepspeed"},
        "checkpoint": {"every": 1000},
        "log": {"every": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def step_losses(run_dir) -> dict[int, float]:
    """step → loss from metrics.jsonl, refusing a step logged twice."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was trained twice"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def torchrun_reference(stdlib_data, slurm_env, tmp_path_factory):
    """The same config launched directly: launch/torchrun.sh, 2 CPU workers (gloo), no Slurm."""
    root = tmp_path_factory.mktemp("torchrun")
    config = write_config(root / "config.yaml", stdlib_data, root / "run")
    env = {**slurm_env, "NPROC_PER_NODE": "2"}
    proc = subprocess.run([str(REPO / "launch" / "torchrun.sh"), str(config)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = step_losses(root / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 1.0  # the curve moves, so matching it means something
    return losses


def test_sbatch_trains_to_the_end_and_matches_torchrun(torchrun_reference, stdlib_data, slurm_env, tmp_path):
    config = write_config(tmp_path / "config.yaml", stdlib_data, tmp_path / "run")
    job = sbatch({**slurm_env, "NPROC_PER_NODE": "2"}, tmp_path, str(REPO / "slurm" / "train.sbatch"), str(config))
    info = wait_for(slurm_env, job, finished)
    log = (tmp_path / f"bigtrain-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert f"done: step {STEPS}" in log and "training exited with 0" in log
    assert step_losses(tmp_path / "run") == pytest.approx(torchrun_reference, rel=1e-6)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:07d}"


def test_plain_srun_one_task_per_process_matches_torchrun(torchrun_reference, stdlib_data, slurm_env, tmp_path):
    """`srun --ntasks 2 bigtrain train` without torchrun: ranks and rendezvous from Slurm's variables."""
    config = write_config(tmp_path / "config.yaml", stdlib_data, tmp_path / "run")
    proc = srun(slurm_env, tmp_path, "--ntasks=2", sys.executable, "-m", "bigtrain", "train", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert step_losses(tmp_path / "run") == pytest.approx(torchrun_reference, rel=1e-6)


def preempt_and_requeue(slurm_env, job, run_dir, between=lambda: None) -> tuple[dict, str]:
    """USR1 to train.sbatch mid-run, as before a time limit; once the job is requeued and its first
    attempt has ended, `between()`, then start it at once. The finished job's info and log."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    watch = StartWatch(slurm_env, job)
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):  # mid-run
        assert time.monotonic() < deadline and not finished(job_info(slurm_env, job))
        watch.check()
        time.sleep(0.2)
    # what Slurm's --signal=B:USR1@120 does before a time limit: USR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True)
    info = wait_for(slurm_env, job, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING")
    # Slurm holds a requeued job for BatchStartTimeout so that the previous attempt's processes
    # can end (their credential is revoked: an earlier start fails the job). Start it as soon as
    # slurmd reports both of that attempt's steps done.
    slurmd_log = Path(slurm_env["SLURM_CONF"]).parent / "log" / "slurmd.log"
    deadline = time.monotonic() + 120
    while not all(f"[{job}.{step}] done with job" in slurmd_log.read_text() for step in ("batch", "0")):
        assert time.monotonic() < deadline, "the first attempt's steps did not end after the requeue"
        time.sleep(0.5)
    between()
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_env, check=True)
    info = wait_for(slurm_env, job, finished)
    return info, (run_dir.parent / f"bigtrain-{job}.log").read_text()


def test_preempted_job_saves_requeues_and_resumes_on_the_same_curve(torchrun_reference, stdlib_data, slurm_env,
                                                                   tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", stdlib_data, run_dir)
    job = sbatch({**slurm_env, "NPROC_PER_NODE": "2"}, tmp_path, str(REPO / "slurm" / "train.sbatch"), str(config))
    info, log = preempt_and_requeue(slurm_env, job, run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-3000:])

    saved = [p.name for p in (run_dir / "checkpoints").glob("step-*")]
    preempted_at = int(min(saved).removeprefix("step-"))
    assert 5 <= preempted_at < STEPS and sorted(saved) == [f"step-{preempted_at:07d}", f"step-{STEPS:07d}"]
    assert log.count("received SIGUSR1") == 2  # both workers
    assert f"preempted at step {preempted_at}: saved" in log
    assert f"requeueing job {job}" in log and "run.resume=auto" in log
    # every step exactly once (step_losses refuses repeats), the same losses as without preemption
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == pytest.approx(torchrun_reference, rel=1e-6)


def test_requeued_job_on_a_fresh_node_resumes_from_the_remote(torchrun_reference, stdlib_data, slurm_env, s3_server,
                                                              s3_bucket, tmp_path):
    """checkpoint.remote: the requeued attempt finds an empty run directory (the first attempt's
    was on another node's disk: moved away here) and continues from the bucket on the same curve."""
    run_dir, remote = tmp_path / "run", f"s3://{s3_bucket}/slurm"
    config = write_config(tmp_path / "config.yaml", stdlib_data, run_dir)
    cfg = yaml.safe_load(config.read_text())
    cfg["checkpoint"]["remote"] = remote
    config.write_text(yaml.safe_dump(cfg))
    s3_env = {k: os.environ[k] for k in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                         "AWS_DEFAULT_REGION")}
    job = sbatch({**slurm_env, **s3_env, "NPROC_PER_NODE": "2"}, tmp_path, str(REPO / "slurm" / "train.sbatch"),
                 str(config))
    info, log = preempt_and_requeue(slurm_env, job, run_dir, between=lambda: run_dir.rename(tmp_path / "first"))
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-3000:])
    first, second = step_losses(tmp_path / "first"), step_losses(run_dir)
    preempted_at = max(first)
    assert sorted(second) == list(range(preempted_at + 1, STEPS + 1))  # nothing retrained, nothing skipped
    assert {**first, **second} == pytest.approx(torchrun_reference, rel=1e-6)
    client = boto3.client("s3", endpoint_url=s3_server)
    assert client.get_object(Bucket=s3_bucket, Key="slurm/latest")["Body"].read() == f"step-{STEPS:07d}\n".encode()
    assert f"uploaded {remote}/step-{preempted_at:07d}" in log


def test_sweep_array_trains_every_config_of_runs_txt(stdlib_data, slurm_env, tmp_path):
    plan = tmp_path / "plan"
    (plan / "configs").mkdir(parents=True)
    lrs = [1e-3, 3e-3, 1e-2]
    paths = []
    for i, lr in enumerate(lrs):
        path = write_config(plan / "configs" / f"lr{i}.yaml", stdlib_data, tmp_path / "runs" / f"lr{i}", lr=lr,
                            steps=5)
        config = yaml.safe_load(path.read_text())
        config["parallel"]["engine"] = "local"  # one process per task
        path.write_text(yaml.safe_dump(config))
        paths.append(path)
    # relative to PLAN_DIR, and one absolute
    (plan / "runs.txt").write_text(f"configs/lr0.yaml\nconfigs/lr1.yaml\n{paths[2]}\n")
    job = sbatch(slurm_env, tmp_path, "--array=0-2%2", str(REPO / "slurm" / "sweep.sbatch"), str(plan))
    for task in range(3):
        info = wait_for(slurm_env, f"{job}_{task}", finished)
        log = (tmp_path / f"bigtrain-sweep-{job}_{task}.log").read_text()
        assert info["JobState"] == "COMPLETED", log[-3000:]
    for i, path in enumerate(paths):
        run_dir = tmp_path / "runs" / f"lr{i}"
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-0000005"
        cfg = from_dict(yaml.safe_load(path.read_text()))
        cfg.run.dir = str(tmp_path / "direct" / f"lr{i}")
        expected = train(cfg, console=False).losses
        assert list(step_losses(run_dir).values()) == pytest.approx(expected, rel=1e-6)


def test_missing_config_is_one_line_in_the_job_log(slurm_env, tmp_path):
    job = sbatch(slurm_env, tmp_path, str(REPO / "slurm" / "train.sbatch"), "configs/nope.yaml")
    info = wait_for(slurm_env, job, finished)
    assert info["JobState"] == "FAILED"
    log = (tmp_path / f"bigtrain-{job}.log").read_text()
    assert log == f"train.sbatch: error: config file not found: configs/nope.yaml (relative paths start at {tmp_path})\n"


def test_sweep_task_without_a_line_is_one_line_in_the_job_log(slurm_env, tmp_path):
    (tmp_path / "runs.txt").write_text("a.yaml\n")
    job = sbatch(slurm_env, tmp_path, "--array=3", str(REPO / "slurm" / "sweep.sbatch"), str(tmp_path))
    info = wait_for(slurm_env, f"{job}_3", finished)
    assert info["JobState"] == "FAILED"
    log = (tmp_path / f"bigtrain-sweep-{job}_3.log").read_text()
    assert log == f"sweep.sbatch: error: {tmp_path}/runs.txt has no line 4 for array task 3\n"


def test_gpus_requested_but_none_visible_is_a_clear_error(stdlib_data, slurm_env, tmp_path):
    """The test node advertises a GPU to Slurm that torch cannot see, like a node without a driver."""
    config = write_config(tmp_path / "config.yaml", stdlib_data, tmp_path / "run")
    job = sbatch(slurm_env, tmp_path, "--gpus-per-node=1", str(REPO / "slurm" / "train.sbatch"), str(config))
    info = wait_for(slurm_env, job, finished)
    assert info["JobState"] == "FAILED"
    log = (tmp_path / f"bigtrain-{job}.log").read_text()
    errors = [line for line in log.splitlines() if "error:" in line and not line.startswith("srun:")]
    assert len(errors) == 1 and errors[0].startswith("multinode.sh: error: Slurm allocated 1 GPU(s) on"), log
    assert "but torch sees none (CUDA_VISIBLE_DEVICES=0)" in errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("how", "reason"), [
    (("sbatch", "--cpus-per-task=999"), "PartitionConfig"),  # more than the node has
    (("sbatch", "--begin=now+1hour"), "BeginTime"),
    (("srun", "--ntasks=999"), "PartitionConfig"),
], ids=["sbatch-more-cpus-than-the-node", "sbatch-begin-in-an-hour", "srun-more-tasks-than-cpus"])
def test_a_job_that_cannot_start_fails_with_its_pending_reason(slurm_env, tmp_path, how, reason):
    """The helpers every test submits through end a job that stays pending on an idle cluster."""
    tool, option = how
    limit = 3
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=rf"job (\d+) cannot start: PENDING \({reason}\) for {limit} s"
                       ) as failure:
        if tool == "sbatch":
            wait_for(slurm_env, sbatch(slurm_env, tmp_path, option, "--wrap=true"), finished, pending_limit=limit)
        else:
            srun(slurm_env, tmp_path, option, "true", pending_limit=limit)
    assert time.monotonic() - start < limit + 15
    job = failure.value.msg.split()[1]
    wait_for(slurm_env, job, lambda info: info.get("JobState") == "CANCELLED", timeout=30)  # not left queued


def test_under_srun_a_lost_rank_stops_the_others_naming_it(stdlib_data, slurm_env, tmp_path):
    """`srun --ntasks 2` without torchrun and without --kill-on-bad-exit: nobody else stops the
    survivor when a task dies; it stops itself, naming the rank."""
    config = write_config(tmp_path / "config.yaml", stdlib_data, tmp_path / "run", steps=100_000)
    proc = subprocess.Popen(["srun", "--ntasks=2", "--kill-on-bad-exit=0", sys.executable, "-m", "bigtrain", "train",
                             str(config), "parallel.timeout_minutes=0.25"], cwd=tmp_path, env=slurm_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(step_losses(tmp_path / "run") if (tmp_path / "run" / "metrics.jsonl").exists() else {}) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        rank1 = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_rank(p, config, "1"))
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)
        assert time.monotonic() - killed < 30
        assert "bigtrain: error: rank 1 stopped answering (" in err and "stopping rank 0" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _is_rank(proc_dir: Path, config: Path, rank: str) -> bool:
    """Whether /proc/PID is the bigtrain task of `config` with SLURM_PROCID=`rank`."""
    try:
        if str(config) not in (proc_dir / "cmdline").read_bytes().decode(errors="replace"):
            return False
        return f"SLURM_PROCID={rank}".encode() in (proc_dir / "environ").read_bytes().split(b"\0")
    except OSError:
        return False
