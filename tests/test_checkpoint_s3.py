"""Checkpoints in an object store, against moto's real S3 server on loopback: background uploads,
autoresume on an empty disk after SIGKILL, kills during a save, an S3 outage, and remote sync."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cadenza.engine import Callback
from cadenza.engine.checkpoint import load_checkpoint
from cadenza.engine.errors import CheckpointError
from cadenza.engine.object_store import LocalStore, ObjectStoreError, S3Store
from cadenza.train.trainer import Trainer

from .conftest import ROOT, TINY
from .data_helpers import write_csv
from .s3 import free_port
from .test_data_csv import csv_args

NO_EVAL = ("data.val=null", "optim.grad_clip_norm=null", "run.log_interval=10ba")


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_object_store_round_trip(kind, tmp_path, request):
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        store = S3Store(f"s3://{bucket}/runs/a", multipart_threshold=5 << 20)
    else:
        store = LocalStore(tmp_path / "store")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 << 20))  # three parts at a 5 MiB threshold
    small = tmp_path / "small.txt"
    small.write_text("hello")
    store.upload(big, "big.bin")
    store.upload(small, "sub/small.txt")
    assert store.list() == {"big.bin": 11 << 20, "sub/small.txt": 5}
    assert store.list("sub/") == {"sub/small.txt": 5}
    store.copy("sub/small.txt", "copy.txt")
    store.download("big.bin", tmp_path / "back" / "big.bin")
    assert (tmp_path / "back" / "big.bin").read_bytes() == big.read_bytes()
    store.delete("big.bin")
    store.delete("missing")  # no error
    assert sorted(store.list()) == ["copy.txt", "sub/small.txt"]


def test_unreachable_store_retries_then_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = S3Store("s3://nowhere/x")
    started = time.monotonic()
    with pytest.raises(ObjectStoreError, match="listing of s3://nowhere/x.*failed"):
        store.list()
    assert time.monotonic() - started < 30


def _run(args: list[str], env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cadenza.train.cli", str(TINY), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _s3_env(moto_server) -> dict:
    from .s3 import CREDENTIALS

    return {**CREDENTIALS, "S3_ENDPOINT_URL": moto_server.endpoint}


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _pointer_step(client, bucket: str, prefix: str) -> int:
    try:
        return json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/latest.json")["Body"].read())["step"]
    except client.exceptions.NoSuchKey:
        return -1


def _final_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


@pytest.mark.parametrize("data", ["synthetic", "csv"])
def test_sigkill_then_resume_on_an_empty_disk_is_bit_identical(s3_bucket, moto_server, tmp_path, data):
    if data == "csv":  # 512 JPEGs on disk, read by 2 loader workers: the loader's position must survive the kill
        dataset = ("data.workers=2", *csv_args(write_csv(tmp_path / "data", 512)))
    else:
        dataset = ("data.train.num_samples=512",)
    common = [*NO_EVAL, "run.duration=64ba", "run.name=job", "checkpoint.save_interval=8ba", *dataset]
    reference = Trainer(tiny_cfg(tmp_path / "reference", *common))
    reference.fit()
    expected = _final_weights(reference.run_dir / "checkpoints" / "ep1-ba64.pt")

    remote = [f"checkpoint.save_folder=s3://{s3_bucket}/job", "checkpoint.resume=latest"]
    env = _s3_env(moto_server)
    client = moto_server.client()
    first = _run([*common, *remote, f"run.logs={tmp_path / 'machine1'}"], env)
    try:
        _wait_for(lambda: _pointer_step(client, s3_bucket, "job") >= 16, 240, "a checkpoint in the bucket")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = _pointer_step(client, s3_bucket, "job")
    assert killed_at < 64, "the run finished before it was killed; lengthen it"

    second = _run([*common, *remote, f"run.logs={tmp_path / 'machine2'}"], env)  # a fresh, empty disk
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    assert "resumed from" in output and "downloaded checkpoint" in output
    resumed_step = int(output.split("resumed from")[1].split("step ")[1].split(" ")[0])
    assert resumed_step >= killed_at
    final = tmp_path / "final.pt"
    store = S3Store(f"s3://{s3_bucket}/job")
    store.download("ep1-ba64.pt", final)
    got = _final_weights(final)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def tiny_cfg(logs: Path, *overrides: str):
    from cadenza.train.config import load_config

    return load_config(TINY, [f"run.logs={logs}", *overrides])


SLOW_SAVE = """
import sys, time, torch
original = torch.save
calls = {"n": 0}
def slow_save(obj, f, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 3:  # the third checkpoint: write part of it, then hang until killed
        f.write(b"PK partial checkpoint")
        f.flush()
        print("SAVE-STARTED", flush=True)
        time.sleep(600)
    return original(obj, f, *args, **kwargs)
torch.save = slow_save
from cadenza.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    common = [
        *NO_EVAL,
        "run.duration=40ba",
        "run.name=job",
        "checkpoint.save_interval=5ba",
        "checkpoint.resume=latest",
        f"run.logs={tmp_path}",
    ]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(TINY), *common],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in process.stdout:
        if "SAVE-STARTED" in line:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    folder = tmp_path / "job" / "checkpoints"
    assert [p.name for p in folder.glob(".*.tmp")], "the killed save left its temporary file"
    assert sorted(p.name for p in folder.glob("ep*-ba*.pt")) == ["ep0-ba10.pt", "ep0-ba5.pt"]

    resumed = _run(common, {})
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "at epoch 0, step 10" in output
    assert not list(folder.glob(".*.tmp"))  # cleaned up at start
    assert (folder / "ep2-ba40.pt").is_file()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target port; ``cut()`` refuses and drops connections until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._up = threading.Event()
        self._up.set()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._open_listener()

    def _open_listener(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass
        self._sockets = []

    def restore(self) -> None:
        self._open_listener()


class Outage(Callback):
    def __init__(self, proxy: TcpProxy, cut_at: int, restore_at: int | None) -> None:
        self.proxy, self.cut_at, self.restore_at = proxy, cut_at, restore_at

    def batch_end(self, state, logger):
        if state.timestamp.batch == self.cut_at:
            self.proxy.cut()
        if state.timestamp.batch == self.restore_at:
            self.proxy.restore()


def test_s3_outage_mid_run_then_every_checkpoint_reaches_the_bucket(
    s3_bucket, moto_server, tmp_path, monkeypatch, caplog
):
    proxy = TcpProxy(moto_server.port)
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    cfg = tiny_cfg(
        tmp_path,
        *NO_EVAL,
        "run.duration=60ba",
        "checkpoint.save_interval=5ba",
        "checkpoint.keep=-1",
        f"checkpoint.save_folder=s3://{s3_bucket}/run",
    )
    slow = SlowSteps(0.05)  # the outage must outlast a few uploads
    trainer = Trainer(cfg, callbacks=[Outage(proxy, cut_at=12, restore_at=45), slow])
    trainer.fit()
    keys = moto_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="run/")["Contents"]
    names = {item["Key"].removeprefix("run/") for item in keys}
    expected = {f"ep{(b - 1) // 16}-ba{b}.pt" for b in range(5, 61, 5)}
    assert expected <= names and {f"{n}.sha256" for n in expected} <= names
    assert {"latest.json", "epoch_latest.pt"} <= names
    assert "failed" in (trainer.run_dir / "out.log").read_text()  # the outage was noticed and retried


