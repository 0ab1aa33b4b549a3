"""Distillation: train the student's image–text similarity distributions towards frozen teachers' (Hinton et al. 2015,
https://arxiv.org/abs/1503.02531), with the teachers run online or their embeddings read from the data.

- ``source: online`` (the default) is OpenCLIP's ``--distill-model`` / ``--distill-pretrained``: on ``INIT`` the
  teacher is built (frozen, eval mode, the run's precision and device); on ``AFTER_FORWARD`` it encodes the same batch.
  Costs a teacher forward per step.
- ``source: stored`` is MobileCLIP's (Vasu et al., "MobileCLIP: Fast Image-Text Models through Multi-Modal
  Reinforced Training", CVPR 2024, https://arxiv.org/abs/2311.17049): no teacher is loaded. The training data is a
  reinforced dataset (``composer convert --teacher MODEL[:pretrained] --views K``, see ``datasets/reinforced.py``):
  each step's sample is one of its ``K`` stored views, replayed exactly from its stored seed, and the batch carries
  every teacher's stored embedding of that view and of the drawn caption. Costs nothing at training time beyond
  reading the embeddings.

The loss is the CLIP loss plus a distillation term, OpenCLIP's ``DistillClipLoss``: the cross-entropy of the student's
image→text and text→image softmax distributions over the batch against the teachers' (``softmax(sim / temperature)``,
by default each teacher's own learned scale), averaged over the ensemble after the softmax as MobileCLIP does.
That cross-entropy equals the mean over teachers of MobileCLIP's KL divergence plus the teachers' entropies, a
constant: the gradients are the paper's. ``train/contrastive_loss`` and ``train/distill_loss`` are logged weighted:
``loss_weights: [contrastive, distill]`` (MobileCLIP trains on DataCompDR with ``[0, 1]`` at ``temperature: 0.01``;
``weight: w`` is ``[1, w]``, OpenCLIP's).

When it helps: a small student and a much stronger teacher (MobileCLIP: +several points of ImageNet zero-shot at the
same compute), many epochs over the same images (the stored views make each pass see new augmentations with their own
targets). When it hurts: a teacher no better than the student (the target only adds noise); online, the teacher's
forward costs a step of its size. Stored, the data grows by ``K x D x 2`` bytes per teacher and image (DataCompDR:
30 views x 768 x 2 teachers), and training must use the stored views' augmentation settings.

Measured (``python benchmarks/reinforced_distillation.py``; Intel Xeon, 2 shared cores, one thread; README
"Reinforced data"): a tiny-vit training step (batch 32) costs 125 ms without distillation, 129 ms (1.03x) with
``source: stored`` and 200 ms (1.60x) with ``source: online`` and a teacher twice as wide. On the digits, the tiny-vit
student distilled from the stored embeddings of that teacher (95.3% zero-shot top-1) reaches 96.4% / 93.0% (seeds 0 /
1) where the same student alone reaches 91.4% / 90.3%, at the same 1068 steps on the same data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cadenza.datasets.context import TEACHER_EMBEDDINGS
from cadenza.engine.algorithm import Algorithm
from cadenza.engine.errors import ConfigError
from cadenza.engine.event import Event
from cadenza.engine.logger import Logger
from cadenza.engine.precision import autocast_context, weights_dtype
from cadenza.engine.registry import ALGORITHMS
from cadenza.engine.state import State
from cadenza.models.factory import create_frozen_model
from cadenza.models.losses import ClipLoss, DistillClipLoss

SOURCES = ("online", "stored")


def build_teacher(name: str, pretrained: str | None, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A frozen teacher in eval mode. Problems with its weights name the algorithm's keys, not ``model.*``; a
    Cadenza checkpoint brings its ``model.overrides``."""
    return create_frozen_model(
        name,
        pretrained,
        device,
        dtype,
        name_key="algorithms.distillation.teacher",
        pretrained_key="algorithms.distillation.pretrained",
    )


@torch.no_grad()
def teacher_outputs(
    teacher: nn.Module, images: torch.Tensor, tokens: torch.Tensor, temperature: float | None = None
) -> dict[str, torch.Tensor]:
    """The teacher's normalized features and scale (``1 / temperature`` when set), under the keys ``DistillClipLoss``
    reads. Captions cut after the batch's longest (``model.trim_text_padding``) are padded back for a teacher whose text
    tower needs every position. Images of another size than the teacher's (a batch made smaller by
    ``progressive_resizing`` or ``clipa``, or a teacher trained at another resolution) are resized to it: the teacher
    sees the student's view at its own resolution."""
    size = getattr(teacher, "image_size", None)
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if not getattr(teacher, "trims_text_padding", False) and tokens.shape[1] < teacher.context_length:
        tokens = F.pad(tokens, (0, teacher.context_length - tokens.shape[1]), value=teacher.text.pad_id)
    out = teacher(images, tokens)
    return {
        "dist_image_features": out["image_features"],
        "dist_text_features": out["text_features"],
        "dist_logit_scale": out["logit_scale"] if temperature is None else 1.0 / temperature,
    }


