"""Non-finite losses stop training without a host sync per step.

Asking every step whether the loss is finite (``loss.isfinite().item()``) makes the CPU wait for the forward pass
before it may queue the backward pass, so a GPU idles between steps. Instead the check stays on the device:
``watch_loss`` records the first step whose loss is not finite, and from then on every optimizer update is skipped
on the device, the way ``torch.amp.GradScaler`` skips a step whose gradients overflowed: AdamW's fused kernel takes
a ``found_inf`` tensor and leaves weights, moments and step counts as they were when it is non-zero. The host
learns of it at the next ``check`` (one sync), which the trainer runs at each logging window, before every
checkpoint save and evaluation, and at the end; ``check`` raises ``NonFiniteError`` naming the step.

What is watched on the device each step: the loss; the gradients too where they overflow with a finite loss (weights
cast to ``fp16`` or ``bf16``; under ``amp`` the GradScaler's own check does it, and a non-finite loss is added to its
findings). ``check(weights=...)`` before a save also verifies the weights, so a non-finite gradient that came with a
finite loss in fp32 never reaches a checkpoint either. An optimizer without a ``found_inf`` input (``optim.fused:
false``) cannot skip on the device: there ``step`` checks on the host before every update, one sync per step, as
before.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

from cadenza.engine import dist
from cadenza.engine.errors import TrainingError


class NonFiniteError(TrainingError):
    """A loss (or gradient, or weight) was not finite; no update after it reached the weights.

    Attributes:
        step: the 1-based optimizer step whose loss or gradients were first not finite (0: found in the weights).
        loss: that step's loss (a float; ``nan`` or ``inf`` when the loss itself was the problem).
        what: ``"loss"``, ``"gradients"`` or ``"weights"``.
    """

    def __init__(self, step: int, loss: float, what: str) -> None:
        self.step, self.loss, self.what = step, loss, what
        found = {
            "loss": f"the loss is {loss} at step {step}",
            "gradients": f"the gradients are not finite at step {step} (its loss was {loss})",
            "weights": "the weights are not finite (a non-finite gradient came with a finite loss)",
        }[what]
        super().__init__(found)


class NonFiniteGuard:
    """Watches losses and gradients on the device and skips updates once one is not finite.

    Args:
        device: where the flags live (the model's device).
        check_gradients: also watch the gradients every step (fp16 / bf16 weights, where they overflow).
    """

    def __init__(self, device: torch.device, check_gradients: bool = False) -> None:
        self.check_gradients = check_gradients
        self._first = torch.zeros((), dtype=torch.int64, device=device)  # 0, or the first bad step (1-based)
        self._loss = torch.zeros((), dtype=torch.float32, device=device)  # that step's loss
        self._gradients = torch.zeros((), dtype=torch.bool, device=device)  # found in the gradients, not the loss

    def watch_loss(self, loss: torch.Tensor, step: int) -> None:
        """Record ``loss`` of optimizer step ``step`` (1-based) if it is the first non-finite one. No sync."""
        loss = loss.detach().float()
        first = (self._first == 0) & ~torch.isfinite(loss)
        self._first = torch.where(first, step, self._first)
        self._loss = torch.where(first, loss, self._loss)

    def watch_gradients(self, gradients: Iterable[torch.Tensor], step: int, loss: torch.Tensor) -> None:
        """Record step ``step`` if any gradient holds a NaN or an infinity (one pass over them). No sync."""
        local = [g.to_local() if isinstance(g, DTensor) else g for g in gradients]  # FSDP: this process's shards
        if not local:
            return
        norms = torch._foreach_norm(local)  # nan or inf where a gradient is (one multi-tensor kernel on CUDA)
        first = (self._first == 0) & ~torch.isfinite(torch.stack(norms).float().sum())
        self._first = torch.where(first, step, self._first)
        self._loss = torch.where(first, loss.detach().float(), self._loss)
        self._gradients = self._gradients | first

    @property
    def found(self) -> torch.Tensor:
        """1.0 once anything was not finite, else 0.0: the ``found_inf`` an optimizer or GradScaler skips on (fused
        AdamW skips on exactly 1.0)."""
        return (self._first > 0).float()

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        loss: torch.Tensor,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        """``optimizer.step()`` (through ``scaler`` under ``amp``, after its ``unscale_``), skipped on the device once
        a loss or gradient was not finite."""
        if scaler is not None and scaler.is_enabled():
            # amp: the scaler found the overflowing gradients in unscale_ and skips (and lowers its scale) for them, as
            # always; a non-finite loss joins its findings. (Its per-optimizer record is private; GradScaler.step
            # itself reads it there, without a sync for fused optimizers.)
            found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
            for value in found.values():  # 0 or 1: fused kernels skip on exactly 1 (and subtract it from their step)
                torch.maximum(value, self.found.to(value.device, non_blocking=True), out=value)
            scaler.step(optimizer)
            scaler.update()
            return
        if self.check_gradients:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.watch_gradients(grads, step, loss)
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            self.check()  # this optimizer has no found_inf input: one sync per step (optim.fused=false)
            optimizer.step()
            return
        optimizer.found_inf = self.found  # fused AdamW: weights, moments and step counts stay as they were when 1
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf

    def check(self, weights: Iterable[torch.Tensor] = ()) -> None:
        """Raise ``NonFiniteError`` if anything was not finite on any process (one sync; every process must call it at
        the same point when there are several). With ``weights``, also verify those are finite."""
        first = torch.where(self._first > 0, self._first, torch.iinfo(torch.int64).max)
        bad_weights = torch.zeros((), dtype=torch.int64, device=first.device)
        local = [w.to_local() if isinstance(w, DTensor) else w for w in weights]
        if local:
            bad_weights = (~torch.isfinite(torch.stack(torch._foreach_norm(local)).float().sum())).long()
        flags = torch.stack([first, -bad_weights])  # the earliest bad step over processes; any bad weights
        if dist.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        first_step, weights_bad = (int(v) for v in flags.tolist())
        if first_step != torch.iinfo(torch.int64).max:
            mine = int(self._first.item()) == first_step
            loss = float(self._loss.item()) if mine else float("nan")
            raise NonFiniteError(first_step, loss, "gradients" if mine and bool(self._gradients.item()) else "loss")
        if weights_bad:
            raise NonFiniteError(0, float("nan"), "weights")


__all__ = ["NonFiniteError", "NonFiniteGuard"]
