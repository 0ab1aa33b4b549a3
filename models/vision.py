"""Image towers: a timm trunk followed by OpenCLIP's projection into the joint space."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn


class TimmImageTower(nn.Module):
    """A timm model without its classifier, pooled to ``(B, width)``, projected to ``(B, embed_dim)``.

    Args:
        timm_model: a timm architecture name (``vit_base_patch16_clip_224``, ``resnet50_clip``, ...).
        embed_dim: size of the joint image–text space.
        image_size: input resolution (for transforms and synthetic data).
        timm_kwargs: constructor arguments that size the timm model.
        proj_bias: OpenCLIP's ViT projection has none.
    """

    def __init__(
        self,
        timm_model: str,
        embed_dim: int,
        image_size: int = 224,
        timm_kwargs: dict[str, Any] | None = None,
        proj_bias: bool = False,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.trunk = timm.create_model(timm_model, pretrained=False, num_classes=0, **(timm_kwargs or {}))
        width = self.trunk.num_features
        self.proj = nn.Linear(width, embed_dim, bias=proj_bias)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.trunk, "no_weight_decay", lambda: set())()
        return {f"trunk.{name}" for name in names}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(images))  # (B, 3, H, W) -> (B, width) -> (B, E)
