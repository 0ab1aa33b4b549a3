"""Build models by OpenCLIP architecture name. Architectures are data: ``architectures/<name>.yaml``.

An architecture file holds the fields below; ``model.overrides`` in a run's YAML changes any of them (nested
mappings merge), so a custom architecture is a known one plus overrides. Values may interpolate other fields of
the same file (``img_size: ${vision.image_size}``); interpolation is resolved after the overrides are merged.

```
model_type: clip          # which assembly builds it: clip (CLIP) or coca (CoCa)
embed_dim: 512            # the joint image–text space
quick_gelu: false         # the text tower's activation (OpenAI's sigmoid approximation when true)
image_mean: [...]         # the normalization the model's image transforms use
image_std: [...]
vision: {...}             # TimmImageTower's arguments (CoCa: AttentionalPoolImageTower's)
text: {...}               # TextTransformer's arguments
decoder: {...}            # CoCa only: MultimodalDecoder's arguments
init_logit_scale: 2.659   # optional: ln(1/0.07) by default
init_logit_bias: -10.0    # optional: gives the model a logit bias (SigLIP); none by default
```
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from cadenza.engine.errors import ConfigError, suggest
from cadenza.engine.registry import MODELS
from cadenza.models.clip import CLIP
from cadenza.models.coca import CoCa, MultimodalDecoder
from cadenza.models.pretrained import load_resolved, resolve_pretrained, stored_architecture
from cadenza.models.text import TextTransformer
from cadenza.models.vision import AttentionalPoolImageTower, TimmImageTower

ARCHITECTURE_DIR = Path(__file__).parent / "architectures"


def list_models() -> list[str]:
    """Every architecture name (the files in ``architectures/``)."""
    return sorted(p.stem for p in ARCHITECTURE_DIR.glob("*.yaml"))


def get_model_config(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Architecture ``name``'s fields, with ``overrides`` merged in and interpolations resolved."""
    path = ARCHITECTURE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("model.name", f"unknown architecture '{name}'.{suggest(name, list_models())}")
    merged = _merge(OmegaConf.to_container(OmegaConf.load(path)), overrides or {})
    try:
        return OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError("model.overrides", f"architecture '{name}': {error}") from error


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


#: the fields a CLIP architecture may have
CLIP_FIELDS = frozenset(
    {"model_type", "embed_dim", "quick_gelu", "image_mean", "image_std", "vision", "text"}
    | {"init_logit_scale", "init_logit_bias"}
)


def check_fields(arch: dict[str, Any], known: frozenset[str] | set[str]) -> None:
    """Raise a ``ConfigError`` naming the first field of ``arch`` that is not in ``known``."""
    for key in arch:
        if key not in known:
            raise ConfigError(f"model.overrides.{key}", f"not an architecture field.{suggest(key, known)}")


