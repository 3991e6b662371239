"""Object storage: which paths are remote, the boto3 client, the retry loop, the one-line error,
and the stores `checkpoint.remote` keeps checkpoints in.

A store is rooted at a URL and holds keys relative to it (`latest`, `step-0000100/files.json`):

    s3://bucket/prefix   boto3; endpoint from S3_ENDPOINT_URL (MinIO, Ceph, moto, …), credentials as
                         boto3 finds them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, roles)
    gs://bucket/prefix   Google Cloud Storage through its S3-compatible XML API with HMAC keys
                         GCS_KEY/GCS_SECRET (as mosaicml-streaming reads them); endpoint
                         https://storage.googleapis.com or GCS_ENDPOINT_URL
    /path or file://…    a directory (an NFS mount, another disk): files are copied, then renamed

Every failure is a `StoreError`, one line naming the object (`cannot read s3://b/k: NoSuchKey: …`);
`retrying` tries again a bounded number of times with exponential backoff, each try bounded by
the client's timeouts: never a hang.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlparse

from bigtrain.errors import BigtrainError, first_line

T = TypeVar("T")
BUCKET_SCHEMES = ("s3", "gs")
GCS_ENDPOINT = "https://storage.googleapis.com"
# S3 answers that another try cannot change: a missing bucket or key, refused credentials.
PERMANENT_S3_CODES = {
    "NoSuchBucket", "NoSuchKey", "404", "403", "AccessDenied", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "InvalidBucketName", "InvalidToken", "ExpiredToken",
    "AllAccessDisabled",
}


class StoreError(BigtrainError):
    """A storage operation that failed, in one line naming the object; `permanent` when another
    try cannot change the answer (a missing bucket or file, refused credentials)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Retry:
    """How long to insist: `tries` attempts, waiting `backoff_s`, then twice that (at most
    `max_backoff_s`), between them; a permanent error ends them unless `retry_permanent`.
    `timeout_s` bounds each try (connect and each read) of the clients made for this policy."""

    tries: int = 3
    timeout_s: float = 60.0
    backoff_s: float = 1.0
    max_backoff_s: float = 8.0
    retry_permanent: bool = False


def is_remote(url: str | Path) -> bool:
    """Whether `url` names object storage (`s3://`, `gs://`, …) rather than a local path (a `Path`,
    a path without a scheme, a `file://` URL)."""
    return isinstance(url, str) and urlparse(url).scheme not in ("", "file")


def join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


def bucket_key(url: str) -> tuple[str, str]:
    """(bucket, key) of `scheme://bucket/key`."""
    parsed = urlparse(url)
    return parsed.netloc, parsed.path.lstrip("/")


