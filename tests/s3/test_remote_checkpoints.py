"""`checkpoint.remote` against a live S3-protocol server (and a directory remote): checkpoints are
uploaded in the background, the remote `latest` is written only once every file arrived, old
remote checkpoints are pruned after it, a run on an empty directory resumes from the remote bit
for bit, and a failing remote warns, retries and fails the run only if its last checkpoint never
arrived."""

import json
import os
from pathlib import Path

import boto3
import pytest

from bigtrain.checkpoint.files import file_crc32c
from bigtrain.errors import BigtrainError
from bigtrain.train import loop
from tests.helpers import read_metrics, tiny_config

STEPS = 8


def config(stdlib_data, run_dir, remote, steps=STEPS, every=4, **checkpoint):
    cfg = tiny_config(stdlib_data, run_dir, validate=False, verify_checksums=False, steps=steps, val_every=1000, schedule="constant")  # any train.steps
    cfg.checkpoint.every, cfg.checkpoint.remote, cfg.log.every = every, remote, 2
    for key, value in checkpoint.items():
        setattr(cfg.checkpoint, key, value)
    return cfg


def s3():
    return boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])


def remote_of(kind, s3_bucket, tmp_path):
    return f"s3://{s3_bucket}/runs/r1" if kind == "s3" else str(tmp_path / "mirror")


def read_remote(remote, key):
    """An object of the remote (bucket or directory), or None."""
    if remote.startswith("s3://"):
        bucket, _, prefix = remote[5:].partition("/")
        client = s3()
        try:
            return client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
    path = Path(remote) / key
    return path.read_bytes() if path.is_file() else None


