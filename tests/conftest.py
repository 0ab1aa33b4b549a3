"""Shared test helpers: tiny configs rooted in a temporary folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cadenza.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "yamls" / "tiny.yaml"


def tiny_config(tmp_path: Path, *overrides: str):
    """``yamls/tiny.yaml`` with its run folder under ``tmp_path`` and the given ``key=value`` overrides."""
    return load_config(TINY, [f"run.logs={tmp_path / 'logs'}", *overrides])


@pytest.fixture
def tiny(tmp_path):
    return lambda *overrides: tiny_config(tmp_path, *overrides)


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server for the session (see tests/s3.py)."""
    from .s3 import MotoServer

    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(moto_server, monkeypatch, request):
    """A fresh bucket on the moto server, with S3_ENDPOINT_URL and test credentials in the environment.

    Returns the bucket name; ``s3://<name>/...`` URIs then work in boto3, streaming and Cadenza.
    """
    from .s3 import CREDENTIALS

    for key, value in {**CREDENTIALS, "S3_ENDPOINT_URL": moto_server.endpoint}.items():
        monkeypatch.setenv(key, value)
    # unique per test *and* parameter: a name cut to S3's 63 characters made the variants of one test share a bucket
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]
    readable = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:45].strip("-")
    name = f"test-{readable}-{digest}"
    moto_server.client().create_bucket(Bucket=name)
    return name
