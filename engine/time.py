"""Unit-tagged time strings: ``"32ep"``, ``"2000ba"``, ``"400000000sp"``, ``"0.1dur"``, ``"30m"``.

``ba`` counts optimizer steps (one step may hold several micro-batches when ``optim.accum_freq > 1``).
Wall-clock units (``s``, ``m``, ``h``) are allowed only where a key says so (checkpoint intervals).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum

from cadenza.engine.errors import ConfigError


class TimeUnit(str, Enum):
    EPOCH = "ep"
    BATCH = "ba"
    SAMPLE = "sp"
    DURATION = "dur"
    SECOND = "s"
    MINUTE = "m"
    HOUR = "h"

    @property
    def is_wall_clock(self) -> bool:
        return self in (TimeUnit.SECOND, TimeUnit.MINUTE, TimeUnit.HOUR)


_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*(ep|ba|sp|dur|s|m|h)\s*$")
_SECONDS = {TimeUnit.SECOND: 1.0, TimeUnit.MINUTE: 60.0, TimeUnit.HOUR: 3600.0}


@dataclass(frozen=True)
class Time:
    """A quantity of training time with its unit."""

    value: float
    unit: TimeUnit

    @classmethod
    def parse(cls, text: str | int, key: str = "time", allow_wall_clock: bool = False) -> Time:
        """Parse ``"32ep"`` and friends; ``key`` names the config key in errors."""
        if isinstance(text, int) and not isinstance(text, bool):
            raise ConfigError(key, f"{text!r} has no unit. Write e.g. '{text}ba' (batches) or '{text}ep' (epochs).")
        if re.fullmatch(r"\s*[\d.e+-]+\s*", str(text)):
            raise ConfigError(key, f"{text!r} has no unit. Write e.g. '{text}ba' (batches) or '{text}ep' (epochs).")
        match = _PATTERN.match(str(text))
        if match is None:
            units = "ep, ba, sp, dur" + (", s, m, h" if allow_wall_clock else "")
            raise ConfigError(key, f"{text!r} is not a time string. Use a number and a unit ({units}), e.g. '8ba'.")
        number, exponent, unit = match.groups()
        value = float(number) * (10 ** int(exponent) if exponent else 1)
        time = cls(value, TimeUnit(unit))
        if time.unit.is_wall_clock and not allow_wall_clock:
            raise ConfigError(key, f"{text!r}: wall-clock units are not allowed here. Use ep, ba, sp or dur.")
        if time.unit in (TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE) and value != int(value):
            raise ConfigError(key, f"{text!r}: {unit} must be a whole number.")
        if time.unit == TimeUnit.DURATION and not 0 <= value <= 1:
            raise ConfigError(key, f"{text!r}: a fraction of the run must lie in [0, 1].")
        return time

    @property
    def seconds(self) -> float:
        return self.value * _SECONDS[self.unit]

    def to_batches(self, batches_per_epoch: int, samples_per_batch: int, total_batches: int | None = None) -> int:
        """Convert to optimizer steps. Samples round up to whole steps; ``dur`` needs ``total_batches``."""
        if self.unit == TimeUnit.BATCH:
            return int(self.value)
        if self.unit == TimeUnit.EPOCH:
            return int(self.value) * batches_per_epoch
        if self.unit == TimeUnit.SAMPLE:
            return math.ceil(self.value / samples_per_batch)
        if self.unit == TimeUnit.DURATION:
            if total_batches is None:
                raise ValueError("a 'dur' time needs the run's total length")
            return round(self.value * total_batches)
        raise ValueError(f"{self} is wall-clock time, not a number of batches")

    def __str__(self) -> str:
        value = int(self.value) if self.value == int(self.value) else self.value
        return f"{value}{self.unit.value}"


@dataclass
class Timestamp:
    """Where training is. ``batch`` counts optimizer steps since the start of the run."""

    epoch: int = 0
    batch: int = 0
    sample: int = 0
    batch_in_epoch: int = 0
    sample_in_epoch: int = 0

    def after_batch(self, samples: int) -> None:
        self.batch += 1
        self.batch_in_epoch += 1
        self.sample += samples
        self.sample_in_epoch += samples

    def after_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.sample_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name, value in state.items():
            setattr(self, name, int(value))
