"""Python's text logging for a run: ``cadenza.*`` records to the console (through tqdm) and to ``out.log``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines through tqdm so a live progress bar is not torn apart."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(run_dir: Path | None, rank: int, level: int = logging.INFO) -> None:
    """Log ``cadenza.*`` to the console and to ``<run_dir>/out.log`` (rank 0; other ranks ``out_rank<r>.log``)."""
    root = logging.getLogger("cadenza")
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s | %(levelname)s | %(message)s", "%Y-%m-%d,%H:%M:%S")
    console = _TqdmHandler()
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.setFormatter(formatter)
    root.addHandler(console)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / ("out.log" if rank == 0 else f"out_rank{rank}.log"))
        file_handler.setLevel(level)
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    root.propagate = False
