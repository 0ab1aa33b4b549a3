"""Precision: autocast contexts and weight dtypes for ``run.precision``."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def autocast_context(precision: str, device: torch.device) -> AbstractContextManager:
    """Mixed precision: ``amp`` is fp16 autocast (with a GradScaler), ``amp_bf16`` bf16 autocast."""
    if precision == "amp":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "amp_bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def weights_dtype(precision: str) -> torch.dtype:
    """``bf16`` / ``fp16`` cast the weights themselves; every other precision keeps fp32 weights."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
