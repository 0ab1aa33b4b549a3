"""The one S3 stack: every object-store access of Cadenza (checkpoints, pretrained weights, remote sync,
WebDataset shards, conversion outputs) goes through this module, and so does the rule for what is remote.

- **What is remote:** ``s3://bucket/key`` (``is_remote``). Anything else without a scheme is a local path. Another
  scheme (``gs://``, ``hf://``, ...) is no S3 URI: places that only Cadenza reads or writes reject it with a clear
  error (``check_storage``); MDS streams pass it through to mosaicml-streaming, which reads many (``is_url``).
- **One client and one retry policy:** boto3 clients built by ``s3_client`` with botocore's ``standard`` retry
  mode: throttling, 5xx answers, timeouts and dropped connections are retried with exponential backoff and jitter,
  up to ``S3_ATTEMPTS`` tries per request; 4xx answers (no such bucket, access denied) are not retried. Credentials
  come from boto3's standard chain (never logged), the endpoint from ``S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``
  (any S3-compatible server). Large files go as multipart transfers (boto3's ``TransferConfig``).
- **Errors:** every failure is an ``ObjectStoreError`` whose ``permanent`` says whether trying again can help.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from cadenza.engine.errors import CadenzaError, ConfigError

log = logging.getLogger("cadenza")
T = TypeVar("T")

#: tries per S3 request (botocore's standard retry mode counts the first one)
S3_ATTEMPTS = 5
#: 4xx answers that are worth retrying all the same (the server is busy or timed out, not refusing)
_RETRYABLE_4XX = {"RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "Throttling", "ThrottlingException"}
#: what boto3's credential chain reads from the environment
_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE", "AWS_DEFAULT_REGION",
)  # fmt: skip
_clients: dict[tuple[int, str | None, int], object] = {}
_clients_lock = threading.Lock()


class ObjectStoreError(CadenzaError, RuntimeError):
    """An object-store operation failed after botocore's retries; ``permanent`` when retrying cannot help (a
    missing bucket, refused credentials), else the store was unreachable or busy."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


# -- what is remote ---------------------------------------------------------------------------------------------------
def is_remote(uri: str | Path | None) -> bool:
    """``s3://...`` is remote; everything else is a local path."""
    return isinstance(uri, str) and uri.startswith("s3://")


def is_url(uri: str) -> bool:
    """``scheme://...`` of any scheme (what mosaicml-streaming may read); ``is_remote`` is the S3 subset."""
    return "://" in uri


def check_storage(uri: str | Path | None, key: str) -> None:
    """Raise ``ConfigError`` naming ``key`` when ``uri`` has a scheme other than ``s3://`` (Cadenza reads and
    writes S3 and local paths only; a ``gs://`` folder must not become a local folder named ``gs:``)."""
    if isinstance(uri, str) and is_url(uri) and not is_remote(uri):
        scheme = uri.split("://", 1)[0]
        raise ConfigError(
            key,
            f"'{uri}': {scheme}:// is not supported here; use s3://bucket/prefix (any S3-compatible server via "
            "S3_ENDPOINT_URL) or a local path.",
        )


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")`` (the key may be empty: a bucket's root)."""
    if not is_remote(uri):
        raise ValueError(f"'{uri}' is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"'{uri}' has no bucket name")
    return bucket, key.strip("/")


def s3_client():
    """The boto3 S3 client of this process, endpoint and credentials, with the one retry policy (clients are not
    shared across forks: a data worker gets its own)."""
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    identity = hash(tuple(os.environ.get(name) for name in _CREDENTIAL_VARIABLES))  # a changed login, a new client
    key = (os.getpid(), endpoint, identity)
    with _clients_lock:  # boto3 sessions are not thread-safe to create; the clients they make are
        if key not in _clients:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"total_max_attempts": S3_ATTEMPTS, "mode": "standard"}, connect_timeout=10, read_timeout=60
            )
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        return _clients[key]


