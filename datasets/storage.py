"""Reading data files from local paths or ``s3://bucket/key`` URLs as byte streams.

S3 goes through boto3 (never the AWS CLI): credentials from boto3's standard chain, the endpoint from
``S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` (any S3-compatible server), botocore's standard retries for
transient errors. ``open_url`` can start at a byte offset (an HTTP range request on S3), which is how a resumed
WebDataset loader continues in the middle of a shard without reading what it already consumed.
"""

from __future__ import annotations

import os
from typing import BinaryIO

_clients: dict[tuple[int, str | None], object] = {}


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b.tar`` → ``("bucket", "a/b.tar")``."""
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ValueError(f"'{url}' is not an s3://bucket/key URL")
    return bucket, key


def s3_client():
    """A boto3 S3 client for this process and endpoint (clients are not shared across forks)."""
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    key = (os.getpid(), endpoint)
    if key not in _clients:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60)
        _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
    return _clients[key]


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


def open_url(url: str, start: int = 0, end: int | None = None) -> ByteStream:
    """Open bytes ``[start, end)`` of a local file or ``s3://`` object. Raises ``FileNotFoundError`` or ``OSError``."""
    if not is_s3(url):
        handle = open(url, "rb")  # noqa: SIM115 - closed by the ByteStream
        size = os.fstat(handle.fileno()).st_size
        handle.seek(start)
        return ByteStream(handle, size, start, end)
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_url(url)
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
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(f"{url} does not exist") from None
        raise OSError(f"cannot read {url}: {error}") from None
    except BotoCoreError as error:
        raise OSError(f"cannot read {url}: {error}") from None
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
    return url.rsplit("/", 1)[0] if is_s3(url) else os.path.dirname(url)


def url_basename(url: str) -> str:
    return url.rsplit("/", 1)[-1]


class _Empty:
    def read(self, n: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass
