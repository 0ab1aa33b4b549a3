"""Training techniques toggled in YAML under ``algorithms:``. One module per algorithm; importing
this package registers them all."""

import cadenza.engine.deferred_imports  # noqa: F401 - first: timm, imported below, would import wandb (0.5-0.7 s)

# isort: split

from cadenza.algorithms.clipa import CLIPA
from cadenza.algorithms.distillation import Distillation
from cadenza.algorithms.ema import EMA
from cadenza.algorithms.grad_checkpointing import GradCheckpointing
from cadenza.algorithms.gradient_clipping import GradientClipping
from cadenza.algorithms.lock_image import LockImage
from cadenza.algorithms.lock_text import LockText
from cadenza.algorithms.lora import LoRA
from cadenza.algorithms.patch_dropout import PatchDropout
from cadenza.algorithms.progressive_resizing import ProgressiveResizing
from cadenza.algorithms.text_token_reduction import TextTokenReduction
from cadenza.algorithms.torch_compile import TorchCompile

__all__ = [
    "CLIPA",
    "EMA",
    "Distillation",
    "GradCheckpointing",
    "GradientClipping",
    "LockImage",
    "LockText",
    "LoRA",
    "PatchDropout",
    "ProgressiveResizing",
    "TextTokenReduction",
    "TorchCompile",
]