def stored_teacher_outputs(extras: Mapping[str, torch.Tensor], temperature: float | None = None) -> dict[str, Any]:
    """Stored teacher embeddings of a batch (``teacher<i>_image`` / ``_text`` ``(B, D_i)``, ``teacher<i>_scale``
    ``(B,)``) as ``DistillClipLoss``'s per-teacher inputs, in float32.

    Example:
        >>> extras = {"teacher0_image": torch.ones(2, 4, dtype=torch.float16), "teacher0_text": torch.ones(2, 4),
        ...           "teacher0_scale": torch.tensor([50.0, 50.0])}
        >>> out = stored_teacher_outputs(extras)
        >>> out["dist_image_features"][0].dtype, float(out["dist_logit_scale"][0])
        (torch.float32, 50.0)
        >>> stored_teacher_outputs(extras, temperature=0.01)["dist_logit_scale"]
        [100.0]
    """
    count = sum(1 for key in extras if key.startswith("teacher") and key.endswith("_image"))
    if count == 0:
        raise ValueError("the batch carries no stored teacher embeddings (teacher<i>_image)")
    teachers = range(count)
    return {
        "dist_image_features": [extras[f"teacher{i}_image"].float() for i in teachers],
        "dist_text_features": [extras[f"teacher{i}_text"].float() for i in teachers],
        "dist_logit_scale": [
            extras[f"teacher{i}_scale"][0].float() if temperature is None else 1.0 / temperature for i in teachers
        ],
    }


def weigh_losses(loss_dict: Mapping[str, torch.Tensor], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``contrastive_loss`` times ``weights[0]`` and ``distill_loss`` times ``weights[1]``; other terms unchanged."""
    weighted = dict(loss_dict)
    for key, weight in zip(("contrastive_loss", "distill_loss"), weights, strict=True):
        if weight != 1.0:
            weighted[key] = weight * weighted[key]
    return weighted


@ALGORITHMS.register("distillation")
class Distillation(Algorithm):
    """Distil frozen teachers' image–text logits into the student.

    Args:
        teacher: the teacher's architecture name (``ViT-L-14``); online only.
        pretrained: the teacher's weights (a local file, ``s3://`` URI, or OpenCLIP tag when online); online only.
        weight: multiplies the distillation loss (``train/distill_loss``); ``loss_weights: [1, weight]``.
        source: ``online`` (run the teacher every step) or ``stored`` (embeddings from a reinforced dataset).
        temperature: the teachers' softmax temperature (logits are similarities / temperature); default each
            teacher's own learned scale. MobileCLIP's ``--distill-logit-scale 100`` is ``0.01``.
        loss_weights: ``[contrastive, distill]`` multipliers of the two losses (instead of ``weight``).
    """

    def __init__(
        self,
        teacher: str | None = None,
        pretrained: str | None = None,
        weight: float = 1.0,
        source: str = "online",
        temperature: float | None = None,
        loss_weights: list[float] | None = None,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        if source == "online" and not teacher:
            raise ValueError("source: online needs teacher (and usually pretrained): the model run as the teacher")
        if source == "stored" and (teacher or pretrained):
            raise ValueError(
                "source: stored loads no teacher (the data holds the embeddings of the teachers composer convert "
                "--teacher ran): remove teacher and pretrained"
            )
        if weight < 0:
            raise ValueError("weight must not be negative")
        if loss_weights is not None:
            if weight != 1.0:
                raise ValueError("set either weight or loss_weights ([contrastive, distill]), not both")
            if len(loss_weights) != 2 or any(not w >= 0 for w in loss_weights) or not any(loss_weights):
                raise ValueError(f"loss_weights is [contrastive, distill], two weights >= 0, got {loss_weights}")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.teacher = teacher
        self.pretrained = pretrained
        self.weight = weight
        self.source = source
        self.temperature = temperature
        self.loss_weights = loss_weights
        self._weights = tuple(loss_weights) if loss_weights is not None else (1.0, weight)
        self._teacher: nn.Module | None = None

    @property
    def batch_extras(self) -> tuple[str, ...]:
        return (TEACHER_EMBEDDINGS,) if self.source == "stored" else ()

    def check_compatible(self, others: list[Algorithm], state: State) -> None:
        if state.accum_freq > 1:
            raise ConfigError(
                "algorithms.distillation",
                "cannot run with optim.accum_freq > 1 (the teacher's features are not cached); set optim.accum_freq=1.",
            )
        if type(state.loss_fn) is not ClipLoss:  # the loss is built before the algorithms are checked
            raise ConfigError(
                "algorithms.distillation",
                f"distils the CLIP loss; loss.name={state.loss_fn.name} cannot be combined with it.",
            )

    def match(self, event: Event, state: State) -> bool:
        if event == Event.INIT:
            return True
        return event in (Event.AFTER_FORWARD, Event.AFTER_LOSS) and torch.is_grad_enabled()

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            if self.source == "online":
                dtype = weights_dtype(state.precision)
                self._teacher = build_teacher(self.teacher, self.pretrained, state.device, dtype)
            state.loss_fn = DistillClipLoss(state.loss_fn.local_loss, state.loss_fn.gather_with_grad)
        elif event == Event.AFTER_FORWARD:
            if self._teacher is not None:
                with autocast_context(state.precision, state.device):
                    teacher = teacher_outputs(self._teacher, *state.micro_batch, temperature=self.temperature)
            else:
                teacher = stored_teacher_outputs(state.extras, self.temperature)
            state.outputs = {**state.outputs, **teacher}
        else:
            state.loss_dict = weigh_losses(state.loss_dict, self._weights)
            state.loss = sum(state.loss_dict.values())
