"""The stores behind `checkpoint.remote`: s3:// and gs:// (GCS's S3-compatible API, pointed at the
test server with GCS_ENDPOINT_URL and HMAC keys GCS_KEY/GCS_SECRET) and a plain directory."""

import os

import boto3
import pytest

from bigtrain.object_store import Retry, StoreError, open_store, retrying


@pytest.fixture(params=["s3", "gs", "directory"])
def store_url(request, s3_bucket, tmp_path, monkeypatch):
    if request.param == "gs":
        monkeypatch.setenv("GCS_ENDPOINT_URL", os.environ["S3_ENDPOINT_URL"])
        monkeypatch.setenv("GCS_KEY", os.environ["AWS_ACCESS_KEY_ID"])
        monkeypatch.setenv("GCS_SECRET", os.environ["AWS_SECRET_ACCESS_KEY"])
        monkeypatch.delenv("S3_ENDPOINT_URL")  # gs:// must not use the S3 endpoint
    return {"s3": f"s3://{s3_bucket}/a/b", "gs": f"gs://{s3_bucket}/a/b", "directory": str(tmp_path / "remote")}[
        request.param]


def test_a_store_round_trips_lists_and_deletes(store_url, tmp_path):
    store = open_store(store_url)
    assert store.read_text("latest") is None and store.children() == []
    (tmp_path / "w.bin").write_bytes(b"\0" * 1000)
    for name in ("step-1", "step-2"):
        store.put(tmp_path / "w.bin", f"{name}/w.bin")
        store.put(tmp_path / "w.bin", f"{name}/deep/er.bin")
    store.write_text("latest", "step-2\n")
    assert store.read_text("latest") == "step-2\n"
    assert store.children() == ["step-1", "step-2"]
    store.get("step-2/deep/er.bin", tmp_path / "back" / "er.bin")
    assert (tmp_path / "back" / "er.bin").read_bytes() == b"\0" * 1000
    store.delete_tree("step-1")
    assert store.children() == ["step-2"]
    with pytest.raises(StoreError):
        store.get("step-1/w.bin", tmp_path / "gone.bin")


def test_a_missing_bucket_is_raised_at_once_or_retried_when_asked(s3_server):
    """A permanent error ends the tries, unless the policy insists (the checkpoint mirror's)."""
    store = open_store("s3://no-such-bucket-here/x")
    head = "cannot read s3://no-such-bucket-here/x/latest: NoSuchBucket: "
    warned = []
    with pytest.raises(StoreError, match=rf"^{head}.*\(gave up after 1 try over \d+\.\d s\)$"):
        retrying(lambda: store.read_text("latest"), Retry(tries=3, backoff_s=0.1), warned.append)
    assert warned == []
    with pytest.raises(StoreError, match=rf"^{head}.*\(gave up after 2 tries over \d+\.\d s\)$"):
        retrying(lambda: store.read_text("latest"), Retry(tries=2, backoff_s=0.1, retry_permanent=True),
                 warned.append)
    assert len(warned) == 1 and warned[0].startswith(head) and warned[0].endswith("; retry 1/1 in 0.1 s")
    assert "no-such-bucket-here" not in [b["Name"] for b in boto3.client(
        "s3", endpoint_url=s3_server).list_buckets()["Buckets"]]