def build_clip(arch: dict[str, Any]) -> CLIP:
    """Build a CLIP from an architecture dict (the YAML's fields)."""
    check_fields(arch, CLIP_FIELDS)
    embed_dim = arch["embed_dim"]
    try:
        visual = TimmImageTower(embed_dim=embed_dim, **arch["vision"])
        text = TextTransformer(embed_dim=embed_dim, quick_gelu=arch.get("quick_gelu", False), **arch["text"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError("model.overrides", f"the architecture cannot be built: {error}") from error
    extra = {k: arch[k] for k in ("init_logit_scale", "init_logit_bias", "image_mean", "image_std") if k in arch}
    return CLIP(visual, text, **extra)


#: the fields a CoCa architecture may have
COCA_FIELDS = CLIP_FIELDS | {"decoder"}


def build_coca(arch: dict[str, Any]) -> CoCa:
    """Build a CoCa from an architecture dict: CLIP's fields plus ``decoder`` (OpenCLIP's ``multimodal_cfg``)."""
    check_fields(arch, COCA_FIELDS)
    embed_dim, quick_gelu = arch["embed_dim"], arch.get("quick_gelu", False)
    # The decoder reads the text tower's token features and cross-attends to image tokens of size embed_dim.
    for key in ("text", "decoder"):
        width = arch[key].get("width")
        if width != embed_dim:
            raise ConfigError(
                f"model.overrides.{key}.width", f"CoCa needs {key}.width equal to embed_dim ({embed_dim}), got {width}"
            )
    try:
        visual = AttentionalPoolImageTower(embed_dim=embed_dim, **arch["vision"])
        text = TextTransformer(embed_dim=embed_dim, quick_gelu=quick_gelu, embed_cls=True, **arch["text"])
        decoder = MultimodalDecoder(vocab_size=text.vocab_size, quick_gelu=quick_gelu, **arch["decoder"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError("model.overrides", f"the architecture cannot be built: {error}") from error
    extra = {k: arch[k] for k in ("init_logit_scale", "init_logit_bias", "image_mean", "image_std") if k in arch}
    return CoCa(visual, text, decoder, **extra)


#: ``model_type`` in an architecture file -> the function that builds the model from the file's fields
BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {"clip": build_clip, "coca": build_coca}


def build_model(arch: dict[str, Any]) -> nn.Module:
    """Build the model an architecture dict describes, dispatching on its ``model_type`` (default ``clip``)."""
    model_type = arch.get("model_type", "clip")
    if model_type not in BUILDERS:
        raise ConfigError(
            "model.overrides.model_type", f"unknown model_type '{model_type}'.{suggest(model_type, BUILDERS)}"
        )
    return BUILDERS[model_type](arch)


def create_model(name: str, pretrained: str | None = None, **overrides: Any) -> nn.Module:
    """Build architecture ``name`` (fields changed by ``overrides``), optionally loading weights.

    Args:
        name: an architecture name from ``list_models()``.
        pretrained: weights to start from: a local file (OpenCLIP or Cadenza checkpoint, ``.pt`` / ``.bin`` /
            ``.safetensors``), an ``s3://`` URI, or an OpenCLIP tag such as ``laion2b_s34b_b79k``.
        overrides: architecture fields to change, e.g. ``embed_dim=64`` or ``text={"layers": 4}``.
    """
    arch = get_model_config(name, overrides)
    resolved = resolve_pretrained(pretrained, name) if pretrained else None  # a bad source fails before building
    model = build_model(arch)
    if resolved is not None:
        load_resolved(model, resolved, pretrained, name)
    return model


def create_frozen_model(
    name: str,
    pretrained: str | None,
    device: torch.device,
    dtype: torch.dtype,
    name_key: str = "model.name",
    pretrained_key: str = "model.pretrained",
) -> nn.Module:
    """A frozen model in eval mode (a distillation teacher): architecture ``name`` with ``pretrained`` weights.

    A Cadenza training checkpoint as ``pretrained`` brings the ``model.overrides`` it was trained with, so a teacher
    of a custom size loads by its architecture name and its checkpoint. Problems name ``name_key`` /
    ``pretrained_key`` (the config keys or flags that chose them), not ``model.*``.
    """
    overrides: dict[str, Any] = {}
    if pretrained:
        try:
            path, _ = resolve_pretrained(pretrained, name)
        except ConfigError as error:
            raise ConfigError(pretrained_key, str(error).split("': ", 1)[-1]) from error
        stored = stored_architecture(path)
        if stored is not None:
            if stored[0] != name:
                raise ConfigError(
                    name_key, f"'{pretrained}' was trained as model.name={stored[0]}, not {name}: name {stored[0]}"
                )
            overrides = stored[1]
    try:
        model = create_model(name, **overrides)
    except ConfigError as error:
        raise ConfigError(name_key, str(error).split("': ", 1)[-1]) from error
    if pretrained:
        try:
            load_resolved(model, resolve_pretrained(pretrained, name), pretrained, name, name_key=name_key)
        except ConfigError as error:
            raise ConfigError(pretrained_key, str(error).split("': ", 1)[-1]) from error
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


for _name in list_models():
    MODELS.register(_name)(
        lambda pretrained=None, overrides=None, _n=_name: create_model(_n, pretrained, **(overrides or {}))
    )
