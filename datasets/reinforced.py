"""Reinforced datasets (MobileCLIP's DataCompDR, Vasu et al., CVPR 2024): MDS shards that store, beside each image
and its captions, a seed for ``K`` augmented views and every teacher's embedding of each view and each caption, so
that training distils from an ensemble of teachers without running one (``algorithms.distillation: {source:
stored}``).

``composer convert --teacher MODEL[:pretrained] --views K`` writes them (``convert.py``); the ``streaming`` loader
reads them back when an algorithm asks for ``teacher_embeddings`` (``mds.py``). This module holds what both sides
share: the columns, the metadata in ``cadenza-convert.json``, how a view's augmentation is seeded, and the teachers.

**Columns** (besides the image and the caption fields): ``seed`` (``int64``), and for teacher ``i``
``teacher<i>_image`` (``ndarray:float16:K,D``: view ``k``'s normalized image embedding in row ``k``) and
``teacher<i>_text`` (``ndarray:float16``, ``(C, D)``: the normalized embedding of every caption of the sample, field
by field in the metadata's ``captions`` order, each field's in the order ``samples.caption_list`` reads them; as
DataCompDR's ``text_emb`` holds the alt-text's, then the synthetic captions').

**Views.** View ``k`` of a sample is the training transform (``data.augment``) seeded with ``view_seed(seed, k)``.
Every random draw of Cadenza's transforms (the crop's box, jitter, grayscale) comes from the generators that seed
forks, and none depends on the output size or the normalization, so the student replays exactly the crop and colour
changes the teacher saw, at its own resolution and with its own mean and std. DataCompDR stores the drawn parameters
instead; a stored seed needs the same augmentation settings at training, which the loader checks against the
metadata.

Example:
    >>> view_seed(1234, 0) != view_seed(1234, 1), view_seed(1234, 1) == view_seed(1234, 1)
    (True, True)
    >>> parse_teacher("tiny-vit:/ckpt/teacher.pt"), parse_teacher("ViT-L-14:openai"), parse_teacher("tiny-vit")
    (('tiny-vit', '/ckpt/teacher.pt'), ('ViT-L-14', 'openai'), ('tiny-vit', None))
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cadenza.datasets.context import TEACHER_EMBEDDINGS
from cadenza.datasets.samples import mix64, transform_sample
from cadenza.datasets.transforms import image_transform
from cadenza.engine.errors import ConfigError, DataError
from cadenza.engine.object_store import get_object_store

__all__ = [
    "MARKER",
    "SEED_COLUMN",
    "TEACHER_EMBEDDINGS",
    "Teacher",
    "check_reinforcement",
    "image_column",
    "load_teacher",
    "parse_teacher",
    "read_reinforcement",
    "text_column",
    "view_seed",
]

#: what ``composer convert`` writes next to ``index.json`` once every shard is written (a reinforced dataset's
#: metadata is its ``reinforced`` entry)
MARKER = "cadenza-convert.json"
#: the column holding each sample's augmentation seed
SEED_COLUMN = "seed"
#: version of the metadata layout below
VERSION = 1
_VIEW_SALT = 0x5649_4557


def view_seed(seed: int, view: int) -> int:
    """The seed of view ``view`` of a sample whose stored augmentation seed is ``seed`` (63 bits)."""
    return mix64(seed, view, _VIEW_SALT) >> 1


def image_column(teacher: int) -> str:
    return f"teacher{teacher}_image"


def text_column(teacher: int) -> str:
    return f"teacher{teacher}_text"


def parse_teacher(spec: str) -> tuple[str, str | None]:
    """``MODEL[:pretrained]`` → ``(model, pretrained or None)``; architecture names hold no colon."""
    name, _, pretrained = spec.partition(":")
    if not name:
        raise ValueError(f"--teacher {spec!r}: expected MODEL or MODEL:PRETRAINED (e.g. ViT-L-14:openai)")
    return name, pretrained or None


# -- the teachers (composer convert) ------------------------------------------------------------------------
@dataclass
class Teacher:
    """A frozen teacher, with the transform that draws its views and the tokenizer of its text tower."""

    name: str
    pretrained: str | None
    model: nn.Module
    transform: Any
    tokenizer: Any
    device: torch.device
    dim: int  # the embedding width

    def metadata(self, index: int) -> dict[str, Any]:
        """What the dataset's metadata says about this teacher (teacher ``index``)."""
        return {
            "name": self.name,
            "pretrained": self.pretrained,
            "dim": self.dim,
            "normalized": True,
            "logit_scale": float(self.model.logit_scale.exp().item()),
            "image_size": int(self.model.image_size),
            "context_length": int(self.model.context_length),
            "image_column": image_column(index),
            "text_column": text_column(index),
        }

    @torch.no_grad()
    def embed_views(self, images: Sequence[Any], seeds: Sequence[int], views: int, batch_size: int) -> np.ndarray:
        """``(N, views, D)`` float16: the normalized embedding of view ``k`` of each image (see ``view_seed``)."""
        pixels = [transform_sample(self.transform, image, view_seed(seed, k)) for image, seed in zip(images, seeds, strict=True) for k in range(views)]  # fmt: skip
        features = [
            self.model.encode_image(torch.stack(pixels[start : start + batch_size]).to(self.device), normalize=True)
            for start in range(0, len(pixels), batch_size)
        ]
        return torch.cat(features).float().cpu().numpy().astype(np.float16).reshape(len(images), views, -1)

    @torch.no_grad()
    def embed_texts(self, captions: Sequence[str], batch_size: int) -> np.ndarray:
        """``(M, D)`` float16: the normalized embedding of each caption (tokenized by the teacher's tokenizer)."""
        if not captions:
            return np.zeros((0, self.dim), np.float16)
        features = [
            self.model.encode_text(
                self.tokenizer(list(captions[start : start + batch_size])).to(self.device), normalize=True
            )  # fmt: skip
            for start in range(0, len(captions), batch_size)
        ]
        return torch.cat(features).float().cpu().numpy().astype(np.float16)


