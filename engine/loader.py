"""The loader contract: what the trainer, the checkpoint and the callbacks use of ``data.train`` and ``data.val``.

Every dataset type builds an object with these members (``DATASETS.build(type, args, key, context=...)``
returns one), so nothing above the kernel probes a loader for what it can do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch


class Loader(Protocol):
    """Batches of ``(images, tokens)`` for one process, in epochs, that resume exactly where a checkpoint stopped.

    The trainer drives it like this (``state.train_loader``; ``state.eval_loader`` gets ``set_epoch(0)`` and one
    pass before every evaluation)::

        loader.load_state_dict(checkpoint["dataloader"])   # resuming: continue mid-epoch
        while training:
            batches = iter(loader)                         # the rest of the current epoch
            for _ in range(loader.batches_per_epoch - batches_done):
                images, tokens = next(batches)             # (B, 3, H, W), (B, L)
                ...                                        # a checkpoint saves loader.state_dict()
            loader.set_epoch(epoch + 1)

    Members:
        batches_per_epoch: the batches each process yields in an epoch. In training every process yields exactly
            that many, each of the per-process batch size, so processes stay in step; an evaluation loader may
            end its pass earlier or later (0 when its size is unknown).
        skipped: samples this process skipped (corrupt, missing, empty) since the loader was built, never
            reset; the trainer sums it over processes as ``data/skipped``. 0 for a source that cannot fail.
        set_epoch(epoch): move to the start of ``epoch``; the next ``iter`` yields all of it.
        __iter__(): yield the rest of the current epoch as ``(images, tokens)`` pairs of tensors, ``images``
            ``(B, 3, H, W)`` floats and ``tokens`` ``(B, L)`` token ids, or ``(images, tokens, extras)`` where the
            batch carries more: ``extras`` maps names to per-sample tensors (first dimension ``B``), such as every
            caption of each image in evaluation or stored teacher embeddings that an algorithm asked for (the
            trainer puts them in ``state.extras``). What is yielded depends only on the seed, the epoch and the
            position in it, never on the worker count.
        state_dict(): where the loader is (epoch, position, and whatever else resuming needs), in plain Python
            types that ``torch.load(weights_only=True)`` reads; taken between batches, on every process.
        load_state_dict(state): continue from ``state_dict()``'s output, before the next ``iter``: a loader built
            from the same config then yields exactly the batches the saved one had not yet yielded.
        close(): stop the loader's worker processes now (``data.persistent_workers`` keeps them between epochs,
            and they would otherwise live, idle, as long as the loader); a later ``iter`` starts new ones. The
            trainer closes its loaders when ``fit`` ends.
    """

    @property
    def batches_per_epoch(self) -> int: ...

    @property
    def skipped(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...
