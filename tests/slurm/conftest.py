"""A real single-node Slurm cluster for the session (tools/slurm_cluster.sh), and job helpers.

Without Slurm installed (or without root) these tests are skipped, except in CI (CI=true), where
they are required and fail instead.

Every job a test starts goes through `sbatch` + `wait_for` or `srun` here, which watch it with
`StartWatch`: a job that cannot start (more CPUs than the node has, a start time in the future, a
dependency that never ends) fails the test within `PENDING_LIMIT_S` with Slurm's pending reason,
instead of a generic timeout minutes later.
"""

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tools" / "slurm_cluster.sh"


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Slurm tests are required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_env():
    """Start the cluster; yield the environment jobs are submitted with; stop what was started."""
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(t) is None]
    if missing:
        _unavailable(f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        _unavailable("the throw-away Slurm cluster needs root")
    proc = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cluster_dir = Path(proc.stdout.strip())
    env = {**os.environ, "SLURM_CONF": str(cluster_dir / "slurm.conf"), "BIGTRAIN_HOME": str(REPO),
           "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("NPROC_PER_NODE", None)
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop", str(cluster_dir)], timeout=60)
        shutil.rmtree(cluster_dir, ignore_errors=True)


def sbatch(env: dict, cwd: Path, *args: str) -> str:
    """Submit a batch job from `cwd`; return its id."""
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, …); empty once forgotten."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True)
    return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)


# A job that can start does so within seconds of the cluster going idle (the scheduler runs on
# every submission and every job end), so this long pending with nothing running means never.
PENDING_LIMIT_S = 30


def _squeue(env: dict, *args: str) -> list[str]:
    """`squeue -h ARGS` lines; none for a job id slurmctld does not know (any more)."""
    proc = subprocess.run(["squeue", "-h", *args], env=env, capture_output=True, text=True, timeout=60)
    return proc.stdout.splitlines() if proc.returncode == 0 else []


class StartWatch:
    """Fails the test, naming the job's pending reason, once the job has been PENDING for `limit`
    seconds while no other job ran on the cluster: then nothing will ever free what it waits for
    (`PartitionConfig`: it asks for more than the node has; `BeginTime`; `Dependency`; ...).
    Waiting behind the test's own running jobs (`Resources`, `JobArrayTaskLimit`) does not count."""

    def __init__(self, env: dict, job_id: str, limit: float = PENDING_LIMIT_S):
        self.env, self.job_id, self.limit = env, job_id, limit
        self.idle_since: float | None = None

    def check(self) -> None:
        lines = _squeue(self.env, "-j", self.job_id, "-o", "%T|%r")
        state, _, reason = lines[0].partition("|") if lines else ("", "", "")
        if state != "PENDING" or any(
            job != self.job_id
            for job in _squeue(self.env, "-t", "RUNNING,COMPLETING,CONFIGURING", "-o", "%i")
        ):
            self.idle_since = None
            return
        now = time.monotonic()
        if self.idle_since is None:
            self.idle_since = now
        elif now - self.idle_since >= self.limit:
            subprocess.run(["scancel", self.job_id], env=self.env, capture_output=True, timeout=60)
            pytest.fail(f"job {self.job_id} cannot start: PENDING ({reason}) for {self.limit:g} s "
                        "with no other job running on the cluster")


def wait_for(env: dict, job_id: str, done, timeout: float = 300,
             pending_limit: float = PENDING_LIMIT_S) -> dict[str, str]:
    """Poll the job until `done(info)`; fail with its state after `timeout` seconds, or with its
    pending reason as soon as `StartWatch` finds that it cannot start."""
    deadline = time.monotonic() + timeout
    watch = StartWatch(env, job_id, pending_limit)
    while True:
        info = job_info(env, job_id)
        if done(info):
            return info
        assert time.monotonic() < deadline, f"job {job_id} still {info.get('JobState')} after {timeout} s"
        watch.check()
        time.sleep(0.5)


def srun(env: dict, cwd: Path, *args: str, timeout: float = 300,
         pending_limit: float = PENDING_LIMIT_S) -> subprocess.CompletedProcess:
    """`srun ARGS` from `cwd` to its end, watched like `wait_for`: a job that cannot start or that
    runs past `timeout` is cancelled and fails the test."""
    name = f"bigtrain-test-{uuid.uuid4().hex[:12]}"  # to find the job srun submits
    command = ["srun", f"--job-name={name}", *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        job_id, watch = None, None
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if watch is None and (ids := _squeue(env, "-n", name, "-o", "%i")):
                    job_id = ids[0]
                    watch = StartWatch(env, job_id, pending_limit)
                if watch is not None:
                    watch.check()
                assert time.monotonic() < deadline, f"srun job {job_id} still running after {timeout} s"
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                if job_id is not None:
                    subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=60)
                proc.terminate()  # srun revokes a pending allocation and ends its steps
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read())


def finished(info: dict[str, str]) -> bool:
    return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