def load_teacher(spec: str, augment: Mapping[str, Any], device: torch.device) -> Teacher:
    """Teacher ``MODEL[:pretrained]`` frozen in eval mode on ``device`` (fp32), its views drawn with ``augment``.

    A Cadenza checkpoint as ``pretrained`` brings its own ``model.overrides`` (a teacher trained with a custom width).
    """
    from cadenza.models.factory import create_frozen_model
    from cadenza.models.tokenizer import get_tokenizer

    name, pretrained = parse_teacher(spec)
    model = create_frozen_model(
        name, pretrained, device, torch.float32, name_key="--teacher", pretrained_key="--teacher"
    )
    transform = image_transform(model.image_size, True, model.image_mean, model.image_std, **augment)
    tokenizer = get_tokenizer(name, context_length=model.context_length)
    with torch.no_grad():
        dim = int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
    return Teacher(name, pretrained, model, transform, tokenizer, device, dim)


# -- reading them back (training) -----------------------------------------------------------------------------
def read_reinforcement(root: str) -> dict[str, Any] | None:
    """The ``reinforced`` metadata of the MDS dataset at ``root`` (a folder or ``s3://`` prefix); ``None`` when the
    dataset stores no teacher embeddings. A conversion that did not finish has no metadata (``DataError``)."""
    raw = get_object_store(root).read_bytes(MARKER)
    if raw is None:
        raise DataError(
            f"{root} has no {MARKER}: it was not written by composer convert, or its conversion did not finish "
            "(rerun it with --resume)"
        )
    try:
        marker = json.loads(raw)
    except ValueError as error:
        raise DataError(f"{root}/{MARKER} is not JSON ({error})") from None
    return marker.get("reinforced") if isinstance(marker, dict) else None


def check_reinforcement(
    meta: Mapping[str, Any], fields: Sequence[str], augment: Mapping[str, Any] | None, where: str
) -> None:
    """Raise ``ConfigError`` when training cannot use the stored embeddings as configured: captions drawn from a
    field without stored text embeddings, augmentation settings other than the stored views', or metadata that does
    not describe teachers."""
    teachers = meta.get("teachers") or []
    if meta.get("version") != VERSION or not teachers or not int(meta.get("views", 0)) >= 1:
        raise ConfigError(
            "data.train", f"{where}: its metadata describes no teachers and views (version {meta.get('version')})"
        )
    for index, teacher in enumerate(teachers):
        dim = teacher.get("dim")
        if not isinstance(dim, int) or dim < 1 or not math.isfinite(float(teacher.get("logit_scale", math.nan))):
            raise ConfigError("data.train", f"{where}: teacher {index} has no valid dim / logit_scale in {MARKER}")
    stored = list(meta.get("captions") or [])
    missing = [field for field in fields if field not in stored]
    if missing:
        raise ConfigError(
            "data.train.captions",
            f"{where} stores teacher text embeddings of the caption fields {stored}, not of {missing}: draw "
            f"captions from those fields, or convert again with --captions naming {missing}",
        )
    stored_augment = meta.get("augment")
    if augment is not None and dict(augment) != stored_augment:
        changed = sorted(
            k for k in set(augment) | set(stored_augment or {}) if augment.get(k) != (stored_augment or {}).get(k)
        )
        raise ConfigError(
            "data.augment",
            f"{where} stores views drawn with data.augment {stored_augment}; this run sets {dict(augment)} "
            f"(differs in {changed}). Replaying the stored views needs the same settings: set them, or convert again "
            "with --augment.",
        )


def teacher_extras(meta: Mapping[str, Any]) -> tuple[str, ...]:
    """The names of the extras a batch of this dataset carries for ``TEACHER_EMBEDDINGS``."""
    return tuple(f"teacher{i}_{part}" for i in range(len(meta["teachers"])) for part in ("image", "text", "scale"))
