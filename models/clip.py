"""CLIP: an image tower and a text tower trained to agree in one embedding space."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.models import group_parameters
from torch import nn

from cadenza.engine.errors import ConfigError
from cadenza.models.text import TextTransformer, trim_padding
from cadenza.models.vision import TimmImageTower

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)
#: the towers by the names configs use (optim.layer_decay, algorithms.lora.target) -> the model's attribute
TOWERS = {"image": "visual", "text": "text"}


class CLIP(nn.Module):
    """Image and text encoders with a learnable temperature (and a bias, for SigLIP).

    Args:
        visual: the image tower (``images -> (B, E)``).
        text: the text tower (``tokens -> (B, E)``).
        init_logit_scale: initial log temperature (OpenCLIP: ln(1/0.07)).
        init_logit_bias: initial logit bias; ``None`` means the model has none (CLIP), SigLIP uses -10.
        image_mean, image_std: the normalization its image transforms use.
    """

    def __init__(
        self,
        visual: TimmImageTower,
        text: TextTransformer,
        init_logit_scale: float = LOGIT_SCALE_INIT,
        init_logit_bias: float | None = None,
        image_mean: tuple[float, ...] = OPENAI_MEAN,
        image_std: tuple[float, ...] = OPENAI_STD,
    ) -> None:
        super().__init__()
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.visual = visual
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def context_length(self) -> int:
        return self.text.context_length

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def trims_text_padding(self) -> bool:
        """Whether every part of the model reading tokens gives the same result on :func:`trim_padding`'s output."""
        return self.text.trims_padding

    def trim_text_padding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Captions cut after the batch's last non-padding token, if that leaves this model's function unchanged."""
        return trim_padding(tokens, self.text.pad_id) if self.trims_text_padding else tokens

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Normalized features and the exponentiated logit scale, keyed as OpenCLIP's ``output_dict``."""
        out: dict[str, torch.Tensor] = {"logit_scale": self.logit_scale.exp()}
        if images is not None:
            out["image_features"] = self.encode_image(images, normalize=True)
        if tokens is not None:
            out["text_features"] = self.encode_text(tokens, normalize=True)
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the temperature at most 100, as OpenCLIP does after every step."""
        self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    @property
    def towers(self) -> dict[str, nn.Module]:
        """The image and text towers by their config names (``image``, ``text``); each has ``group_matcher``."""
        return {name: getattr(self, attribute) for name, attribute in TOWERS.items()}

    def no_weight_decay(self) -> set[str]:
        """Names timm and the text tower exempt from weight decay (informational: the optimizer uses OpenCLIP's rule)."""
        names = {"logit_scale"} | ({"logit_bias"} if self.logit_bias is not None else set())
        names |= {f"visual.{n}" for n in self.visual.no_weight_decay()}
        return names | {f"text.{n}" for n in self.text.no_weight_decay()}


def layer_decay_scales(model: CLIP, decays: Mapping[str, float]) -> dict[str, tuple[str, float]]:
    """Layer-wise learning-rate decay (BEiT's, as timm's ``param_groups_layer_decay``) per tower.

    A tower's layers are its ``group_matcher`` groups in order (image: stem, each block, the head; text: the
    embeddings, each block, the projection); layer ``i`` of ``n`` gets ``decay ** (n - 1 - i)``, so the last layer
    trains at the full rate and the embeddings slowest. Parameters outside the listed towers (the temperature,
    CoCa's decoder) are left out (factor 1).

    Returns:
        parameter name -> (``"<tower> layer i/n"``, factor), for every parameter of the listed towers.

    Example:
        >>> from cadenza.models import create_model
        >>> scales = layer_decay_scales(create_model("tiny-vit"), {"image": 0.5})
        >>> scales["visual.trunk.pos_embed"], scales["visual.proj.weight"]
        (('image layer 0/3', 0.125), ('image layer 3/3', 1.0))
    """
    towers = getattr(model, "towers", None)
    if towers is None:
        raise ConfigError("optim.layer_decay", f"{type(model).__name__} names no towers; use optim.param_groups.")
    scales = {}
    for tower_name, decay in decays.items():
        tower = towers[tower_name]
        prefix = next(n for n, m in model.named_modules() if m is tower)
        layers = group_parameters(tower, tower.group_matcher(), reverse=True)  # name in the tower -> layer index
        top = max(layers.values())
        for name, layer in layers.items():
            scales[f"{prefix}.{name}"] = (f"{tower_name} layer {layer}/{top}", decay ** (top - layer))
    return scales
