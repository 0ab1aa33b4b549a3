"""Training techniques toggled in YAML under ``algorithms:``. One module per algorithm; importing
this package registers them all."""

from cadenza.algorithms.gradient_clipping import GradientClipping, clip_gradients

__all__ = ["GradientClipping", "clip_gradients"]
