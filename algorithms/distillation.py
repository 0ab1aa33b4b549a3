"""Distillation: train the student's image–text logits towards a frozen teacher's (OpenCLIP's
``--distill-model`` / ``--distill-pretrained``; Hinton et al. 2015, https://arxiv.org/abs/1503.02531).

On ``INIT`` the teacher is built (frozen, eval mode, the run's precision and device) and the CLIP
loss becomes OpenCLIP's ``DistillClipLoss`` with the same ``local_loss`` / ``gather_with_grad``.
On ``AFTER_FORWARD`` the teacher encodes the same batch; on ``AFTER_LOSS`` the distillation term is
weighted. Costs a teacher forward per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cadenza.engine.algorithm import Algorithm
from cadenza.engine.errors import ConfigError
from cadenza.engine.event import Event
from cadenza.engine.logger import Logger
from cadenza.engine.precision import autocast_context, weights_dtype
from cadenza.engine.registry import ALGORITHMS
from cadenza.engine.state import State
from cadenza.models.factory import create_model
from cadenza.models.losses import ClipLoss, DistillClipLoss
from cadenza.models.pretrained import load_pretrained


def build_teacher(name: str, pretrained: str | None, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A frozen teacher in eval mode. Problems with its weights name the algorithm's keys, not ``model.*``."""
    try:
        teacher = create_model(name)
    except ConfigError as error:
        raise ConfigError("algorithms.distillation.teacher", str(error).split("': ", 1)[-1]) from error
    if pretrained:
        try:
            load_pretrained(teacher, pretrained, name, name_key="algorithms.distillation.teacher")
        except ConfigError as error:
            raise ConfigError("algorithms.distillation.pretrained", str(error).split("': ", 1)[-1]) from error
    teacher = teacher.to(device=device, dtype=dtype).eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher's normalized features and scale, under the keys ``DistillClipLoss`` reads. Captions cut after the
    batch's longest (``model.trim_text_padding``) are padded back for a teacher whose text tower needs every position."""
    if not getattr(teacher, "trims_text_padding", False) and tokens.shape[1] < teacher.context_length:
        tokens = F.pad(tokens, (0, teacher.context_length - tokens.shape[1]), value=teacher.text.pad_id)
    out = teacher(images, tokens)
    return {
        "dist_image_features": out["image_features"],
        "dist_text_features": out["text_features"],
        "dist_logit_scale": out["logit_scale"],
    }


@ALGORITHMS.register("distillation")
class Distillation(Algorithm):
    """Distil a frozen teacher's logits into the student.

    Args:
        teacher: the teacher's architecture name (``ViT-L-14``).
        pretrained: the teacher's weights (a local file, ``s3://`` URI, or OpenCLIP tag when online).
        weight: multiplies the distillation loss (``train/distill_loss``).
    """

    def __init__(self, teacher: str, pretrained: str | None = None, weight: float = 1.0) -> None:
        if weight < 0:
            raise ValueError("weight must not be negative")
        self.teacher = teacher
        self.pretrained = pretrained
        self.weight = weight
        self._teacher: nn.Module | None = None

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
            self._teacher = build_teacher(self.teacher, self.pretrained, state.device, weights_dtype(state.precision))
            state.loss_fn = DistillClipLoss(state.loss_fn.local_loss, state.loss_fn.gather_with_grad)
        elif event == Event.AFTER_FORWARD:
            with autocast_context(state.precision, state.device):
                state.outputs = {**state.outputs, **teacher_outputs(self._teacher, *state.micro_batch)}
        else:
            state.loss_dict = {**state.loss_dict, "distill_loss": self.weight * state.loss_dict["distill_loss"]}
            state.loss = sum(state.loss_dict.values())
