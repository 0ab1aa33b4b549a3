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


def flops_per_sample(
    model: nn.Module, precision: str = "fp32", batch: int = 2, text_length: int | None = None
) -> float:
    """Forward + backward FLOPs of one training sample (frozen parameters get no weight gradients), with captions of
    ``text_length`` tokens (default: the model's context)."""
    dtype = weights_dtype(precision)  # bf16 / fp16 runs feed their images in the weights' dtype
    images = torch.zeros(batch, 3, model.image_size, model.image_size, dtype=dtype, device="meta")
    tokens = torch.zeros(batch, text_length or model.context_length, dtype=torch.long, device="meta")
    return _count(_ForwardBackward(model), "model.", model, precision, (images, tokens)) / batch


class FlopsByTextLength:
    """FLOPs per sample as a function of the caption length the text tower really ran (``model.trim_text_padding``
    cuts captions to the batch's longest): the whole model counted once at the full context, and the text tower's
    count, which is a quadratic in the length (projections grow with it, attention with its square), fitted exactly
    through three counted lengths. Counted before any wrapper (FSDP's hooks cannot run on meta tensors)."""

    def __init__(self, model: nn.Module, precision: str = "fp32") -> None:
        self.context_length = model.context_length
        self.full = flops_per_sample(model, precision)
        self._coefficients: tuple[float, float, float] | None = None
        if getattr(model, "trims_text_padding", False):
            lengths = (8, 16, self.context_length) if self.context_length > 16 else (1, 2, self.context_length)
            counts = [_text_flops(model.text, precision, length) for length in lengths]
            self._coefficients = _quadratic_through(lengths, counts)

    def __call__(self, text_length: int) -> float:
        if self._coefficients is None or text_length >= self.context_length:
            return self.full
        a, b, c = self._coefficients
        at = lambda length: a * length * length + b * length + c  # noqa: E731
        return self.full - at(self.context_length) + at(text_length)


def _text_flops(text: nn.Module, precision: str, length: int, batch: int = 2) -> float:
    tokens = torch.zeros(batch, length, dtype=torch.long, device="meta")
    return _count(_Backward(text), "module.", text, precision, (tokens,)) / batch


def _quadratic_through(xs: tuple[int, ...], ys: list[float]) -> tuple[float, float, float]:
    """``(a, b, c)`` with ``a x^2 + b x + c = y`` at the three points (Lagrange; counts are exact integers)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d0, d1, d2 = y0 / ((x0 - x1) * (x0 - x2)), y1 / ((x1 - x0) * (x1 - x2)), y2 / ((x2 - x0) * (x2 - x1))
    a = d0 + d1 + d2
    b = -(d0 * (x1 + x2) + d1 * (x0 + x2) + d2 * (x0 + x1))
    c = d0 * x1 * x2 + d1 * x0 * x2 + d2 * x0 * x1
    return a, b, c


def _count(wrapper: nn.Module, prefix: str, model: nn.Module, precision: str, inputs: tuple) -> float:
    """FLOPs of ``wrapper(*inputs)`` (which runs its own backward) with ``model``'s parameters on the meta device."""
    meta = {n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    meta.update({n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()})
    # Model FLOPs, not hardware FLOPs: recomputation by activation checkpointing is not counted.
    checkpointed = [m for m in model.modules() if getattr(m, "grad_checkpointing", False) is True]
    for module in checkpointed:
        module.grad_checkpointing = False
    counter = FlopCounterMode(display=False)
    try:
        with counter, autocast_context(precision, torch.device("cpu")):
            # backward inside the call, so anything it recomputes also sees the meta parameters
            functional_call(wrapper, {f"{prefix}{k}": v for k, v in meta.items()}, inputs)
    finally:
        for module in checkpointed:
            module.grad_checkpointing = True
    return counter.get_total_flops()


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


class _Backward(nn.Module):
    """One module's forward, and its backward when its output has a gradient."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: torch.Tensor) -> None:
        out = self.module(*inputs).float().sum()
        if out.requires_grad:
            out.backward()


def matmul_dtype(precision: str) -> torch.dtype:
    return {"amp": torch.float16, "fp16": torch.float16, "amp_bf16": torch.bfloat16, "bf16": torch.bfloat16}.get(
        precision, torch.float32
    )


@functools.cache
def measured_peak_flops(device_type: str, device_index: int | None, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul on this device and dtype (the best of a few runs).

    8192² on a GPU. On a CPU the first power of two from 256 whose matmul takes 10 ms or more, at most 2048²: a
    CPU's GEMM is at its peak by then (fp32 on one Sapphire Rapids core: 149 GFLOP/s at 1024², 147 at 2048²; bf16
    on AMX 1136 and 1035), and the measurement costs about 0.1 s of the run instead of 0.9 s at 2048² (a fifth of
    an epoch of the quickstart, counted in its time to accuracy). A dtype the CPU has no instructions for is
    emulated at a few hundred MFLOP/s (bf16 and fp16 on AVX2: 0.3 GFLOP/s), where 2048² took 4 minutes to
    measure; such a slow path stops at 256².
    """
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    generator = torch.Generator(device).manual_seed(0)  # its own stream: the run's RNG does not move

    def seconds(size: int, runs: int) -> float:
        a = torch.randn(size, size, device=device, generator=generator).to(dtype)
        b = torch.randn(size, size, device=device, generator=generator).to(dtype)
        best = float("inf")
        for _ in range(runs):
            if device_type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            a @ b
            if device_type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best

    size = 8192
    if device_type != "cuda":
        size = 256
        while size < 2048 and seconds(size, 1) < 0.01:
            size *= 2
    return 2 * size**3 / seconds(size, 4)


def peak_flops(device: torch.device, precision: str, peak_tflops: float | None = None) -> float:
    """``peak_tflops`` (per device) when given, else the measured matmul peak."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    return measured_peak_flops(device.type, device.index, matmul_dtype(precision))
