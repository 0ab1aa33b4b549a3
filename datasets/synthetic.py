"""Synthetic data: random images and captions, deterministic per index. For tests and speed runs."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from cadenza.datasets.context import LoaderContext
from cadenza.datasets.loader import resumable
from cadenza.engine.registry import DATASETS


class SyntheticDataset(Dataset):
    """``num_samples`` pairs of a standard-normal image and a random caption of token ids.

    Sample ``i`` depends only on ``(seed, i)``, so any order, worker count or resume point sees the
    same data. Captions are ``[SOT, random ids..., EOT, 0...]`` with lengths from 1 to ``max_caption_length``.

    Args:
        num_samples: the epoch's size.
        context: set by the trainer: the model's ``image_size``, ``context_length`` and ``vocab_size``, and
            ``seed`` (``run.seed``).
        max_caption_length: the most random ids in a caption (default: as many as the context holds). Real
            captions are short: this sets what ``model.trim_text_padding`` can save in a speed run.
    """

    def __init__(self, num_samples: int, context: LoaderContext, max_caption_length: int | None = None) -> None:
        if num_samples < 1:
            raise ValueError("num_samples must be at least 1")
        longest = context.context_length - 2  # SOT and EOT around the ids
        if max_caption_length is not None and not 1 <= max_caption_length <= longest:
            raise ValueError(f"max_caption_length must be from 1 to {longest} (the context holds SOT and EOT too)")
        self.max_caption_length = longest if max_caption_length is None else max_caption_length
        self.num_samples = num_samples
        self.image_size = context.image_size
        self.context_length = context.context_length
        self.vocab_size = context.vocab_size
        self.seed = context.seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.randn(3, self.image_size, self.image_size, generator=generator)  # (3, H, W)
        length = int(torch.randint(1, self.max_caption_length + 1, (1,), generator=generator))
        tokens = torch.zeros(self.context_length, dtype=torch.long)  # (L,)
        sot, eot = self.vocab_size - 2, self.vocab_size - 1
        tokens[0] = sot
        tokens[1 : length + 1] = torch.randint(1, sot, (length,), generator=generator)
        tokens[length + 1] = eot
        return image, tokens


DATASETS.register("synthetic")(resumable(SyntheticDataset))
