"""Contrastive losses for CLIP-style training: CLIP (InfoNCE), SigLIP, CoCa and distillation.

Numerically equal to OpenCLIP 3.3.0 (``open_clip/loss.py``), with one difference in how they are set up: the rank and
world size are read from ``torch.distributed`` at every forward instead of being stored at construction, so one loss
object is correct before and after the process group is initialised (rank 0 of 1 when it is not).

Every ``forward`` takes the model's output dict as keyword arguments (``loss(**model_out)``), ignores the keys it does
not use and returns a dict of named loss terms that the trainer sums.

References:
    CLIP: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021.
    SigLIP: Zhai et al., "Sigmoid Loss for Language Image Pre-Training", https://arxiv.org/abs/2303.15343.
    CoCa: Yu et al., "CoCa: Contrastive Captioners are Image-Text Foundation Models", 2022.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

from cadenza.engine.errors import ConfigError
from cadenza.engine.registry import LOSSES

__all__ = [
    "CLIP_LOGIT_SCALE_INIT",
    "SIGLIP_LOGIT_BIAS_INIT",
    "SIGLIP_LOGIT_SCALE_INIT",
    "LOSSES",
    "LOSS_MODEL_TYPES",
    "ClipLoss",
    "CoCaLoss",
    "DistillClipLoss",
    "SigLipLoss",
    "LOGIT_BIAS_CHOICES",
    "apply_logit_bias_choice",
    "build_loss",
    "check_logit_bias",
    "gather_features",
    "logit_bias_choice",
    "model_init_overrides",
    "siglip_init",
]

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
"""Initial value of the (log-space) ``logit_scale`` parameter of a CLIP model: a temperature of 0.07."""

SIGLIP_LOGIT_SCALE_INIT = math.log(10)
"""Initial value of the (log-space) ``logit_scale`` parameter when training with :class:`SigLipLoss`."""

SIGLIP_LOGIT_BIAS_INIT = -10.0
"""Initial value of the ``logit_bias`` parameter when training with :class:`SigLipLoss`."""

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def siglip_init() -> tuple[float, float]:
    """Returns OpenCLIP's initial ``(logit_scale, logit_bias)`` for SigLIP training.

    The scale is in log space, like the model parameter: the model multiplies logits by ``exp(logit_scale) == 10``.

    Returns:
        ``(math.log(10), -10.0)``.
    """
    return SIGLIP_LOGIT_SCALE_INIT, SIGLIP_LOGIT_BIAS_INIT


def gather_features(
    image_features: Tensor,
    text_features: Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Gathers image and text features from every rank, concatenated in rank order.

    Args:
        image_features: This rank's image features, ``(B, D)``. Every rank must have the same ``B``.
        text_features: This rank's text features, ``(B, D)``.
        local_loss: Whether the caller only computes this rank's rows of the logits. If it does not and
            ``gather_with_grad`` is off, this rank's slice of the result is the input itself, so that the local
            features still receive a gradient.
        gather_with_grad: Gather through an autograd-aware all-gather, whose backward sums each slice's gradient
            from every rank back onto the rank that owns it.

    Returns:
        ``(all_image_features, all_text_features)``, each ``(world_size * B, D)``; the inputs unchanged when not
        running distributed.
    """
    rank, world_size = _rank_and_world_size()
    if world_size == 1:
        return image_features, text_features
    if gather_with_grad:
        all_image = torch.cat(_all_gather_with_grad(image_features), dim=0)  # (W*B, D)
        all_text = torch.cat(_all_gather_with_grad(text_features), dim=0)  # (W*B, D)
        return all_image, all_text

    gathered_image = [torch.zeros_like(image_features) for _ in range(world_size)]
    gathered_text = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(gathered_image, image_features)
    dist.all_gather(gathered_text, text_features)
    if not local_loss:
        # The gathered copies carry no gradient: put the local tensors back so this rank's features still get one.
        gathered_image[rank] = image_features
        gathered_text[rank] = text_features
    return torch.cat(gathered_image, dim=0), torch.cat(gathered_text, dim=0)  # (W*B, D) each


