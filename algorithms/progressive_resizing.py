"""Progressive image resizing: train on smaller images first, reaching full size before the end (Composer's
``progressive_resizing``; Touvron et al., "Fixing the train-test resolution discrepancy", 2019, and fast.ai's
progressive resizing).

**What.** Every training batch's images are resized (or randomly cropped, ``mode: crop``) to
``scale(t) x image_size`` pixels, where ``t`` is the fraction of the run done: ``initial_scale`` until
``delay_fraction``, then a linear ramp that reaches 1 when ``finetune_fraction`` of the run is left, full size from
there on. Sizes are rounded down to a multiple of ``size_increment`` (default: the ViT's patch size, so each size
is a whole patch grid). A ViT tower's position embeddings are resampled to each grid
(:meth:`TimmImageTower.accept_any_image_size`); its parameters do not change, so checkpoints, resume and export
are as without it. Runs on ``INIT`` (the tower) and ``AFTER_DATALOADER`` (the batch); the size is logged as
``train/image_size``.

**Evaluation is honest:** only training batches are resized; evaluation and zero-shot see full-size images.
The size is a function of the step, and crops draw from torch's global generator (saved in every checkpoint), so
a resumed run resizes exactly as the uninterrupted one.

**When it helps.** The image tower's cost falls with the square of the scale (a ViT at half size runs a quarter
of the patches), so the first part of the run is cheaper; the full-size phase at the end adapts the model to the
resolution it is evaluated at. **When it hurts:** where fine detail matters and the low-resolution phase is long,
or where the image tower is a small part of the step (the text tower or the optimizer dominates).

**Measured** (time to accuracy, `python benchmarks/time_to_accuracy.py --algorithms --seeds 0 1 2 --budget 30`;
digits, `tiny-vit`, seeds 0, 1, 2, 2 idle CPU cores (Sapphire Rapids), 2026-12-06 21:39-21:50 UTC): switched on in the
fastest recipe (`yamls/digits_fast.yaml`: Muon at lr 1.2e-2 with momentum 0.5 and no warmup, an average of the weights
with a half-life of 10 steps, the text embeddings frozen, captions cut to 8 tokens), 90% zero-shot top-1 in no seed
(median; per seed never, never, never), after epochs never, never, never (the recipe: 1, 1, 1), against 7.5 s without
(—), best top-1 within 30 s 0.8273 against 0.9749 (-14.8 pt). README's method-card table has every algorithm side by
side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cadenza.engine.algorithm import Algorithm
from cadenza.engine.errors import ConfigError
from cadenza.engine.event import Event
from cadenza.engine.logger import Logger
from cadenza.engine.registry import ALGORITHMS
from cadenza.engine.state import State

MODES = ("resize", "crop")


def resize_scale(fraction: float, initial_scale: float, delay_fraction: float, finetune_fraction: float) -> float:
    """The image scale at ``fraction`` of the run: ``initial_scale``, a linear ramp, then 1.

    >>> [resize_scale(t, 0.5, 0.5, 0.2) for t in (0.0, 0.5, 0.65, 0.8, 0.9)]
    [0.5, 0.5, 0.75, 1.0, 1.0]
    """
    ramp_end = 1.0 - finetune_fraction
    if fraction < delay_fraction:
        return initial_scale
    if fraction >= ramp_end:
        return 1.0
    progress = (fraction - delay_fraction) / (ramp_end - delay_fraction)
    return initial_scale + (1.0 - initial_scale) * progress


def scaled_size(size: int, scale: float, increment: int) -> int:
    """``size * scale`` rounded down to a multiple of ``increment``, at least ``increment`` and at most ``size``.

    >>> scaled_size(32, 0.5, 8), scaled_size(32, 0.6, 8), scaled_size(32, 0.1, 8), scaled_size(224, 0.5, 16)
    (16, 16, 8, 112)
    """
    return min(size, max(increment, math.floor(size * scale / increment + 1e-9) * increment))


def resize_images(images: torch.Tensor, size: int, mode: str = "resize") -> torch.Tensor:
    """``(B, C, H, W)`` images at ``size x size``: resized (bilinear, antialiased) or randomly cropped (one crop
    position per batch, drawn from torch's global generator). Unchanged when they already have that size."""
    if images.shape[-2:] == (size, size):
        return images
    if mode == "resize":
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    top = int(torch.randint(0, images.shape[-2] - size + 1, ()))
    left = int(torch.randint(0, images.shape[-1] - size + 1, ()))
    return images[..., top : top + size, left : left + size]


def allow_image_sizes(model: nn.Module, key: str) -> int:
    """Make ``model.visual`` accept smaller images; its patch size (the size increment it needs).

    Raises:
        ConfigError: the image tower is not a ViT (naming ``key``).
    """
    tower = getattr(model, "visual", None)
    try:
        tower.accept_any_image_size()
    except (AttributeError, ValueError) as error:
        raise ConfigError(key, f"the image tower cannot take other image sizes ({error}); use a ViT model.") from None
    return tower.patch_size


@ALGORITHMS.register("progressive_resizing")
class ProgressiveResizing(Algorithm):
    """Train on smaller images first, full size by the end.

    Args:
        initial_scale: image side at the start, as a fraction of the model's, in (0, 1].
        delay_fraction: fraction of the run at ``initial_scale`` before the ramp starts.
        finetune_fraction: fraction at the end trained at full size.
        size_increment: sizes are multiples of this (pixels); default the ViT's patch size.
        mode: ``resize`` (the whole image, smaller) or ``crop`` (a random part at full detail).
    """

    def __init__(
        self,
        initial_scale: float = 0.5,
        delay_fraction: float = 0.5,
        finetune_fraction: float = 0.2,
        size_increment: int | None = None,
        mode: str = "resize",
    ) -> None:
        if not 0 < initial_scale <= 1:
            raise ValueError(f"initial_scale must lie in (0, 1], got {initial_scale}")
        if not (0 <= delay_fraction and 0 <= finetune_fraction and delay_fraction + finetune_fraction <= 1):
            raise ValueError("delay_fraction and finetune_fraction must be at least 0 and add up to at most 1")
        if size_increment is not None and size_increment < 1:
            raise ValueError(f"size_increment must be a positive number of pixels, got {size_increment}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.initial_scale = initial_scale
        self.delay_fraction = delay_fraction
        self.finetune_fraction = finetune_fraction
        self.size_increment = size_increment
        self.mode = mode
        self._increment = size_increment or 1

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.AFTER_DATALOADER)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            patch = allow_image_sizes(state.model, "algorithms.progressive_resizing")
            self._increment = self.size_increment or patch
            if self._increment % patch:
                raise ConfigError(
                    "algorithms.progressive_resizing.size_increment",
                    f"{self._increment} px is not a multiple of the ViT's {patch} px patches.",
                )
            return
        fraction = state.timestamp.batch / max(state.max_batches, 1)
        scale = resize_scale(fraction, self.initial_scale, self.delay_fraction, self.finetune_fraction)
        size = scaled_size(state.model.image_size, scale, self._increment)
        state.batch = [(resize_images(images, size, self.mode), tokens) for images, tokens in state.batch]
        state.step_metrics["image_size"] = torch.tensor(float(size))  # logged as train/image_size
