"""kill -9 of a training job while it uploads a checkpoint to a live S3-protocol server: the remote
`latest` still names a complete checkpoint (every file there, crc32c as written), and a job on an
empty run directory resumes from it and logs the killed job's losses bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import boto3
import yaml

from bigtrain.checkpoint.mirror import cached_checkpoint
from bigtrain.train import loop
from tests.helpers import tiny_config

# ~11 M parameters: each checkpoint is ~130 MB (weights and AdamW moments), so an upload spans steps
MODEL = {"vocab_size": 512, "d_model": 384, "n_layers": 6, "n_heads": 6, "n_kv_heads": 2, "ffn_hidden": 1024,
         "max_seq_len": 64}


def losses(run_dir) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:  # the line the kill cut short
            pass
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_kill_during_an_upload_leaves_a_complete_remote_latest(stdlib_data, s3_server, s3_bucket, tmp_path,
                                                               monkeypatch):
    remote = f"s3://{s3_bucket}/run"
    cfg = tiny_config(stdlib_data, tmp_path / "killed", validate=False, verify_checksums=False, steps=40, val_every=1000)
    cfg.model = type(cfg.model)(**MODEL)
    cfg.data.micro_batch, cfg.checkpoint.every, cfg.checkpoint.remote, cfg.log.every = 2, 2, remote, 1
    cfg.run.resume, cfg.train.schedule = "auto", "constant"  # constant: the resumed job may stop earlier
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    client = boto3.client("s3", endpoint_url=s3_server)

    def uploading() -> str | None:
        """A checkpoint newer than the remote latest with some of its files there, but not all."""
        objects = client.list_objects_v2(Bucket=s3_bucket, Prefix="run/").get("Contents", [])
        keys = {o["Key"].removeprefix("run/") for o in objects}
        latest = client.get_object(Bucket=s3_bucket, Key="run/latest")["Body"].read().decode().strip() \
            if "latest" in keys else ""
        started = {k.split("/")[0] for k in keys if k.startswith("step-")}
        partial = [s for s in started if s > latest and f"{s}/files.json" not in keys]
        return max(partial) if partial and latest else None

    proc = subprocess.Popen([sys.executable, "-m", "bigtrain", "train", str(tmp_path / "config.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    in_flight = None
    try:
        while proc.poll() is None and in_flight is None:
            in_flight = uploading()
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process tree: the trainer and its upload thread
        proc.wait()
    assert in_flight, "the job ended before an upload was caught in flight"

    latest = client.get_object(Bucket=s3_bucket, Key="run/latest")["Body"].read().decode().strip()
    assert latest < in_flight
    monkeypatch.setenv("BIGTRAIN_CACHE", str(tmp_path / "cache"))
    assert cached_checkpoint(remote).name == latest  # downloaded and checked against files.json (crc32c)

    killed = losses(tmp_path / "killed")
    resumed_at = int(latest.removeprefix("step-"))
    cfg.run.dir, cfg.train.steps = str(tmp_path / "fresh"), max(killed)
    result = loop.train(cfg, console=False)
    assert result.losses == [killed[s] for s in range(resumed_at + 1, max(killed) + 1)]
