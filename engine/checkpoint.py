"""Checkpoints: atomic local writes with checksums, retention, background upload to an object store,
and finding the newest complete checkpoint locally or remotely.

A checkpoint is a ``torch.save``d dict: ``state_dict`` (model weights, OpenCLIP's key), ``optimizer``,
``scaler``, ``scheduler``, ``timestamp``, ``rng``, ``dataloader``, ``algorithms``, ``callbacks``,
plus ``epoch``, ``name``, ``lineage`` and the resolved ``config`` (YAML text). Files are named
``ep{epoch}-ba{batch}.pt``, each with a ``.sha256`` sidecar written after it (a checkpoint without
one is incomplete); ``epoch_latest.pt`` is a copy of the newest.

A run's ``lineage`` is an id drawn when it starts from scratch and carried on by every run that resumes
from it; it is in each checkpoint and in its sidecar (JSON: ``sha256``, ``size``, ``lineage``), and
retention deletes only checkpoints of its own lineage. Checkpoints written before lineages existed have
none (``None``), and a run resumed from one carries that on. In an object store, ``latest.json``
names the newest checkpoint and is written only after all of its files are uploaded.

With FSDP the weights and optimizer state are gathered into that same layout (``engine/fsdp.py``),
unless ``dist.fsdp_state_dict: sharded``: then every rank writes its shards into the folder
``ep{epoch}-ba{batch}.dcp`` (``torch.distributed.checkpoint``) before rank 0 writes the ``.pt`` file,
whose ``state_dict`` and ``optimizer`` are ``None`` and whose ``sharded`` names that folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from cadenza.engine.algorithm import Callback
from cadenza.engine.errors import CheckpointError
from cadenza.engine.fsdp import save_sharded
from cadenza.engine.object_store import BackgroundTransfers, ObjectStore, get_object_store
from cadenza.engine.time import Time, TimeUnit

if TYPE_CHECKING:
    from cadenza.engine.logger import Logger
    from cadenza.engine.state import State

log = logging.getLogger("cadenza")

LATEST = "epoch_latest.pt"
POINTER = "latest.json"
_NAME = re.compile(r"^ep(\d+)-ba(\d+)\.pt$")
OPENCLIP_NAME = re.compile(r"^epoch_(\d+)\.pt$")  # open_clip_train's epoch_K.pt (``openclip_names``)


def checkpoint_name(epoch: int, batch: int) -> str:
    return f"ep{epoch}-ba{batch}.pt"


def sharded_folder(path: Path) -> Path:
    """The folder of a sharded checkpoint's weights and optimizer state: ``ep0-ba8.pt`` → ``ep0-ba8.dcp``."""
    return path.with_suffix(".dcp")


def step_of(name: str) -> int | None:
    match = _NAME.match(name)
    return int(match.group(2)) if match else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _space_left_message(folder: Path, error: BaseException) -> str:
    free = shutil.disk_usage(folder).free
    if free < 16 << 20:
        return f"No space left on device ({free >> 10} KiB free in {folder}; the writer said: {error})"
    return str(error)


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        # torch.save on a full disk raises RuntimeError from its zip writer, not OSError: look at the space left
        # before the temporary file is removed, so the message names the cause.
        cause = str(error) if isinstance(error, OSError) else _space_left_message(path.parent, error)
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, Exception):
            raise CheckpointError(f"could not write {path}: {cause}; the previous checkpoint is kept") from error
        raise
    _fsync_dir(path.parent)


