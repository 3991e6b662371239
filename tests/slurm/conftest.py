"""A real single-node Slurm cluster for the session (tools/slurm_cluster.sh), and job helpers.

Without Slurm installed (or without root) these tests are skipped, except in CI (CI=true), where
they are required and fail instead.
"""

import os
import shutil
import subprocess
import time
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


def wait_for(env: dict, job_id: str, done, timeout: float = 300) -> dict[str, str]:
    """Poll the job until `done(info)`; fail with its state after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(env, job_id)
        if done(info):
            return info
        assert time.monotonic() < deadline, f"job {job_id} still {info.get('JobState')} after {timeout} s"
        time.sleep(0.5)


def finished(info: dict[str, str]) -> bool:
    return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
