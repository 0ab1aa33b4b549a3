"""TensorBoard and W&B (offline) destinations, read back from the files they wrote."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cadenza.train.trainer import Trainer


def test_tensorboard_event_files_hold_the_metrics(tiny):
    trainer = Trainer(tiny("run.log_interval=4ba", "loggers.tensorboard={}"))
    trainer.fit()
    events = EventAccumulator(str(trainer.run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/scale", "train/samples_per_second", "val/clip_val_loss"):
        assert tag in tags
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [4, 8, 12, 16]
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in loss] == pytest.approx([r["train/loss"] for r in rows if "train/loss" in r])


def _wandb_records(path):
    """Records of a W&B run file: LevelDB-style log blocks after a 7-byte ':W&B' header."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk


def _open_handles(folder) -> list[str]:
    """Files under ``folder`` that some process still has open (from /proc/<pid>/fd)."""
    import os
    from pathlib import Path

    folder = str(folder.resolve())
    found = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:  # the process or descriptor went away while we looked
            continue
        if target.startswith(folder) and target.endswith(".wandb"):
            found.append(target)
    return found


def _wandb_services() -> list[int]:
    """This process's W&B service processes (wandb-core), which write the run files."""
    import os
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, parent, ...
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == os.getpid() and b"wandb-core" in command and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _wandb_history(run_dir):
    from wandb.proto import wandb_internal_pb2

    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, "no offline W&B run was written"
    history, run_ids = [], set()
    for path in files:
        for data in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            elif kind == "run":
                run_ids.add(record.run.run_id)
    return history, run_ids


def test_wandb_offline_run_holds_the_metrics_and_a_resume_continues_it(tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = ("run.log_interval=2ba", "data.val=null", "loggers.wandb={project: cadenza-tests, tags: [tiny]}")
    first = Trainer(tiny(*common, "run.duration=4ba"))
    first.fit()
    assert not _open_handles(first.run_dir / "wandb") and not _wandb_services(), "close() returned before W&B was done"
    run_id = next(c for c in first.state.callbacks if type(c).__name__ == "WandBLogger").run_id
    resumed = Trainer(tiny(*common, "run.duration=8ba", "checkpoint.resume=latest"))
    resumed.fit()
    assert not _open_handles(first.run_dir / "wandb") and not _wandb_services(), "close() returned before W&B was done"
    assert next(c for c in resumed.state.callbacks if type(c).__name__ == "WandBLogger").run_id == run_id
    history, run_ids = _wandb_history(first.run_dir)
    assert run_ids == {run_id}
    steps = [row["_step"] for row in history if "train/loss" in row]
    assert steps == [2, 4, 6, 8]
    assert all("train/lr" in row for row in history if "train/loss" in row)


def test_wandb_is_imported_only_when_used():
    """timm imports wandb as it is imported (0.5-0.7 s); a Cadenza process imports it only once it uses it."""
    code = """
import importlib.metadata, importlib.util, inspect, sys
import cadenza.train.cli, timm.utils.summary
assert type(sys.modules["wandb"]).__name__ == "_DeferredModule", "importing Cadenza imported wandb"
assert importlib.util.find_spec("wandb").origin.endswith("__init__.py")
inspect.getmodule(inspect.getmodule)  # reads every module's __file__, as torch does while it is imported
import wandb
assert type(sys.modules["wandb"]).__name__ == "_DeferredModule", "inspect or import imported wandb"
assert wandb.__version__ == importlib.metadata.version("wandb")  # the first use imports it
assert type(sys.modules["wandb"]).__name__ == "module"
import wandb.sdk
from wandb import Settings
assert timm.utils.summary.wandb.Settings is Settings is sys.modules["wandb"].Settings
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_without_wandb_installed_nothing_stands_in(monkeypatch):
    import importlib.util

    from cadenza.engine.deferred_imports import defer_wandb

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    defer_wandb()
    assert "wandb" not in sys.modules  # timm's ``except ImportError`` sees no wandb, as without Cadenza