def remote_names(remote):
    if remote.startswith("s3://"):
        bucket, _, prefix = remote[5:].partition("/")
        pages = s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/",
                                                                             Delimiter="/")
        return sorted(p["Prefix"].split("/")[-2] for page in pages for p in page.get("CommonPrefixes", []))
    return sorted(p.name for p in Path(remote).iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def straight(stdlib_data, tmp_path_factory):
    """The losses of an uninterrupted run of 2 × STEPS steps."""
    cfg = tiny_config(stdlib_data, tmp_path_factory.mktemp("straight") / "run", validate=False, verify_checksums=False, steps=2 * STEPS, val_every=1000,
                      schedule="constant")
    return loop.train(cfg, console=False).losses


@pytest.mark.parametrize("kind", ["s3", "directory", "s3-async"])
def test_remote_mirrors_prunes_and_an_empty_run_dir_resumes_bitwise(kind, stdlib_data, s3_bucket, tmp_path, straight):
    """`s3-async`: with `checkpoint.async` the mirror takes each checkpoint once it is complete."""
    remote = remote_of(kind.removesuffix("-async"), s3_bucket, tmp_path)
    cfg = config(stdlib_data, tmp_path / "a", remote, keep_last=1)
    cfg.checkpoint.async_save = kind.endswith("-async")
    head = loop.train(cfg, console=False)
    assert head.losses == straight[:STEPS]
    assert read_remote(remote, "latest") == b"step-0000008\n"
    assert remote_names(remote) == ["step-0000008"]  # step 4 pruned once step 8's latest was written
    listed = json.loads(read_remote(remote, "step-0000008/files.json"))
    local = tmp_path / "a" / "checkpoints" / "step-0000008"
    assert listed == json.loads((local / "files.json").read_text())
    for name, entry in listed.items():
        assert read_remote(remote, f"step-0000008/{name}") == (local / name).read_bytes()
        assert file_crc32c(local / name) == entry["crc32c"]
    uploads = [r for r in read_metrics(tmp_path / "a") if "checkpoint_upload_s" in r]
    assert [r["checkpoint_remote"] for r in uploads] == [f"{remote}/step-0000004", f"{remote}/step-0000008"]

    # a new node: an empty run directory, run.resume=auto
    cfg = config(stdlib_data, tmp_path / "b", remote, steps=2 * STEPS, keep_last=1)
    cfg.run.resume = "auto"
    tail = loop.train(cfg, console=False)
    assert tail.losses == straight[STEPS:]  # bitwise: the same floats as the uninterrupted run
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["latest", "step-0000016"]
    assert read_remote(remote, "latest") == b"step-0000016\n"
    assert remote_names(remote) == ["step-0000016"]


def test_a_new_run_refuses_a_remote_with_checkpoints(stdlib_data, s3_bucket, tmp_path):
    remote = f"s3://{s3_bucket}/r"
    loop.train(config(stdlib_data, tmp_path / "a", remote, steps=2, every=2), console=False)
    with pytest.raises(BigtrainError, match=f"checkpoint.remote={remote} already has checkpoints"):
        loop.train(config(stdlib_data, tmp_path / "b", remote, steps=2, every=2), console=False)


def test_a_deleted_bucket_warns_retries_and_fails_the_run_at_the_end(stdlib_data, s3_bucket, tmp_path,
                                                                     monkeypatch, capsys):
    """The bucket disappears after the first checkpoint: training goes on to the last step, each
    upload is retried, and the run ends with one line saying the final checkpoint is not remote."""
    save = loop.ckpt.begin_save

    def save_then_delete_bucket(run_dir, step, *args, **kwargs):
        if step == 4:  # the step-2 checkpoint reached the remote (it was waited for before this save)
            s3 = boto3.resource("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
            s3.Bucket(s3_bucket).objects.all().delete()
            s3.Bucket(s3_bucket).delete()
        return save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(loop.ckpt, "begin_save", save_then_delete_bucket)
    cfg = config(stdlib_data, tmp_path / "a", f"s3://{s3_bucket}/r", steps=6, every=2, remote_retries=1)
    with pytest.raises(BigtrainError) as error:
        loop.train(cfg, console=False)
    message = str(error.value)
    assert message.startswith(f"the final checkpoint step-0000006 did not reach s3://{s3_bucket}/r (")
    assert "NoSuchBucket" in message and "\n" not in message
    stderr = capsys.readouterr().err
    assert "retry 1/1 in 1 s" in stderr
    assert "warning: checkpoint step-0000004 did not reach" in stderr
    assert [r["step"] for r in read_metrics(tmp_path / "a") if "loss" in r] == [2, 4, 6]  # training went on
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text() == "step-0000006\n"  # local copy intact


def test_a_stopped_server_warns_and_the_run_fails_at_the_end(stdlib_data, s3_server, tmp_path, monkeypatch, capsys):
    """A private server is stopped after the first checkpoint arrived: the same, for an unreachable endpoint."""
    import s3_server  # registered by the s3_server fixture's module loader

    endpoint = s3_server.start(tmp_path / "server")
    try:
        monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="stopped")
        save = loop.ckpt.begin_save

        def save_then_stop_server(run_dir, step, *args, **kwargs):
            if step == 4:
                s3_server.stop(tmp_path / "server")
            return save(run_dir, step, *args, **kwargs)

        monkeypatch.setattr(loop.ckpt, "begin_save", save_then_stop_server)
        cfg = config(stdlib_data, tmp_path / "a", "s3://stopped/r", steps=4, every=2, remote_retries=1)
        with pytest.raises(BigtrainError, match="^the final checkpoint step-0000004 did not reach s3://stopped/r"):
            loop.train(cfg, console=False)
        assert "retry 1/1" in capsys.readouterr().err
        assert [r["checkpoint_remote"] for r in read_metrics(tmp_path / "a") if "checkpoint_upload_s" in r] == [
            "s3://stopped/r/step-0000002"]
    finally:
        s3_server.stop(tmp_path / "server")


def test_a_local_resume_uploads_the_checkpoint_the_remote_missed(stdlib_data, tmp_path):
    """The last job was killed before its upload finished: the next one uploads that checkpoint first."""
    remote = str(tmp_path / "mirror")
    loop.train(config(stdlib_data, tmp_path / "a", None, steps=2, every=2), console=False)  # nothing remote yet
    cfg = config(stdlib_data, tmp_path / "a", remote, steps=4, every=2)
    cfg.run.resume = "auto"
    loop.train(cfg, console=False)
    uploads = [r["checkpoint_remote"] for r in read_metrics(tmp_path / "a") if "checkpoint_upload_s" in r]
    assert uploads == [f"{remote}/step-0000002", f"{remote}/step-0000004"]
    assert remote_names(remote) == ["step-0000002", "step-0000004"]
    assert read_remote(remote, "latest") == b"step-0000004\n"
