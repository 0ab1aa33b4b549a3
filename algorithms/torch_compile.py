"""Compile the training forward pass with ``torch.compile`` (OpenCLIP's ``--torchcompile``).

Runs on ``FIT_START``, after every other algorithm changed the model (ordering rule ``sort_to_back``)
and after DDP wrapping, so the compiled graph sees the final model and DDP can split it at its
gradient buckets. Checkpoints and evaluation use the uncompiled module (the weights are shared).
The first steps are slow while graphs compile; later steps are faster.

**Measured** (time to accuracy, `python benchmarks/time_to_accuracy.py --algorithms --seeds 0 1 2 --budget 30`;
digits, `tiny-vit`, seeds 0, 1, 2, 2 idle CPU cores (Sapphire Rapids), 2026-12-06 21:39-21:50 UTC): switched on in the
fastest recipe (`yamls/digits_fast.yaml`: Muon at lr 1.2e-2 with momentum 0.5 and no warmup, an average of the weights
with a half-life of 10 steps, the text embeddings frozen, captions cut to 8 tokens), 90% zero-shot top-1 after 14.6 s
(median; per seed 29.8, 14.6, 10.3), after epochs 1, 1, 1 (the recipe: 1, 1, 1), against 7.5 s without (0.51x), best
top-1 within 30 s 0.9694 against 0.9749 (-0.5 pt). README's method-card table has every algorithm side by side.
"""

from __future__ import annotations

import torch
from torch import nn

from cadenza.engine.algorithm import Algorithm
from cadenza.engine.event import Event
from cadenza.engine.logger import Logger
from cadenza.engine.registry import ALGORITHMS
from cadenza.engine.state import State

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_model(
    model: nn.Module,
    mode: str = "default",
    backend: str = "inductor",
    fullgraph: bool = False,
    dynamic: bool | None = None,
) -> nn.Module:
    """Return ``torch.compile(model, ...)`` (the parameters are shared with ``model``)."""
    return torch.compile(model, mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic)


@ALGORITHMS.register("torch_compile")
class TorchCompile(Algorithm):
    """Compile the model used by the training loop.

    Args:
        mode: ``torch.compile`` mode (default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs).
        backend: ``inductor`` (default), or e.g. ``aot_eager`` to debug.
        fullgraph: fail on graph breaks instead of falling back to eager for that part.
        dynamic: ``None`` lets torch decide; ``False`` specializes on shapes.
    """

    def __init__(
        self, mode: str = "default", backend: str = "inductor", fullgraph: bool = False, dynamic: bool | None = None
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"unknown backend {backend!r}; available: {', '.join(torch._dynamo.list_backends())}")
        self.mode = mode
        self.backend = backend
        self.fullgraph = fullgraph
        self.dynamic = dynamic

    def match(self, event: Event, state: State) -> bool:
        return event == Event.FIT_START

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        state.wrapped_model = compile_model(state.wrapped_model, self.mode, self.backend, self.fullgraph, self.dynamic)
