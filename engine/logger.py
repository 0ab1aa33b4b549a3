"""The ``Logger``: fans each metric out to the run's destinations (console, jsonl, TensorBoard, W&B, ...).

The destinations themselves (``LoggerDestination`` and the ones YAML names under ``loggers:``) are in
``logger_destinations.py``; Python's text logging (``out.log``) is set up in ``text_log.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class MetricSink(Protocol):
    """What the logger writes to: every ``LoggerDestination`` is one."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_hyperparameters(self, params: dict[str, Any]) -> None: ...


class Logger:
    """Fans metrics out to the destinations; only rank 0 writes (others keep their values local)."""

    def __init__(self, destinations: Sequence[MetricSink], is_main: bool = True) -> None:
        self.destinations = list(destinations)
        self.is_main = is_main

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.is_main:
            for destination in self.destinations:
                destination.log_metrics(metrics, step)

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        if self.is_main:
            for destination in self.destinations:
                destination.log_hyperparameters(params)