@LOSSES.register("clip")
class ClipLoss(nn.Module):
    """The symmetric InfoNCE loss of CLIP, over the global batch when running distributed.

    With ``N = world_size * B`` pairs in the global batch, each image is classified among the ``N`` texts and each
    text among the ``N`` images; the loss is the mean of the two cross-entropies.

    Args:
        local_loss: Compute only this rank's ``B`` rows of the logits (against all ``N`` columns) instead of the full
            ``N x N`` matrix on every rank. Cheaper; combine with ``gather_with_grad`` for exact gradients.
        gather_with_grad: Gather features with an autograd-aware all-gather so gradients flow to the rank that owns
            each feature. Without it, other ranks' features are constants, and each rank's features get only the
            gradient of its own copy of the loss, so that DDP's gradient averaging trains on ``1 / world_size`` of the
            one-process gradient (as OpenCLIP does).
        cache_labels: Keep the target indices between steps instead of rebuilding them.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self._labels: dict[tuple[torch.device, int, int], Tensor] = {}

    def get_ground_truth(self, device: torch.device, num_logits: int) -> Tensor:
        """Returns the target column of each logit row.

        Args:
            device: Where the labels live.
            num_logits: Number of logit rows on this rank.

        Returns:
            ``(num_logits,)`` int64 indices; offset by ``rank * num_logits`` with ``local_loss``, where this rank's
            rows are matched against the global columns.
        """
        rank, world_size = _rank_and_world_size()
        offset = num_logits * rank if world_size > 1 and self.local_loss else 0
        key = (device, num_logits, offset)
        labels = self._labels.get(key)
        if labels is None:
            labels = torch.arange(num_logits, device=device, dtype=torch.long) + offset  # (B,) or (N,)
            if self.cache_labels:
                self._labels[key] = labels
        return labels

    def get_logits(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Computes image-to-text and text-to-image logits, gathering features across ranks if needed.

        Args:
            image_features: This rank's image features, ``(B, D)``.
            text_features: This rank's text features, ``(B, D)``.
            logit_scale: The exponentiated scale the similarities are multiplied by.
            logit_bias: Optional scalar added to every logit.

        Returns:
            ``(logits_per_image, logits_per_text)``: ``(B, N)`` each with ``local_loss`` (or at world size 1, where
            ``N == B``), else ``(N, N)`` each.
        """
        _, world_size = _rank_and_world_size()
        if world_size > 1:
            all_image, all_text = gather_features(
                image_features, text_features, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad
            )
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_text.T  # (B, N)
                logits_per_text = logit_scale * text_features @ all_image.T  # (B, N)
            else:
                logits_per_image = logit_scale * all_image @ all_text.T  # (N, N)
                logits_per_text = logits_per_image.T  # (N, N)
        else:
            logits_per_image = logit_scale * image_features @ text_features.T  # (B, B)
            logits_per_text = logit_scale * text_features @ image_features.T  # (B, B)

        if logit_bias is not None:
            # OpenCLIP adds the bias in place, which adds it twice when the text logits are a transposed view. A
            # constant shift does not change a softmax cross-entropy, so adding it once gives the same loss.
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return logits_per_image, logits_per_text

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        **unused: Any,
    ) -> dict[str, Tensor]:
        """Computes the CLIP loss.

        Args:
            image_features: This rank's normalised image features, ``(B, D)``.
            text_features: This rank's normalised text features, ``(B, D)``.
            logit_scale: The exponentiated scale (``model.logit_scale.exp()``, as the model outputs it).
            logit_bias: Optional scalar added to every logit; it cannot change this loss.
            **unused: Other entries of the model output, ignored.

        Returns:
            ``{"contrastive_loss": loss}`` with a scalar ``loss``.
        """
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"contrastive_loss": loss}


