"""A run folder belongs to one run: its lock, checkpoints of another run, retention by lineage, staged uploads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from cadenza.engine import checkpoint as ckpt
from cadenza.engine.errors import ConfigError
from cadenza.engine.object_store import S3Store
from cadenza.train.run_folder import RunFolderLock
from cadenza.train.trainer import Trainer

FAST = ("data.val=null", "data.train.num_samples=32", "data.batch_size=8", "run.log_interval=2ba")


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_reused_run_name_without_resume_stops_before_any_work_and_keeps_the_other_runs_files(tiny, tmp_path):
    first = (*FAST, "run.name=r", "checkpoint.save_interval=2ba", "checkpoint.keep=3")
    Trainer(tiny(*first, "run.duration=8ba")).fit()
    folder = tmp_path / "logs" / "r"
    before = {p.name: p.stat().st_mtime_ns for p in (folder / "checkpoints").iterdir()}
    config_before = (folder / "config.yaml").read_text()
    with pytest.raises(ConfigError) as info:
        Trainer(tiny(*first, "run.duration=4ba", "run.seed=1"))
    message = str(info.value)
    assert info.value.key == "checkpoint.resume" and "3 checkpoints of another run" in message
    assert "checkpoint.resume=latest" in message and "run.name" in message and "checkpoint.overwrite=true" in message
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "checkpoints").iterdir()} == before
    assert (folder / "config.yaml").read_text() == config_before  # config.yaml is written after the checks
    # resuming it is what the folder is for; the lock of the refused attempt was let go
    assert Trainer(tiny(*first, "run.duration=10ba", "checkpoint.resume=latest")).fit().timestamp.batch == 10


def test_overwrite_deletes_the_other_runs_checkpoints_and_says_so(tiny, tmp_path):
    run = (*FAST, "run.name=r", "checkpoint.save_interval=4ba")
    Trainer(tiny(*run, "run.duration=8ba")).fit()
    folder = tmp_path / "logs" / "r" / "checkpoints"
    assert "ep1-ba8.pt" in _names(folder)
    Trainer(tiny(*run, "run.duration=4ba", "checkpoint.overwrite=true")).fit()
    assert _names(folder) == ["ep0-ba4.pt", "ep0-ba4.pt.sha256", "epoch_latest.pt"]
    said = (tmp_path / "logs" / "r" / "out.log").read_text()
    assert "checkpoint.overwrite: deleted 5 files" in said and "ep1-ba8.pt" in said
    with pytest.raises(ConfigError, match="checkpoint.overwrite"):
        tiny("checkpoint.overwrite=true", "checkpoint.resume=latest")


def test_a_second_run_on_a_locked_folder_exits_2_at_once_naming_it(tiny, tmp_path):
    folder = tmp_path / "logs" / "busy"
    held = RunFolderLock(folder)
    try:
        with pytest.raises(ConfigError) as info:
            Trainer(tiny(*FAST, "run.name=busy"))
        assert info.value.key == "run.name" and str(folder) in str(info.value) and "own run.name" in str(info.value)
        assert not (folder / "checkpoints").exists() and not (folder / "config.yaml").exists()
    finally:
        held.release()
    trainer = Trainer(tiny(*FAST, "run.name=busy", "run.duration=2ba"))
    with pytest.raises(ConfigError, match="another Trainer of this process"):
        Trainer(tiny(*FAST, "run.name=busy", "run.duration=2ba"))  # held while the trainer lives
    trainer.fit()
    RunFolderLock(folder).release()  # and let go when it ends


def test_the_lock_dies_with_a_killed_process(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                from cadenza.train.run_folder import RunFolderLock
                held = RunFolderLock(__import__("pathlib").Path({str(folder)!r}))
                print("held", flush=True)
                time.sleep(600)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {holder.pid} on "):
            RunFolderLock(folder)
    finally:
        holder.kill()
        holder.wait()
    RunFolderLock(folder).release()  # SIGKILL left no stale lock


def _checkpoint(folder, step, lineage):
    ckpt.save_atomic({"step": step}, folder / f"ep0-ba{step}.pt", lineage)


def test_retention_deletes_only_checkpoints_of_its_own_lineage(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _checkpoint(folder, step, "other")
    _checkpoint(folder, 5, None)  # written before lineages existed
    saver = ckpt.CheckpointSaver(folder, "1ba", 2, False, "r", "", lineage="mine")
    for step in (1, 2, 3):
        _checkpoint(folder, step, "mine")
        saver._apply_retention()
    assert [p.name for p in ckpt.numbered_checkpoints(folder)] == [
        "ep0-ba2.pt",
        "ep0-ba3.pt",
        "ep0-ba5.pt",
        "ep0-ba10.pt",
        "ep0-ba20.pt",
        "ep0-ba30.pt",
    ]
    assert ckpt.lineage_of(folder / "ep0-ba3.pt") == "mine" and ckpt.lineage_of(folder / "ep0-ba5.pt") is None


def test_a_resumed_run_carries_its_lineage_on(tiny, tmp_path):
    run = (*FAST, "run.name=r", "checkpoint.save_interval=2ba", "checkpoint.keep=1")
    Trainer(tiny(*run, "run.duration=2ba")).fit()
    folder = tmp_path / "logs" / "r" / "checkpoints"
    lineage = ckpt.lineage_of(folder / "ep0-ba2.pt")
    assert lineage is not None and torch.load(folder / "ep0-ba2.pt", weights_only=True)["lineage"] == lineage
    Trainer(tiny(*run, "run.duration=4ba", "checkpoint.resume=latest")).fit()
    assert [p.name for p in ckpt.numbered_checkpoints(folder)] == ["ep0-ba4.pt"]  # its own ba2 was retention's
    assert ckpt.lineage_of(folder / "ep0-ba4.pt") == lineage


def test_remote_retention_keeps_other_lineages(s3_bucket, tmp_path):
    remote = f"s3://{s3_bucket}/ckpt"
    store = S3Store(remote)
    other = tmp_path / "other"
    _checkpoint(other, 50, "other")
    store.upload(other / "ep0-ba50.pt", "ep0-ba50.pt")
    store.upload(ckpt.sidecar_of(other / "ep0-ba50.pt"), "ep0-ba50.pt.sha256")
    saver = ckpt.CheckpointSaver(tmp_path / "local", "1ba", 1, False, "r", "", remote=remote, lineage="mine")
    for step in (1, 2):
        _checkpoint(saver.folder, step, "mine")
        saver._upload(saver.folder / f"ep0-ba{step}.pt", "", step)
    saver._uploads.close(60)
    assert sorted(store.list()) == [
        "ep0-ba2.pt",
        "ep0-ba2.pt.sha256",
        "ep0-ba50.pt",
        "ep0-ba50.pt.sha256",
        "latest.json",
    ]


class _Main:
    class dist:  # noqa: N801 - what fit_start reads of the state
        is_main = True

    batches_per_epoch, samples_per_batch, max_batches = 1, 1, 1


def _stage(folder, step, lineage="mine"):
    """What a run killed mid-upload leaves: the staged links of a complete checkpoint, the checkpoint itself gone."""
    _checkpoint(folder, step, lineage)
    path = folder / f"ep0-ba{step}.pt"
    path.rename(folder / f".{path.name}.upload")
    ckpt.sidecar_of(path).rename(folder / f".{path.name}.sha256.upload")


def test_staged_uploads_of_a_killed_run_are_uploaded_when_it_resumes(s3_bucket, tmp_path):
    remote = f"s3://{s3_bucket}/ckpt"
    folder = tmp_path / "local"
    folder.mkdir()
    _stage(folder, 3)
    saver = ckpt.CheckpointSaver(folder, "1ba", -1, False, "r", "", remote=remote, lineage="mine")
    saver.fit_start(_Main, None)
    saver._uploads.close(60)
    keys = S3Store(remote).list()
    assert {"ep0-ba3.pt", "ep0-ba3.pt.sha256", "latest.json"} <= set(keys)
    assert json.loads(S3Store(remote).read_bytes("latest.json"))["name"] == "ep0-ba3.pt"
    assert not list(folder.glob(".*.upload"))
    downloaded = ckpt.find_latest_remote(S3Store(remote), tmp_path / "fresh")
    assert torch.load(downloaded, weights_only=True) == {"step": 3}


def test_staged_uploads_are_removed_when_the_run_uploads_nowhere(tmp_path):
    folder = tmp_path / "local"
    folder.mkdir()
    _stage(folder, 3)
    ckpt.CheckpointSaver(folder, "1ba", -1, False, "r", "", lineage="mine").fit_start(_Main, None)
    assert _names(folder) == []


def test_a_late_config_error_leaves_the_runs_config_yaml_alone(tiny, tmp_path):
    run = (*FAST, "run.name=r", "run.duration=2ba")
    Trainer(tiny(*run)).fit()
    config = tmp_path / "logs" / "r" / "config.yaml"
    before = config.read_text()
    with pytest.raises(ConfigError, match="data.batch_size"):  # found only once the data is built
        Trainer(tiny(*run, "data.batch_size=64", "checkpoint.resume=latest"))
    assert config.read_text() == before


def test_a_resume_with_another_batch_size_says_what_a_step_now_is(tiny, tmp_path):
    run = (*FAST, "run.name=r", "checkpoint.save_interval=2ba")
    Trainer(tiny(*run, "run.duration=2ba")).fit()
    Trainer(tiny(*run, "run.duration=4ba", "data.batch_size=4", "checkpoint.resume=latest")).fit()
    said = (tmp_path / "logs" / "r" / "out.log").read_text()
    assert "resumed with 4 samples per step, saved with 8 (data.batch_size=8, optim.accum_freq=1, 1 processes)" in said
    assert "continues at step 2 of 4" in said
