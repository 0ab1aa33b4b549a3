"""A run folder belongs to one run: a lock while it trains, and checkpoints no other run writes over.

- ``RunFolderLock``: an OS lock on ``<run folder>/.lock`` (``filelock``: ``flock`` on Linux), held by rank 0 from
  the start of the run to its end. The OS drops it when the process dies, SIGKILL included, so a stale lock never
  outlives its run. A second run on the folder stops at once with a config error (exit 2).
- ``claim_checkpoints``: a run that starts from scratch (no ``checkpoint.resume``) into a checkpoint folder, or an
  ``s3://`` prefix, that already holds checkpoints stops before any work, unless ``checkpoint.overwrite`` says to
  delete them first. Retention (``engine/checkpoint.py``) deletes only checkpoints of the run's own lineage.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from cadenza.engine.checkpoint import LATEST, POINTER, checkpoint_files, step_of
from cadenza.engine.errors import ConfigError
from cadenza.engine.object_store import get_object_store

log = logging.getLogger("cadenza")

LOCK = ".lock"


class RunFolderLock:
    """Hold ``<folder>/.lock`` or raise ``ConfigError`` naming the folder and what to do."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOCK
        holder = self.path.read_text(errors="replace").strip() if self.path.is_file() else ""
        self._lock: FileLock | None = FileLock(self.path, timeout=0, fallback_to_soft=False)
        try:
            self._lock.acquire()
        except Timeout:
            self._lock = None
            if holder.startswith(f"pid {os.getpid()} "):
                raise ConfigError(
                    "run.name",
                    f"the run folder {folder} is held by another Trainer of this process: let it end (fit) or call "
                    "its release() first, or give this run its own run.name.",
                ) from None
            raise ConfigError(
                "run.name",
                f"the run folder {folder} is in use by another run ({holder or 'another process'}). Wait for it to "
                "end, or give this run its own run.name.",
            ) from None
        except (OSError, NotImplementedError) as error:  # a file system without locks (some NFS mounts)
            self._lock = None
            log.warning(
                "cannot lock the run folder %s (%s): nothing stops a second run from writing into it", folder, error
            )
            return
        with open(self.path, "w") as handle:  # who holds it, for the second run's message (the lock is on the fd)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _remote_checkpoints(remote: str) -> list[str]:
    keys = get_object_store(remote).list()
    return sorted(k for k in keys if step_of(k.removesuffix(".sha256")) is not None or k in (LATEST, POINTER))


def claim_checkpoints(folder: Path, remote: str | None, overwrite: bool) -> None:
    """Before a run from scratch writes checkpoints into ``folder`` (and ``remote``): stop if another run's are there,
    or, with ``overwrite``, delete them, saying what was deleted."""
    local = checkpoint_files(folder)
    remote_keys = _remote_checkpoints(remote) if remote else []
    found = [str(p) for p in local] + [f"{remote}/{k}" for k in remote_keys]
    numbered = [p for p in local if step_of(p.name) is not None] + [k for k in remote_keys if step_of(k) is not None]
    names = sorted({Path(str(n)).name for n in numbered}, key=step_of) or [LATEST]
    if not found:
        return
    where = " and ".join(filter(None, [str(folder) if local else None, remote if remote_keys else None]))
    if not overwrite:
        raise ConfigError(
            "checkpoint.resume",
            f"{where} already holds {len(numbered)} checkpoints of another run ({', '.join(names[-3:])}"
            f"{', ...' if len(names) > 3 else ''}), and this run starts from scratch. Resume that run "
            "(checkpoint.resume=latest), give this run its own run.name (or checkpoint.save_folder), or delete them "
            "first with checkpoint.overwrite=true.",
        )
    for path in local:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if remote_keys:
        store = get_object_store(remote)
        for key in remote_keys:
            store.delete(key)
    log.warning("checkpoint.overwrite: deleted %d files of a previous run from %s: %s", len(found), where, found)
