"""The small reads of MDS datasets: a dataset's own files (`bigtrain-mds.json`, the tokenizer)
and the first object under an upload target, within a `Retry` (`bigtrain.object_store`).

`s3://` goes through the object store's boto3 client (at `S3_ENDPOINT_URL` when set, the
variable mosaicml-streaming reads); the other schemes streaming knows (`gs://`, `oci://`, ...)
through its storage clients, as the shards themselves are; a path without a scheme is a local
directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from urllib.parse import urlparse

from bigtrain.object_store import Retry, attempt, bucket_key, client, is_remote, retrying

DEFAULT_RETRY = Retry()  # streaming's defaults: 2 retries, 60 s


def _s3(timeout_s: float):
    """An S3 client that tries once (the retries are `retrying`'s), reading public buckets too."""
    return client("s3", timeout_s, timeout_s, public=True)


def _read_once(url: str, timeout_s: float) -> bytes:
    if not is_remote(url):
        return Path(url).read_bytes()
    if urlparse(url).scheme == "s3":
        bucket, key = bucket_key(url)
        return _s3(timeout_s).get_object(Bucket=bucket, Key=key)["Body"].read()
    from streaming.base.storage.download import CloudDownloader

    with tempfile.TemporaryDirectory(prefix="bigtrain-read-") as scratch:
        target = Path(scratch) / "object"
        CloudDownloader.direct_download(url, str(target), timeout=timeout_s)
        return target.read_bytes()


def read_bytes(url: str, retry: Retry = DEFAULT_RETRY) -> bytes:
    """The whole (small) object or file at `url`."""
    return retrying(lambda: attempt("read", url, lambda: _read_once(url, retry.timeout_s)), retry)


def _first_object(url: str, timeout_s: float) -> str | None:
    if urlparse(url).scheme == "s3":
        bucket, key = bucket_key(url)
        prefix = f"{key.rstrip('/')}/" if key.strip("/") else ""
        found = _s3(timeout_s).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return found["Contents"][0]["Key"][len(prefix):] if found.get("Contents") else None
    from streaming.base.storage.upload import CloudUploader

    with tempfile.TemporaryDirectory(prefix="bigtrain-list-") as scratch:
        names = CloudUploader.get((scratch, url), exist_ok=True).list_objects() or []
    return names[0] if names else None


def first_object(url: str, retry: Retry = DEFAULT_RETRY) -> str | None:
    """The name of one object under the remote prefix `url` (the first in S3's order), or None
    when it holds none."""
    return retrying(lambda: attempt("list", url, lambda: _first_object(url, retry.timeout_s)), retry)
