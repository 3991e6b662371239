"""No endless hangs: when one rank dies or freezes, the others stop within parallel.timeout_minutes
with a line naming the rank that stopped answering. Launched with plain torch.distributed
environment variables and no torchrun, where nobody else would stop the survivors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.distributed.test_checkpoints import config
from tests.helpers import CPU_RANKS_ENV

pytestmark = pytest.mark.distributed
TIMEOUT_MINUTES = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config_path, world_size=2) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**CPU_RANKS_ENV, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "bigtrain", "train", str(config_path)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def logged_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return sum("loss" in json.loads(line) for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("fault, victim, named", [
    ("kill", 1, "rank 1 stopped answering"),
    ("freeze", 1, "rank 1 stopped answering"),
    ("kill", 0, "the rendezvous store's host (rank 0 or the launcher) stopped answering"),
])
def test_survivors_stop_and_name_the_rank(fault, victim, named, stdlib_data, tmp_path):
    cfg = config(stdlib_data, tmp_path / "run")
    cfg["train"]["steps"] = 10_000
    cfg["parallel"] = {"engine": "deepspeed", "zero_stage": 2, "timeout_minutes": TIMEOUT_MINUTES}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    procs = launch(tmp_path / "config.yaml")
    try:
        deadline = time.monotonic() + 300
        while logged_steps(tmp_path / "run") < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
            time.sleep(0.2)
        os.kill(procs[victim].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        stopped = time.monotonic()
        survivor = procs[1 - victim]
        survivor.wait(timeout=60 * TIMEOUT_MINUTES + 60)
        elapsed = time.monotonic() - stopped
        assert survivor.returncode == 1
        last = survivor.stderr.read().strip().splitlines()[-1]
        assert last.startswith(f"bigtrain: error: {named} (") and last.endswith(f"stopping rank {1 - victim}"), last
        # a dead peer is noticed at once, a frozen one when the collective times out
        assert elapsed < (10 if fault == "kill" else 60 * TIMEOUT_MINUTES + 20), elapsed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
