"""The one S3 stack: one rule for what is remote, one client and retry policy for every user, ranged reads, and
permanent errors (a missing bucket) found at the start and never retried. Against moto's S3 server on loopback."""

from __future__ import annotations

import ast
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cadenza.engine import object_store
from cadenza.engine.errors import CheckpointError, ConfigError
from cadenza.engine.object_store import (
    S3_ATTEMPTS,
    BackgroundTransfers,
    ObjectStoreError,
    S3Store,
    check_storage,
    get_object_store,
    is_remote,
    is_url,
    open_url,
    read_url,
    s3_client,
)
from cadenza.engine.remote_sync import RemoteSync
from cadenza.train.trainer import Trainer

from .conftest import ROOT
from .s3 import free_port

PACKAGE_FOLDERS = ("engine", "train", "models", "datasets", "algorithms")


def test_one_rule_decides_what_is_remote(tiny):
    assert is_remote("s3://bucket/x") and not is_remote("/data/x") and not is_remote(None)
    assert not is_remote("gs://bucket/x") and is_url("gs://bucket/x") and not is_url("relative/folder")
    check_storage("s3://bucket/x", "k")
    check_storage("/local/folder", "k")
    check_storage(None, "k")
    with pytest.raises(ConfigError, match=r"checkpoint.save_folder.*gs:// is not supported.*s3://bucket/prefix"):
        check_storage("gs://bucket/x", "checkpoint.save_folder")
    # each key that Cadenza itself reads or writes, rejected when the config loads, before any work
    for override in ("checkpoint.save_folder=gs://b/x", "checkpoint.resume=hf://org/model/ckpt.pt"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            tiny(override)
    with pytest.raises(ValueError, match="neither an s3:// URI nor a local path"):
        get_object_store("gs://b/x")


def test_the_pretrained_key_rejects_another_scheme(tiny):
    with pytest.raises(ConfigError, match=r"model.pretrained.*gs:// is not supported"):
        Trainer(tiny("model.pretrained=gs://bucket/weights.pt", "data.val=null"))


def test_only_the_object_store_module_talks_to_boto3():
    """Every S3 user goes through engine/object_store.py, so one retry policy holds for all of them."""
    offenders = []
    for folder in PACKAGE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "engine" / "object_store.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                offenders += [
                    f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("boto3", "botocore")
                ]
    assert not offenders, offenders


def test_every_store_shares_one_client_and_retry_policy(s3_bucket):
    client = s3_client()
    assert S3Store(f"s3://{s3_bucket}/a").client is client
    assert S3Store(f"s3://{s3_bucket}/b").client is client
    retries = client.meta.config.retries
    assert retries == {"total_max_attempts": S3_ATTEMPTS, "mode": "standard"}  # botocore's max_attempts counts retries


def test_new_credentials_get_a_new_client(s3_bucket, monkeypatch):
    before = s3_client()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-login")
    assert s3_client() is not before


def test_ranged_reads_on_s3(s3_bucket):
    data = bytes(range(256)) * 4
    s3_client().put_object(Bucket=s3_bucket, Key="dir/blob.bin", Body=data)
    url = f"s3://{s3_bucket}/dir/blob.bin"
    with open_url(url) as stream:
        assert stream.size == len(data) and stream.read() == data
    with open_url(url, 100, 300) as stream:
        assert stream.read(50) == data[100:150] and stream.read() == data[150:300] and stream.read() == b""
    with open_url(url, 1000) as stream:
        assert stream.read() == data[1000:]
    with open_url(url, 5000) as stream:  # past the end: empty, not an error
        assert stream.read() == b""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_url(f"s3://{s3_bucket}/dir/missing.bin")
    assert read_url(f"s3://{s3_bucket}/dir/missing.bin") is None


def test_a_missing_bucket_is_permanent_and_not_retried(s3_bucket):
    store = S3Store("s3://no-such-bucket-anywhere/x")
    with pytest.raises(ObjectStoreError, match="NoSuchBucket") as caught:
        store.list()
    assert caught.value.permanent
    assert caught.value.__cause__.response["ResponseMetadata"]["RetryAttempts"] == 0
    with pytest.raises(ObjectStoreError) as caught:
        store.probe()
    assert caught.value.permanent
    with pytest.raises(ObjectStoreError, match="no-such-bucket-anywhere") as caught:
        open_url("s3://no-such-bucket-anywhere/x.tar")
    assert caught.value.permanent


