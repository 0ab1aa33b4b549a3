"""What the trainer hands every dataset builder besides the YAML arguments."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cadenza.engine.dist import DistInfo

#: the ``extras`` name of stored teacher embeddings (``algorithms.distillation: {source: stored}`` asks for it)
TEACHER_EMBEDDINGS = "teacher_embeddings"


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
        augment: the ``data.augment`` values ``transform`` was built from (a format that replays stored augmented
            views checks them against the stored ones).
        extras: what training batches must carry besides images and tokens, for the algorithms that read it
            (``teacher_embeddings``: stored teacher embeddings, from ``composer convert --teacher`` shards); a
            format that cannot carry one refuses it with a ``ValueError``.
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
    augment: Mapping[str, Any] | None = None
    extras: frozenset[str] = frozenset()

    def worker_options(self) -> dict[str, Any]:
        """The ``DataLoader`` arguments that apply only with worker processes (it refuses them without)."""
        if self.workers == 0:
            return {}
        return {
            "persistent_workers": self.persistent_workers,
            "prefetch_factor": self.prefetch_factor,
            "worker_init_fn": share_batches_by_name,
        }


def share_batches_by_name(worker_id: int) -> None:
    """In a DataLoader worker: send batches to the training process as named shared memory (torch's
    ``file_system`` strategy, whose segments torch_shm_manager removes) instead of passing a file descriptor per
    tensor, which costs a socket connection and an authentication handshake with the worker each time: 14% of a
    quickstart worker's CPU time on a 2-core EPYC."""
    import torch.multiprocessing

    torch.multiprocessing.set_sharing_strategy("file_system")
