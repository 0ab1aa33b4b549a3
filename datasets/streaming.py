"""MosaicML ``streaming``: MDS shards on S3 (or disk), a seeded global shuffle, exact and elastic resume.

``data.train.type: streaming`` reads image–caption MDS shards (``composer convert`` writes them) with
``streaming.StreamingDataset``. Where a run stopped is ``(epoch, samples consumed by all processes)``
plus the shuffle's fixed parameters; a resumed run — on the same or a different number of processes
or workers — continues with exactly the samples it had not seen (streaming's elastic resume: 2
processes x batch 4 and 1 process x batch 8 see identical global batches).

The traps of streaming 0.13 this module handles (see the project's streaming notes):

- the dataset's ``batch_size`` is the per-process batch of the ``DataLoader`` (else resume loses and
  duplicates samples);
- ``shuffle_seed`` and ``num_canonical_nodes`` are fixed at the first run and taken from the
  checkpoint on resume; a config that contradicts the checkpoint is an error;
- a resume (or a second pass over an epoch) uses a *fresh* dataset and ``StreamingDataLoader``, with
  the state loaded before iterating — an iterated dataset treats an older state as stale;
- a state saved at the very end of an epoch is rewritten to "next epoch, 0 samples";
- ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` are exported before a dataset is
  built (under SLURM only ``SLURM_*`` are set);
- S3 goes through boto3 and ``S3_ENDPOINT_URL``.

Images are read as their stored bytes and decoded with PIL (JPEGs in draft mode, at the smallest
scale that still covers the model's input: faster than ``torchvision.io`` once augmentation is
counted, see ``benchmarks/data_throughput.py``). A sample whose image or caption does not decode is
replaced by a fixed substitute and counted (``skipped``, ``data/skipped``), so batches stay full and
resume stays exact; a source where nothing decodes is a ``DataError`` naming it (see ``samples.py``).
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import tempfile
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from cadenza.datasets.context import TEACHER_EMBEDDINGS, LoaderContext
from cadenza.datasets.loader import stop_workers
from cadenza.datasets.samples import CaptionRule, SampleCollator, SkipCounter
from cadenza.engine.dist import DistInfo
from cadenza.engine.errors import CadenzaError, ConfigError, DataError
from cadenza.engine.object_store import is_url
from cadenza.engine.registry import DATASETS

log = logging.getLogger("cadenza")

#: ``streams:`` entries: where a stream is, and how much of it an epoch takes (one of the last three)
STREAM_KEYS = ("remote", "local", "split", "proportion", "repeat", "choose")


def export_world_env(info: DistInfo) -> None:
    """Set the variables streaming reads its rank and world from, where a launcher did not (SLURM, tests).

    A single process needs nothing: streaming's defaults are rank 0 of 1.
    """
    if info.world_size == 1:
        return
    local_world = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "")
    local_world = local_world.split("(")[0].split(",")[0]  # SLURM writes e.g. "4(x2)"
    for name, value in (
        ("RANK", info.rank),
        ("WORLD_SIZE", info.world_size),
        ("LOCAL_RANK", info.local_rank),
        ("LOCAL_WORLD_SIZE", local_world if local_world.isdigit() else info.world_size),
    ):
        os.environ.setdefault(name, str(value))


# -- the loader ------------------------------------------------------------------------------------------
#: the MDS datasets of this process not yet collected (weak references)
_DATASETS: weakref.WeakSet = weakref.WeakSet()


@DATASETS.register("streaming")
class StreamingLoader:
    """Batches of ``(images, tokens)`` from MDS shards, with ``state_dict`` for exact, elastic resume (a ``Loader``).

    Training shuffles (seeded) and drops the last partial global batch; evaluation reads every sample in
    order (with several processes, streaming pads each process's share with repeated samples).

    Args:
        remote: the shards: ``s3://bucket/prefix`` or a local folder (read in place unless ``local`` is set).
        local: cache folder for a remote; default ``<run folder>/data-cache/streaming-<train|val>``.
        streams: instead of ``remote``/``local``, several sources mixed per epoch, each a mapping with
            ``remote``, optional ``local`` and ``split``, and one of ``proportion`` (share of the epoch),
            ``repeat`` (times its size) or ``choose`` (samples).
        split: a subfolder of every remote / local.
        image_key: the image column (MDS encoding ``jpeg``, ``png``, ``bytes`` or ``pil``).
        caption_key: the caption column (``str``).
        captions: several caption columns instead (``str`` holding one caption or a JSON list, or ``json``): a
            column name or a list of them (one caption drawn uniformly per step), or a mapping of column names to
            weights (see ``samples.CaptionRule``); evaluation scores every caption of an image.
        num_samples: samples per epoch (streaming's ``epoch_size``); default every sample once.
        shuffle: default: shuffle when training.
        shuffle_seed: default ``run.seed``. Fixed for a run: a checkpoint keeps it.
        shuffle_algo, shuffle_block_size: streaming's shuffle (``py1e``; block default from the data).
        num_canonical_nodes: streaming's canonical node count, which makes resume elastic; default the
            number of nodes of the first run. Fixed for a run: a checkpoint keeps it.
        predownload, cache_limit, download_retry, download_timeout, validate_hash: streaming's download
            settings (``validate_hash: xxh64`` checks shards written by ``composer convert``).
        context: batch size, processes, transform and tokenizer (from the trainer).
    """

    def __init__(
        self,
        remote: str | None = None,
        local: str | None = None,
        streams: list[dict[str, Any]] | None = None,
        split: str | None = None,
        image_key: str = "jpg",
        caption_key: str = "txt",
        captions: str | list[str] | dict[str, float] | None = None,
        num_samples: int | None = None,
        shuffle: bool | None = None,
        shuffle_seed: int | None = None,
        shuffle_algo: str = "py1e",
        shuffle_block_size: int | None = None,
        num_canonical_nodes: int | None = None,
        predownload: int | None = None,
        cache_limit: int | str | None = None,
        download_retry: int = 2,
        download_timeout: float = 60.0,
        validate_hash: str | None = None,
        *,
        context: LoaderContext,
    ) -> None:
        if (remote is None) == (streams is None):
            raise ValueError("set either remote (one source) or streams (several), not both or neither")
        if streams is not None and local is not None:
            raise ValueError("local is per stream when streams are given: set streams[i].local")
        if download_retry < 1:
            raise ValueError("download_retry counts attempts: it must be at least 1")
        if num_samples is not None and num_samples < 1:
            raise ValueError("num_samples must be at least 1")
        if captions is not None and caption_key != "txt":
            raise ValueError("set either captions (several caption columns) or caption_key (one), not both")
        unknown = set(context.extras) - {TEACHER_EMBEDDINGS}
        if unknown:
            raise ValueError(f"streaming data cannot carry {', '.join(sorted(unknown))}")
        rule = CaptionRule(captions, caption_key)
        self.context = context
        self.train = context.train
        self.batch_size = context.batch_size
        self.global_batch = context.batch_size * context.dist.world_size
        self.shuffle = context.train if shuffle is None else shuffle
        self.shuffle_seed = context.seed if shuffle_seed is None else shuffle_seed
        self._fixed = {"shuffle_seed": shuffle_seed, "num_canonical_nodes": num_canonical_nodes}
        self.sources = self._sources(remote, local, streams, split)
        self.reinforced = self._reinforcement(rule) if TEACHER_EMBEDDINGS in context.extras else None
        export_world_env(context.dist)
        nodes = max(context.dist.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
        self.num_canonical_nodes = num_canonical_nodes or nodes
        self.initial_physical_nodes = nodes
        self._dataset_args = {
            "image_key": image_key,
            "caption_key": caption_key,
            "captions": captions,
            "train": context.train,
            "reinforced": self.reinforced,
            "transform": context.transform,
            "augment_seed": context.seed if context.train else None,
            "draft_size": context.image_size,
            "epoch_size": num_samples,
            "batch_size": context.batch_size,  # the per-process DataLoader batch: exact resume needs it
            "shuffle": self.shuffle,
            "shuffle_algo": shuffle_algo,
            "shuffle_block_size": shuffle_block_size,
            "predownload": predownload,
            "cache_limit": cache_limit,
            "download_retry": download_retry,
            "download_timeout": download_timeout,
            "validate_hash": validate_hash,
            "source": f"streaming {self.describe()}",
        }
        self.epoch = 0
        self.sample_in_epoch = 0  # consumed by all processes
        self._skips = SkipCounter(f"streaming {self.describe()}")
        self.dataset = self.loader = None
        self._build()
        self._check_cache_limit()
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"an epoch has {self.dataset.epoch_size} samples, fewer than one global batch "
                f"({context.batch_size} x {context.dist.world_size} processes); lower data.batch_size or add data"
            )

    def _check_cache_limit(self) -> None:
        """Warn when ``cache_limit`` cannot hold the shards its readers may need at once.

        Each reader (a DataLoader worker, or the process without workers; the processes of a node share the
        cache) downloads ``predownload`` samples ahead. Shuffled, each of them may sit in another shard; in
        order, they span a few shards. When those do not fit, streaming evicts shards that are still to be
        read and downloads them again (thrashing). A reader waiting for a shard that gets evicted fetches it
        again (``MDSImageCaptions._ready_thread``; streaming 0.13's own waited forever), but every sample may
        then cost a download.
        """
        dataset = self.dataset
        if not dataset.cache_limit:
            return
        largest = max(shard.get_max_size() for shard in dataset.shards)
        readers = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) * max(self.context.workers, 1)
        window = int(dataset.predownload)
        if self.shuffle:
            per_reader = window
        else:
            per_reader = -(-window // max(int(statistics.median(dataset.samples_per_shard)), 1)) + 1
        in_use = min(readers * per_reader + 1, dataset.num_shards)  # + 1: the shard being downloaded
        if dataset.cache_limit < in_use * largest:
            order = "shuffled" if self.shuffle else "in order"
            log.warning(
                "streaming %s: cache_limit (%d bytes) holds %d of its largest shards (%d bytes), but up to %d can be "
                "in use at once (%d readers x predownload %d samples, %s). streaming then evicts shards before they are "
                "read and downloads them again and again. Raise cache_limit to at least %d bytes, or "
                "lower predownload or data.workers.",
                self.describe(), dataset.cache_limit, dataset.cache_limit // largest, largest, in_use, readers,
                window, order, in_use * largest,
            )  # fmt: skip

    def _reinforcement(self, rule: CaptionRule) -> dict[str, Any]:
        """The stored teacher embeddings' metadata, the same in every source and usable as configured (else a
        ``ConfigError`` naming the key to change)."""
        from cadenza.datasets.reinforced import check_reinforcement, read_reinforcement

        found = []
        for source in self.sources:
            root = source["remote"] or source["local"]
            root = f"{root.rstrip('/')}/{source['split']}" if source.get("split") else root
            try:
                meta = read_reinforcement(root)
            except DataError as error:
                raise ConfigError("algorithms.distillation", f"stored teacher embeddings: {error}") from None
            if meta is None:
                raise ConfigError(
                    "algorithms.distillation",
                    f"{root} stores no teacher embeddings; write them with composer convert --teacher MODEL[:pretrained]"
                    " (see README, Reinforced data), or distil from a teacher run online (source: online)",
                )
            check_reinforcement(meta, rule.fields, self.context.augment, root)
            found.append((root, meta))
        first_root, first = found[0]
        for root, meta in found[1:]:
            if {k: v for k, v in meta.items() if k != "seed"} != {k: v for k, v in first.items() if k != "seed"}:
                raise ConfigError(
                    "data.train.streams", f"{root} and {first_root} store different teachers, views or augmentation"
                )
        return first

    def _sources(self, remote, local, streams, split) -> list[dict[str, Any]]:
        """One mapping of ``Stream`` arguments per source, with its local folder decided."""
        cache = self.context.cache_dir or os.path.join(tempfile.gettempdir(), "cadenza-streaming")
        cache = os.path.join(cache, f"streaming-{'train' if self.train else 'val'}")
        if streams is None:
            streams = [{"remote": remote, "local": local}]
        elif not streams:
            raise ValueError("streams is empty")
        sources = []
        for index, stream in enumerate(streams):
            unknown = set(stream) - set(STREAM_KEYS)
            if unknown:
                raise ValueError(
                    f"streams[{index}] has unknown keys {sorted(unknown)}; valid: {', '.join(STREAM_KEYS)}"
                )
            if not stream.get("remote"):
                raise ValueError(f"streams[{index}] needs a remote (s3://bucket/prefix or a folder)")
            source = {"split": split, **stream}
            if source.get("local") is None:
                if is_url(source["remote"]):  # s3:// and the other schemes streaming reads
                    source["local"] = cache if len(streams) == 1 else os.path.join(cache, str(index))
                else:  # a local folder is read in place
                    source["remote"], source["local"] = None, source["remote"]
            sources.append(source)
        return sources

    def _build(self) -> None:
        """A fresh dataset and ``StreamingDataLoader`` (the old ones are released first)."""
        # imported here, not at the top: mds imports streaming (0.3 s), which a run on other data never needs
        from cadenza.datasets.mds import MDSImageCaptions
        from cadenza.datasets.streaming_import import load_streaming

        streaming = load_streaming()  # without transformers

        self._release()
        streams = [streaming.Stream(**source) for source in self.sources]
        try:
            self.dataset = MDSImageCaptions(
                streams=streams, num_canonical_nodes=self.num_canonical_nodes, shuffle_seed=self.shuffle_seed,
                **self._dataset_args,
            )  # fmt: skip
        except (CadenzaError, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - streaming's index download: botocore, OS and its own errors
            reason = " ".join(str(error).split()) or type(error).__name__
            raise DataError(
                f"cannot open the MDS shards of streaming {self.describe()}: {reason} ({type(error).__name__}). "
                "Check that the remote is a folder or s3:// prefix holding index.json (composer convert writes one), "
                "and for s3:// the bucket, S3_ENDPOINT_URL and the credentials."
            ) from None
        _DATASETS.add(self.dataset)
        context = self.context
        self.loader = streaming.StreamingDataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=context.workers,
            pin_memory=context.pin_memory,
            collate_fn=SampleCollator(
                context.tokenizer, (3, context.image_size, context.image_size), context.context_length
            ),
            drop_last=False,
            **context.worker_options(),
        )

    def _release(self) -> None:
        """Drop the dataset and loader, so that a new one can take over their shared memory (streaming names it after
        the local folder, and frees it when the dataset is collected)."""
        self.close()
        self.dataset = self.loader = None
        if _DATASETS:  # one built earlier in this process is not collected yet (a cycle, or this loader's last one)
            gc.collect()  # 0.2 s with torch loaded: not at a process's first build, where there is none

    @property
    def batches_per_epoch(self) -> int:
        """Batches of ``batch_size`` each process gets per epoch."""
        if self.train:
            return self.dataset.epoch_size // self.global_batch
        return -(-len(self.dataset) // self.batch_size)

    @property
    def samples_per_epoch(self) -> int:
        """Samples (over all processes) that an epoch's batches hold."""
        if self.train:
            return self.batches_per_epoch * self.global_batch
        return self.dataset.epoch_size

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``."""
        self.epoch, self.sample_in_epoch = epoch, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the rest of the current epoch (all of it after ``set_epoch``)."""
        if self.sample_in_epoch >= self.samples_per_epoch:
            return
        if self.epoch < self.dataset.next_epoch:
            self._build()  # this dataset already began this epoch (or a later one): its state would be stale
        self.dataset.load_state_dict(self._streaming_state())
        remaining = (self.samples_per_epoch - self.sample_in_epoch + self.global_batch - 1) // self.global_batch
        batches = iter(self.loader)
        try:
            for _ in range(remaining):
                try:
                    batch = next(batches)
                except StopIteration:
                    return  # evaluation: this process's share ended
                self.sample_in_epoch += self.global_batch
                self._skips.add(batch.skipped)
                yield batch.as_tuple()
        finally:
            self._stop_threads()

    def _stop_threads(self) -> None:
        """Stop streaming's download and ready threads in this process (``workers: 0``), and wait for them.

        Streaming stops them when its sample generator runs out or the next epoch begins; an epoch left early
        (this loop stops after its batches; a step that raises) would leave them running, downloading ahead,
        until then. With workers they run in the worker processes, which stop or persist with the loader.
        """
        iterator = getattr(self.dataset, "_iterator", None)  # streaming's, for the epoch being read here
        if iterator is not None:
            iterator.exit()

    def close(self) -> None:
        """Stop the worker processes (a later iteration starts new ones)."""
        if self.loader is not None:
            stop_workers(self.loader)

    @property
    def skipped(self) -> int:
        """Samples this process skipped (and replaced) since the loader was built."""
        return self._skips.skipped

    def describe(self) -> str:
        """The sources, for messages."""
        return ", ".join(str(s["remote"] or s["local"]) for s in self.sources)

    def _streaming_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "sample_in_epoch": self.sample_in_epoch,
            "num_canonical_nodes": self.num_canonical_nodes,
            "shuffle_seed": self.shuffle_seed,
            "initial_physical_nodes": self.initial_physical_nodes,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the run is: epoch, samples consumed by all processes, the shuffle's fixed parameters."""
        state = self._streaming_state()
        if self.train and state["sample_in_epoch"] >= self.samples_per_epoch:  # the epoch's end: the next one
            state.update(epoch=self.epoch + 1, sample_in_epoch=0)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` stopped, on this run's number of processes and workers."""
        for key in ("shuffle_seed", "num_canonical_nodes"):
            if self._fixed[key] is not None and self._fixed[key] != state[key]:
                raise ValueError(
                    f"the checkpoint's data loader used {key}={state[key]}, this config sets {self._fixed[key]}; "
                    f"changing it mid-run repeats and skips samples. Remove data.train.{key} or set it to {state[key]}"
                )
        self.shuffle_seed = int(state["shuffle_seed"])
        self.num_canonical_nodes = int(state["num_canonical_nodes"])
        self.initial_physical_nodes = state.get("initial_physical_nodes")
        self.epoch, self.sample_in_epoch = int(state["epoch"]), int(state["sample_in_epoch"])
        if self.train and self.sample_in_epoch >= self.samples_per_epoch:
            self.epoch, self.sample_in_epoch = self.epoch + 1, 0  # resuming at an epoch's end: the next epoch
        if self.sample_in_epoch % self.global_batch:
            raise ValueError(
                f"the checkpoint stopped after {self.sample_in_epoch} samples of epoch {self.epoch}, not a multiple "
                f"of the global batch ({self.global_batch}); resume with the same data.batch_size x processes"
            )
        if self.dataset.next_epoch > 0:
            self._build()  # resume on a fresh dataset: an iterated one may take the state for a stale one


__all__ = ["StreamingLoader", "export_world_env"]
