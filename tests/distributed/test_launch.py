"""launch/: two torchrun agents on this machine acting as two nodes, `accelerate launch`, and a
rendezvous that cannot be reached. Losses are compared with the single-process local engine."""

import dataclasses
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from bigtrain.config import from_dict
from bigtrain.train.loop import train
from tests.helpers import small_model_config

REPO = Path(__file__).resolve().parents[2]
STEPS, GLOBAL_BATCH = 20, 8


def config(data, run_dir, micro_batch=GLOBAL_BATCH // 2, engine="deepspeed") -> dict:
    return {
        "run": {"name": "launch", "dir": str(run_dir), "seed": 5},
        "model": dataclasses.asdict(small_model_config(vocab_size=512)),
        "data": {"path": str(data[0]), "val_path": str(data[1]), "seq_len": 16, "micro_batch": micro_batch},
        "train": {"steps": STEPS, "lr": 1e-2, "warmup_steps": 1, "device": "cpu", "global_batch": GLOBAL_BATCH},
        "eval": {"val_every": 1000, "val_batches": 1},
        "parallel": {"engine": engine},
        "checkpoint": {"every": 1000},
        "log": {"every": 1},
    }


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process(stdlib_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local")
    result = train(from_dict(config(stdlib_data, run_dir, GLOBAL_BATCH, "local")), console=False)
    assert result.losses[-1] < result.losses[0] - 0.5  # a curve that moves
    return result.losses


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(data, tmp_path / "run")))
    return path


def test_two_agents_as_two_nodes_match_one_process(single_process, stdlib_data, tmp_path):
    """`launch/multinode.sh` twice, one worker each: c10d rendezvous on 127.0.0.1, world size 2."""
    path, endpoint = write(tmp_path, stdlib_data), f"127.0.0.1:{free_port()}"
    agents = [
        subprocess.Popen([str(REPO / "launch" / "multinode.sh"), str(path)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env=env(NNODES="2", NODE_RANK=str(rank), RDZV_ENDPOINT=endpoint, RDZV_ID="two-nodes",
                                 NPROC_PER_NODE="1", RDZV_TIMEOUT="120"))
        for rank in (1, 0)  # node 1 first: it waits for node 0's endpoint
    ]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert losses(tmp_path / "run") == pytest.approx(single_process, rel=1e-5)


def test_accelerate_launch_matches_one_process(single_process, stdlib_data, tmp_path):
    path = write(tmp_path, stdlib_data)
    proc = subprocess.run(
        ["accelerate", "launch", "--config_file", str(REPO / "launch" / "accelerate_deepspeed.yaml"),
         "--num_processes", "2", "-m", "bigtrain", "train", str(path)],
        capture_output=True, text=True, env=env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "run") == pytest.approx(single_process, rel=1e-5)


def test_unreachable_rendezvous_is_one_line_after_the_timeout(stdlib_data, tmp_path):
    path, endpoint = write(tmp_path, stdlib_data), f"127.0.0.1:{free_port()}"  # nobody listens there
    started = time.monotonic()
    proc = subprocess.run([str(REPO / "launch" / "multinode.sh"), "--nnodes", "2", "--node-rank", "1",
                           "--rdzv-endpoint", endpoint, str(path)],
                          capture_output=True, text=True, env=env(RDZV_TIMEOUT="3"), timeout=60)
    assert proc.returncode == 1 and 3 <= time.monotonic() - started < 30
    assert proc.stderr == (f"multinode.sh: error: rendezvous endpoint {endpoint} not reachable after 3 s "
                           "(is node 0 running? check RDZV_ENDPOINT and the firewall)\n")
    assert not (tmp_path / "run").exists()


def test_missing_node_ends_the_rendezvous_after_the_timeout(stdlib_data, tmp_path):
    """Node 0 waiting for a node that never comes gives up after RDZV_TIMEOUT instead of hanging."""
    path = write(tmp_path, stdlib_data)
    started = time.monotonic()
    proc = subprocess.run([str(REPO / "launch" / "multinode.sh"), str(path)], capture_output=True, text=True,
                          env=env(NNODES="2", NODE_RANK="0", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
                                  RDZV_TIMEOUT="5"), timeout=120)
    assert proc.returncode != 0 and 5 <= time.monotonic() - started < 90
    assert "RendezvousTimeoutError" in proc.stderr
    assert not (tmp_path / "run").exists()
