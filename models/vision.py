"""Image towers: a timm trunk followed by OpenCLIP's projection (or pooling) into the joint space.

Two shapes cover OpenCLIP's architectures:

- ``proj: linear`` — the trunk is built without a classifier (``num_classes=0``): a ViT's class token after its
  final norm, or a ConvNeXt's pooled and normed features, ``(B, width)``; a bias-free ``nn.Linear`` maps them to
  ``(B, embed_dim)``. OpenCLIP's ViT ``proj`` and its ``TimmModel`` ``head.proj`` are this layer.
- ``proj: none`` — the trunk's own head already outputs ``embed_dim`` (built with ``num_classes=embed_dim``), as
  the attention pool of timm's ``resnet*_clip`` models does (OpenCLIP's ``ModifiedResNet.attnpool``).

CoCa's image tower (``AttentionalPoolImageTower``) is a timm ViT whose every token, before any final norm, feeds
OpenCLIP's attentional pooler: learned queries cross-attend to them; the first query, projected, is the image
embedding and the others are the image tokens the multimodal decoder reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models import group_parameters
from torch import nn

PROJECTIONS = ("linear", "none")


def trunk_then_head(tower: nn.Module, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
    """A timm ``group_matcher`` (the callable form) for a tower of ``trunk`` + head: the trunk's own groups in order
    (timm's: stem, each block or stage, the final norm with the last block), then everything else (projection,
    pooler) as the last group. The grouping of ``lock_image`` and of layer-wise learning-rate decay."""
    layers = group_parameters(tower.trunk, tower.trunk.group_matcher(coarse=coarse), reverse=True)  # name -> index

    def ordinal(name: str) -> tuple[float, ...]:
        inner = name.removeprefix("trunk.")
        return (float(layers[inner]),) if name.startswith("trunk.") and inner in layers else (math.inf,)

    return ordinal


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

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """timm's grouping of the trunk, then the projection (see :func:`trunk_then_head`)."""
        return trunk_then_head(self, coarse)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(images))  # (B, 3, H, W) -> (B, width) -> (B, E)


class AttentionalPooler(nn.Module):
    """OpenCLIP's ``AttentionalPooler``: ``n_queries`` learned queries attend to ``(B, N, context_dim)`` tokens.

    Uses ``nn.MultiheadAttention`` itself, so that its parameter names are OpenCLIP's.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 256) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)  # (B, N, C)
        query = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, Q, D)
        return self.attn(query, x, x, need_weights=False)[0]  # (B, Q, D)


class AttentionalPoolImageTower(nn.Module):
    """CoCa's image tower: a timm ViT, OpenCLIP's attentional pooler, a norm, and a projection of the first query.

    ``forward`` returns ``(embedding (B, embed_dim), image tokens (B, attn_pooler_queries - 1, embed_dim))``. This is
    OpenCLIP 3.3.0's ``VisionTransformer(attentional_pool=True, output_tokens=True)`` (its original CoCa setup).

    Args:
        timm_model: a timm ViT name (``vit_base_patch32_clip_224``); built without final norm, pooling or head.
        embed_dim: size of the joint image–text space (and of the image tokens).
        image_size: input resolution.
        timm_kwargs: constructor arguments that size the timm model.
        attn_pooler_queries: learned queries (OpenCLIP: 256); all but the first become image tokens.
        attn_pooler_heads: attention heads of the pooler.
    """

    def __init__(
        self,
        timm_model: str,
        embed_dim: int,
        image_size: int = 224,
        timm_kwargs: dict[str, Any] | None = None,
        attn_pooler_queries: int = 256,
        attn_pooler_heads: int = 8,
    ) -> None:
        super().__init__()
        if attn_pooler_queries < 2:
            raise ValueError(
                f"attn_pooler_queries must be at least 2 (one embedding, image tokens), got {attn_pooler_queries}"
            )
        self.image_size = image_size
        self.timm_model = timm_model
        self.timm_kwargs = dict(timm_kwargs or {})
        self.trunk = timm.create_model(
            timm_model, pretrained=False, num_classes=0, global_pool="", final_norm=False, **self.timm_kwargs
        )
        width = self.trunk.num_features
        self.attn_pool = AttentionalPooler(embed_dim, width, attn_pooler_heads, attn_pooler_queries)
        self.ln_post = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)  # OpenCLIP's scale: the trunk's width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.trunk, "no_weight_decay", lambda: set())()
        return {f"trunk.{name}" for name in names}

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """timm's grouping of the trunk, then the pooler, its norm and the projection (see :func:`trunk_then_head`)."""
        return trunk_then_head(self, coarse)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.trunk.forward_features(images)  # (B, 3, H, W) -> (B, 1 + N, width), no final norm
        x = self.ln_post(self.attn_pool(x))  # (B, Q, E)
        return self.proj(x[:, 0]), x[:, 1:]  # (B, E), (B, Q - 1, E)
