"""Everything a hook may read or change during training, in one place."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cadenza.engine.dist import DistInfo, all_gather_object
from cadenza.engine.finite import NonFiniteGuard
from cadenza.engine.fsdp import (
    full_tensors,
    load_model_state_dict,
    load_optimizer_state_dict,
    model_state_dict,
    optimizer_state_dict,
)
from cadenza.engine.loader import Loader
from cadenza.engine.optim import renumbered_state
from cadenza.engine.time import Timestamp


@dataclass
class State:
    """The training state. ``state_dict()`` / ``load_state_dict()`` cover all of it that changes.

    Attributes:
        model: the unwrapped model (``encode_image``, ``encode_text``, ...).
        wrapped_model: what the forward pass calls (the model itself, or DDP / compiled wrappers).
        batch: the current optimizer step's micro-batches, a list of ``(images, tokens)``.
        batch_extras: each micro-batch's extras (a dict of per-sample tensors, often empty: see ``Loader``).
        micro_batch: the micro-batch being processed (``(images, tokens)``); ``extras`` its extras.
        outputs: the model's output dict for ``micro_batch``.
        loss_dict: the named losses of ``micro_batch`` (``contrastive_loss``, ...); ``loss`` is their sum.
        step_metrics: scalars an algorithm measured in this optimizer step (device tensors, never synchronized),
            averaged over the logging window and logged as ``train/<name>`` (``grad_norm``); emptied every step.
        max_batches: the run's length in optimizer steps; ``batches_per_epoch`` likewise.
        train_loader, eval_loader: ``data.train`` and ``data.val`` (see ``Loader``), ``None`` when unset.
        stop_training: set by a hook to end ``fit`` after the current step.
        guard: watches losses on the device and skips updates after a non-finite one (``engine/finite.py``); its
            ``check`` (one sync) runs at logging windows and before checkpoint saves.
    """

    model: nn.Module
    config: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    dist: DistInfo = field(default_factory=DistInfo)
    wrapped_model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    loss_fn: nn.Module | None = None
    timestamp: Timestamp = field(default_factory=Timestamp)
    max_batches: int = 0
    batches_per_epoch: int = 0
    samples_per_batch: int = 0
    accum_freq: int = 1
    train_loader: Loader | None = None
    eval_loader: Loader | None = None
    algorithms: list = field(default_factory=list)
    callbacks: list = field(default_factory=list)
    batch: list = field(default_factory=list)
    batch_extras: list = field(default_factory=list)
    micro_batch: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    loss_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    step_metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    stop_training: bool = False
    guard: NonFiniteGuard | None = None

    def __post_init__(self) -> None:
        if self.wrapped_model is None:
            self.wrapped_model = self.model

    @property
    def is_done(self) -> bool:
        return self.stop_training or self.timestamp.batch >= self.max_batches

    # -- checkpointed state ------------------------------------------------------------------------
    def state_dict(self, weights: bool = True) -> dict[str, Any]:
        """Model weights under ``state_dict`` (OpenCLIP's key) and every other piece that changes.

        Every rank must call it: an FSDP-sharded model's weights, optimizer state and algorithm states
        are gathered into full tensors, present on rank 0 only (the layout a run without FSDP saves).
        ``weights=False`` leaves model and optimizer out (``None``): sharded checkpoints save them apart.
        """
        return {
            "state_dict": model_state_dict(self.model) if weights else None,
            "optimizer": optimizer_state_dict(self.model, self.optimizer)
            if weights and self.optimizer is not None
            else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "timestamp": self.timestamp.state_dict(),
            "rng": all_gather_object(get_rng_state()),  # one entry per rank
            "dataloader": self.train_loader.state_dict() if self.train_loader is not None else None,
            "algorithms": {type(a).__name__: full_tensors(a.state_dict()) for a in self.algorithms},
            "callbacks": {type(c).__name__: full_tensors(c.state_dict()) for c in self.callbacks},
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore from ``state_dict()``'s output (full tensors, on every rank); ``None`` weights are skipped."""
        if state["state_dict"] is not None:
            load_model_state_dict(self.model, state["state_dict"], strict=strict)
        if self.optimizer is not None and state.get("optimizer") is not None:
            saved = renumbered_state(state["optimizer"], self.model, self.optimizer)  # older checkpoints' numbering
            load_optimizer_state_dict(self.model, self.optimizer, saved)
        for name in ("scheduler", "scaler"):
            target = getattr(self, name)
            if target is not None and state.get(name) is not None:
                target.load_state_dict(state[name])
        self.timestamp.load_state_dict(state["timestamp"])
        if self.train_loader is not None and state.get("dataloader") is not None:
            self.train_loader.load_state_dict(state["dataloader"])
        for group, objects in (("algorithms", self.algorithms), ("callbacks", self.callbacks)):
            saved = state.get(group) or {}
            for obj in objects:
                if type(obj).__name__ in saved:
                    obj.load_state_dict(saved[type(obj).__name__])
        rng = state["rng"]
        # Each rank continues its own random streams; on a different number of processes, ranks reuse
        # the saved ones in turn (data order does not depend on these: it is seeded per epoch).
        set_rng_state(rng[self.dist.rank % len(rng)] if isinstance(rng, list) else rng)


def get_rng_state() -> dict[str, Any]:
    """Every random number generator's state, in types ``torch.load(weights_only=True)`` accepts."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"]["version"], tuple(state["python"]["state"]), state["python"]["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
