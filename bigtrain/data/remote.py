"""Object storage for MDS datasets: bounded reads of small files and listing an upload
target. A missing bucket, wrong credentials or an unreachable endpoint becomes one line
naming the object, after a bounded number of tries, each with a bounded timeout: never a hang.

`s3://` goes through boto3 at `S3_ENDPOINT_URL` when set (the variable mosaicml-streaming reads);
the other schemes streaming knows (`gs://`, `oci://`, ...) through its storage clients; a path
without a scheme is a local directory.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from bigtrain.data.shards import first_line
from bigtrain.errors import BigtrainError

T = TypeVar("T")

# S3 answers that another try cannot change: a missing bucket or key, refused credentials.
PERMANENT_S3_CODES = {
    "NoSuchBucket", "NoSuchKey", "404", "403", "AccessDenied", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "InvalidBucketName", "InvalidToken", "ExpiredToken",
    "AllAccessDisabled",
}


@dataclass(frozen=True)
class Retry:
    """How long to insist: `tries` attempts, each bounded by `timeout_s` (connect and each read),
    waiting `backoff_s`, then twice that (at most 8 s), between them."""

    tries: int = 3
    timeout_s: float = 60.0
    backoff_s: float = 1.0


DEFAULT_RETRY = Retry()  # streaming's defaults: 2 retries, 60 s


def is_remote(url: str) -> bool:
    """Whether `url` names object storage (`s3://`, `gs://`, ...) rather than a local path."""
    return urlparse(url).scheme not in ("", "file")


def join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


def _bucket_key(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed.netloc, parsed.path.lstrip("/")


def _s3_client(timeout_s: float):
    """A boto3 S3 client that tries once (the retries are `_bounded`'s) within `timeout_s`;
    unsigned when no credentials are configured (public buckets), as streaming's own client."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    session = boto3.session.Session()
    unsigned = {"signature_version": UNSIGNED} if session.get_credentials() is None else {}
    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                    retries={"total_max_attempts": 1}, **unsigned)
    return session.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL"), config=config)


def _describe(error: Exception) -> tuple[str, bool]:
    """(one line for the error, whether it is permanent)."""
    from botocore.exceptions import ClientError

    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        code = str(info.get("Code", ""))
        return f"{code}: {info.get('Message') or 'no message'}", code in PERMANENT_S3_CODES
    if isinstance(error, (FileNotFoundError, NotADirectoryError, PermissionError)):
        return f"{type(error).__name__}: {first_line(error)}", True
    return first_line(error), False


def _bounded(action: str, url: str, attempt: Callable[[], T], retry: Retry) -> T:
    """`attempt()`, tried again after a transient failure until `retry.tries` are spent."""
    started, tries = time.monotonic(), 0
    while True:
        tries += 1
        try:
            return attempt()
        except Exception as e:  # noqa: BLE001 - each storage client raises its own types
            message, permanent = _describe(e)
            if permanent or tries >= retry.tries:
                spent = time.monotonic() - started
                raise BigtrainError(
                    f"cannot {action} {url}: {message} (gave up after {tries} "
                    f"{'try' if tries == 1 else 'tries'} over {spent:.1f} s)"
                ) from e
        time.sleep(min(retry.backoff_s * 2 ** (tries - 1), 8.0))


def _read_once(url: str, timeout_s: float) -> bytes:
    if not is_remote(url):
        return Path(url).read_bytes()
    if urlparse(url).scheme == "s3":
        bucket, key = _bucket_key(url)
        return _s3_client(timeout_s).get_object(Bucket=bucket, Key=key)["Body"].read()
    from streaming.base.storage.download import CloudDownloader

    with tempfile.TemporaryDirectory(prefix="bigtrain-read-") as scratch:
        target = Path(scratch) / "object"
        CloudDownloader.direct_download(url, str(target), timeout=timeout_s)
        return target.read_bytes()


def read_bytes(url: str, retry: Retry = DEFAULT_RETRY) -> bytes:
    """The whole (small) object or file at `url`."""
    return _bounded("read", url, lambda: _read_once(url, retry.timeout_s), retry)


def _first_object(url: str, timeout_s: float) -> str | None:
    if urlparse(url).scheme == "s3":
        bucket, key = _bucket_key(url)
        prefix = f"{key.rstrip('/')}/" if key.strip("/") else ""
        found = _s3_client(timeout_s).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return found["Contents"][0]["Key"][len(prefix):] if found.get("Contents") else None
    from streaming.base.storage.upload import CloudUploader

    with tempfile.TemporaryDirectory(prefix="bigtrain-list-") as scratch:
        names = CloudUploader.get((scratch, url), exist_ok=True).list_objects() or []
    return names[0] if names else None


def first_object(url: str, retry: Retry = DEFAULT_RETRY) -> str | None:
    """The name of one object under the remote prefix `url` (the first in S3's order), or None
    when it holds none."""
    return _bounded("list", url, lambda: _first_object(url, retry.timeout_s), retry)
