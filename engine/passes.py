"""Ordering rules for algorithms on one event. Each rule is a named, pure function of the list.

The engine applies ``ALGORITHM_PASSES`` in order to the algorithms that matched an event. A rule
that needs an algorithm to run before or after another says so here, not in the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cadenza.engine.algorithm import Algorithm
from cadenza.engine.event import Event

AlgorithmPass = Callable[[Sequence[Algorithm], Event], list[Algorithm]]

#: algorithms that wrap or compile the model run after every algorithm that changes its modules
RUN_LAST = ("torch_compile",)
#: algorithms whose changes others build on (a frozen tower before anything inspects requires_grad)
RUN_FIRST = ("lock_image", "lock_text")


def sort_to_front(algorithms: Sequence[Algorithm], event: Event) -> list[Algorithm]:
    """Tower locking first, so later algorithms see the final ``requires_grad`` flags."""
    return sorted(algorithms, key=lambda a: 0 if a.name in RUN_FIRST else 1)


def sort_to_back(algorithms: Sequence[Algorithm], event: Event) -> list[Algorithm]:
    """Compilation last: it must see the model after every other algorithm changed it."""
    return sorted(algorithms, key=lambda a: 1 if a.name in RUN_LAST else 0)


def reverse_after_events(algorithms: Sequence[Algorithm], event: Event) -> list[Algorithm]:
    """On ``AFTER_X`` / ``X_END`` events run in reverse, so an algorithm can undo what it did first."""
    return list(reversed(algorithms)) if event.is_after else list(algorithms)


ALGORITHM_PASSES: list[AlgorithmPass] = [sort_to_front, sort_to_back, reverse_after_events]