@LOSSES.register("coca")
class CoCaLoss(ClipLoss):
    """CoCa's loss: a weighted CLIP loss plus a weighted captioning cross-entropy that skips padding.

    Args:
        caption_loss_weight: Weight of the captioning loss.
        clip_loss_weight: Weight of the contrastive loss; 0 skips computing it (and any communication).
        pad_id: Token id ignored by the captioning loss (0 for OpenCLIP's tokenizer).
        local_loss: See :class:`ClipLoss`.
        gather_with_grad: See :class:`ClipLoss`.
        cache_labels: See :class:`ClipLoss`.
    """

    def __init__(
        self,
        caption_loss_weight: float = 2.0,
        clip_loss_weight: float = 1.0,
        pad_id: int = 0,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = True,
    ) -> None:
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels)
        self.caption_loss_weight = caption_loss_weight
        self.clip_loss_weight = clip_loss_weight
        self.pad_id = pad_id

    def forward(  # type: ignore[override]
        self,
        image_features: Tensor,
        text_features: Tensor,
        logits: Tensor,
        labels: Tensor,
        logit_scale: Tensor | float,
        **unused: Any,
    ) -> dict[str, Tensor]:
        """Computes the weighted contrastive and captioning losses.

        Args:
            image_features: This rank's normalised image features, ``(B, D)``.
            text_features: This rank's normalised text features, ``(B, D)``.
            logits: Captioning logits of the text decoder, ``(B, L, V)``.
            labels: Target token ids, ``(B, L)``; positions equal to ``pad_id`` are ignored.
            logit_scale: The exponentiated contrastive scale.
            **unused: Other entries of the model output (``logit_bias`` included, as in OpenCLIP), ignored.

        Returns:
            ``{"contrastive_loss": ..., "caption_loss": ...}``, both scalars and already weighted. The contrastive
            loss is a zero of ``logits``' dtype when ``clip_loss_weight`` is 0.
        """
        if self.clip_loss_weight:
            clip_loss = super().forward(image_features, text_features, logit_scale)["contrastive_loss"]
            clip_loss = self.clip_loss_weight * clip_loss
        else:
            clip_loss = logits.new_zeros(())

        # cross_entropy wants the classes in dim 1: (B, V, L) against (B, L).
        caption_loss = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=self.pad_id)
        caption_loss = caption_loss * self.caption_loss_weight
        return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}


@LOSSES.register("distill")
class DistillClipLoss(ClipLoss):
    """CLIP loss plus a distillation term: cross-entropy between the teacher's and the student's softmaxed logits.

    Takes the same arguments as :class:`ClipLoss`; the teacher's features are gathered the same way as the student's.
    With several teachers (sequences of features and scales), the target is their softmaxed logits averaged, as in
    MobileCLIP (Vasu et al., CVPR 2024; ``--distill-average-after-softmax``): its cross-entropy is the mean over the
    teachers of each one's, which differs from the mean of their KL divergences (the paper's loss) by the teachers'
    entropies, a constant, so the gradients are the KL's.
    """

    @staticmethod
    def dist_loss(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
        """Returns the row-mean cross-entropy of the student's distribution against the teacher's.

        Args:
            teacher_logits: ``(R, C)`` logits of the teacher.
            student_logits: ``(R, C)`` logits of the student.

        Returns:
            A scalar.
        """
        return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    @staticmethod
    def teacher_probabilities(teacher_logits: Sequence[Tensor]) -> Tensor:
        """The teachers' softmaxed logits, averaged (one teacher's softmax as it is)."""
        probabilities = teacher_logits[0].softmax(dim=1)
        for logits in teacher_logits[1:]:
            probabilities = probabilities + logits.softmax(dim=1)
        return probabilities / len(teacher_logits) if len(teacher_logits) > 1 else probabilities

    def forward(  # type: ignore[override]
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        dist_image_features: Tensor | Sequence[Tensor],
        dist_text_features: Tensor | Sequence[Tensor],
        dist_logit_scale: Tensor | float | Sequence[Tensor | float],
        **unused: Any,
    ) -> dict[str, Tensor]:
        """Computes the contrastive and distillation losses (no logit bias, as in OpenCLIP).

        Args:
            image_features: Student image features, ``(B, D)``.
            text_features: Student text features, ``(B, D)``.
            logit_scale: The student's exponentiated scale.
            dist_image_features: Teacher image features, ``(B, D_t)``, or one such tensor per teacher.
            dist_text_features: Teacher text features, ``(B, D_t)``, or one per teacher.
            dist_logit_scale: The teacher's exponentiated scale, or one per teacher.
            **unused: Other entries of the model output, ignored.

        Returns:
            ``{"contrastive_loss": ..., "distill_loss": ...}``, both scalars, unweighted.
        """
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale)
        teachers = _per_teacher(dist_image_features, dist_text_features, dist_logit_scale)
        dist_logits = [self.get_logits(image, text, scale) for image, text, scale in teachers]
        labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        contrastive_loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        distill_loss = 0
        for direction, student_logits in enumerate((logits_per_image, logits_per_text)):
            target = self.teacher_probabilities([logits[direction] for logits in dist_logits])
            distill_loss = distill_loss + -(target * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)
        return {"contrastive_loss": contrastive_loss, "distill_loss": distill_loss / 2}


