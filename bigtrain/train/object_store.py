"""Where `checkpoint.remote` keeps checkpoints: an S3 bucket, a GCS bucket or a directory.

A store is rooted at a URL and holds keys relative to it (`latest`, `step-0000100/files.json`):

    s3://bucket/prefix   boto3; endpoint from S3_ENDPOINT_URL (MinIO, Ceph, moto, …), credentials as
                         boto3 finds them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, roles)
    gs://bucket/prefix   Google Cloud Storage through its S3-compatible XML API with HMAC keys
                         GCS_KEY/GCS_SECRET (as mosaicml-streaming reads them); endpoint
                         https://storage.googleapis.com or GCS_ENDPOINT_URL
    /path or file://…    a directory (an NFS mount, another disk): files are copied, then renamed
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlparse

from bigtrain.errors import BigtrainError

T = TypeVar("T")
BACKOFF_S = 1.0  # the first retry waits this long, each next one twice as long (at most MAX_BACKOFF_S)
MAX_BACKOFF_S = 60.0
GCS_ENDPOINT = "https://storage.googleapis.com"


class StoreError(Exception):
    """A store operation that failed (network, permissions, a missing bucket)."""


class Store(Protocol):
    url: str

    def put(self, local: Path, key: str) -> None: ...  # upload, then confirm the stored size
    def get(self, key: str, local: Path) -> None: ...
    def read_text(self, key: str) -> str | None: ...  # None: no such key
    def write_text(self, key: str, text: str) -> None: ...
    def children(self) -> list[str]: ...  # the names of the top-level "directories"
    def delete_tree(self, name: str) -> None: ...


def is_remote(path: str | Path) -> bool:
    return isinstance(path, str) and path.startswith(("s3://", "gs://"))


def open_store(url: str) -> Store:
    if url.startswith(("s3://", "gs://")):
        return BucketStore(url)
    return DirectoryStore(url.removeprefix("file://"))


def with_retries(action: Callable[[], T], what: str, retries: int) -> T:
    """`action()`, retried `retries` times with exponential backoff after a `StoreError`; each
    failure is a warning on stderr, the last one is raised."""
    for attempt in range(retries + 1):
        try:
            return action()
        except StoreError as e:
            if attempt == retries:
                raise
            wait = min(BACKOFF_S * 2**attempt, MAX_BACKOFF_S)
            print(f"bigtrain: warning: {what} failed ({e}); retry {attempt + 1}/{retries} in {wait:g} s",
                  file=sys.stderr, flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")


class BucketStore:
    """An S3 or GCS bucket prefix, through boto3 (thread-safe: one client serves every thread)."""

    def __init__(self, url: str):
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        if not parsed.netloc:
            raise BigtrainError(f"{url} names no bucket; use {parsed.scheme}://BUCKET/PREFIX")
        self.url, self.scheme, self.bucket = url.rstrip("/"), parsed.scheme, parsed.netloc
        self.prefix = parsed.path.strip("/") + "/" if parsed.path.strip("/") else ""
        options = {"endpoint_url": os.environ.get("S3_ENDPOINT_URL") or None}
        if self.scheme == "gs":
            options = {"endpoint_url": os.environ.get("GCS_ENDPOINT_URL", GCS_ENDPOINT),
                       "aws_access_key_id": os.environ.get("GCS_KEY"),
                       "aws_secret_access_key": os.environ.get("GCS_SECRET")}
        config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10, read_timeout=120)
        self.client = boto3.session.Session().client("s3", config=config, **options)

    def _call(self, what: str, action: Callable[[], T]) -> T:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return action()
        except ClientError as e:
            error = e.response.get("Error", {})
            raise StoreError(f"{what}: {error.get('Code', '')} {error.get('Message', '')}".strip()) from None
        except (BotoCoreError, Boto3Error, OSError) as e:
            raise StoreError(f"{what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def _key(self, key: str) -> str:
        return self.prefix + key

    def put(self, local: Path, key: str) -> None:
        url = f"{self.url}/{key}"
        self._call(f"upload {url}", lambda: self.client.upload_file(str(local), self.bucket, self._key(key)))
        head = self._call(f"check {url}", lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        if head["ContentLength"] != local.stat().st_size:
            raise StoreError(f"{url} holds {head['ContentLength']} bytes, {local.stat().st_size} were uploaded")

    def get(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self._call(f"download {self.url}/{key}",
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

        return self._call(f"read {self.url}/{key}", read)

    def write_text(self, key: str, text: str) -> None:
        self._call(f"write {self.url}/{key}",
                   lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=text.encode()))

    def _pages(self, **kwargs) -> list[dict]:
        paginator = self.client.get_paginator("list_objects_v2")
        return self._call(f"list {self.url}", lambda: list(paginator.paginate(Bucket=self.bucket, **kwargs)))

    def children(self) -> list[str]:
        pages = self._pages(Prefix=self.prefix, Delimiter="/")
        return sorted(p["Prefix"][len(self.prefix):].rstrip("/") for page in pages
                      for p in page.get("CommonPrefixes", []))

    def delete_tree(self, name: str) -> None:
        keys = [o["Key"] for page in self._pages(Prefix=self._key(name) + "/") for o in page.get("Contents", [])]
        if self.scheme == "gs":  # GCS's XML API has no multi-object delete
            for key in keys:
                self._call(f"delete gs://{self.bucket}/{key}",
                           lambda key=key: self.client.delete_object(Bucket=self.bucket, Key=key))
            return
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            self._call(f"delete {self.url}/{name}",
                       lambda batch=batch: self.client.delete_objects(Bucket=self.bucket, Delete=batch))


class DirectoryStore:
    """A directory, e.g. on a network filesystem; each file is copied under a temporary name and renamed."""

    def __init__(self, path: str):
        self.root = Path(path)
        self.url = str(self.root)

    def _call(self, what: str, action: Callable[[], T]) -> T:
        try:
            return action()
        except OSError as e:
            raise StoreError(f"{what}: {e.strerror or e}") from None

    def _replace(self, key: str, write: Callable[[Path], None]) -> None:
        target = self.root / key
        tmp = target.with_name(f".{target.name}.tmp")

        def replace() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, target)

        self._call(f"write {target}", replace)

    def put(self, local: Path, key: str) -> None:
        self._replace(key, lambda tmp: shutil.copyfile(local, tmp))

    def get(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self._call(f"read {self.root / key}", lambda: shutil.copyfile(self.root / key, local))

    def read_text(self, key: str) -> str | None:
        path = self.root / key
        return self._call(f"read {path}", lambda: path.read_text() if path.is_file() else None)

    def write_text(self, key: str, text: str) -> None:
        self._replace(key, lambda tmp: tmp.write_text(text))

    def children(self) -> list[str]:
        return self._call(f"list {self.root}", lambda: sorted(
            p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else [])

    def delete_tree(self, name: str) -> None:
        self._call(f"delete {self.root / name}", lambda: shutil.rmtree(self.root / name, ignore_errors=True))
