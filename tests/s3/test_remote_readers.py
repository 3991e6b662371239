"""`bigtrain eval` and `bigtrain convert to-hf` read a remote checkpoint (s3://…): fetched into the
cache once, checked against `files.json`; a damaged remote file is refused in one line."""

import json
import os

import boto3
import pytest
from safetensors.torch import load_file

from bigtrain.cli import main
from bigtrain.train import loop
from tests.helpers import tiny_config


@pytest.fixture
def remote_run(stdlib_data, s3_bucket, tmp_path, monkeypatch):
    """A 2-step run mirrored to s3://<bucket>/r (checkpoints at steps 1 and 2); the cache in tmp_path."""
    monkeypatch.setenv("BIGTRAIN_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(stdlib_data, tmp_path / "run", steps=2, val_every=1000)
    cfg.checkpoint.every, cfg.checkpoint.remote = 1, f"s3://{s3_bucket}/r"
    loop.train(cfg, console=False)
    return cfg.checkpoint.remote, tmp_path / "run" / "checkpoints"


def test_eval_and_to_hf_read_a_remote_checkpoint(remote_run, stdlib_data, tmp_path, capsys):
    remote, local = remote_run
    assert main(["eval", f"{remote}/step-0000001", "--data", str(stdlib_data[1]), "--max-batches", "2"]) == 0
    remote_loss = capsys.readouterr().out.split("loss ")[1].split(",")[0]
    assert main(["eval", str(local / "step-0000001"), "--data", str(stdlib_data[1]), "--max-batches", "2"]) == 0
    assert capsys.readouterr().out.split("loss ")[1].split(",")[0] == remote_loss

    assert main(["convert", "to-hf", remote, str(tmp_path / "hf")]) == 0  # the remote root: its latest
    cached = tmp_path / "cache" / "checkpoints" / "s3" / remote[5:] / "step-0000002"
    assert json.loads((cached / "files.json").read_text()) == json.loads((local / "step-0000002" / "files.json").read_text())
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    assert hf["model.embed_tokens.weight"].equal(load_file(local / "step-0000002" / "model.safetensors")[
        "layers.0.embed_tokens.weight"])


def test_a_damaged_remote_checkpoint_is_refused(remote_run, tmp_path, capsys):
    remote, local = remote_run
    bucket, _, prefix = remote[5:].partition("/")
    data = bytearray((local / "step-0000002" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]).put_object(
        Bucket=bucket, Key=f"{prefix}/step-0000002/model.safetensors", Body=bytes(data))
    assert main(["convert", "to-hf", remote, str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bigtrain: error: cannot fetch {remote}/step-0000002: ") and "\n" not in err
    assert "model.safetensors does not match the crc32c it was written with" in err
    assert not (tmp_path / "cache" / "checkpoints" / "s3" / remote[5:] / "step-0000002").exists()
    assert not (tmp_path / "hf").exists()
