"""CLIPA-style short training: most of the run on low-resolution images and short captions, then a short phase
at full resolution and full caption length (Li, Wang and Xie, "An Inverse Scaling Law for CLIP Training",
NeurIPS 2023, https://arxiv.org/abs/2305.07017).

**What.** Until ``1 - finetune_fraction`` of the run, every training batch's images are resized to
``image_scale x image_size`` (rounded down to whole ViT patches; position embeddings resampled, see
:func:`cadenza.algorithms.progressive_resizing.allow_image_sizes`) and its captions cut to ``text_length`` tokens by
``text_mask`` masking (:func:`cadenza.algorithms.text_token_reduction.reduce_tokens`). The last
``finetune_fraction`` trains on full images and whole captions, which CLIPA found recovers most of the accuracy
the short sequences cost. Unlike ``progressive_resizing`` there is no ramp: two phases, as in the paper (which
fine-tunes in a second run; here it is the tail of one schedule, so one command and one checkpoint lineage).

**Evaluation is honest:** evaluation and zero-shot always see full-size images and whole prompts. The phase is a
function of the step and the masks draw from torch's global generator (checkpointed), so resume is exact.

**When it helps.** CLIPA's point: the image tower's cost falls with the square of the scale and the text tower's
with the caption length, while accuracy falls much less, more so for larger models; at a fixed compute budget the
shorter sequences see more samples. It hurts when the low-resolution phase cannot see what separates the classes,
or when the full-resolution phase is too short to adapt to it.

**Measured** (time to accuracy, `python benchmarks/time_to_accuracy.py --algorithms --seeds 0 1 2 --budget 30`;
digits, `tiny-vit`, seeds 0, 1, 2, 2 idle CPU cores (Sapphire Rapids), 2026-12-06 21:39-21:50 UTC): switched on in the
fastest recipe in place of its text-token reduction (`yamls/digits_fast.yaml`: Muon at lr 1.2e-2 with momentum 0.5 and
no warmup, an average of the weights with a half-life of 10 steps, the text embeddings frozen, captions cut to 8
tokens), 90% zero-shot top-1 in no seed (per seed never, never, never; the recipe: after epoch 1 in every seed, 7.5 s
by the median); its first two epochs train at 16 px on 8 tokens exactly as progressive resizing's do, and score the
same; best top-1 within 30 s 0.6992 against 0.9749 (-27.6 pt). README's method-card table has every algorithm side by
side.
"""

from __future__ import annotations

from cadenza.algorithms.progressive_resizing import allow_image_sizes, resize_images, scaled_size
from cadenza.algorithms.text_token_reduction import MODES, reduce_tokens, syntax_priorities
from cadenza.engine.algorithm import Algorithm
from cadenza.engine.event import Event
from cadenza.engine.logger import Logger
from cadenza.engine.registry import ALGORITHMS
from cadenza.engine.state import State


def in_short_phase(step: int, max_steps: int, finetune_fraction: float) -> bool:
    """Whether ``step`` (0-based) trains on short sequences: every step before the last ``finetune_fraction``.

    >>> [in_short_phase(s, 10, 0.2) for s in range(10)].count(True)
    8
    """
    return step < round((1.0 - finetune_fraction) * max_steps)


@ALGORITHMS.register("clipa")
class CLIPA(Algorithm):
    """Low resolution and short captions for most of the run, full size at the end.

    Args:
        image_scale: image side in the short phase, as a fraction of the model's, in (0, 1] (CLIPA: 0.25-0.5).
        text_length: tokens per caption in the short phase, start and end included (CLIPA: 8-32); null keeps
            captions whole.
        text_mask: ``random``, ``block`` or ``syntax`` (see ``text_token_reduction``).
        finetune_fraction: the last part of the run at full size, in [0, 1).
    """

    def __init__(
        self,
        image_scale: float = 0.5,
        text_length: int | None = 16,
        text_mask: str = "random",
        finetune_fraction: float = 0.1,
    ) -> None:
        if not 0 < image_scale <= 1:
            raise ValueError(f"image_scale must lie in (0, 1], got {image_scale}")
        if text_length is not None and text_length < 3:
            raise ValueError(f"text_length must be at least 3 (start, one token, end), got {text_length}")
        if text_mask not in MODES:
            raise ValueError(f"text_mask must be one of {MODES}, got {text_mask!r}")
        if not 0 <= finetune_fraction < 1:
            raise ValueError(f"finetune_fraction must lie in [0, 1), got {finetune_fraction}")
        self.image_scale = image_scale
        self.text_length = text_length
        self.text_mask = text_mask
        self.finetune_fraction = finetune_fraction
        self._priorities = syntax_priorities() if text_mask == "syntax" and text_length is not None else None
        self._patch = 1

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT or (
            event == Event.AFTER_DATALOADER
            and in_short_phase(state.timestamp.batch, state.max_batches, self.finetune_fraction)
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._patch = allow_image_sizes(state.model, "algorithms.clipa")
            return
        size = scaled_size(state.model.image_size, self.image_scale, self._patch)
        batch = []
        for images, tokens in state.batch:
            if self.text_length is not None:
                tokens = reduce_tokens(tokens, self.text_length, self.text_mask, priorities=self._priorities)
            batch.append((resize_images(images, size), tokens))
        state.batch = batch
