"""Remote sync: mirror the whole run folder to an object store every N seconds, and once at the end.

OpenCLIP's ``--remote-sync s3://... --remote-sync-frequency 300``, done with boto3 in a background
thread (no AWS CLI, no extra process). Unlike OpenCLIP it also syncs ``epoch_latest.pt``. Only
files that changed (size or modification time) since their last upload are sent.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from cadenza.engine.algorithm import Callback
from cadenza.engine.errors import ConfigError
from cadenza.engine.object_store import ObjectStoreError, get_object_store
from cadenza.engine.registry import CALLBACKS

if TYPE_CHECKING:
    from cadenza.engine.logger import Logger
    from cadenza.engine.state import State

log = logging.getLogger("cadenza")


def sync_folder(folder: Path, store, uploaded: dict[str, tuple[int, int]]) -> int:
    """Upload the files of ``folder`` that changed since ``uploaded`` records; return how many were sent.

    Hidden files (temporary checkpoint writes) are skipped. ``uploaded`` is updated in place.
    """
    sent = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        key = path.relative_to(folder).as_posix()
        stat = path.stat()
        signature = (stat.st_size, stat.st_mtime_ns)
        if uploaded.get(key) == signature:
            continue
        store.upload(path, key)
        uploaded[key] = signature
        sent += 1
    return sent


@CALLBACKS.register("remote_sync")
class RemoteSync(Callback):
    """Mirror the run folder to ``remote`` every ``frequency`` seconds (rank 0), with a final sync.

    Args:
        remote: ``s3://bucket/prefix`` (or a local folder); the run folder's files land under it.
        frequency: seconds between syncs (OpenCLIP's ``--remote-sync-frequency``).
        under_run: the files land under ``<remote>/<run name>`` instead (OpenCLIP's ``--remote-sync`` layout); the
            name is the run's as the trainer settled it, rank 0's date when ``run.name`` is unset.
    """

    def __init__(self, run_dir: Path, remote: str, frequency: float = 300.0, under_run: bool = False) -> None:
        if frequency <= 0:
            raise ValueError("frequency must be a positive number of seconds")
        self.run_dir = Path(run_dir)
        self.remote = f"{remote.rstrip('/')}/{self.run_dir.name}" if under_run else remote
        self.frequency = frequency
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._store = get_object_store(self.remote)  # another scheme than s3:// is a ValueError, named by the registry

    def fit_start(self, state: State, logger: Logger) -> None:
        if not state.dist.is_main or self._thread is not None:
            return
        try:  # a missing bucket or refused credentials stop the run now, not after hours of failed syncs
            self._store.probe()
        except ObjectStoreError as error:
            raise ConfigError(
                "callbacks.remote_sync.remote",
                f"cannot write to {self.remote} ({error}). Check the bucket, the credentials and S3_ENDPOINT_URL.",
            ) from None
        self._thread = threading.Thread(target=self._loop, name="cadenza-remote-sync", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.frequency):
            self.sync()

    def sync(self) -> int:
        """One pass over the run folder; failures are logged and retried on the next pass."""
        with self._lock:
            try:
                sent = sync_folder(self.run_dir, self._store, self._uploaded)
            except Exception as error:  # noqa: BLE001 - keep training; the next pass retries
                log.warning("remote sync to %s failed (%s); retrying in %.0fs", self.remote, error, self.frequency)
                return 0
        if sent:
            log.debug("remote sync: %d files to %s", sent, self.remote)
        return sent

    def close(self, state: State, logger: Logger) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        log.info("remote sync: final sync of the run folder to %s", self.remote)
        self.sync()
