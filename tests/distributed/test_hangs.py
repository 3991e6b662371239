"""No endless hangs: when one rank dies or freezes, the others stop within parallel.timeout_minutes
with a line naming the rank that stopped answering. Launched with plain torch.distributed
environment variables and no torchrun, where nobody else would stop the survivors."""

import functools
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers import CPU_RANKS_ENV, ranks_config

TIMEOUT_MINUTES = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config_path, world_size=2, file_limits=None) -> list[subprocess.Popen]:
    """One `bigtrain train` per rank; `file_limits`: rank → largest file it may write."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**CPU_RANKS_ENV, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        limit = (file_limits or {}).get(rank)
        procs.append(subprocess.Popen([sys.executable, "-m", "bigtrain", "train", str(config_path)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      preexec_fn=limit and functools.partial(limit_file_size, limit)))
    return procs


def limit_file_size(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def logged_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return sum("loss" in json.loads(line) for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("fault, victim, named", [
    ("kill", 1, "rank 1 stopped answering"),
    ("freeze", 1, "rank 1 stopped answering"),
    ("kill", 0, "the rendezvous store's host (rank 0 or the launcher) stopped answering"),
])
def test_survivors_stop_and_name_the_rank(fault, victim, named, stdlib_data, tmp_path):
    cfg = ranks_config(stdlib_data, tmp_path / "run")
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


def test_an_error_on_one_rank_is_named_by_the_others(stdlib_data, tmp_path):
    """Rank 1 alone cannot write its share of a checkpoint (a file-size limit on that process):
    it stops with its line, and rank 0 stops with the same line naming rank 1, not a broken
    collective."""
    cfg = ranks_config(stdlib_data, tmp_path / "run")
    cfg["parallel"] = {"engine": "deepspeed", "zero_stage": 2, "timeout_minutes": TIMEOUT_MINUTES}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    procs = launch(tmp_path / "config.yaml", file_limits={1: 200_000})  # its optimizer shard no longer fits
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-2000:]
        errors.append(err.strip().splitlines()[-1])
    line = f"cannot save checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-0000003'}: "
    assert errors[1].startswith(f"bigtrain: error: {line}") and errors[1].endswith("no checkpoint was written")
    assert errors[0] == errors[1].replace("bigtrain: error: ", "bigtrain: error: rank 1: ")
