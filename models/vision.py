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

A trunk's patch embedding (a ViT's, a ConvNeXt's stem: a convolution whose windows do not overlap) runs as one
matrix multiply over the image's patches (``PatchifyConv2d``): the same function and parameters, and on a CPU its
backward pass is a GEMM instead of oneDNN's convolution backward (ViT-B-32, batch 32, amp_bf16: 119 ms instead of
1.42 s of CPU per step on a Sapphire Rapids core pair).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import Format, use_fused_attn
from timm.models import group_parameters
from torch import nn

from cadenza.models.text import prefers_matmul_attention

PROJECTIONS = ("linear", "none")
#: how a ViT trunk's weights start: timm's (truncated normal, std 0.02) or OpenCLIP's VisionTransformer's
INITS = ("timm", "openclip")


def init_like_openclip(trunk: nn.Module, proj: nn.Module) -> None:
    """Initialise a timm ViT trunk and its projection as OpenCLIP 3.3.0's ``VisionTransformer`` starts: PyTorch's
    default initialisation of every layer (its ``init_parameters`` leaves them so), attention's input projection
    Xavier-uniform with zero biases (``nn.MultiheadAttention``'s), and the class token, position embeddings and
    projection normal with std ``width ** -0.5``. Random draws come from torch's global generator.

    At small widths this matters: timm's std 0.02 leaves a 64-wide tower near zero for its first epochs.
    """
    for module in trunk.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            module.reset_parameters()  # PyTorch's defaults (OpenCLIP's conv1, MLPs, norms)
    for block in getattr(trunk, "blocks", ()):
        nn.init.xavier_uniform_(block.attn.qkv.weight)  # nn.MultiheadAttention's in_proj_weight
        if block.attn.qkv.bias is not None:
            nn.init.zeros_(block.attn.qkv.bias)
        nn.init.zeros_(block.attn.proj.bias)
    width = trunk.num_features
    for name in ("cls_token", "pos_embed"):
        if getattr(trunk, name, None) is not None:
            nn.init.normal_(getattr(trunk, name), std=width**-0.5)
    if isinstance(proj, nn.Linear):
        nn.init.normal_(proj.weight, std=width**-0.5)


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
        init: ``openclip`` (OpenCLIP's ``VisionTransformer``'s, see :func:`init_like_openclip`; ViT trunks only) or
            ``timm`` (the trunk's own initialisation); default: ``openclip`` for a ViT trunk, as OpenCLIP's ViT
            architectures start, and ``timm`` for the others (ResNet, ConvNeXt).
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
        init: str | None = None,
    ) -> None:
        super().__init__()
        if proj not in PROJECTIONS:
            raise ValueError(f"proj must be one of {PROJECTIONS}, got {proj!r}")
        if init is not None and init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.image_size = image_size
        self.timm_model = timm_model
        self.timm_kwargs = dict(timm_kwargs or {})
        self.pool = pool
        extra = {} if pool is None else {"global_pool": pool}
        num_classes = embed_dim if proj == "none" else 0
        self.trunk = timm.create_model(
            timm_model, pretrained=False, num_classes=num_classes, **extra, **self.timm_kwargs
        )
        patchify_first_convolution(self.trunk)
        choose_attention(self.trunk)
        if proj == "linear":
            width = self.trunk.num_features
            self.proj = nn.Linear(width, embed_dim, bias=proj_bias)
            nn.init.normal_(self.proj.weight, std=width**-0.5)
        else:
            self.proj = nn.Identity()
        is_vit = hasattr(self.trunk, "blocks") and hasattr(self.trunk, "pos_embed")
        if init == "openclip" or (init is None and is_vit):
            if not is_vit:
                raise ValueError(f"init 'openclip' is OpenCLIP's ViT initialisation; {timm_model} is not a ViT")
            init_like_openclip(self.trunk, self.proj)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def _apply(self, fn, recurse: bool = True):  # .to(device) and friends: attention follows the device
        module = super()._apply(fn, recurse)
        choose_attention(self.trunk)
        return module

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.trunk, "no_weight_decay", lambda: set())()
        return {f"trunk.{name}" for name in names}

    @property
    def patch_size(self) -> int | None:
        """A ViT trunk's patch side in pixels; ``None`` for towers without patches (ResNet, ConvNeXt)."""
        patch_embed = getattr(self.trunk, "patch_embed", None)
        return int(patch_embed.patch_size[0]) if hasattr(patch_embed, "patch_size") else None

    def accept_any_image_size(self) -> None:
        """Let a ViT trunk take square images of any multiple of its patch size (low-resolution training).

        Position embeddings are resampled (bicubic, timm's ``dynamic_img_size``) to the input's patch grid in every
        forward; at ``image_size`` they are used as they are, so the tower's function there is unchanged, and its
        parameters (names and shapes) stay the same: checkpoints and exports are unaffected.

        Raises:
            ValueError: the trunk is not a ViT.
        """
        if self.patch_size is None or not hasattr(self.trunk, "dynamic_img_size"):
            raise ValueError(f"{self.timm_model} has no patch grid to resample; other image sizes need a ViT tower")
        self.trunk.dynamic_img_size = True
        patch_embed = self.trunk.patch_embed
        patch_embed.strict_img_size = False  # any multiple of the patch
        patch_embed.flatten = False  # (B, H, W, C): the trunk flattens after adding the resampled embeddings
        patch_embed.output_fmt = Format.NHWC

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
        patchify_first_convolution(self.trunk)
        choose_attention(self.trunk)
        width = self.trunk.num_features
        self.attn_pool = AttentionalPooler(embed_dim, width, attn_pooler_heads, attn_pooler_queries)
        self.ln_post = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)  # OpenCLIP's scale: the trunk's width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def _apply(self, fn, recurse: bool = True):  # .to(device) and friends: attention follows the device
        module = super()._apply(fn, recurse)
        choose_attention(self.trunk)
        return module

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


