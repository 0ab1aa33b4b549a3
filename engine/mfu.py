"""Model FLOPs utilization: counted FLOPs per sample × samples/s ÷ the device's peak FLOP/s.

FLOPs are counted with torch's ``FlopCounterMode`` on a forward and backward pass run on the meta
device (no real compute, no change to the model, its gradients or any random state). The peak is
``run.peak_tflops`` when set, else measured once per process with a large matmul in the run's
precision (so the ratio is against what this machine really reaches, not a datasheet).
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from cadenza.engine.precision import autocast_context, weights_dtype


def flops_per_sample(model: nn.Module, precision: str = "fp32", batch: int = 2) -> float:
    """Forward + backward FLOPs of one training sample (frozen parameters get no weight gradients)."""
    meta = {n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    meta.update({n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()})
    dtype = weights_dtype(precision)  # bf16 / fp16 runs feed their images in the weights' dtype
    images = torch.zeros(batch, 3, model.image_size, model.image_size, dtype=dtype, device="meta")
    tokens = torch.zeros(batch, model.context_length, dtype=torch.long, device="meta")
    # Model FLOPs, not hardware FLOPs: recomputation by activation checkpointing is not counted.
    checkpointed = [m for m in model.modules() if getattr(m, "grad_checkpointing", False) is True]
    for module in checkpointed:
        module.grad_checkpointing = False
    counter = FlopCounterMode(display=False)
    try:
        with counter, autocast_context(precision, torch.device("cpu")):
            # backward inside the call, so anything it recomputes also sees the meta parameters
            functional_call(_ForwardBackward(model), {f"model.{k}": v for k, v in meta.items()}, (images, tokens))
    finally:
        for module in checkpointed:
            module.grad_checkpointing = True
    return counter.get_total_flops() / batch


class _ForwardBackward(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        out = self.model(images, tokens)
        # every output with a gradient: the features, and CoCa's captioning logits (its decoder's backward)
        loss = sum(v.float().sum() for k, v in out.items() if k.endswith("features") or k == "logits")
        if loss.requires_grad:
            loss.backward()


def matmul_dtype(precision: str) -> torch.dtype:
    return {"amp": torch.float16, "fp16": torch.float16, "amp_bf16": torch.bfloat16, "bf16": torch.bfloat16}.get(
        precision, torch.float32
    )


@functools.cache
def measured_peak_flops(device_type: str, device_index: int | None, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul on this device and dtype (the best of a few runs)."""
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    size = 8192 if device_type == "cuda" else 2048
    generator = torch.Generator(device).manual_seed(0)  # its own stream: the run's RNG does not move
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    best = float("inf")
    for _ in range(4):
        if device_type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device_type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, precision: str, peak_tflops: float | None = None) -> float:
    """``peak_tflops`` (per device) when given, else the measured matmul peak."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    return measured_peak_flops(device.type, device.index, matmul_dtype(precision))