def save_atomic(obj: Any, path: Path, lineage: str | None = None) -> str:
    """Write ``obj`` to ``path`` (temporary file, fsync, rename), then its ``.sha256`` sidecar (with ``lineage``).

    A crash at any point leaves either the previous state or a complete checkpoint; a failure (a full
    disk) removes the temporary file and keeps any previous ``path``. Returns the SHA-256.
    """
    _write_atomic(path, lambda handle: torch.save(obj, handle))
    digest = sha256_of(path)
    record: dict[str, Any] = {"sha256": digest, "size": path.stat().st_size}
    if lineage is not None:
        record["lineage"] = lineage
    sidecar = json.dumps(record).encode()
    _write_atomic(sidecar_of(path), lambda handle: handle.write(sidecar))
    return digest


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` hold ``source``'s bytes, atomically: a hard link (no extra disk space, instant), or a copy
    where the file system has no hard links. Files are never modified in place, so sharing the inode is safe."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:

        def copy(handle) -> None:
            with source.open("rb") as original:
                shutil.copyfileobj(original, handle, 1 << 20)

        _write_atomic(target, copy)
        return
    os.replace(tmp, target)


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def lineage_of_sidecar(text: bytes | str) -> str | None:
    """The lineage a sidecar records (``None``: written before lineages, or not JSON)."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record.get("lineage") if isinstance(record, dict) else None


def lineage_of(path: Path) -> str | None:
    """The lineage of the local checkpoint ``path``, from its sidecar."""
    try:
        return lineage_of_sidecar(sidecar_of(path).read_bytes())
    except OSError:
        return None


def checkpoint_files(folder: Path) -> list[Path]:
    """What a run's checkpoints occupy in ``folder``: numbered checkpoints, their sidecars and sharded folders,
    ``epoch_latest.pt`` and staged uploads."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if step_of(p.name.removesuffix(".sha256")) is not None
        or _NAME.match(p.name.removesuffix(".dcp") + ".pt")
        or p.name in (LATEST, f".{POINTER}")
        or OPENCLIP_NAME.match(p.name)
        or (p.name.startswith(".ep") and p.name.endswith(".upload"))
    )


def newest_openclip_checkpoint(folder: Path) -> Path | None:
    """The ``epoch_K.pt`` of the highest ``K`` in ``folder`` (what OpenCLIP's ``--resume latest`` takes), or ``None``."""
    found = [(int(m.group(1)), p) for p in folder.glob("epoch_*.pt") if (m := OPENCLIP_NAME.match(p.name))]
    return max(found)[1] if found else None


def verify(path: Path, require_sidecar: bool = True) -> None:
    """Raise ``CheckpointError`` unless ``path`` matches its recorded size and SHA-256."""
    sidecar = sidecar_of(path)
    if not sidecar.is_file():
        if require_sidecar:
            raise CheckpointError(f"checkpoint '{path}' has no checksum file: it was not completely written")
        return
    expected = json.loads(sidecar.read_text())
    if path.stat().st_size != expected["size"] or sha256_of(path) != expected["sha256"]:
        raise CheckpointError(f"checkpoint '{path}' does not match its checksum: it is corrupt or partial")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Verify (when a checksum exists) and load on CPU with ``weights_only=True`` (no code from pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (config key 'checkpoint.resume')")
    verify(path, require_sidecar=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({error}); it is corrupt or incomplete") from error


def stored_config(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The resolved config a checkpoint was saved with, as plain data.

    Stored configs are data: read with ``yaml.safe_load`` (a ``!!python/...`` tag is refused, never constructed)
    and never resolved, so a ``${oc.env:...}`` someone wrote into a checkpoint stays that text instead of
    pulling a secret out of this process's environment.
    """
    try:
        config = yaml.safe_load(checkpoint.get("config") or "")
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise CheckpointError(f"checkpoint '{path}' stores a config that is not plain YAML data ({problem})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint '{path}' stores no config mapping; it was not written by Cadenza")
    return config


def numbered_checkpoints(folder: Path) -> list[Path]:
    """``ep*-ba*.pt`` files in ``folder``, oldest first (by step)."""
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if (step := step_of(p.name)) is not None]
    return [p for _, p in sorted(found)]


def find_latest(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (checksum verified), or ``None``; bad ones are reported."""
    for path in reversed(numbered_checkpoints(folder)):
        try:
            verify(path)
        except CheckpointError as error:
            log.warning("skipping checkpoint: %s", error)
            continue
        return path
    return None


def find_latest_remote(store: ObjectStore, local_folder: Path, newer_than: int = -1) -> Path | None:
    """Download the newest complete checkpoint from ``store`` if it is newer than step ``newer_than``.

    A checkpoint is complete when its checksum file exists (uploaded after the checkpoint itself).
    They are tried newest first; a download that fails its checksum is reported and the previous
    one is tried.
    """
    keys = store.list()
    complete = sorted((step, key) for key in keys if (step := step_of(key)) is not None and f"{key}.sha256" in keys)
    for step, key in reversed(complete):
        if step <= newer_than:
            return None
        target = local_folder / key
        try:
            store.download(f"{key}.sha256", sidecar_of(target))
            store.download(key, target)
            verify(target)
        except Exception as error:  # noqa: BLE001 - try the previous checkpoint
            log.warning("skipping remote checkpoint %s: %s", store.join(key), error)
            target.unlink(missing_ok=True)
            sidecar_of(target).unlink(missing_ok=True)
            continue
        log.info("downloaded checkpoint %s", store.join(key))
        return target
    return None


def resolve_resume(resume: str, local_folder: Path, remote: str | None) -> Path | None:
    """``checkpoint.resume`` → a local file: ``latest`` looks locally, then in the object store."""
    if resume != "latest":
        if resume.startswith("s3://"):
            uri, _, name = resume.rpartition("/")
            store = get_object_store(uri)
            target = local_folder / name
            store.download(name, target)
            if f"{name}.sha256" in store.list(name):
                store.download(f"{name}.sha256", sidecar_of(target))
            return target
        return Path(resume)
    local = find_latest(local_folder)
    local_step = step_of(local.name) if local is not None else -1
    if remote is not None:
        downloaded = find_latest_remote(get_object_store(remote), local_folder, newer_than=local_step)
        if downloaded is not None:
            return downloaded
    if local is None and local_folder.is_dir():  # a folder open_clip_train wrote: its newest epoch_K.pt
        return newest_openclip_checkpoint(local_folder)
    return local


class CheckpointSaver(Callback):
    """Saves a checkpoint every ``save_interval`` and at the end of training (rank 0 writes).

    Args:
        folder: the local folder checkpoints are written to.
        save_interval: a time string; epochs save at epoch ends, batches and samples after steps,
            wall-clock (``30m``) after the first step past the interval.
        keep: numbered checkpoints kept, newest first (-1: all); applies remotely too.
        save_latest: keep ``epoch_latest.pt`` as a copy of the newest (remotely too).
        run_name: stored in the checkpoint as ``name``.
        lineage: the run's lineage (see the module docstring); the trainer sets the resumed one's.
        config_yaml: the resolved config, stored as ``config``.
        remote: an object-store URI (``s3://bucket/prefix``) checkpoints are uploaded to in the background.
        upload_timeout: seconds to wait at the end for pending uploads.
        sharded: write the model and optimizer as every rank's shards (``dist.fsdp_state_dict: sharded``).
        openclip_names: also name a checkpoint saved at an epoch's end ``epoch_K.pt``, as open_clip_train does (a hard
            link, locally; retention deletes it with its checkpoint).
    """

    def __init__(
        self,
        folder: str | Path,
        save_interval: str,
        keep: int,
        save_latest: bool,
        run_name: str,
        config_yaml: str,
        remote: str | None = None,
        upload_timeout: float = 600.0,
        sharded: bool = False,
        lineage: str | None = None,
        openclip_names: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.openclip_names = openclip_names
        self.lineage = lineage
        self.sharded = sharded
        self.interval = Time.parse(save_interval, "checkpoint.save_interval", allow_wall_clock=True)
        self.keep = keep
        self.save_latest = save_latest
        self.run_name = run_name
        self.config_yaml = config_yaml
        self.remote = get_object_store(remote) if remote else None
        self.upload_timeout = upload_timeout
        self._uploads: BackgroundTransfers | None = None
        self._every_batches = 0
        self._last_saved_batch = -1
        self._last_save_time = time.monotonic()
        self._remote_lineages: dict[str, str | None] = {}  # remote checkpoint → its lineage, as read or uploaded
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """What a process killed mid-save or mid-retention left: temporary files and checksums whose checkpoint is
        gone. (Uploads' ``.upload`` links stay until ``fit_start`` finishes or removes them.)"""
        if not self.folder.is_dir():
            return
        for stale in self.folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        for sidecar in self.folder.glob("ep*-ba*.pt.sha256"):
            if not sidecar.with_suffix("").exists():
                sidecar.unlink(missing_ok=True)
                log.info("removed %s, whose checkpoint was deleted", sidecar)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._last_save_time = time.monotonic()
        if state.dist.is_main:
            self._finish_staged_uploads()
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
        """Write the checkpoint for the current step (once per step), then apply retention and upload."""
        if state.timestamp.batch == self._last_saved_batch:
            return None
        if state.guard is not None:  # never save what follows a non-finite loss or holds non-finite weights
            state.guard.check(weights=state.model.parameters())
        self._last_saved_batch = state.timestamp.batch
        self._last_save_time = time.monotonic()
        path = self.folder / checkpoint_name(state.timestamp.epoch, state.timestamp.batch)
        started = time.perf_counter()
        if self.sharded:  # the shards first: a .pt with its checksum means the folder is complete
            save_sharded(state.model, state.optimizer, sharded_folder(path))
        checkpoint = state.state_dict(weights=not self.sharded)  # every rank: FSDP gathers the weights
        if not state.dist.is_main:
            return None
        checkpoint.update(
            epoch=state.timestamp.epoch, name=self.run_name, config=self.config_yaml, lineage=self.lineage
        )
        if self.sharded:
            checkpoint["sharded"] = sharded_folder(path).name
        digest = save_atomic(checkpoint, path, self.lineage)
        if self.save_latest:
            link_or_copy(path, self.folder / LATEST)
        if self.openclip_names and state.batches_per_epoch and state.timestamp.batch % state.batches_per_epoch == 0:
            link_or_copy(path, self.folder / f"epoch_{state.timestamp.batch // state.batches_per_epoch}.pt")
        log.info("saved checkpoint %s (%.1fs)", path, time.perf_counter() - started)
        self._apply_retention()
        if self.remote is not None:
            self._upload(path, digest, state.timestamp.batch)
        return path

    def _apply_retention(self) -> None:
        """Keep the newest ``keep`` checkpoints of this run's lineage; never touch another lineage's."""
        if self.keep == -1:
            return
        own = [
            p for p in numbered_checkpoints(self.folder) if sidecar_of(p).is_file() and lineage_of(p) == self.lineage
        ]
        for old in own[: -self.keep]:
            # the checkpoint first, its checksum (which says whose it is) last: killed between the two, the orphaned
            # checksum is removed when the next run starts (_remove_leftovers)
            shutil.rmtree(sharded_folder(old), ignore_errors=True)
            for name in self.folder.glob("epoch_*.pt"):  # its OpenCLIP name (openclip_names), not epoch_latest.pt
                if OPENCLIP_NAME.match(name.name) and os.path.samefile(name, old):
                    name.unlink()
            old.unlink(missing_ok=True)
            sidecar_of(old).unlink(missing_ok=True)
            log.info("deleted old checkpoint %s (checkpoint.keep=%d)", old, self.keep)

    # -- object store -------------------------------------------------------------------------------
    def _upload(self, path: Path, digest: str, step: int) -> None:
        """Queue the checkpoint's files, then the pointer, then remote retention, in that order."""
        if self._uploads is None:
            self._uploads = BackgroundTransfers("checkpoint upload")
        name = path.name
        # Upload from hard links: local retention may delete the files before their upload runs.
        staged, staged_sidecar = self.folder / f".{name}.upload", self.folder / f".{name}.sha256.upload"
        for source, link in ((path, staged), (sidecar_of(path), staged_sidecar)):
            link.unlink(missing_ok=True)
            os.link(source, link)
        self._upload_staged(name, step, digest)

    def _upload_staged(self, name: str, step: int, digest: str, newest: bool = True) -> None:
        """Queue the upload of ``.<name>.upload`` and its checksum, then the pointer (when ``newest``), then remote
        retention; the staged links are removed once uploaded."""
        store = self.remote
        staged, staged_sidecar = self.folder / f".{name}.upload", self.folder / f".{name}.sha256.upload"
        self._remote_lineages[name] = lineage_of_sidecar(staged_sidecar.read_bytes())
        self._uploads.submit(f"upload of {name}", lambda: store.upload(staged, name))
        self._uploads.submit(f"upload of {name}.sha256", lambda: store.upload(staged_sidecar, f"{name}.sha256"))
        pointer = json.dumps({"name": name, "step": step, "sha256": digest}).encode()

        def finish() -> None:
            if newest:
                if self.save_latest:
                    store.copy(name, LATEST)
                pointer_file = self.folder / f".{POINTER}"
                pointer_file.write_bytes(pointer)
                store.upload(pointer_file, POINTER)
            staged.unlink(missing_ok=True)
            staged_sidecar.unlink(missing_ok=True)
            log.info("uploaded checkpoint %s", store.join(name))

        self._uploads.submit(f"pointer update to {name}" if newest else f"end of the upload of {name}", finish)
        if self.keep != -1:
            self._uploads.submit("remote retention", self._apply_remote_retention)

    def _finish_staged_uploads(self) -> None:
        """Staged uploads a killed run left (``.<name>.upload`` links, each a complete checkpoint): uploaded now, or
        removed when this run uploads nowhere or the remote already has them."""
        staged = sorted(
            (step, p.name[1 : -len(".upload")])
            for p in self.folder.glob(".ep*-ba*.pt.upload")
            if (step := step_of(p.name[1 : -len(".upload")])) is not None
        )
        if not staged:
            return
        remote_keys = set(self.remote.list()) if self.remote is not None else set()
        newest_remote = max((s for k in remote_keys if (s := step_of(k)) is not None), default=-1)
        for step, name in staged:
            files = (self.folder / f".{name}.upload", self.folder / f".{name}.sha256.upload")
            if self.remote is None or not files[1].is_file() or {name, f"{name}.sha256"} <= remote_keys:
                for file in files:
                    file.unlink(missing_ok=True)
                log.info("removed the staged upload of %s left by an interrupted run (%s)", name, self._why(files))
                continue
            if self._uploads is None:
                self._uploads = BackgroundTransfers("checkpoint upload")
            digest = json.loads(files[1].read_bytes())["sha256"]
            log.info("uploading %s, staged by an interrupted run, to %s", name, self.remote.join(name))
            self._upload_staged(name, step, digest, newest=step > newest_remote)
            newest_remote = max(newest_remote, step)

    def _why(self, files: tuple[Path, Path]) -> str:
        if self.remote is None:
            return "this run uploads nowhere"
        if not files[1].is_file():
            return "its checksum was never staged"
        return f"{self.remote.uri} has it"

    def _apply_remote_retention(self) -> None:
        """The newest ``keep`` remote checkpoints of this run's lineage stay; other lineages' are never deleted."""
        keys = set(self.remote.list())
        numbered = sorted((step, key) for key in keys if (step := step_of(key)) is not None and f"{key}.sha256" in keys)
        for key in (k for _, k in numbered if k not in self._remote_lineages):
            self._remote_lineages[key] = lineage_of_sidecar(self.remote.read_bytes(f"{key}.sha256") or b"")
        own = [key for _, key in numbered if self._remote_lineages[key] == self.lineage]
        for key in own[: -self.keep]:
            self.remote.delete(key)
            self.remote.delete(f"{key}.sha256")
            self._remote_lineages.pop(key, None)
            log.info("deleted old remote checkpoint %s", self.remote.join(key))

    def close(self, state: State, logger: Logger) -> None:
        if self._uploads is None:
            return
        uploads, self._uploads = self._uploads, None
        left = uploads.close(self.upload_timeout)
        if uploads.failure is not None:
            raise CheckpointError(
                f"{len(left)} checkpoint uploads to {self.remote.uri} were not done: {uploads.failure}; the local "
                f"copies are kept in {self.folder}"
            )
        if left:
            raise CheckpointError(
                f"{len(left)} checkpoint uploads to {self.remote.uri} could not be completed within "
                f"{self.upload_timeout:.0f}s ({'; '.join(left)}); the local copies are kept in {self.folder}"
            )
