"""Cadenza models: OpenCLIP architectures (CLIP, CoCa) on timm image towers, the text tower, tokenizer and losses."""

import cadenza.engine.deferred_imports  # noqa: F401 - first: timm, imported below, would import wandb (0.5-0.7 s)

# isort: split

from cadenza.models.clip import CLIP
from cadenza.models.coca import CoCa
from cadenza.models.factory import create_model, get_model_config, list_models
from cadenza.models.pretrained import list_pretrained_tags, load_pretrained
from cadenza.models.tokenizer import ClipTokenizer, get_tokenizer

__all__ = [
    "CLIP",
    "CoCa",
    "ClipTokenizer",
    "create_model",
    "get_model_config",
    "get_tokenizer",
    "list_models",
    "list_pretrained_tags",
    "load_pretrained",
]