def client(scheme: str, connect_timeout_s: float, read_timeout_s: float, attempts: int = 1,
           public: bool = False):
    """A boto3 S3 client for `s3://` (at S3_ENDPOINT_URL when set) or `gs://` (module docstring)
    that makes at most `attempts` attempts per request itself, each bounded by the timeouts.
    With `public`, requests are unsigned when no credentials are found (public buckets), as
    mosaicml-streaming's own client does."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    options = {"endpoint_url": os.environ.get("S3_ENDPOINT_URL") or None}
    if scheme == "gs":
        options = {"endpoint_url": os.environ.get("GCS_ENDPOINT_URL", GCS_ENDPOINT),
                   "aws_access_key_id": os.environ.get("GCS_KEY"),
                   "aws_secret_access_key": os.environ.get("GCS_SECRET")}
    session = boto3.session.Session()
    anonymous = public and not options.get("aws_access_key_id") and session.get_credentials() is None
    config = Config(connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
                    retries={"mode": "standard", "total_max_attempts": attempts},
                    **({"signature_version": UNSIGNED} if anonymous else {}))
    return session.client("s3", config=config, **options)


def describe(error: BaseException) -> tuple[str, bool]:
    """(one line for a storage client's error, whether it is permanent)."""
    from botocore.exceptions import ClientError

    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        code = str(info.get("Code", ""))
        return f"{code}: {info.get('Message') or 'no message'}", code in PERMANENT_S3_CODES
    if isinstance(error, (FileNotFoundError, NotADirectoryError, PermissionError)):
        return f"{type(error).__name__}: {first_line(error)}", True
    return first_line(error), False


def attempt(action: str, url: str, fn: Callable[[], T]) -> T:
    """`fn()`; its failure as the `StoreError` "cannot `action` `url`: why"."""
    try:
        return fn()
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - each storage client raises its own types
        reason, permanent = describe(e)
        raise StoreError(f"cannot {action} {url}: {reason}", permanent) from e


def retrying(fn: Callable[[], T], retry: Retry, warn: Callable[[str], None] | None = None) -> T:
    """`fn()`, tried again after a `StoreError` until `retry.tries` are spent; `warn` hears of each
    retry ("<error>; retry i/n in w s"). The last error is raised, saying how long it was tried."""
    started, tries = time.monotonic(), 0
    while True:
        tries += 1
        try:
            return fn()
        except StoreError as e:
            if tries >= retry.tries or (e.permanent and not retry.retry_permanent):
                spent = time.monotonic() - started
                raise StoreError(f"{e} (gave up after {tries} {'try' if tries == 1 else 'tries'} "
                                 f"over {spent:.1f} s)", e.permanent) from e
            wait = min(retry.backoff_s * 2 ** (tries - 1), retry.max_backoff_s)
            if warn is not None:
                warn(f"{e}; retry {tries}/{retry.tries - 1} in {wait:g} s")
            time.sleep(wait)


class Store(Protocol):
    url: str

    def put(self, local: Path, key: str) -> None: ...  # upload, then confirm the stored size
    def get(self, key: str, local: Path) -> None: ...
    def read_text(self, key: str) -> str | None: ...  # None: no such key
    def write_text(self, key: str, text: str) -> None: ...
    def children(self) -> list[str]: ...  # the names of the top-level "directories"
    def delete_tree(self, name: str) -> None: ...


def open_store(url: str) -> Store:
    """The store rooted at `url`: a bucket for s3:// and gs://, else a directory."""
    if urlparse(url).scheme in BUCKET_SCHEMES:
        return BucketStore(url)
    if is_remote(url):
        raise BigtrainError(f"{url}: checkpoints are kept in s3://, gs:// or a directory")
    return DirectoryStore(url.removeprefix("file://"))


class BucketStore:
    """An S3 or GCS bucket prefix, through boto3 (thread-safe: one client serves every thread)."""

    def __init__(self, url: str):
        parsed = urlparse(url)
        if not parsed.netloc:
            raise BigtrainError(f"{url} names no bucket; use {parsed.scheme}://BUCKET/PREFIX")
        self.url, self.scheme, self.bucket = url.rstrip("/"), parsed.scheme, parsed.netloc
        self.prefix = parsed.path.strip("/") + "/" if parsed.path.strip("/") else ""
        self.client = client(self.scheme, connect_timeout_s=10, read_timeout_s=120, attempts=4)

    def _key(self, key: str) -> str:
        return self.prefix + key

    def put(self, local: Path, key: str) -> None:
        url = f"{self.url}/{key}"
        attempt("upload", url, lambda: self.client.upload_file(str(local), self.bucket, self._key(key)))
        head = attempt("check", url, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        if head["ContentLength"] != local.stat().st_size:
            raise StoreError(f"{url} holds {head['ContentLength']} bytes, {local.stat().st_size} were uploaded")

    def get(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        attempt("download", f"{self.url}/{key}",
                lambda: self.client.download_file(self.bucket, self._key(key), str(local)))

    def read_text(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        def read() -> str | None:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read().decode()
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

        return attempt("read", f"{self.url}/{key}", read)

    def write_text(self, key: str, text: str) -> None:
        attempt("write", f"{self.url}/{key}",
                lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=text.encode()))

    def _pages(self, **kwargs) -> list[dict]:
        paginator = self.client.get_paginator("list_objects_v2")
        return attempt("list", self.url, lambda: list(paginator.paginate(Bucket=self.bucket, **kwargs)))

    def children(self) -> list[str]:
        pages = self._pages(Prefix=self.prefix, Delimiter="/")
        return sorted(p["Prefix"][len(self.prefix):].rstrip("/") for page in pages
                      for p in page.get("CommonPrefixes", []))

    def delete_tree(self, name: str) -> None:
        keys = [o["Key"] for page in self._pages(Prefix=self._key(name) + "/") for o in page.get("Contents", [])]
        if self.scheme == "gs":  # GCS's XML API has no multi-object delete
            for key in keys:
                attempt("delete", f"gs://{self.bucket}/{key}",
                        lambda key=key: self.client.delete_object(Bucket=self.bucket, Key=key))
            return
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            attempt("delete", f"{self.url}/{name}",
                    lambda batch=batch: self.client.delete_objects(Bucket=self.bucket, Delete=batch))


class DirectoryStore:
    """A directory, e.g. on a network filesystem; each file is copied under a temporary name and renamed."""

    def __init__(self, path: str):
        self.root = Path(path)
        self.url = str(self.root)

    def _replace(self, key: str, write: Callable[[Path], None]) -> None:
        target = self.root / key
        tmp = target.with_name(f".{target.name}.tmp")

        def replace() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, target)

        attempt("write", str(target), replace)

    def put(self, local: Path, key: str) -> None:
        self._replace(key, lambda tmp: shutil.copyfile(local, tmp))

    def get(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        attempt("read", str(self.root / key), lambda: shutil.copyfile(self.root / key, local))

    def read_text(self, key: str) -> str | None:
        path = self.root / key
        return attempt("read", str(path), lambda: path.read_text() if path.is_file() else None)

    def write_text(self, key: str, text: str) -> None:
        self._replace(key, lambda tmp: tmp.write_text(text))

    def children(self) -> list[str]:
        return attempt("list", str(self.root), lambda: sorted(
            p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else [])

    def delete_tree(self, name: str) -> None:
        attempt("delete", str(self.root / name), lambda: shutil.rmtree(self.root / name, ignore_errors=True))
