"""Gradient clipping: bound the gradients before every optimizer step.

``norm`` rescales all gradients so their global L2 norm is at most ``norm`` (OpenCLIP's
``--grad-clip-norm``, ``torch.nn.utils.clip_grad_norm_``); ``value`` clamps each element to
``[-value, value]``. Runs on ``BEFORE_OPTIMIZER_STEP``, after AMP's unscaling, so it sees true gradients.
Clipping by norm reports the norm before clipping, averaged over each logging window, as ``train/grad_norm``.
Under FSDP (``dist.fsdp``) gradients are ``DTensor`` shards: their norm is reduced over the shards
and combined with the replicated ones', so the global norm is the one a single process computes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

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
    if norm is not None and any(isinstance(p.grad, DTensor) for p in parameters):
        return _clip_sharded_grad_norm(parameters, norm)
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
            state.step_metrics["grad_norm"] = total.detach()


@torch.no_grad()
def _clip_sharded_grad_norm(parameters: list[torch.nn.Parameter], norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over a mix of sharded (``DTensor``) and replicated gradients; returns the global norm."""
    sharded = [p.grad for p in parameters if isinstance(p.grad, DTensor)]
    replicated = [p.grad for p in parameters if not isinstance(p.grad, DTensor)]
    squares = [torch.nn.utils.get_total_norm(sharded).full_tensor() ** 2]  # reduced over the shards
    if replicated:
        squares.append(torch.nn.utils.get_total_norm(replicated).to(squares[0].device) ** 2)
    total = torch.stack(squares).sum().sqrt()
    coefficient = torch.clamp(norm / (total + 1e-6), max=1.0)  # clip_grad_norm_'s rule, on the device: no sync
    torch._foreach_mul_(sharded + replicated, coefficient)
    return total