def is_permanent(error: BaseException) -> bool:
    """Whether an S3 failure will fail again: a 4xx answer (other than a timeout or throttling), or no credentials.
    boto3's transfer manager wraps the answer (``S3UploadFailedError``); the chain is searched for it."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (NoCredentialsError, PartialCredentialsError)):
            return True
        if isinstance(seen, ClientError):
            code = seen.response.get("Error", {}).get("Code", "")
            status = seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return 400 <= status < 500 and status not in (408, 429) and code not in _RETRYABLE_4XX
        seen = seen.__cause__ or seen.__context__
    return False


def _failed(what: str, error: BaseException) -> ObjectStoreError:
    return ObjectStoreError(f"{what} failed: {type(error).__name__}: {error}", permanent=is_permanent(error))


# -- byte streams (data loaders) --------------------------------------------------------------------------------------
class ByteStream:
    """A readable binary stream over ``[start, end)`` of a file or object; ``size`` is the whole object's size."""

    def __init__(self, raw: BinaryIO, size: int, start: int, end: int | None) -> None:
        self._raw = raw
        self.size = size
        self.position = start
        self._end = size if end is None else min(end, size)

    def read(self, n: int = -1) -> bytes:
        left = self._end - self.position
        if left <= 0:
            return b""
        n = left if n is None or n < 0 else min(n, left)
        data = self._raw.read(n)
        self.position += len(data)
        return data

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> ByteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Empty:
    def read(self, n: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


def open_url(url: str, start: int = 0, end: int | None = None) -> ByteStream:
    """Open bytes ``[start, end)`` of a local file or ``s3://`` object (an HTTP range request on S3: a resumed
    WebDataset loader continues inside a shard without reading what it consumed). Raises ``FileNotFoundError``, or
    ``ObjectStoreError`` for any other S3 failure."""
    if not is_remote(url):
        handle = open(url, "rb")  # noqa: SIM115 - closed by the ByteStream
        size = os.fstat(handle.fileno()).st_size
        handle.seek(start)
        return ByteStream(handle, size, start, end)
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(url)
    if not key:
        raise ValueError(f"'{url}' names a bucket, not an object")
    client = s3_client()
    try:
        if start > 0 or end is not None:
            size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
            if start >= size or (end is not None and end <= start):
                return ByteStream(_Empty(), size, start, start)
            last = size - 1 if end is None else min(end, size) - 1
            response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{last}")
        else:
            response = client.get_object(Bucket=bucket, Key=key)
            size = response["ContentLength"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code", "") in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(f"{url} does not exist") from None
        raise _failed(f"reading {url}", error) from None
    except BotoCoreError as error:
        raise _failed(f"reading {url}", error) from None
    return ByteStream(response["Body"], size, start, end)


def read_url(url: str) -> bytes | None:
    """The whole content of a local file or ``s3://`` object, or ``None`` when it does not exist."""
    try:
        with open_url(url) as stream:
            return stream.read()
    except FileNotFoundError:
        return None


def url_dirname(url: str) -> str:
    """The "folder" of a path or URL (``s3://b/x/y.tar`` → ``s3://b/x``)."""
    return url.rsplit("/", 1)[0] if is_remote(url) else os.path.dirname(url)


def url_basename(url: str) -> str:
    return url.rsplit("/", 1)[-1]


# -- stores (checkpoints, remote sync, pretrained weights, conversion outputs) ----------------------------------------
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

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a small object in one request."""

    def read_bytes(self, key: str) -> bytes | None:
        """A small object's content, or ``None`` when it does not exist."""
        return read_url(self.join(key))

    def exists(self, key: str) -> bool:
        return key in self.list(key)

    def join(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def probe(self) -> None:
        """Check that the store can be listed and written (a small object is written and deleted), so that a
        missing bucket or refused credentials stop a run before its first step, not at its first upload."""
        key = f".cadenza-probe-{uuid.uuid4().hex}"
        self.list(key)
        self.write_bytes(key, b"")
        self.delete(key)


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
            raise ObjectStoreError(f"{source} does not exist", permanent=True)
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

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.upload")
        tmp.write_bytes(data)
        os.replace(tmp, target)


class S3Store(ObjectStore):
    """``s3://bucket/prefix`` through the shared client (its retry policy is the module's).

    Args:
        uri: ``s3://bucket/prefix``.
        multipart_threshold: files larger than this upload in parts of this size, several at once.
    """

    def __init__(self, uri: str, multipart_threshold: int = 64 << 20) -> None:
        from boto3.s3.transfer import TransferConfig

        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3_uri(uri)
        self.client = s3_client()
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold, max_concurrency=4
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except Exception as error:  # noqa: BLE001 - botocore retried what it could; classified for the caller
            raise _failed(what, error) from error

    def upload(self, local: Path, key: str) -> None:
        self._call(
            f"upload of {local} to {self.join(key)}",
            lambda: self.client.upload_file(str(local), self.bucket, self._key(key), Config=self.transfer),
        )

    def download(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.download")

        def fetch() -> None:
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self.transfer)
            os.replace(tmp, local)

        self._call(f"download of {self.join(key)}", fetch)

    def list(self, prefix: str = "") -> dict[str, int]:
        def fetch() -> dict[str, int]:
            found: dict[str, int] = {}
            base = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) + 1 :] if self.prefix else item["Key"]
                    found[key] = item["Size"]
            return found

        return self._call(f"listing of {self.join(prefix)}", fetch)

    def delete(self, key: str) -> None:
        self._call(
            f"delete of {self.join(key)}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        )

    def copy(self, source: str, target: str) -> None:
        self._call(
            f"copy of {self.join(source)} to {self.join(target)}",
            lambda: self.client.copy({"Bucket": self.bucket, "Key": self._key(source)}, self.bucket, self._key(target)),
        )

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(
            f"write of {self.join(key)}",
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data),
        )


def get_object_store(uri: str | Path) -> ObjectStore:
    """``s3://...`` → ``S3Store``; a local path → ``LocalStore``; another scheme is an error."""
    if isinstance(uri, str) and is_url(uri) and not is_remote(uri):
        raise ValueError(f"'{uri}' is neither an s3:// URI nor a local path")
    return S3Store(uri) if is_remote(uri) else LocalStore(uri)


class BackgroundTransfers:
    """Runs object-store tasks in order on one background thread, retrying each until it succeeds.

    A task that fails transiently (S3 unreachable, ...) is logged and retried with exponential backoff while
    training goes on; later tasks wait behind it, so a pointer written after a checkpoint's files
    never gets ahead of them. A permanent failure (``ObjectStoreError.permanent``) is not retried: it is kept in
    ``failure`` and the tasks behind it are left undone. ``close(timeout)`` waits (bounded) for what is pending.

    Args:
        name: used in log messages ("checkpoint upload").
        backoff, max_backoff: seconds between retries of a failing task.
    """

    def __init__(self, name: str, backoff: float = 1.0, max_backoff: float = 30.0) -> None:
        import queue

        self.name = name
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: the permanent ``ObjectStoreError`` that stopped the transfers (a missing bucket, refused credentials)
        self.failure: ObjectStoreError | None = None
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
            if self.failure is not None:  # after a permanent failure, what follows is left undone
                continue
            delay = self.backoff
            while True:
                try:
                    task()
                    break
                except Exception as error:  # noqa: BLE001 - keep training; retry until close() gives up
                    if isinstance(error, ObjectStoreError) and error.permanent:
                        self.failure = error
                        log.error(
                            "%s: %s failed for good; the transfers behind it are not attempted: %s",
                            self.name,
                            description,
                            error,
                        )
                        break
                    if self._wait_to_retry(description, error, delay):
                        return
                    delay = min(delay * 2, self.max_backoff)
            if self.failure is None:
                with self._lock:
                    self._pending.remove(description)

    def _wait_to_retry(self, description: str, error: BaseException, delay: float) -> bool:
        """Log a transient failure and wait ``delay`` seconds; True when ``close()`` stopped the thread meanwhile."""
        if self._stop.is_set():
            return True
        log.warning("%s: %s failed (%s); retrying in %.0fs", self.name, description, error, delay)
        return self._stop.wait(delay)

    def wait(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds for every task; return the descriptions still pending."""
        deadline = time.monotonic() + timeout
        while self.pending and self.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.pending

    def close(self, timeout: float) -> list[str]:
        """Finish pending tasks within ``timeout`` seconds, stop the thread, return what was left undone."""
        left = self.wait(timeout)
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=5)
        return left
