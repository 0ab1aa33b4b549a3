"""Cadenza's kernel (events, state, algorithms, callbacks, the engine, time, registries, errors) and the services
that know nothing of CLIP (dist, precision, fsdp, optim, checkpoints, object store, loggers, metrics).

Nothing here imports ``cadenza.train``, ``cadenza.algorithms``, ``cadenza.datasets`` or ``cadenza.models``.
"""

import cadenza.engine.deferred_imports  # noqa: F401 - before anything imports timm, which imports wandb (0.5-0.7 s)

# isort: split

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
