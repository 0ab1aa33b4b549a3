"""Resuming from an open_clip_train checkpoint (``epoch_K.pt``): weights, optimizer state and epoch.

OpenCLIP's trainer saves ``{"epoch", "name", "state_dict", "optimizer", "scaler"}`` at the end of an epoch, and
its ``--resume`` continues from there. ``checkpoint.resume`` (``--resume``) accepts such a file too, and continues
the way OpenCLIP's own resume would:

- the weights, renamed into Cadenza's (``models/convert.py``, as ``model.pretrained`` does);
- AdamW's state (step count and moments), renamed and reshaped the same way, each OpenCLIP parameter found by
  OpenCLIP's numbering: two groups, the parameters without weight decay and then the others, each in the order of
  OpenCLIP's ``named_parameters`` (the order of its ``state_dict``), trainable ones only. The learning rate, betas,
  eps and weight decay are this run's;
- the AMP scaler's state, when both runs use one;
- the epoch: the run continues at the start of epoch ``K`` (step ``K x`` steps per epoch), where the learning-rate
  schedule, which OpenCLIP computes from the step, continues; the data order restarts at that epoch, as OpenCLIP's
  does. OpenCLIP saves no random-number states, so none are restored.

A checkpoint that does not fit the run (another architecture, another set of trainable parameters) is a
``ConfigError`` naming the problem; an OpenCLIP weights file without optimizer state goes in ``model.pretrained``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cadenza.engine.errors import ConfigError
from cadenza.engine.fsdp import load_model_state_dict, load_optimizer_state_dict
from cadenza.engine.optim import excluded_from_weight_decay
from cadenza.engine.state import State
from cadenza.models.convert import cadenza_to_openclip, is_openclip_state_dict, openclip_to_cadenza

log = logging.getLogger("cadenza")

KEY = "checkpoint.resume"


def is_openclip_checkpoint(checkpoint: Any) -> bool:
    """True for a training checkpoint open_clip_train wrote (an epoch and OpenCLIP's parameter names, no Cadenza
    timestamp)."""
    if not isinstance(checkpoint, dict) or "timestamp" in checkpoint or "epoch" not in checkpoint:
        return False
    weights = checkpoint.get("state_dict")
    return isinstance(weights, dict) and is_openclip_state_dict(_unwrapped(weights))


def resume_openclip(state: State, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Load OpenCLIP's ``checkpoint`` (from ``path``) into ``state``: weights, optimizer, scaler and the epoch."""
    model, epoch = state.model, int(checkpoint["epoch"])
    weights = _unwrapped(checkpoint["state_dict"])
    try:
        converted = openclip_to_cadenza(weights, model)
    except (ValueError, KeyError, RuntimeError) as error:
        raise _mismatch(path, state, str(error)) from error
    own = model.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    reshaped = sorted(k for k in own if k in converted and converted[k].shape != own[k].shape)
    if missing or unexpected or reshaped:
        found = f"{len(missing)} missing, {len(unexpected)} unexpected and {len(reshaped)} reshaped tensors"
        raise _mismatch(path, state, f"{found}, e.g. {(missing + unexpected + reshaped)[:3]}")
    load_model_state_dict(model, converted)
    if state.optimizer is not None:
        saved = checkpoint.get("optimizer")
        if not saved:
            raise ConfigError(KEY, f"'{path}' holds no optimizer state: start from its weights with model.pretrained")
        load_optimizer_state_dict(model, state.optimizer, optimizer_state(saved, weights, model, state.optimizer, path))
    if state.scaler is not None and checkpoint.get("scaler"):
        state.scaler.load_state_dict(checkpoint["scaler"])
    _continue_at_epoch(state, epoch)
    log.info("resumed from OpenCLIP's %s at epoch %d (step %d)", path, epoch, state.timestamp.batch)


