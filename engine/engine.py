"""The engine: on each event, run the matching algorithms in rule order, then the callbacks."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cadenza.engine.algorithm import Algorithm, Callback
from cadenza.engine.event import Event
from cadenza.engine.logger import Logger
from cadenza.engine.passes import ALGORITHM_PASSES, AlgorithmPass
from cadenza.engine.state import State

log = logging.getLogger(__name__)


class Engine:
    """Dispatches events. Algorithms run before callbacks so callbacks observe the changed state.

    Args:
        state: the training state (its ``algorithms`` and ``callbacks`` are what runs).
        logger: the metrics logger handed to every hook.
        passes: ordering rules (default: ``ALGORITHM_PASSES``).
    """

    def __init__(self, state: State, logger: Logger, passes: Sequence[AlgorithmPass] | None = None) -> None:
        self.state = state
        self.logger = logger
        self.passes = list(ALGORITHM_PASSES if passes is None else passes)

    def run_event(self, event: Event) -> None:
        for algorithm in self.order(event, [a for a in self.state.algorithms if a.match(event, self.state)]):
            log.debug("event %s: running algorithm %s", event.value, algorithm.name)
            algorithm.apply(event, self.state, self.logger)
        for callback in self.state.callbacks:
            callback.run_event(event, self.state, self.logger)

    def order(self, event: Event, algorithms: list[Algorithm]) -> list[Algorithm]:
        for rule in self.passes:
            algorithms = rule(algorithms, event)
        return algorithms

    def close(self) -> None:
        """Close every callback, even if one fails; re-raise the first failure."""
        first_error: BaseException | None = None
        for callback in self.state.callbacks:
            try:
                callback.close(self.state, self.logger)
            except Exception as error:  # noqa: BLE001 - every callback must get its chance to close
                log.exception("closing callback %s failed", type(callback).__name__)
                first_error = first_error or error
        if first_error is not None:
            raise first_error


def check_algorithms(algorithms: Sequence[Algorithm], state: State) -> None:
    """Let each algorithm reject the others it cannot run beside (raises ``ConfigError``)."""
    for algorithm in algorithms:
        algorithm.check_compatible([a for a in algorithms if a is not algorithm], state)


__all__ = ["Engine", "Callback", "check_algorithms"]
