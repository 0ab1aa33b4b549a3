"""Base classes of what the engine runs on events: algorithms change training, callbacks observe it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from cadenza.engine.event import Event

if TYPE_CHECKING:
    from cadenza.engine.logger import Logger
    from cadenza.engine.state import State


class Algorithm(ABC):
    """A training technique that runs on events and may change the model, the batch or the loss.

    Subclasses keep ``__init__`` to checking and storing arguments, ``match`` free of side effects,
    and do their work in ``apply``. State that must survive a resume goes through ``state_dict``.
    """

    #: registry name, also the YAML key under ``algorithms:`` (set by ``ALGORITHMS.register``)
    name: str = ""
    #: per-sample data the algorithm reads from training batches besides images and tokens (``state.extras``); the
    #: trainer asks the training data for them, and a format that cannot carry one is a config error before any work
    batch_extras: tuple[str, ...] = ()

    @abstractmethod
    def match(self, event: Event, state: State) -> bool:
        """Whether to run on ``event``. Must not change anything."""

    @abstractmethod
    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Do the algorithm's work for ``event``."""

    def check_compatible(self, others: list[Algorithm], state: State) -> None:
        """Raise ``ConfigError`` (naming both YAML keys) if this cannot run beside ``others``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Callback:
    """Observes training (logging, checkpointing, evaluation) and must not change it.

    ``run_event`` dispatches to a method named after the event (``batch_end(state, logger)``).
    """

    name: str = ""

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        handler = getattr(self, event.value, None)
        if handler is not None:
            handler(state, logger)

    def close(self, state: State, logger: Logger) -> None:
        """Release resources; runs after ``FIT_END`` and also when training fails."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
