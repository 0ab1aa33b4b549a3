"""AdamW with OpenCLIP's weight-decay rule, and its learning-rate schedules as ``LambdaLR`` factors."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch import nn


def excluded_from_weight_decay(name: str, param: torch.Tensor) -> bool:
    """OpenCLIP 3.3.0's rule: no decay for gains, biases and the temperature.

    A parameter is exempt when it has fewer than 2 dims or its name contains ``bn``, ``ln``, ``bias`` or
    ``logit_scale``. Token and positional embeddings are decayed (as in 3.3.0). A ViT's class token is exempt: OpenCLIP
    holds it as a 1-dim ``class_embedding``, timm as a ``(1, 1, D)`` ``cls_token``.
    """
    return (
        param.ndim < 2
        or "bn" in name
        or "ln" in name
        or "bias" in name
        or "logit_scale" in name
        or name.endswith("cls_token")
    )


def renumbered_state(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``saved`` (an ``optimizer.state_dict()``) numbered as ``optimizer`` numbers ``model``'s parameters.

    Checkpoints written before the class token left the decayed group (timm's ``cls_token``, OpenCLIP's 1-dim
    ``class_embedding``) number the parameters by the earlier rule: their state is renumbered, so they resume; from
    there the class token is not decayed. A state numbered as ``optimizer`` already is returned as it is.
    """
    sizes = [len(group["params"]) for group in saved.get("param_groups", [])]
    if sizes == [len(group["params"]) for group in optimizer.param_groups]:
        return saved
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    before = [p for n, p in named if _exempt_before(n, p)], [p for n, p in named if not _exempt_before(n, p)]
    if sizes != [len(group) for group in before]:
        return saved  # not the earlier rule either: the optimizer's own check says what is wrong
    position = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    new = {old: position[id(p)] for old, p in enumerate(before[0] + before[1])}
    groups = [
        {**group, "params": [position[id(p)] for p in current["params"]]}
        for group, current in zip(saved["param_groups"], optimizer.param_groups, strict=True)
    ]
    return {"state": {new[k]: v for k, v in saved["state"].items()}, "param_groups": groups}


def _exempt_before(name: str, param: torch.Tensor) -> bool:
    """The weight-decay exemption before the class token was exempt (checkpoints written then)."""
    return excluded_from_weight_decay(name, param) and not name.endswith("cls_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed and exempt. Frozen parameters are left out, as OpenCLIP does."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = [p for n, p in named if excluded_from_weight_decay(n, p)]
    decayed = [p for n, p in named if not excluded_from_weight_decay(n, p)]
    return [{"params": exempt, "weight_decay": 0.0}, {"params": decayed, "weight_decay": weight_decay}]


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW from ``optim`` (lr, betas, eps, weight_decay, fused).

    ``fused`` (default: on CPU and CUDA) is torch's single-kernel AdamW: the same update in one pass over each
    parameter instead of a dozen ``foreach`` passes. On a 2-core EPYC a step took 37-50 ms instead of 135-260 ms
    for ViT-S-32's 63M parameters, and 3.5 instead of 11 ms for tiny-vit (a sixth of the quickstart's step).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = cfg.get("fused")
    if fused is None:
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def lr_factor(
    scheduler: str, warmup: int, total: int, cooldown: int = 0, cooldown_power: float = 1.0, end_factor: float = 0.0
) -> Callable[[int], float]:
    """The factor on the base LR at step ``s`` (0-based), as OpenCLIP's ``scheduler.py`` computes it.

    Warmup: ``(s + 1) / warmup``. ``cosine``: ``0.5 (1 + cos(pi e / es))`` with ``e = s - warmup``,
    ``es = total - warmup``. ``const``: 1. ``const-cooldown``: 1 until ``total - cooldown``, then
    ``(1 - e / es) ** power`` from 1 down to ``end_factor`` (``cooldown_end_lr / lr``).
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        if scheduler == "const":
            return 1.0
        start = total - cooldown
        if step < start:
            return 1.0
        decay = max(1 - (step - start) / max(cooldown, 1), 0.0) ** cooldown_power
        return decay * (1 - end_factor) + end_factor

    return factor


def build_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, warmup: int, total: int, cooldown: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """``optim.scheduler`` over ``total`` steps, ``warmup`` and ``cooldown`` already in steps."""
    end_factor = cfg.cooldown_end_lr / cfg.lr if cfg.lr else 0.0
    factor = lr_factor(cfg.scheduler, warmup, total, cooldown, cfg.cooldown_power, end_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