def optimizer_state(
    saved: dict[str, Any], weights: dict[str, torch.Tensor], model: nn.Module, optimizer: torch.optim.Optimizer, path
) -> dict[str, Any]:
    """OpenCLIP's AdamW state dict as ``optimizer``'s (position-keyed, this run's hyperparameters).

    Args:
        saved: OpenCLIP's ``optimizer.state_dict()``.
        weights: OpenCLIP's model state dict, in its order (parameters and buffers).
        model: the Cadenza model (its trainable parameters are the optimizer's).
        optimizer: the run's AdamW, built from ``param_groups`` (``engine/optim.py``).
        path: the checkpoint, for messages.
    """
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    openclip_name = {
        name: next(iter(cadenza_to_openclip({name: param.detach()}, model))) for name, param in trainable.items()
    }
    ours = {theirs: name for name, theirs in openclip_name.items()}
    order = [name for name in weights if name in ours]  # OpenCLIP's named_parameters order, trainable only
    exempt = [name for name in order if excluded_from_weight_decay(name, weights[name])]
    numbered = exempt + [name for name in order if name not in exempt]  # OpenCLIP's two groups, numbered in turn
    sizes = [len(group["params"]) for group in saved.get("param_groups", [])]
    if sizes != [len(exempt), len(order) - len(exempt)]:
        raise ConfigError(
            KEY,
            f"'{path}': OpenCLIP's optimizer has groups of {sizes} parameters, this run trains {len(exempt)} without "
            f"and {len(order) - len(exempt)} with weight decay. Resume with the same locked towers "
            "(--lock-image, --lock-text) it was trained with, or start from its weights with model.pretrained.",
        )
    index = dict(zip(numbered, [p for group in saved["param_groups"] for p in group["params"]], strict=True))
    moments: dict[str, dict[str, torch.Tensor]] = {}
    steps: dict[str, torch.Tensor] = {}
    for name in order:
        entry = saved["state"].get(index[name])
        if entry is None:
            continue  # never stepped (no gradient yet): AdamW starts it fresh, as OpenCLIP's would
        steps[name] = entry["step"]
        for moment in ("exp_avg", "exp_avg_sq"):
            moments.setdefault(moment, {})[name] = entry[moment]
    renamed = {moment: openclip_to_cadenza(values, model) for moment, values in moments.items()}
    current = optimizer.state_dict()
    position_of = {id(param): position for position, param in _numbered_params(optimizer)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, param in trainable.items():
        theirs = openclip_name[name]
        if theirs not in steps:
            continue
        state[position_of[id(param)]] = {
            "step": steps[theirs].clone(),
            **{moment: renamed[moment][name].reshape(param.shape).clone() for moment in renamed},
        }
    return {"state": state, "param_groups": current["param_groups"]}


def _numbered_params(optimizer: torch.optim.Optimizer) -> list[tuple[int, nn.Parameter]]:
    """``(position, parameter)`` in the numbering of ``optimizer.state_dict()``."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return list(enumerate(params))


def _continue_at_epoch(state: State, epoch: int) -> None:
    """The timestamp, schedule and data at the start of ``epoch``."""
    ts = state.timestamp
    ts.epoch, ts.batch, ts.sample = (
        epoch,
        epoch * state.batches_per_epoch,
        epoch * state.batches_per_epoch * state.samples_per_batch,
    )
    ts.batch_in_epoch, ts.sample_in_epoch = 0, 0
    scheduler = state.scheduler
    if scheduler is not None:  # a LambdaLR: its factor at the step, without stepping it (no optimizer step yet)
        scheduler.last_epoch = ts.batch
        scheduler._last_lr = [
            base * factor(ts.batch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, lr in zip(state.optimizer.param_groups, scheduler._last_lr, strict=True):
            group["lr"] = lr
    if state.train_loader is not None:
        state.train_loader.set_epoch(epoch)


def _unwrapped(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix("module.").removeprefix("_orig_mod."): value for key, value in weights.items()}


def _mismatch(path: str | Path, state: State, problem: str) -> ConfigError:
    name = state.config.model.name if state.config is not None else "this model"
    return ConfigError(
        KEY,
        f"'{path}' is an OpenCLIP checkpoint that does not fit model.name={name} ({problem}). Resume it with the "
        "architecture it was trained as (--model), or start from its weights with model.pretrained (--pretrained).",
    )


__all__ = ["is_openclip_checkpoint", "optimizer_state", "resume_openclip"]