def _per_teacher(images: Any, texts: Any, scales: Any) -> list[tuple[Tensor, Tensor, Tensor | float]]:
    """``[(image features, text features, scale)]``, one per teacher, from single tensors or sequences."""
    if isinstance(images, Tensor):
        return [(images, texts, scales)]
    scales = list(scales) if isinstance(scales, (list, tuple)) else [scales] * len(images)
    if not (len(images) == len(texts) == len(scales) > 0):
        raise ValueError(f"{len(images)} teachers' image features, {len(texts)} text features, {len(scales)} scales")
    return list(zip(images, texts, scales, strict=True))


@LOSSES.register("siglip")
class SigLipLoss(nn.Module):
    """The pairwise sigmoid loss of SigLIP, over the global batch when running distributed.

    Every (image, text) pair is an independent binary classification: positive on the diagonal, negative elsewhere.
    The loss of this rank sums its ``B`` images against all ``N`` texts and divides by ``B``. Other ranks' texts come
    to this rank block by block through autograd-aware exchanges, so gradients flow back to their owners.

    Args:
        cache_labels: Keep the ``(B, B)`` label matrices between steps instead of rebuilding them.
        dist_impl: How text blocks travel between ranks: ``"bidir"`` passes them both ways round a ring (about
            ``world_size / 2`` exchanges), ``"shift"`` one way round the ring (``world_size - 1`` exchanges),
            ``"reduce"`` broadcasts each rank's block with an all-reduce, ``"gather"`` all-gathers every block at once
            (fewest steps, most memory).

    Raises:
        ValueError: If ``dist_impl`` is not one of the four.
    """

    def __init__(self, cache_labels: bool = False, dist_impl: str = "bidir") -> None:
        super().__init__()
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(
                f"Unknown SigLipLoss dist_impl {dist_impl!r}; valid values are: {', '.join(SIGLIP_DIST_IMPLS)}."
            )
        self.cache_labels = cache_labels
        self.dist_impl = dist_impl
        self._labels: dict[tuple[torch.device, torch.dtype, int, bool], Tensor] = {}

    def get_ground_truth(
        self, device: torch.device, dtype: torch.dtype, num_logits: int, negative_only: bool = False
    ) -> Tensor:
        """Returns the ``±1`` targets of a block of logits.

        Args:
            device: Where the labels live.
            dtype: Their dtype (that of the features).
            num_logits: Size ``B`` of the square block.
            negative_only: The block pairs this rank's images with another rank's texts: every pair is negative.

        Returns:
            ``(B, B)``: ``-1`` everywhere, ``+1`` on the diagonal unless ``negative_only``.
        """
        key = (device, dtype, num_logits, negative_only)
        labels = self._labels.get(key)
        if labels is None:
            labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)  # (B, B)
            if not negative_only:
                labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
            if self.cache_labels:
                self._labels[key] = labels
        return labels

    def get_logits(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
    ) -> Tensor:
        """Returns ``logit_scale * image_features @ text_features.T (+ logit_bias)``, ``(B, B)``."""
        logits = logit_scale * image_features @ text_features.T  # (B, B)
        if logit_bias is not None:
            logits = logits + logit_bias
        return logits

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None,
        **unused: Any,
    ) -> dict[str, Tensor]:
        """Computes this rank's SigLIP loss.

        Args:
            image_features: This rank's normalised image features, ``(B, D)``.
            text_features: This rank's normalised text features, ``(B, D)``.
            logit_scale: The exponentiated scale.
            logit_bias: Scalar added to every logit (a learned parameter in SigLIP models).
            **unused: Other entries of the model output, ignored.

        Returns:
            ``{"contrastive_loss": loss}`` with a scalar ``loss``. The mean of the ranks' losses is the loss of the
            global batch.
        """
        loss = self._block_loss(image_features, text_features, logit_scale, logit_bias)
        rank, world_size = _rank_and_world_size()
        if world_size == 1:
            return {"contrastive_loss": loss}

        for other_text, weight in self._other_text_blocks(text_features, rank, world_size):
            block_loss = self._block_loss(image_features, other_text, logit_scale, logit_bias, negative_only=True)
            loss = loss + weight * block_loss
        return {"contrastive_loss": loss}

    def _block_loss(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None,
        negative_only: bool = False,
    ) -> Tensor:
        logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)  # (B, B)
        labels = self.get_ground_truth(
            image_features.device, image_features.dtype, image_features.shape[0], negative_only=negative_only
        )
        return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]

    def _other_text_blocks(self, text_features: Tensor, rank: int, world_size: int) -> list[tuple[Tensor, float]]:
        """Returns the other ranks' text blocks, each ``(B, D)``, with the weight of their loss, in OpenCLIP's order.

        ``"reduce"`` and ``"gather"`` also return this rank's own block, with weight 0: its loss must stay in the
        graph, because with ``"reduce"`` every rank's backward has to join the all-reduce of every block.
        """
        right = (rank + 1) % world_size
        left = (rank - 1 + world_size) % world_size
        blocks: list[tuple[Tensor, float]] = []
        if self.dist_impl == "bidir":
            to_left = to_right = text_features
            num_bidir, remainder = divmod(world_size - 1, 2)
            for _ in range(num_bidir):
                from_right, from_left = _NeighbourExchangeBidir.apply(left, right, to_left, to_right)
                blocks += [(from_right, 1.0), (from_left, 1.0)]
                # Pass each block on in the direction it was travelling.
                to_left, to_right = from_right, from_left
            if remainder:
                blocks.append((_NeighbourExchange.apply(left, right, to_right), 1.0))
        elif self.dist_impl == "shift":
            to_right = text_features
            for _ in range(world_size - 1):
                to_right = _NeighbourExchange.apply(left, right, to_right)
                blocks.append((to_right, 1.0))
        elif self.dist_impl == "reduce":
            for i in range(world_size):
                # Rank i contributes its block and everyone else zeros: an all-reduce broadcasts it with gradients.
                blocks.append((_all_reduce_with_grad(text_features * (rank == i)), float(i != rank)))
        else:  # "gather"
            for i, block in enumerate(_all_gather_with_grad(text_features)):
                blocks.append((block, float(i != rank)))
        return blocks


