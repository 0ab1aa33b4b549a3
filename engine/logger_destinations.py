"""Where metrics go: the ``LoggerDestination`` base and the destinations YAML names under ``loggers:``."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadenza.engine.algorithm import Callback
from cadenza.engine.registry import LOGGERS

if TYPE_CHECKING:
    from cadenza.engine.logger import Logger
    from cadenza.engine.state import State

log = logging.getLogger("cadenza")


class LoggerDestination(Callback):
    """Receives metrics from the ``Logger``. Destinations are callbacks too, so they see ``fit_start``, ``close``, ..."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at optimizer step ``step``."""

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        """Record the run's configuration once at the start."""


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

    def epoch_start(self, state: State, logger: Logger) -> None:
        if state.dist.is_main:
            log.info("Start epoch %d", state.timestamp.epoch)

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
        ts = state.timestamp
        epoch_samples = state.batches_per_epoch * state.samples_per_batch
        losses = "  ".join(
            f"{k.removeprefix('train/').capitalize()}: {v:.4g}" for k, v in metrics.items() if k.endswith("loss")
        )
        # OpenCLIP's line: the samples trained in this epoch, then significant digits (a slow run is not "0.0/s")
        log.info(
            "Train Epoch: %d [%*d/%d (%.0f%%)] Data (t): %.3f Batch (t): %.3f, %#g/s, %#g/s/gpu LR: %.6f Logit Scale: %.3f %s",
            ts.epoch,
            len(str(epoch_samples)),
            ts.sample_in_epoch,
            epoch_samples,
            100 * ts.batch_in_epoch / max(state.batches_per_epoch, 1),
            metrics.get("train/data_time", 0.0),
            metrics.get("train/batch_time", 0.0),
            metrics.get("train/samples_per_second", 0.0),
            metrics.get("train/samples_per_second_per_gpu", 0.0),
            metrics.get("train/lr", 0.0),
            metrics.get("train/scale", 0.0),
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
        self._handle.write(json.dumps({"step": step, **{k: _as_number(v) for k, v in metrics.items()}}) + "\n")

    def close(self, state: State, logger: Logger) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _as_number(value: Any) -> Any:
    """A tensor or NumPy scalar as a Python number (JSON, TensorBoard and W&B take those)."""
    return value.item() if hasattr(value, "item") else value


@LOGGERS.register("tensorboard")
class TensorBoardLogger(LoggerDestination):
    """Scalars in ``<run folder>/<log_dir>`` for TensorBoard (``tensorboard --logdir logs``).

    Args:
        log_dir: relative to the run folder.
        flush_secs: how often the event file is flushed.
    """

    def __init__(self, run_dir: Path, log_dir: str = "tensorboard", flush_secs: int = 30) -> None:
        self.path = Path(run_dir) / log_dir
        self.flush_secs = flush_secs
        self._writer = None
        self._params: dict[str, Any] | None = None

    def _open(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path), flush_secs=self.flush_secs)
            if self._params is not None:
                self._writer.add_text("config", "```\n" + json.dumps(self._params, indent=2, default=str) + "\n```")
        return self._writer

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        self._params = params

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        writer = self._open()
        for name, value in metrics.items():
            writer.add_scalar(name, _as_number(value), step)

    def close(self, state: State, logger: Logger) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@LOGGERS.register("wandb")
class WandBLogger(LoggerDestination):
    """Weights & Biases. A resumed run continues the same W&B run (its id is saved in checkpoints).

    Offline mode (``WANDB_MODE=offline`` or ``mode: offline``) writes under ``<run folder>/wandb`` for
    a later ``wandb sync``. Credentials come from W&B's own login; they are never logged or saved.

    Args:
        project, entity, name, notes, tags: the W&B run's fields (``name`` defaults to ``run.name``).
        mode: ``online``, ``offline`` or ``disabled``; default W&B's (``WANDB_MODE``).
    """

    def __init__(
        self,
        run_dir: Path,
        project: str = "cadenza",
        entity: str | None = None,
        name: str | None = None,
        notes: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
    ) -> None:
        if mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"mode must be online, offline or disabled, got {mode!r}")
        self.run_dir = Path(run_dir)
        self.project, self.entity, self.name, self.notes = project, entity, name, notes
        self.tags = list(tags or [])
        self.mode = mode
        self.run_id: str | None = None
        self._run = None
        self._params: dict[str, Any] = {}

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        self._params = params

    def fit_start(self, state: State, logger: Logger) -> None:
        if state.dist.is_main:
            self._start()

    def _start(self) -> None:
        if self._run is not None:
            return
        import wandb

        self.run_id = self.run_id or secrets.token_hex(4)  # W&B ids are lowercase letters and digits
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.name or self.run_dir.name,
            notes=self.notes,
            tags=self.tags,
            config=self._params,
            dir=str(self.run_dir),
            id=self.run_id,
            resume="allow",
            mode=self.mode,
            reinit="finish_previous",
        )
        log.info("W&B run %s (%s)", self.run_id, getattr(self._run, "url", None) or "offline")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._start()
        self._run.log({k: _as_number(v) for k, v in metrics.items()}, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or self.run_id

    def close(self, state: State, logger: Logger) -> None:
        if self._run is not None:
            import wandb

            self._run.finish()
            self._run = None
            # finish() only informs W&B's service process, which closes (and flushes) the run's files later; a
            # reader right after close, or a job ending at once, could miss the last records. teardown() waits
            # for the service to finish and exit (a later run in this process starts a new one).
            wandb.teardown()
