"""Metric destinations selectable under ``loggers:`` in YAML."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadenza.engine.logger import LoggerDestination
from cadenza.engine.registry import LOGGERS

if TYPE_CHECKING:
    from cadenza.engine.logger import Logger
    from cadenza.engine.state import State

log = logging.getLogger("cadenza")


@LOGGERS.register("console")
class ConsoleLogger(LoggerDestination):
    """A progress bar with ETA (on a terminal) and an OpenCLIP-style line at every logging step.

    Args:
        progress_bar: show the tqdm bar (it hides itself when output is not a terminal).
    """

    def __init__(self, run_dir: Path, progress_bar: bool = True) -> None:
        self.progress_bar = progress_bar
        self._bar = None
        self._state: State | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self._state = state
        if self.progress_bar and state.dist.is_main:
            from tqdm import tqdm

            self._bar = tqdm(
                total=state.max_batches, initial=state.timestamp.batch, unit="ba", dynamic_ncols=True, disable=None
            )

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        state = self._state
        if state is None or not any(k.startswith("train/") for k in metrics):
            if any(k.startswith("val/") for k in metrics):
                log.info(
                    "Eval at step %d: %s",
                    step,
                    "\t".join(f"{k.removeprefix('val/')}: {v:.4f}" for k, v in metrics.items()),
                )
            return
        done = step / max(state.max_batches, 1)
        losses = "  ".join(
            f"{k.removeprefix('train/').capitalize()}: {v:.4g}" for k, v in metrics.items() if k.endswith("loss")
        )
        log.info(
            "Train Epoch: %d [%d/%d (%.0f%%)] Data (t): %.3f Batch (t): %.3f, %.1f/s, %.1f/s/gpu LR: %.6f Logit Scale: %.3f %s",
            state.timestamp.epoch,
            step,
            state.max_batches,
            100 * done,
            metrics.get("train/data_time", 0.0),
            metrics.get("train/batch_time", 0.0),
            metrics.get("train/samples_per_second", 0.0),
            metrics.get("train/samples_per_second_per_gpu", 0.0),
            metrics.get("train/lr", 0.0),
            metrics.get("train/logit_scale", 0.0),
            losses,
        )
        if self._bar is not None and "train/loss" in metrics:
            self._bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)

    def close(self, state: State, logger: Logger) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@LOGGERS.register("jsonl")
class JsonlLogger(LoggerDestination):
    """One JSON object per logging step in ``<run folder>/metrics.jsonl``: ``{"step": ..., "train/loss": ...}``.

    Args:
        filename: relative to the run folder.
    """

    def __init__(self, run_dir: Path, filename: str = "metrics.jsonl") -> None:
        self.path = Path(run_dir) / filename
        self._handle = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", buffering=1)
        self._handle.write(json.dumps({"step": step, **{k: _plain(v) for k, v in metrics.items()}}) + "\n")

    def close(self, state: State, logger: Logger) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