#: the ``model_type`` (of an architecture file) each loss trains: CoCa's loss needs the decoder's logits
LOSS_MODEL_TYPES: dict[str, str] = {"clip": "clip", "siglip": "clip", "coca": "coca", "distill": "clip"}

#: architecture fields a loss needs at model initialisation (OpenCLIP's SigLIP configs set these)
LOSS_MODEL_INIT: dict[str, dict[str, float]] = {
    "siglip": {"init_logit_scale": SIGLIP_LOGIT_SCALE_INIT, "init_logit_bias": SIGLIP_LOGIT_BIAS_INIT},
}


#: ``model.logit_bias``: what the model's logit bias does. SigLIP's sigmoid loss needs one; a softmax loss (CLIP,
#: CoCa, distillation) is unchanged by adding a constant to every logit, so its bias would get a zero gradient
#: forever (and DDP would stop on it: OpenCLIP #1076)
LOGIT_BIAS_CHOICES = ("train", "freeze", "drop")
#: losses that use a logit bias
BIASED_LOSSES = ("siglip",)


def logit_bias_choice(loss: str, choice: str | None) -> str:
    """``model.logit_bias`` in effect: unset, ``train`` for the sigmoid loss and ``drop`` for the softmax ones."""
    if choice is not None:
        return choice
    return "train" if loss in BIASED_LOSSES else "drop"


def check_logit_bias(loss: str, choice: str | None) -> None:
    """Raise a ``ConfigError`` for the combinations that cannot work (a config check, before any work)."""
    if loss in BIASED_LOSSES and choice == "drop":
        raise ConfigError(
            "model.logit_bias",
            f"loss.name={loss} adds the bias to every logit and needs it; use freeze to keep it fixed, or train.",
        )
    if loss not in BIASED_LOSSES and choice == "train":
        raise ConfigError(
            "model.logit_bias",
            f"loss.name={loss} is a softmax over the batch, which a constant bias cannot change: the bias would get a "
            "zero gradient forever (and DDP would stop on it, OpenCLIP #1076). Use freeze (keep a SigLIP model's bias "
            "unchanged in the weights and in export) or drop (the default: remove it).",
        )


def gradient_shrinks_with_processes(loss: nn.Module) -> bool:
    """Whether DDP's averaged gradient of ``loss`` is ``1 / world_size`` of the one-process gradient of the same
    global batch: a CLIP-type loss without ``gather_with_grad`` (OpenCLIP's default, see :class:`ClipLoss`). With
    ``gather_with_grad``, and for SigLIP's loss, the gradient is the same at any number of processes.

    Example:
        >>> gradient_shrinks_with_processes(ClipLoss()), gradient_shrinks_with_processes(ClipLoss(True, True))
        (True, False)
    """
    return isinstance(loss, ClipLoss) and not loss.gather_with_grad


