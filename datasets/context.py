"""What the trainer hands every dataset builder besides the YAML arguments."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cadenza.engine.dist import DistInfo


@dataclass(frozen=True)
class LoaderContext:
    """Runtime facts a dataset needs to load, transform and split its samples.

    Attributes:
        train: True for ``data.train`` (shuffled, augmented, drop-last), False for ``data.val``.
        batch_size: per process and micro-batch (``data.batch_size``).
        dist: this process's rank and the world size.
        seed: ``run.seed``: seeds shuffles and per-sample augmentation.
        image_size, context_length, vocab_size: the model's input sizes.
        transform: PIL image → tensor (OpenCLIP's train or val transform for the model).
        tokenizer: captions → ``(N, context_length)`` token ids.
        workers, pin_memory, persistent_workers, prefetch_factor: ``data.*`` loader settings.
        cache_dir: where a format that downloads keeps its local copy (``<run folder>/data-cache``);
            ``None`` outside a trainer.
    """

    train: bool
    batch_size: int
    dist: DistInfo = field(default_factory=DistInfo)
    seed: int = 0
    image_size: int = 224
    context_length: int = 77
    vocab_size: int = 49408
    transform: Callable[[Any], Any] | None = None
    tokenizer: Callable[[Any], Any] | None = None
    workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int = 2
    cache_dir: str | None = None
