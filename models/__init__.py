"""Cadenza models: OpenCLIP architectures on timm image towers, the text tower, tokenizer and losses."""

from cadenza.models.clip import CLIP
from cadenza.models.factory import create_model, get_model_config, list_models, load_weights

__all__ = ["CLIP", "create_model", "get_model_config", "list_models", "load_weights"]