def model_init_overrides(loss: str, choice: str | None) -> dict[str, float]:
    """Architecture fields the model needs for ``loss`` and ``model.logit_bias``: SigLIP's initial scale and bias
    (OpenCLIP's), or a bias parameter to hold a pretrained one (``freeze`` with a softmax loss)."""
    overrides = dict(LOSS_MODEL_INIT.get(loss, {}))
    if logit_bias_choice(loss, choice) != "drop":
        overrides.setdefault("init_logit_bias", SIGLIP_LOGIT_BIAS_INIT)
    return overrides


def apply_logit_bias_choice(model: nn.Module, loss: str, choice: str | None) -> str:
    """Make ``model``'s bias what ``model.logit_bias`` says: removed (``drop``), fixed (``freeze``) or trained.

    Returns:
        the choice in effect.
    """
    choice = logit_bias_choice(loss, choice)
    if getattr(model, "logit_bias", None) is None:
        return choice
    if choice == "drop":
        model.logit_bias = None  # an architecture given a bias by model.overrides: no parameter left without gradient
    elif choice == "freeze":
        model.logit_bias.requires_grad_(False)
    return choice


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Builds a loss by its registry name (``loss.name``) from its constructor arguments.

    Raises:
        ConfigError: ``name`` is not registered (a ``ValueError``).
    """
    return LOSSES.get(name, "loss.name")(**kwargs)


def _rank_and_world_size() -> tuple[int, int]:
    """Returns ``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_with_grad(tensor: Tensor) -> tuple[Tensor, ...]:
    """All-gathers ``tensor`` with a backward that sums each slice's gradient onto the rank that owns it."""
    with warnings.catch_warnings():
        # torch >= 2.10 marks these collectives deprecated in favour of the private _functional_collectives; they
        # still work and give the reduce-scatter backward the losses rely on.
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional", category=FutureWarning)
        return dist_fn.all_gather(tensor)


def _all_reduce_with_grad(tensor: Tensor) -> Tensor:
    """Sums ``tensor`` over ranks with a backward that sums the gradients over ranks too."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional", category=FutureWarning)
        return dist_fn.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _send_recv(sends: list[tuple[Tensor, int]], recv_from: list[int], like: list[Tensor]) -> list[Tensor]:
    """Posts all ``sends`` (tensor, peer) and receives (one per ``recv_from`` peer) as one batch and waits for them."""
    received = [torch.zeros_like(t) for t in like]
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), peer) for tensor, peer in sends]
    ops += [dist.P2POp(dist.irecv, buffer, peer) for buffer, peer in zip(received, recv_from, strict=True)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    """Sends a tensor to ``to_rank`` and receives one from ``from_rank``; the backward sends gradients back."""

    @staticmethod
    def forward(ctx: Any, from_rank: int, to_rank: int, tensor: Tensor) -> Tensor:
        ctx.from_rank, ctx.to_rank = from_rank, to_rank
        (received,) = _send_recv([(tensor, to_rank)], [from_rank], [tensor])
        return received

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[None, None, Tensor]:
        return None, None, _NeighbourExchange.apply(ctx.to_rank, ctx.from_rank, grad_output)


class _NeighbourExchangeBidir(torch.autograd.Function):
    """Sends one tensor to each ring neighbour and receives one from each: returns ``(from_right, from_left)``."""

    @staticmethod
    def forward(ctx: Any, left_rank: int, right_rank: int, to_left: Tensor, to_right: Tensor) -> tuple[Tensor, Tensor]:
        ctx.left_rank, ctx.right_rank = left_rank, right_rank
        from_right, from_left = _send_recv(
            [(to_right, right_rank), (to_left, left_rank)], [right_rank, left_rank], [to_left, to_right]
        )
        return from_right, from_left

    @staticmethod
    def backward(ctx: Any, grad_from_right: Tensor, grad_from_left: Tensor) -> tuple[None, None, Tensor, Tensor]:
        # Mirror image of the forward: what came from the right goes back to the right, and vice versa. The result is
        # (gradient of to_left, gradient of to_right).
        grad_to_left, grad_to_right = _NeighbourExchangeBidir.apply(
            ctx.right_rank, ctx.left_rank, grad_from_right, grad_from_left
        )
        return None, None, grad_to_left, grad_to_right
