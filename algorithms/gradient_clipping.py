"""Gradient clipping: bound the gradients before every optimizer step.

``norm`` rescales all gradients so their global L2 norm is at most ``norm`` (OpenCLIP's
``--grad-clip-norm``, ``torch.nn.utils.clip_grad_norm_``); ``value`` clamps each element to
``[-value, value]``. Runs on ``BEFORE_OPTIMIZER_STEP``, after AMP's unscaling, so it sees true gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cadenza.engine.algorithm import Algorithm
from cadenza.engine.event import Event
from cadenza.engine.logger import Logger
from cadenza.engine.registry import ALGORITHMS
from cadenza.engine.state import State


def clip_gradients(
    parameters: Iterable[torch.nn.Parameter], norm: float | None = None, value: float | None = None
) -> torch.Tensor | None:
    """Clip in place; returns the total norm before clipping when clipping by norm."""
    parameters = [p for p in parameters if p.grad is not None]
    if norm is not None:
        return torch.nn.utils.clip_grad_norm_(parameters, norm)
    torch.nn.utils.clip_grad_value_(parameters, value)
    return None


@ALGORITHMS.register("gradient_clipping")
class GradientClipping(Algorithm):
    """Clip gradients by global norm or by value.

    Args:
        norm: maximum global L2 norm (OpenCLIP's ``--grad-clip-norm``).
        value: maximum absolute value per element.
    """

    def __init__(self, norm: float | None = None, value: float | None = None) -> None:
        if (norm is None) == (value is None):
            raise ValueError("set exactly one of 'norm' or 'value'")
        if (norm if norm is not None else value) <= 0:
            raise ValueError("the clipping threshold must be positive")
        self.norm = norm
        self.value = value

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BEFORE_OPTIMIZER_STEP

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        total = clip_gradients(state.model.parameters(), self.norm, self.value)
        if total is not None:
            state.outputs["grad_norm"] = total.detach()
