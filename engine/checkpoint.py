"""Checkpoints: atomic local writes, retention, and finding the newest complete one.

A checkpoint is a ``torch.save``d dict: ``state_dict`` (model weights, OpenCLIP's key), ``optimizer``,
``scaler``, ``scheduler``, ``timestamp``, ``rng``, ``dataloader``, ``algorithms``, ``callbacks``,
plus ``epoch``, ``name`` and the resolved ``config`` (YAML text). Files are named
``ep{epoch}-ba{batch}.pt``; ``epoch_latest.pt`` is a copy of the newest.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cadenza.engine.algorithm import Callback
from cadenza.engine.errors import CheckpointError
from cadenza.engine.time import Time, TimeUnit

if TYPE_CHECKING:
    from cadenza.engine.logger import Logger
    from cadenza.engine.state import State

log = logging.getLogger(__name__)

LATEST = "epoch_latest.pt"
_NAME = re.compile(r"^ep(\d+)-ba(\d+)\.pt$")


def checkpoint_name(epoch: int, batch: int) -> str:
    return f"ep{epoch}-ba{batch}.pt"


def save_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` through a temporary file, fsync, and rename: never a half-written file.

    On failure (full disk, ...) the temporary file is removed and any previous ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointError(
                f"could not write checkpoint {path}: {error}; the previous checkpoint is kept"
            ) from error
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on CPU with ``weights_only=True`` (no arbitrary code from pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (config key 'checkpoint.resume')")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({error}); it is corrupt or incomplete") from error


def numbered_checkpoints(folder: Path) -> list[Path]:
    """``ep*-ba*.pt`` files in ``folder``, oldest first (by step)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(2)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest(folder: Path) -> Path | None:
    """The newest checkpoint in ``folder`` that loads, or ``None``. Unreadable ones are reported and skipped."""
    for path in reversed(numbered_checkpoints(folder)):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001
            log.warning("skipping unreadable checkpoint %s: %s", path, error)
            continue
        return path
    return None


class CheckpointSaver(Callback):
    """Saves a checkpoint every ``save_interval`` and at the end of training (rank 0 writes).

    Args:
        folder: where checkpoints go.
        save_interval: a time string; epochs save at epoch ends, batches and samples after steps,
            wall-clock (``30m``) after the first step past the interval.
        keep: numbered checkpoints kept, newest first (-1: all).
        save_latest: keep ``epoch_latest.pt`` as a copy of the newest.
        run_name: stored in the checkpoint as ``name``.
        config_yaml: the resolved config, stored as ``config``.
    """

    def __init__(
        self, folder: str | Path, save_interval: str, keep: int, save_latest: bool, run_name: str, config_yaml: str
    ):
        self.folder = Path(folder)
        self.interval = Time.parse(save_interval, "checkpoint.save_interval", allow_wall_clock=True)
        self.keep = keep
        self.save_latest = save_latest
        self.run_name = run_name
        self.config_yaml = config_yaml
        self._every_batches = 0
        self._last_saved_batch = -1
        self._last_save_time = time.monotonic()

    def fit_start(self, state: State, logger: Logger) -> None:
        self._last_save_time = time.monotonic()
        if self.interval.unit in (TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.DURATION):
            self._every_batches = max(
                self.interval.to_batches(state.batches_per_epoch, state.samples_per_batch, state.max_batches), 1
            )

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self._every_batches and state.timestamp.batch % self._every_batches == 0:
            self.save(state)
        elif self.interval.unit.is_wall_clock and time.monotonic() - self._last_save_time >= self.interval.seconds:
            self.save(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.interval.unit == TimeUnit.EPOCH and state.timestamp.epoch % int(self.interval.value) == 0:
            self.save(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self.save(state)

    def save(self, state: State) -> Path | None:
        """Write the checkpoint for the current step (once per step), then apply retention."""
        if state.timestamp.batch == self._last_saved_batch:
            return None
        self._last_saved_batch = state.timestamp.batch
        self._last_save_time = time.monotonic()
        checkpoint = state.state_dict()  # every rank builds it: later, sharded states need all ranks
        if not state.dist.is_main:
            return None
        checkpoint.update(epoch=state.timestamp.epoch, name=self.run_name, config=self.config_yaml)
        path = self.folder / checkpoint_name(state.timestamp.epoch, state.timestamp.batch)
        started = time.perf_counter()
        save_atomic(checkpoint, path)
        if self.save_latest:
            latest_tmp = self.folder / f".{LATEST}.tmp"
            shutil.copyfile(path, latest_tmp)
            os.replace(latest_tmp, self.folder / LATEST)
        log.info("saved checkpoint %s (%.1fs)", path, time.perf_counter() - started)
        self._apply_retention()
        return path

    def _apply_retention(self) -> None:
        if self.keep == -1:
            return
        for old in numbered_checkpoints(self.folder)[: -self.keep]:
            old.unlink(missing_ok=True)
            log.info("deleted old checkpoint %s (checkpoint.keep=%d)", old, self.keep)
