"""Image towers: a timm trunk followed by OpenCLIP's projection (or pooling) into the joint space.

Two shapes cover OpenCLIP's architectures:

- ``proj: linear`` — the trunk is built without a classifier (``num_classes=0``): a ViT's class token after its
  final norm, or a ConvNeXt's pooled and normed features, ``(B, width)``; a bias-free ``nn.Linear`` maps them to
  ``(B, embed_dim)``. OpenCLIP's ViT ``proj`` and its ``TimmModel`` ``head.proj`` are this layer.
- ``proj: none`` — the trunk's own head already outputs ``embed_dim`` (built with ``num_classes=embed_dim``), as
  the attention pool of timm's ``resnet*_clip`` models does (OpenCLIP's ``ModifiedResNet.attnpool``).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

PROJECTIONS = ("linear", "none")


class TimmImageTower(nn.Module):
    """A timm model pooled to ``(B, width)`` and projected to ``(B, embed_dim)``.

    Args:
        timm_model: a timm architecture name (``vit_base_patch16_clip_224``, ``resnet50_clip``, ``convnext_base``).
        embed_dim: size of the joint image–text space.
        image_size: input resolution (for transforms and synthetic data; a timm model that needs it is given it
            through ``timm_kwargs``, e.g. ``img_size: ${vision.image_size}`` in an architecture YAML).
        timm_kwargs: constructor arguments that size the timm model (``depth``, ``drop_path_rate``, ...).
        proj: ``linear`` (a projection after the trunk) or ``none`` (the trunk's head outputs ``embed_dim``).
        proj_bias: OpenCLIP's projections have none.
        pool: the trunk's global pooling (timm's ``global_pool``); ``None`` keeps the model's default.
    """

    def __init__(
        self,
        timm_model: str,
        embed_dim: int,
        image_size: int = 224,
        timm_kwargs: dict[str, Any] | None = None,
        proj: str = "linear",
        proj_bias: bool = False,
        pool: str | None = None,
    ) -> None:
        super().__init__()
        if proj not in PROJECTIONS:
            raise ValueError(f"proj must be one of {PROJECTIONS}, got {proj!r}")
        self.image_size = image_size
        self.timm_model = timm_model
        self.timm_kwargs = dict(timm_kwargs or {})
        self.pool = pool
        extra = {} if pool is None else {"global_pool": pool}
        num_classes = embed_dim if proj == "none" else 0
        self.trunk = timm.create_model(
            timm_model, pretrained=False, num_classes=num_classes, **extra, **self.timm_kwargs
        )
        if proj == "linear":
            width = self.trunk.num_features
            self.proj = nn.Linear(width, embed_dim, bias=proj_bias)
            nn.init.normal_(self.proj.weight, std=width**-0.5)
        else:
            self.proj = nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.trunk, "no_weight_decay", lambda: set())()
        return {f"trunk.{name}" for name in names}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(images))  # (B, 3, H, W) -> (B, width) -> (B, E)
