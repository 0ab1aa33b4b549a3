"""Weight conversion between OpenCLIP 3.3.0 state dicts and Cadenza's, in both directions, and OpenCLIP configs.

A Cadenza CLIP is ``visual.trunk.*`` (a timm model), ``visual.proj.weight`` (when the trunk does not project
itself), ``text.*`` (parameter names equal to OpenCLIP's text tower) and ``logit_scale`` / ``logit_bias``.
OpenCLIP keeps its text tower at the top level (``token_embedding``, ``positional_embedding``, ``transformer.*``,
``ln_final``, ``text_projection``) and has three image towers, each mapped to one timm family:

============================================  ============================================================
OpenCLIP image tower                          Cadenza image tower
============================================  ============================================================
``VisionTransformer`` (``ViT-*``)             timm ``VisionTransformer`` (``vit_*_clip_224``) + ``proj``
``ModifiedResNet`` (``RN50``, ``RN101``)      timm ``ByobNet`` with an attention-pool head (``resnet*_clip``)
``TimmModel`` (``convnext_*``)                the same timm model; OpenCLIP's ``head.proj`` is our ``proj``
``VisionTransformer(attentional_pool=True)``  timm ``VisionTransformer`` without final norm + OpenCLIP's
(CoCa's, ``coca_ViT-*``)                      ``attn_pool``, ``ln_post`` and ``proj`` (``AttentionalPoolImageTower``)
============================================  ============================================================

OpenCLIP's CoCa keeps its towers under ``visual.``, ``text.`` and ``text_decoder.``; Cadenza's CoCa uses the same
names for ``text.*``, ``text_decoder.*`` and the pooler (``visual.attn_pool.*``, ``visual.ln_post.*``), so only its
ViT trunk and projection are renamed.

The OpenCLIP → timm direction reuses timm's own converters for OpenAI CLIP checkpoints
(``timm.models.vision_transformer._convert_openai_clip`` and ``timm.models.byobnet._convert_openai_clip``); the
way back is the inverse renaming below. ``tests/test_model_parity.py`` proves both directions give the same
embeddings as ``open_clip_torch`` for every architecture.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from timm.layers import AttentionPool2d, QuickGELU
from timm.models import ByobNet, VisionTransformer
from timm.models import byobnet as timm_byobnet
from timm.models import vision_transformer as timm_vit
from torch import nn

from cadenza.models.text import QuickGELU as TextQuickGELU
from cadenza.models.vision import AttentionalPoolImageTower, TimmImageTower

StateDict = dict[str, torch.Tensor]

#: Cadenza architectures that are OpenCLIP 3.3.0 built-ins of the same name and sizes (tests check it)
OPENCLIP_NAMES = frozenset(
    {"ViT-S-32", "ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50", "RN101", "convnext_base"}
    | {"ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu", "RN50-quickgelu", "RN101-quickgelu"}
    | {"coca_ViT-B-32"}
)

#: keys of OpenAI / old OpenCLIP checkpoints that hold no weights
_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_SHARED = ("logit_scale", "logit_bias")


def image_tower_kind(visual: nn.Module) -> str:
    """``vit`` (OpenCLIP's VisionTransformer), ``resnet`` (its ModifiedResNet), ``timm`` (its TimmModel) or
    ``vit_attn_pool`` (its VisionTransformer with an attentional pooler: CoCa's)."""
    if isinstance(visual, AttentionalPoolImageTower):
        return "vit_attn_pool"
    if not isinstance(visual, TimmImageTower):
        raise TypeError(f"expected a TimmImageTower or AttentionalPoolImageTower, got {type(visual).__name__}")
    if isinstance(visual.trunk, VisionTransformer):
        return "vit"
    if isinstance(visual.trunk, ByobNet) and isinstance(visual.trunk.head, AttentionPool2d):
        return "resnet"
    return "timm"


def is_openclip_state_dict(state_dict: StateDict) -> bool:
    """True for OpenCLIP's layouts (CLIP: text tower at the top level; CoCa: a ViT with ``conv1``), False for
    Cadenza's (text tower under ``text.``, image trunk under ``visual.trunk.``)."""
    return (
        "token_embedding.weight" in state_dict
        or "visual.conv1.weight" in state_dict
        and "text_decoder.ln_final.weight" in state_dict
    )


def is_coca(model: nn.Module) -> bool:
    return hasattr(model, "text_decoder")


# -- OpenCLIP -> Cadenza --------------------------------------------------------------------------------------------
def openclip_to_cadenza(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Rename an OpenCLIP CLIP (or CoCa) state dict into ``model``'s (a Cadenza CLIP or CoCa) names and layouts."""
    if is_coca(model):
        return _openclip_coca_to_cadenza(state_dict, model)
    out: StateDict = {}
    vision: StateDict = {}
    for key, value in state_dict.items():
        if key in _NON_WEIGHTS:
            continue
        if key.startswith("visual."):
            vision[key] = value
        elif key in _SHARED:
            out[key] = value
        else:
            out[f"text.{key}"] = value
    kind = image_tower_kind(model.visual)
    if kind == "vit":
        converted = timm_vit._convert_openai_clip(vision, model.visual.trunk, prefix="visual.")
        head = converted.pop("head.weight", None)
        converted.pop("head.bias", None)  # timm adds zeros; OpenCLIP's projection has no bias
        out.update({f"visual.trunk.{k}": v for k, v in converted.items()})
        if head is not None:
            out["visual.proj.weight"] = head.contiguous()  # (E, width): already transposed by timm
    elif kind == "resnet":
        converted = timm_byobnet._convert_openai_clip(vision, model.visual.trunk, prefix="visual.")
        out.update({f"visual.trunk.{k}": v for k, v in converted.items()})
    else:
        for key, value in vision.items():
            if key.startswith("visual.trunk."):
                out[key] = value
            elif key.startswith("visual.head.proj."):
                out[key.replace("visual.head.proj.", "visual.proj.")] = value
            else:
                raise ValueError(f"OpenCLIP key '{key}' has no Cadenza equivalent (only a linear head.proj is)")
    return out


#: OpenCLIP CoCa image-tower keys outside the ViT trunk, kept under the same names (``proj`` is transposed)
_POOL_PREFIXES = ("visual.attn_pool.", "visual.ln_post.")


def _openclip_coca_to_cadenza(state_dict: StateDict, model: nn.Module) -> StateDict:
    out: StateDict = {}
    trunk: StateDict = {}
    for key, value in state_dict.items():
        if key in _NON_WEIGHTS or key.endswith("attn_mask"):
            continue
        if key == "visual.proj":
            out["visual.proj.weight"] = value.t().contiguous()  # (E, E) as nn.Linear's (out, in)
        elif key.startswith(_POOL_PREFIXES) or not key.startswith("visual."):
            out[key] = value  # text.*, text_decoder.*, logit_scale / logit_bias and the pooler: the same names
        else:
            trunk[key] = value
    converted = timm_vit._convert_openai_clip(trunk, model.visual.trunk, prefix="visual.")
    out.update({f"visual.trunk.{k}": v for k, v in converted.items()})
    return out


# -- Cadenza -> OpenCLIP --------------------------------------------------------------------------------------------
#: timm ViT names -> OpenCLIP VisionTransformer names (regex, replacement), under ``visual.trunk.`` / ``visual.``
_VIT_TO_OPENCLIP = [
    (r"^patch_embed\.proj\.weight$", "conv1.weight"),
    (r"^norm_pre\.", "ln_pre."),
    (r"^norm\.", "ln_post."),
    (r"^blocks\.(\d+)\.norm(\d)\.", r"transformer.resblocks.\1.ln_\2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"transformer.resblocks.\1.attn.in_proj_\2"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
]

#: timm resnet*_clip (ByobNet) names -> OpenCLIP ModifiedResNet names
_RESNET_CONV = {"conv1_1x1": "1", "conv2_kxk": "2", "conv3_1x1": "3"}
_RESNET_TO_OPENCLIP = [
    (r"^stem\.conv(\d)\.conv\.", r"conv\1."),
    (r"^stem\.conv(\d)\.bn\.", r"bn\1."),
    (
        r"^stages\.(\d+)\.(\d+)\.(conv\d_\w+?)\.(conv|bn)\.",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{m[4]}{_RESNET_CONV[m[3]]}.",
    ),
    (r"^stages\.(\d+)\.(\d+)\.shortcut\.conv\.conv\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^stages\.(\d+)\.(\d+)\.shortcut\.conv\.bn\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"^head\.pos_embed$", "attnpool.positional_embedding"),
    (r"^head\.(q|k|v)\.", r"attnpool.\1_proj."),
    (r"^head\.proj\.", "attnpool.c_proj."),
]


def cadenza_to_openclip(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Rename a Cadenza CLIP (or CoCa) state dict (``model``'s) into OpenCLIP's names and layouts."""
    if is_coca(model):
        return _cadenza_coca_to_openclip(state_dict, model)
    out: StateDict = {}
    kind = image_tower_kind(model.visual)
    if kind == "vit":
        _check_openclip_vit(model.visual)
    for key, value in state_dict.items():
        if key.startswith("text."):
            out[key.removeprefix("text.")] = value
        elif key in _SHARED:
            out[key] = value
        elif key == "visual.proj.weight" and kind == "vit":
            out["visual.proj"] = value.t().contiguous()  # (E, width) -> (width, E)
        elif key.startswith("visual.proj.") and kind == "timm":
            out[key.replace("visual.proj.", "visual.head.proj.")] = value
        elif key.startswith("visual.trunk.") and kind == "timm":
            out[key] = value
        elif key.startswith("visual.trunk."):
            name = key.removeprefix("visual.trunk.")
            if kind == "vit" and name == "cls_token":
                out["visual.class_embedding"] = value.reshape(-1)  # (1, 1, D) -> (D,)
            elif kind == "vit" and name == "pos_embed":
                out["visual.positional_embedding"] = value[0]  # (1, N, D) -> (N, D)
            else:
                table = _VIT_TO_OPENCLIP if kind == "vit" else _RESNET_TO_OPENCLIP
                out[f"visual.{_rename(name, table, key)}"] = value
        else:
            raise ValueError(f"Cadenza key '{key}' has no OpenCLIP equivalent")
    return out


def _cadenza_coca_to_openclip(state_dict: StateDict, model: nn.Module) -> StateDict:
    _check_openclip_vit(model.visual)
    out: StateDict = {}
    for key, value in state_dict.items():
        if key == "visual.proj.weight":
            out["visual.proj"] = value.t().contiguous()
        elif key.startswith(_POOL_PREFIXES) or not key.startswith("visual."):
            out[key] = value
        elif key.startswith("visual.trunk."):
            name = key.removeprefix("visual.trunk.")
            if name == "cls_token":
                out["visual.class_embedding"] = value.reshape(-1)  # (1, 1, D) -> (D,)
            elif name == "pos_embed":
                out["visual.positional_embedding"] = value[0]  # (1, N, D) -> (N, D)
            else:
                out[f"visual.{_rename(name, _VIT_TO_OPENCLIP, key)}"] = value
        else:
            raise ValueError(f"Cadenza key '{key}' has no OpenCLIP equivalent")
    return out


def _rename(name: str, table: list, key: str) -> str:
    for pattern, replacement in table:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    raise ValueError(f"Cadenza key '{key}' has no OpenCLIP equivalent")


def _check_openclip_vit(visual: TimmImageTower | AttentionalPoolImageTower) -> None:
    """OpenCLIP's VisionTransformer is a pre-norm, class-token ViT without patch bias, layer scale or qk-norm."""
    trunk = visual.trunk
    block = trunk.blocks[0]
    attentional = isinstance(visual, AttentionalPoolImageTower)
    problems = {
        "no class token": trunk.cls_token is None,
        f"global_pool={trunk.global_pool!r} (OpenCLIP pools the class token)": trunk.global_pool != "token"
        and not attentional,
        "a final norm before the attentional pooler": attentional and not isinstance(trunk.norm, nn.Identity),
        "no pre-norm (OpenCLIP's ln_pre)": not isinstance(trunk.norm_pre, nn.LayerNorm),
        "a patch-embedding bias": trunk.patch_embed.proj.bias is not None,
        "register tokens": trunk.reg_token is not None,
        "fc_norm": not isinstance(trunk.fc_norm, nn.Identity),
        "layer scale": not isinstance(block.ls1, nn.Identity),
        "qk-norm": not isinstance(block.attn.q_norm, nn.Identity),
        "a projection bias or no projection": not isinstance(visual.proj, nn.Linear) or visual.proj.bias is not None,
    }
    found = [name for name, present in problems.items() if present]
    if found:
        raise ValueError(f"this ViT has {', '.join(found)}: OpenCLIP's VisionTransformer cannot hold it")


# -- OpenCLIP model configs -----------------------------------------------------------------------------------------
def openclip_model_config(model: nn.Module) -> dict[str, Any]:
    """OpenCLIP's model config (``model_configs/<name>.json`` format) that builds ``model``'s architecture."""
    if is_coca(model):
        return _openclip_coca_config(model)
    text, visual = model.text, model.visual
    text_quick_gelu = isinstance(text.transformer.resblocks[0].mlp.gelu, TextQuickGELU)
    block = text.transformer.resblocks[0]
    config: dict[str, Any] = {
        "embed_dim": text.text_projection.shape[1],
        "quick_gelu": text_quick_gelu,
        "vision_cfg": _openclip_vision_config(visual, text_quick_gelu),
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.transformer.width,
            "heads": block.attn.heads,
            "layers": len(text.transformer.resblocks),
            "mlp_ratio": block.mlp.c_fc.out_features / text.transformer.width,
        },
    }
    if model.logit_bias is not None:
        config["init_logit_bias"] = float(model.logit_bias)
    return config


def _openclip_coca_config(model: nn.Module) -> dict[str, Any]:
    """OpenCLIP's CoCa config (``coca_ViT-B-32.json``'s fields) for a Cadenza CoCa."""
    text, visual, decoder = model.text, model.visual, model.text_decoder
    quick_gelu = isinstance(text.transformer.resblocks[0].mlp.gelu, TextQuickGELU)
    vision = _openclip_vision_config(visual, quick_gelu)
    pooler = visual.attn_pool
    vision.update(
        attentional_pool=True,
        attn_pooler_queries=pooler.query.shape[0],
        attn_pooler_heads=pooler.attn.num_heads,
        output_tokens=True,
    )
    text_block, decoder_block = text.transformer.resblocks[0], decoder.resblocks[0]
    config: dict[str, Any] = {
        "embed_dim": text.text_projection.shape[1],
        "quick_gelu": quick_gelu,
        "vision_cfg": vision,
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.transformer.width,
            "heads": text_block.attn.heads,
            "layers": len(text.transformer.resblocks),
            "mlp_ratio": text_block.mlp.c_fc.out_features / text.transformer.width,
            "embed_cls": True,
            "output_tokens": True,
        },
        "multimodal_cfg": {
            "context_length": decoder.context_length,
            "vocab_size": decoder.text_projection.shape[1],
            "width": decoder.width,
            "heads": decoder_block.attn.heads,
            "layers": len(decoder.resblocks),
            "mlp_ratio": decoder_block.mlp.c_fc.out_features / decoder.width,
            "attn_pooler_heads": pooler.attn.num_heads,
        },
        "custom_text": True,
    }
    if model.logit_bias is not None:
        config["init_logit_bias"] = float(model.logit_bias)
    return config


def openclip_preprocess_config(model: nn.Module) -> dict[str, Any]:
    """OpenCLIP's ``preprocess_cfg`` (as in a Hub ``open_clip_config.json``) for ``model``."""
    return {
        "size": model.image_size,
        "mean": list(model.image_mean),
        "std": list(model.image_std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def _openclip_vision_config(visual: TimmImageTower, text_quick_gelu: bool) -> dict[str, Any]:
    kind = image_tower_kind(visual)
    trunk = visual.trunk
    if kind in ("vit", "vit_attn_pool"):
        _check_openclip_vit(visual)
        block = trunk.blocks[0]
        vision_quick_gelu = isinstance(block.mlp.act, QuickGELU)
        if vision_quick_gelu != text_quick_gelu:
            raise ValueError(
                "OpenCLIP's ViT CLIP uses one activation in both towers: use a *_quickgelu_* timm ViT together with "
                "quick_gelu: true, or neither"
            )
        width = trunk.embed_dim
        return {
            "image_size": visual.image_size,
            "layers": len(trunk.blocks),
            "width": width,
            "head_width": width // block.attn.num_heads,
            "mlp_ratio": block.mlp.fc1.out_features / width,
            "patch_size": trunk.patch_embed.patch_size[0],
        }
    if kind == "resnet":
        return {
            "image_size": visual.image_size,
            "layers": [len(stage) for stage in trunk.stages],
            "width": trunk.stem.conv3.conv.out_channels,
            "head_width": trunk.head.head_dim,
            "patch_size": None,
        }
    if not isinstance(visual.proj, nn.Linear):
        raise ValueError("OpenCLIP's TimmModel is only expressible here with proj: linear")
    unexpressible = set(visual.timm_kwargs) - {"drop_path_rate"}
    if unexpressible:
        raise ValueError(
            f"timm_kwargs {sorted(unexpressible)} cannot be expressed in OpenCLIP's TimmModel config "
            "(it takes a timm model name and drop_path_rate only)"
        )
    return {
        "timm_model_name": visual.timm_model,
        "timm_model_pretrained": False,
        "timm_pool": visual.pool or "",  # '' keeps the timm model's default pooling, as None does here
        "timm_proj": "linear",
        "timm_proj_bias": visual.proj.bias is not None,
        "timm_drop": 0.0,
        "timm_drop_path": visual.timm_kwargs.get("drop_path_rate"),
        "image_size": visual.image_size,
    }
