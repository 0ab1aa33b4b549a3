"""Cadenza's engine: events, state, algorithms, callbacks, the trainer and the ``composer`` CLI."""

from cadenza.engine.algorithm import Algorithm, Callback
from cadenza.engine.errors import CadenzaError, CheckpointError, ConfigError, DataError, TrainingError
from cadenza.engine.event import Event
from cadenza.engine.time import Time, Timestamp, TimeUnit

__all__ = [
    "Algorithm",
    "CadenzaError",
    "Callback",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Event",
    "Time",
    "TimeUnit",
    "Timestamp",
    "TrainingError",
]
