"""One interface over local folders and S3 (``s3://bucket/prefix``): upload, download, list, delete.

S3 goes through boto3: credentials from boto3's standard chain (never logged), the endpoint from
``S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` (any S3-compatible server), multipart transfers for large
files (boto3's ``TransferConfig``), and retries with exponential backoff on transient errors.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cadenza.engine.errors import CadenzaError

log = logging.getLogger("cadenza")
T = TypeVar("T")


class ObjectStoreError(CadenzaError, RuntimeError):
    """An object-store operation failed for good (after retries, or with a non-transient error)."""


def is_remote(uri: str | Path | None) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"'{uri}' is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"'{uri}' has no bucket name")
    return bucket, key.strip("/")


class ObjectStore(ABC):
    """A flat key space under a root. Keys are ``/``-separated paths relative to the root."""

    uri: str

    @abstractmethod
    def upload(self, local: Path, key: str) -> None:
        """Copy a local file to ``key`` (replacing it)."""

    @abstractmethod
    def download(self, key: str, local: Path) -> None:
        """Copy ``key`` to a local file (written under a temporary name, then renamed)."""

    @abstractmethod
    def list(self, prefix: str = "") -> dict[str, int]:
        """Keys under ``prefix`` with their sizes in bytes."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if it is missing)."""

    @abstractmethod
    def copy(self, source: str, target: str) -> None:
        """Copy ``source`` to ``target`` inside the store (server-side on S3)."""

    def exists(self, key: str) -> bool:
        return key in self.list(key)

    def join(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"


class LocalStore(ObjectStore):
    """A folder used as an object store (the same code path as S3, for local save folders and tests)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def upload(self, local: Path, key: str) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.upload")
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)

    def download(self, key: str, local: Path) -> None:
        source = self.root / key
        if not source.is_file():
            raise ObjectStoreError(f"{source} does not exist")
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, local)

    def list(self, prefix: str = "") -> dict[str, int]:
        if not self.root.is_dir():
            return {}
        found = {}
        for path in self.root.rglob("*"):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and key.startswith(prefix) and not path.name.startswith("."):
                found[key] = path.stat().st_size
        return found

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def copy(self, source: str, target: str) -> None:
        self.upload(self.root / source, target)


class S3Store(ObjectStore):
    """``s3://bucket/prefix`` through boto3, retrying transient failures with exponential backoff.

    Args:
        uri: ``s3://bucket/prefix``.
        attempts: tries per operation before ``ObjectStoreError`` (transient errors only).
        backoff: first wait in seconds; doubles each retry up to ``max_backoff``.
        multipart_threshold: files larger than this upload in parts of this size, several at once.
    """

    def __init__(
        self,
        uri: str,
        attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        multipart_threshold: int = 64 << 20,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3_uri(uri)
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=10, read_timeout=60)
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold, max_concurrency=4
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, what: str, operation: Callable[[], T]) -> T:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return operation()
            except Exception as error:  # noqa: BLE001 - classified below
                if not is_transient(error) or attempt == self.attempts:
                    raise ObjectStoreError(f"{what} failed: {_describe(error)}") from error
                log.warning(
                    "%s failed (%s); retry %d/%d in %.1fs", what, _describe(error), attempt, self.attempts - 1, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")

    def upload(self, local: Path, key: str) -> None:
        self._retry(
            f"upload of {local} to {self.join(key)}",
            lambda: self.client.upload_file(str(local), self.bucket, self._key(key), Config=self.transfer),
        )

    def download(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.download")

        def fetch() -> None:
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self.transfer)
            os.replace(tmp, local)

        self._retry(f"download of {self.join(key)}", fetch)

    def list(self, prefix: str = "") -> dict[str, int]:
        def fetch() -> dict[str, int]:
            found: dict[str, int] = {}
            base = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) + 1 :] if self.prefix else item["Key"]
                    found[key] = item["Size"]
            return found

        return self._retry(f"listing of {self.join(prefix)}", fetch)

    def delete(self, key: str) -> None:
        self._retry(
            f"delete of {self.join(key)}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        )

    def copy(self, source: str, target: str) -> None:
        self._retry(
            f"copy of {self.join(source)} to {self.join(target)}",
            lambda: self.client.copy({"Bucket": self.bucket, "Key": self._key(source)}, self.bucket, self._key(target)),
        )


def is_transient(error: BaseException) -> bool:
    """Connection problems, timeouts, throttling and 5xx answers are worth retrying; 4xx are not."""
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

    if isinstance(error, (ConnectionError, HTTPClientError, OSError)):
        return True
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError")
    # boto3's transfer manager wraps failures (S3UploadFailedError) around the original message
    return isinstance(error, BotoCoreError) or "Could not connect" in str(error) or "Connection" in str(error)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def get_object_store(uri: str | Path) -> ObjectStore:
    """``s3://...`` → ``S3Store``; anything else is a local folder."""
    return S3Store(uri) if is_remote(uri) else LocalStore(uri)


class BackgroundTransfers:
    """Runs object-store tasks in order on one background thread, retrying each until it succeeds.

    A task that fails (S3 unreachable, ...) is logged and retried with exponential backoff while
    training goes on; later tasks wait behind it, so a pointer written after a checkpoint's files
    never gets ahead of them. ``close(timeout)`` waits (bounded) for what is pending.

    Args:
        name: used in log messages ("checkpoint upload").
        backoff, max_backoff: seconds between retries of a failing task.
    """

    def __init__(self, name: str, backoff: float = 1.0, max_backoff: float = 30.0) -> None:
        import queue
        import threading

        self.name = name
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cadenza-{name}", daemon=True)
        self._thread.start()

    def submit(self, description: str, task: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(description)
        self._queue.put((description, task))

    @property
    def pending(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            description, task = item
            delay = self.backoff
            while True:
                try:
                    task()
                    break
                except Exception as error:  # noqa: BLE001 - keep training; retry until close() gives up
                    if self._stop.is_set():
                        return
                    log.warning("%s: %s failed (%s); retrying in %.0fs", self.name, description, error, delay)
                    if self._stop.wait(delay):
                        return
                    delay = min(delay * 2, self.max_backoff)
            with self._lock:
                self._pending.remove(description)

    def wait(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds for every task; return the descriptions still pending."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.pending

    def close(self, timeout: float) -> list[str]:
        """Finish pending tasks within ``timeout`` seconds, stop the thread, return what was left undone."""
        left = self.wait(timeout)
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=5)
        return left
