"""Typed errors. Every message names what is wrong and says what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CadenzaError(Exception):
    """Base class of every error Cadenza raises on purpose."""


class ConfigError(CadenzaError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible.

    Args:
        key: dotted path of the offending key (``optim.lr``).
        message: what is wrong and how to fix it.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class TrainingError(CadenzaError, RuntimeError):
    """Training cannot go on (non-finite loss, broken data source, ...)."""


class CheckpointError(CadenzaError, RuntimeError):
    """A checkpoint cannot be written, found or read."""


class DataError(CadenzaError, RuntimeError):
    """A data source cannot be used at all (nothing in it decodes, no shard can be read, ...).

    One bad sample never raises this: it is skipped and counted (``data/skipped``).
    """


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or a list of valid choices."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{close[0]}'?"
    return f" Valid: {', '.join(choices)}." if choices else ""
