"""Resumable loading for map-style datasets: a seeded global order, split across processes, that can
start anywhere in an epoch.

The order of epoch ``e`` is a permutation seeded by ``(seed, e)``; global batch ``k`` is
``order[k*W*B : (k+1)*W*B]`` and rank ``r`` takes its ``r``-th slice of ``B``. The loader's state is
``(epoch, samples consumed in the epoch by all ranks)``, so a run resumed with another number of
processes (or workers) continues with exactly the samples it had not seen.

A dataset that sets ``epoch_keys = True`` is indexed with ``(epoch, index)`` pairs, so it can seed each
sample's augmentation from ``(seed, epoch, index)`` (see ``samples.py``). A dataset whose ``collate_fn``
returns ``SampleBatch`` reports skipped samples through it; the loader strips them, yields ``(images,
tokens)`` (plus the batch's ``extras``, when it has any: every caption of each image in evaluation) and counts them in
``skipped``.

``ResumableLoader`` is a ``cadenza.engine.loader.Loader``; a map-style format registers ``resumable(its class)``,
so that ``DATASETS.build`` returns the loader, as it does for the formats with loaders of their own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cadenza.datasets.context import LoaderContext
from cadenza.datasets.samples import SampleBatch, SkipCounter
from cadenza.engine.dist import DistInfo
from cadenza.engine.errors import ConfigError


def stop_workers(loader: DataLoader) -> None:
    """Stop ``loader``'s persistent worker processes now; its next iteration starts new ones.

    A ``DataLoader`` with ``persistent_workers`` keeps its workers' iterator until the loader itself is collected,
    and a finished trainer is often collected late (its objects refer to each other): its idle workers then
    outlive it, and are shut down at whatever garbage collection finds them, waiting there up to 5 s each.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        loader._iterator = None
        iterator._shutdown_workers()


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class ResumableSampler(Sampler[int]):
    """This rank's indices for one epoch, starting after ``start`` globally consumed samples.

    With ``epoch_keys`` it yields ``(epoch, index)`` pairs instead of indices.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        dist: DistInfo,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        epoch_keys: bool = False,
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.dist = dist
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch_keys = epoch_keys
        self.epoch = 0
        self.start = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.dist.world_size

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch
        return -(-self.num_samples // self.global_batch)

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle)
        end = self.batches_per_epoch() * self.global_batch if self.drop_last else self.num_samples
        for first in range(self.start, end, self.global_batch):
            chunk = order[first : min(first + self.global_batch, end)]
            mine = chunk[self.dist.rank * self.batch_size : (self.dist.rank + 1) * self.batch_size].tolist()
            yield from ((self.epoch, index) for index in mine) if self.epoch_keys else mine

    def __len__(self) -> int:
        end = self.batches_per_epoch() * self.global_batch if self.drop_last else self.num_samples
        full, rest = divmod(max(end - self.start, 0), self.global_batch)
        return full * self.batch_size + min(self.batch_size, max(rest - self.dist.rank * self.batch_size, 0))


class ResumableLoader:
    """Batches of ``(images, tokens)`` from a map-style dataset, with ``state_dict`` for exact resume (a ``Loader``).

    Training (``context.train``) shuffles with a per-epoch seed and drops the last partial global
    batch; evaluation visits every sample once, in order.

    Args:
        dataset: returns ``(image tensor, token ids)`` for an index.
        context: batch size, rank/world size, seed and ``DataLoader`` settings.
    """

    def __init__(self, dataset: Dataset, context: LoaderContext) -> None:
        self.dataset = dataset
        self.batch_size = context.batch_size
        self.sampler = ResumableSampler(
            len(dataset),
            context.batch_size,
            context.dist,
            context.seed,
            shuffle=context.train,
            drop_last=context.train,
            epoch_keys=getattr(dataset, "epoch_keys", False),
        )
        if self.sampler.batches_per_epoch() == 0:
            raise ValueError(
                f"the dataset has {len(dataset)} samples, fewer than one global batch "
                f"({context.batch_size} x {context.dist.world_size} processes); lower data.batch_size or add data"
            )
        self.loader = DataLoader(
            dataset,
            batch_size=context.batch_size,
            sampler=self.sampler,
            num_workers=context.workers,
            pin_memory=context.pin_memory,
            drop_last=False,
            collate_fn=getattr(dataset, "collate_fn", None),
            generator=torch.Generator().manual_seed(context.seed),  # worker seeds never draw from the training RNG
            **context.worker_options(),
        )
        self._consumed_batches = 0
        self._skips = SkipCounter(str(getattr(dataset, "source", type(dataset).__name__)))

    @property
    def skipped(self) -> int:
        """Samples this process skipped (and replaced) since the loader was built."""
        return self._skips.skipped

    @property
    def batches_per_epoch(self) -> int:
        """Batches of ``batch_size`` each process gets per epoch."""
        return self.sampler.batches_per_epoch()

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``."""
        self.sampler.epoch = epoch
        self.sampler.start = 0
        self._consumed_batches = 0

    def __iter__(self) -> Iterator[Any]:
        """Yield the rest of the current epoch (all of it after ``set_epoch``)."""
        for batch in self.loader:
            self._consumed_batches += 1
            if isinstance(batch, SampleBatch):
                self._skips.add(batch.skipped)
                batch = batch.as_tuple()
            yield batch

    def state_dict(self) -> dict[str, int]:
        consumed = self.sampler.start + self._consumed_batches * self.sampler.global_batch
        return {"epoch": self.sampler.epoch, "sample_in_epoch": consumed}

    def close(self) -> None:
        """Stop the worker processes (a later iteration starts new ones)."""
        stop_workers(self.loader)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.epoch = int(state["epoch"])
        self.sampler.start = int(state["sample_in_epoch"])
        self._consumed_batches = 0
        if self.sampler.start % self.sampler.global_batch:
            raise ValueError(
                f"the checkpoint stopped after {self.sampler.start} samples of epoch {self.sampler.epoch}, "
                f"not a multiple of the global batch ({self.sampler.global_batch}); resume with the same "
                "data.batch_size x processes, or one that divides it"
            )


def resumable(dataset_class: Callable[..., Dataset]) -> Callable[..., ResumableLoader]:
    """The ``DATASETS`` builder of a map-style dataset: ``dataset_class(**args, context=context)`` in a
    ``ResumableLoader``.

    The builder's signature is the class's (its YAML arguments and ``context``), so the registry checks YAML against
    it. A dataset smaller than one global batch is a ``ConfigError`` of ``data.batch_size``. A map-style format carries
    no ``extras`` in training: asking for some is a ``ValueError`` (the registry makes it a ``ConfigError`` of the
    section).

    Args:
        dataset_class: a map-style dataset whose arguments include ``context: LoaderContext``.
    """

    def build(**args: Any) -> ResumableLoader:
        dataset = dataset_class(**args)
        extras = args["context"].extras
        if extras:  # a ValueError: the registry names the section
            raise ValueError(
                f"{getattr(dataset, 'source', dataset_class.__name__)} cannot carry {', '.join(sorted(extras))} "
                "(stored teacher embeddings come from MDS shards written by composer convert --teacher: type streaming)"
            )
        try:
            return ResumableLoader(dataset, args["context"])
        except ValueError as error:
            raise ConfigError("data.batch_size", str(error)) from error

    build.__signature__ = inspect.signature(dataset_class).replace(return_annotation="ResumableLoader")
    build.__name__ = build.__qualname__ = f"resumable({dataset_class.__name__})"
    build.__doc__ = dataset_class.__doc__
    return build
