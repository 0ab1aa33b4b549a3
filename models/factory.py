"""Build models by OpenCLIP architecture name. Architectures are data: ``architectures/<name>.yaml``."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from cadenza.engine.errors import ConfigError, suggest
from cadenza.engine.registry import MODELS
from cadenza.models.clip import CLIP
from cadenza.models.text import TextTransformer
from cadenza.models.vision import TimmImageTower

log = logging.getLogger(__name__)
ARCHITECTURE_DIR = Path(__file__).parent / "architectures"


def list_models() -> list[str]:
    return sorted(p.stem for p in ARCHITECTURE_DIR.glob("*.yaml"))


def get_model_config(name: str) -> dict[str, Any]:
    path = ARCHITECTURE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("model.name", f"unknown architecture '{name}'.{suggest(name, list_models())}")
    return OmegaConf.to_container(OmegaConf.load(path))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_clip(arch: dict[str, Any]) -> CLIP:
    """Build a CLIP from an architecture dict (the YAML's fields)."""
    known = {"embed_dim", "quick_gelu", "vision", "text", "init_logit_bias"}
    for key in arch:
        if key not in known:
            raise ConfigError(f"model.overrides.{key}", f"not an architecture field.{suggest(key, known)}")
    embed_dim = arch["embed_dim"]
    visual = TimmImageTower(embed_dim=embed_dim, **arch["vision"])
    text = TextTransformer(embed_dim=embed_dim, quick_gelu=arch.get("quick_gelu", False), **arch["text"])
    return CLIP(visual, text, init_logit_bias=arch.get("init_logit_bias"))


def create_model(name: str, pretrained: str | None = None, **overrides: Any) -> CLIP:
    """Build architecture ``name`` (fields changed by ``overrides``), optionally loading weights.

    Args:
        name: an architecture name from ``list_models()``.
        pretrained: a local checkpoint file (a training checkpoint with ``state_dict`` or a bare state dict).
        overrides: architecture fields to change, e.g. ``embed_dim=64`` or ``text={"layers": 4}``.
    """
    model = build_clip(_merge(get_model_config(name), overrides))
    if pretrained:
        load_weights(model, pretrained)
    return model


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load a local checkpoint's weights (``module.`` prefixes from DDP are stripped)."""
    if not Path(path).is_file():
        raise ConfigError("model.pretrained", f"'{path}' is not a file. Pass a local checkpoint path.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            "model.pretrained",
            f"'{path}' does not fit this architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}).",
        )
    log.info("loaded weights from %s", path)


for _name in list_models():
    MODELS.register(_name)(
        lambda pretrained=None, overrides=None, _n=_name: create_model(_n, pretrained, **(overrides or {}))
    )
