"""OpenCLIP's ``local-dir:`` and ``hf-hub:`` model names: an architecture and its weights from one folder.

OpenCLIP 3.x names a model by a folder (``local-dir:/path``) or a Hugging Face Hub repository (``hf-hub:org/repo``)
that holds ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) and the weights
(``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``, ...): the layout ``composer export --format
openclip DIR`` writes. ``resolve_folder_name`` turns such a name into what a Cadenza config says: ``model.name``,
``model.overrides`` and ``model.pretrained`` (the weights file), plus the image normalization of ``preprocess_cfg``.

The architecture is the one the folder's ``cadenza`` entry names (``composer export`` writes it, with the
``model.overrides`` of the run), else the one Cadenza architecture whose OpenCLIP config
(``convert.openclip_model_config``) agrees with every field ``model_cfg`` gives. ``hf-hub:`` reads the Hub's cache
first and downloads only when the Hub answers; offline (``HF_HUB_OFFLINE=1``) or unreachable, a name that is not
cached is a config error at once, saying to pass a local folder.

Example:
    >>> is_folder_name("local-dir:/models/my-clip"), is_folder_name("ViT-B-32")
    (True, False)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from cadenza.engine.errors import ConfigError
from cadenza.models.convert import openclip_model_config
from cadenza.models.factory import create_model, get_model_config, list_models
from cadenza.models.pretrained import HF_FILENAMES, hub_download

log = logging.getLogger("cadenza")

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
CONFIG_NAME = "open_clip_config.json"
#: weight files OpenCLIP looks for in a ``local-dir:`` folder, in its order of preference (``_find_checkpoint_in_dir``)
WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
#: the entry ``composer export`` adds to ``open_clip_config.json`` (OpenCLIP reads only ``model_cfg`` and
#: ``preprocess_cfg``)
CADENZA_KEY = "cadenza"


@dataclass(frozen=True)
class FolderModel:
    """What a ``local-dir:`` / ``hf-hub:`` name means in Cadenza's config.

    Attributes:
        name: the Cadenza architecture (``model.name``).
        overrides: its ``model.overrides``.
        weights: the weights file (``model.pretrained``), ``None`` when the folder holds none.
        image_mean, image_std: ``preprocess_cfg``'s normalization, when it gives one.
    """

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None


def is_folder_name(name: str) -> bool:
    """True for OpenCLIP's ``local-dir:...`` and ``hf-hub:...`` model names."""
    return name.startswith((LOCAL_DIR, HF_HUB))


def resolve_folder_name(name: str, key: str = "model.name") -> FolderModel:
    """The architecture, overrides and weights that ``name`` (``local-dir:`` or ``hf-hub:``) holds.

    Raises:
        ConfigError: for ``key``: no such folder, no config in it, a config no Cadenza architecture matches, or a Hub
            repository that is neither cached nor reachable.
    """
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR) :]).expanduser()
        config_path = folder / CONFIG_NAME
        if not folder.is_dir():
            raise ConfigError(
                key, f"'{name}': {folder} is not a folder (local-dir: names a folder holding {CONFIG_NAME})"
            )
        if not config_path.is_file():
            raise ConfigError(
                key,
                f"'{name}': {folder} has no {CONFIG_NAME}. composer export CHECKPOINT --format openclip DIR writes "
                "one; a bare weights file goes in model.pretrained (--pretrained) with its architecture's model.name.",
            )
        weights = _weights_in(folder)
    elif name.startswith(HF_HUB):
        repo = name[len(HF_HUB) :]
        if not repo:
            raise ConfigError(key, f"'{name}': give a repository, e.g. hf-hub:timm/ViT-B-16-SigLIP")
        fix = f"Download the repository on a machine that is online and pass its folder: local-dir:/path/to/{repo}"
        config_path = hub_download(repo, (CONFIG_NAME,), f"'{name}'", fix, key)
        weights = hub_download(repo, HF_FILENAMES, f"'{name}'", fix, key)
    else:
        raise ConfigError(key, f"'{name}' is neither a local-dir: nor an hf-hub: name")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(key, f"'{name}': {config_path} is not readable JSON ({error})") from error
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ConfigError(key, f"'{name}': {config_path} has no 'model_cfg' (OpenCLIP's model config)")
    arch, overrides = _architecture(config, name, key)
    if weights is None:
        log.warning("%s holds no weights: the model starts from random weights, as OpenCLIP's would", name)
    preprocess = config.get("preprocess_cfg") or {}
    return FolderModel(arch, overrides, weights, _floats(preprocess.get("mean")), _floats(preprocess.get("std")))


def folder_entry(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The ``cadenza`` entry ``composer export`` writes into ``open_clip_config.json``."""
    return {"model": {"name": name, "overrides": overrides}}


def _weights_in(folder: Path) -> Path | None:
    for filename in WEIGHT_NAMES:
        if (folder / filename).is_file():
            return folder / filename
    found = sorted(p for suffix in (".safetensors", ".bin", ".pth") for p in folder.glob(f"*{suffix}"))
    found.sort(key=lambda p: p.suffix != ".safetensors")
    return found[0] if found else None


def _architecture(config: dict[str, Any], name: str, key: str) -> tuple[str, dict[str, Any]]:
    entry = (config.get(CADENZA_KEY) or {}).get("model") or {}
    if entry.get("name") in list_models():
        return entry["name"], dict(entry.get("overrides") or {})
    model_cfg = {"quick_gelu": False, **config["model_cfg"]}  # OpenCLIP's default
    matches = [arch for arch in _candidates(model_cfg) if _agrees(model_cfg, openclip_config(arch))]
    if len(matches) != 1:
        found = f"matches {', '.join(matches)}" if matches else "matches none of Cadenza's architectures"
        raise ConfigError(
            key,
            f"'{name}': its model_cfg {found}. Give the architecture itself: model.name (--model) with "
            "model.overrides, and the weights file in model.pretrained (--pretrained).",
        )
    return matches[0], {}


def _candidates(model_cfg: dict[str, Any]) -> list[str]:
    """Architectures whose files agree with ``model_cfg`` on the fields read without building a model."""
    coca = "multimodal_cfg" in model_cfg
    found = []
    for arch in list_models():
        fields = get_model_config(arch)
        if (fields.get("model_type", "clip") == "coca") != coca:
            continue
        if fields.get("quick_gelu", False) != model_cfg["quick_gelu"] or fields["embed_dim"] != model_cfg.get(
            "embed_dim", fields["embed_dim"]
        ):
            continue
        found.append(arch)
    return found


@cache
def openclip_config(arch: str) -> dict[str, Any] | None:
    """Architecture ``arch``'s OpenCLIP config as JSON data (built on the meta device: no weights are made); ``None``
    for one OpenCLIP cannot express."""
    with torch.device("meta"):
        try:
            return json.loads(json.dumps(openclip_model_config(create_model(arch))))
        except ValueError:
            return None


def _agrees(given: Any, ours: Any) -> bool:
    """Every field ``given`` sets equals ours (numbers compared as numbers); fields it leaves out are not compared."""
    if isinstance(given, dict):
        return isinstance(ours, dict) and all(k in ours and _agrees(v, ours[k]) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(ours, list) and len(given) == len(ours) and all(map(_agrees, given, ours))
    if isinstance(given, (int, float)) and not isinstance(given, bool) and isinstance(ours, (int, float)):
        return float(given) == float(ours)
    return given == ours


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return [float(v) for v in values] * (3 if len(values) == 1 else 1)


__all__ = ["FolderModel", "folder_entry", "is_folder_name", "resolve_folder_name"]