def test_an_unreachable_endpoint_is_transient_after_botocore_retries(monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(ObjectStoreError, match="listing of s3://nowhere/x.*failed") as caught:
        S3Store("s3://nowhere/x").list()
    assert not caught.value.permanent  # the background uploads keep retrying it


def test_background_transfers_stop_at_a_permanent_failure():
    calls: list[str] = []

    def refused() -> None:
        calls.append("refused")
        raise ObjectStoreError("upload of a failed: NoSuchBucket", permanent=True)

    transfers = BackgroundTransfers("test", backoff=0.01)
    transfers.submit("upload of a", refused)
    transfers.submit("upload of b", lambda: calls.append("b"))
    started = time.monotonic()
    left = transfers.close(timeout=60)
    assert time.monotonic() - started < 10  # not the whole timeout
    assert calls == ["refused"]  # tried once; what depends on it is not attempted
    assert left == ["upload of a", "upload of b"]
    assert "NoSuchBucket" in str(transfers.failure)


def test_background_transfers_retry_a_transient_failure():
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise ObjectStoreError("listing failed: EndpointConnectionError")

    transfers = BackgroundTransfers("test", backoff=0.01)
    transfers.submit("flaky", flaky)
    assert transfers.close(timeout=60) == [] and len(calls) == 3 and transfers.failure is None


def test_a_missing_checkpoint_bucket_stops_the_run_before_the_model_is_built(s3_bucket, tiny, monkeypatch):
    import cadenza.train.trainer as trainer_module

    built = []
    monkeypatch.setattr(trainer_module, "seed_everything", lambda seed: built.append(seed))
    cfg = tiny("checkpoint.save_folder=s3://no-such-bucket-anywhere/run", "data.val=null")
    with pytest.raises(ConfigError, match=r"checkpoint.save_folder.*cannot write to s3://no-such-bucket.*NoSuchBucket"):
        Trainer(cfg)
    assert built == []  # nothing after the probe ran


def test_revoked_access_mid_run_fails_at_exit_without_waiting(s3_bucket, moto_server, tiny):
    """The bucket disappears after the probe: the uploads stop at the first refusal and the run says why at once
    instead of retrying until checkpoint.upload_timeout."""
    from .test_checkpoint_s3 import SlowSteps

    class DeleteBucket(SlowSteps):
        def batch_end(self, state, logger):
            if state.timestamp.batch == 1:
                client = moto_server.client()
                for item in client.list_objects_v2(Bucket=s3_bucket).get("Contents", []):
                    client.delete_object(Bucket=s3_bucket, Key=item["Key"])
                client.delete_bucket(Bucket=s3_bucket)

    cfg = tiny(
        "data.val=null",
        "run.duration=4ba",
        "checkpoint.save_interval=2ba",
        "checkpoint.upload_timeout=600",
        f"checkpoint.save_folder=s3://{s3_bucket}/run",
    )
    trainer = Trainer(cfg, callbacks=[DeleteBucket(0)])
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"were not done: upload of .*NoSuchBucket.*local copies are kept"):
        trainer.fit()
    assert time.monotonic() - started < 120
    assert (trainer.run_dir / "checkpoints" / "ep0-ba4.pt").is_file()


def test_remote_sync_probes_its_bucket_before_the_first_step(s3_bucket, tmp_path):
    sync = RemoteSync(tmp_path, "s3://no-such-bucket-anywhere/mirror")

    state = SimpleNamespace(dist=SimpleNamespace(is_main=True))
    with pytest.raises(ConfigError, match=r"callbacks.remote_sync.remote.*cannot write to .*NoSuchBucket"):
        sync.fit_start(state, None)
    with pytest.raises(ValueError, match="neither an s3:// URI nor a local path"):
        RemoteSync(tmp_path, "gs://bucket/mirror")


def test_probe_leaves_nothing_behind(s3_bucket, tmp_path):
    store = S3Store(f"s3://{s3_bucket}/runs")
    store.probe()
    assert store.list() == {}
    local = get_object_store(str(tmp_path / "folder"))
    local.probe()
    assert [p for p in Path(tmp_path / "folder").rglob("*") if p.is_file()] == []
    assert object_store.is_permanent(ValueError("not an S3 error")) is False