class PatchifyConv2d(nn.Conv2d):
    """A convolution whose kernel equals its stride (no padding, dilation or groups), computed as a matrix multiply
    over the image's patches: ``(B, C, H, W)`` → ``(B * N, C * p * q)`` patches → ``F.linear`` with the kernel as a
    ``(D, C * p * q)`` matrix → ``(B, D, H / p, W / q)``, returned in channels-last memory order (a view: a ViT's
    ``flatten(2).transpose(1, 2)`` then costs no copy). The same parameters (names, shapes) as ``nn.Conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        p, q = self.kernel_size
        if height % p or width % q:  # a size the convolution would crop: leave it to the convolution
            return super().forward(x)
        rows, cols = height // p, width // q
        patches = x.reshape(batch, channels, rows, p, cols, q).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/q, C, p, q)
        out = F.linear(patches.reshape(batch * rows * cols, -1), self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(batch, rows, cols, self.out_channels).permute(0, 3, 1, 2)  # (B, D, H/p, W/q)


def patchify_first_convolution(trunk: nn.Module) -> None:
    """Make ``trunk``'s first convolution a ``PatchifyConv2d`` when its windows do not overlap (a ViT's patch
    embedding, a ConvNeXt's stem); other trunks (a ResNet's 7x7 stem) are left as they are. The module changes class
    in place, so no random number is drawn: a seed initialises the model as it did before."""
    for parent in trunk.modules():
        for conv in parent.children():
            if not isinstance(conv, nn.Conv2d):
                continue
            if (
                type(conv) is nn.Conv2d
                and conv.kernel_size == conv.stride
                and conv.padding == (0, 0)
                and conv.dilation == (1, 1)
                and conv.groups == 1
                and conv.padding_mode == "zeros"
            ):
                conv.__class__ = PatchifyConv2d  # the same module and parameters; no new one (whose init would draw)
            return  # only the first convolution


def choose_attention(trunk: nn.Module) -> None:
    """timm's attention layers (``fused_attn``) run fused SDPA, or on a CPU for at most
    ``MATMUL_ATTENTION_MAX_TOKENS`` tokens timm's own matrix-multiply path (see ``models.text.matmul_attention``)."""
    embed = getattr(trunk, "patch_embed", None)
    if embed is None or not hasattr(embed, "num_patches"):
        return
    tokens = embed.num_patches + getattr(trunk, "num_prefix_tokens", 0)
    device = next(trunk.parameters()).device
    matmul = prefers_matmul_attention(device, tokens)
    for module in trunk.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False if matmul else use_fused_attn()  # timm's own default otherwise