class SlowSteps(Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def batch_end(self, state, logger):
        time.sleep(self.seconds)


def test_uploads_that_never_complete_are_reported_and_kept_locally(s3_bucket, moto_server, tmp_path, monkeypatch):
    proxy = TcpProxy(moto_server.port)
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    cfg = tiny_cfg(
        tmp_path,
        *NO_EVAL,
        "run.duration=6ba",
        "checkpoint.save_interval=3ba",
        "checkpoint.upload_timeout=2",
        f"checkpoint.save_folder=s3://{s3_bucket}/run",
    )
    trainer = Trainer(cfg, callbacks=[Outage(proxy, cut_at=1, restore_at=None)])
    with pytest.raises(CheckpointError, match=r"could not be completed within 2s.*local copies are kept"):
        trainer.fit()
    assert (trainer.run_dir / "checkpoints" / "ep0-ba6.pt").is_file()
    proxy.restore()


def test_remote_sync_mirrors_the_run_folder(s3_bucket, tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        "run.duration=8ba",
        "run.log_interval=2ba",
        "checkpoint.save_interval=4ba",
        f"callbacks.remote_sync={{remote: 's3://{s3_bucket}/mirror', frequency: 0.2}}",
    )
    trainer = Trainer(cfg, callbacks=[SlowSteps(0.1)])
    trainer.fit()
    store = S3Store(f"s3://{s3_bucket}/mirror")
    remote = store.list()
    local = {
        p.relative_to(trainer.run_dir).as_posix(): p.stat().st_size
        for p in trainer.run_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(trainer.run_dir).parts)
    }
    assert {"config.yaml", "out.log", "metrics.jsonl", "checkpoints/epoch_latest.pt", "checkpoints/ep0-ba8.pt"} <= set(
        local
    )
    assert remote.pop("out.log") == local.pop("out.log")  # complete up to the final sync's own log line
    assert remote == local
