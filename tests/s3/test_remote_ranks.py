"""`checkpoint.remote` on 2 ranks (DeepSpeed ZeRO-2 under torchrun) against a live S3-protocol
server: every file of every rank reaches the bucket before `latest` names the checkpoint, and a job
on an empty run directory resumes from the bucket and continues the uninterrupted curve bit for bit."""

import json
import os
import subprocess
import sys

import boto3
import pytest
import yaml

from tests.helpers import ranks_config

pytestmark = pytest.mark.distributed


def run(stdlib_data, tmp_path, name, steps, remote=None) -> dict[int, float]:
    """A 2-rank `bigtrain train` of `steps` steps in run directory `name`; its logged losses."""
    cfg = ranks_config(stdlib_data, tmp_path / name)
    cfg["train"].update(steps=steps, schedule="constant")  # the same curve whatever train.steps is
    cfg["checkpoint"].update(every=2, remote=remote)
    cfg["run"]["resume"] = "auto"
    cfg["parallel"] = {"engine": "deepspeed", "zero_stage": 2}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}  # S3_ENDPOINT_URL and credentials
    with open(tmp_path / f"{name}.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "bigtrain", "train", str(tmp_path / f"{name}.yaml")],
                              env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    records = map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_ranks_mirror_and_resume_from_the_bucket(stdlib_data, s3_server, s3_bucket, tmp_path):
    straight = run(stdlib_data, tmp_path, "straight", 6)
    remote = f"s3://{s3_bucket}/zero2"
    head = run(stdlib_data, tmp_path, "head", 4, remote)
    assert head == {s: straight[s] for s in range(1, 5)}
    client = boto3.client("s3", endpoint_url=s3_server)
    assert client.get_object(Bucket=s3_bucket, Key="zero2/latest")["Body"].read() == b"step-0000004\n"
    local = tmp_path / "head" / "checkpoints" / "step-0000004"
    listed = json.loads((local / "files.json").read_text())
    assert any(name.startswith("deepspeed/") and "rank_1" in name for name in listed)  # rank 1's own shard
    objects = client.list_objects_v2(Bucket=s3_bucket, Prefix="zero2/step-0000004/")["Contents"]
    assert {o["Key"].removeprefix("zero2/step-0000004/"): o["Size"] for o in objects} == {
        **{name: entry["bytes"] for name, entry in listed.items()}, "files.json": (local / "files.json").stat().st_size}

    tail = run(stdlib_data, tmp_path, "fresh", 6, remote)  # an empty run directory
    assert tail == {s: straight[s] for s in (5, 6)}
    assert client.get_object(Bucket=s3_bucket, Key="zero2/latest")["Body"].read() == b"step-0000006\n"
