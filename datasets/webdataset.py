"""WebDataset: ``.tar`` shards of ``key.jpg`` / ``key.png`` / ``key.webp`` + ``key.txt``, local or on S3.

``path`` is OpenCLIP's ``--train-data`` string: brace expansion (``/data/{00000..00099}.tar``), sources joined
by ``::`` (with ``upsampling_factors`` per source in resampled mode), ``s3://bucket/...`` shards read through
boto3. The epoch's length comes from ``num_samples`` or from ``sizes.json`` (``{shard file name: count}``)
or OpenCLIP's ``__len__`` file next to the shards.

**Order.** Every epoch, the shards are permuted with a seed from ``(run.seed, epoch)`` and dealt to the
processes (``shards[rank::world]``); a process reads its shards in turn (and, if they run out before the
epoch's share of samples, passes over them again in a new seeded order). With ``resampled: true`` (OpenCLIP's
``--dataset-resampled``) each process instead draws shards with replacement, weighted by the upsampling
factors, draw ``i`` seeded from ``(run.seed, epoch, rank, i)``. Samples then pass through a shuffle buffer
(``shuffle_buffer`` samples, like OpenCLIP's) whose ``n``-th pick is seeded from ``(run.seed, epoch, rank,
n)``. So the sequence of samples is a pure function of (seed, epoch, rank, position), unlike OpenCLIP's
(issue #734).

**Workers.** Reading the tar members (cheap, sequential) and the shuffle happen in the training process;
DataLoader workers only decode and transform whole batches, returned in order. The sequence therefore does
not depend on the number of workers, and each sample's augmentation is seeded from (seed, epoch, rank,
position). A resumed run may use another ``data.workers``.

**Resume.** The loader's state is, per process, the shard cursor, the byte offset of the next sample in that
shard, the shuffle's position (its RNG state) and the byte ranges of the samples in the shuffle buffer; a
resumed run re-reads those ranges (range requests on S3) and continues exactly. It needs the same number of
processes.

**Several captions.** ``captions`` names caption fields: members (``txt``, ``syn.txt``: the name after the key's
first dot) or keys of the sample's ``.json`` member; each holds one caption or a JSON list of them (see
``samples.CaptionRule``). A training step draws one, seeded from (seed, epoch, rank, position); evaluation scores every
caption of an image.

**Bad data.** A missing shard, a truncated or corrupt tar, a sample without an image or caption, an image that
does not decode and an empty caption are skipped and counted (``data/skipped``, reasons in ``out.log``); the
loader takes the next sample so batches stay full. A source where nothing can be read or decoded raises
``DataError``.
"""

from __future__ import annotations

import bisect
import fnmatch
import glob
import json
import logging
import math
import tarfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cadenza.datasets.context import LoaderContext
from cadenza.datasets.loader import stop_workers
from cadenza.datasets.samples import (
    CAPTION_SALT,
    MAX_SUBSTITUTES,
    CaptionRule,
    Sample,
    SampleBatch,
    SampleCollator,
    SampleError,
    SkipCounter,
    Skipped,
    batch_tuple,
    concat_extras,
    decode_image,
    mix64,
    nothing_decodes,
    sample_seed,
    transform_sample,
)
from cadenza.engine import dist
from cadenza.engine.errors import DataError
from cadenza.engine.object_store import (
    ObjectStoreError,
    get_object_store,
    is_remote,
    is_url,
    open_url,
    read_url,
    url_basename,
    url_dirname,
)
from cadenza.engine.registry import DATASETS

log = logging.getLogger("cadenza")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # OpenCLIP's "jpg;png;jpeg;webp"
CAPTION_EXTENSION = "txt"
DEFAULT_SHUFFLE_BUFFER = 5000  # OpenCLIP's _SAMPLE_SHUFFLE_SIZE
SHARD_DONE = -1  # a resume offset meaning "this shard is finished"
_PASS_END = object()  # what the shard reader returns between two passes while the shuffle buffer drains
_BLOCK = 512
_SHUFFLE_SALT = 0x5348_5546  # keeps the shuffle's draws apart from the resampling draws
_AUGMENT_SALT = 0x4155_474D


# -- shard lists ------------------------------------------------------------------------------------------
def _glob(url: str) -> list[str]:
    """``url`` itself, or the shards its ``*``, ``?`` or ``[...]`` matches (sorted), in a folder or an s3:// prefix."""
    if not any(c in url for c in "*?["):
        return [url]
    folder, pattern = url_dirname(url), url_basename(url)
    if any(c in folder for c in "*?["):
        raise ValueError(f"'{url}': only the file name may hold a wildcard, not the folders")
    if is_remote(url):
        names = sorted(get_object_store(folder).list())
        found = [f"{folder}/{name}" for name in names if "/" not in name and fnmatch.fnmatchcase(name, pattern)]
    elif is_url(url):
        raise ValueError(f"'{url}': wildcards work in local folders and s3:// prefixes only; list the shards")
    else:
        found = sorted(glob.glob(url))
    if not found:
        raise ValueError(f"'{url}' matches no file")
    return found


def expand_sources(path: str, upsampling_factors: list[float] | str | None = None) -> tuple[list[str], list[float]]:
    """OpenCLIP's ``expand_urls``: split ``::`` sources, expand braces; one weight per shard (its source's factor)."""
    from webdataset.shardlists import expand_urls

    sources = [s for s in path.split("::") if s]
    if isinstance(upsampling_factors, str):
        upsampling_factors = [float(f) for f in upsampling_factors.split("::")]
    factors = list(upsampling_factors) if upsampling_factors is not None else [1.0] * len(sources)
    if len(factors) != len(sources):
        raise ValueError(f"upsampling_factors has {len(factors)} values for {len(sources)} '::'-joined sources in path")
    if any(not f > 0 for f in factors):
        raise ValueError(f"upsampling_factors must be positive, got {factors}")
    urls: list[str] = []
    weights: list[float] = []
    for source, factor in zip(sources, factors, strict=True):
        expanded = [shard for url in expand_urls(source) for shard in _glob(url)]
        urls += expanded
        weights += [float(factor)] * len(expanded)
    if not urls:
        raise ValueError(f"path '{path}' names no shards")
    return urls, weights


def dataset_size(urls: list[str]) -> int | None:
    """Samples in ``urls`` from ``sizes.json`` (or ``__len__``) in each shard folder; ``None`` if one is missing."""
    folders: dict[str, list[str]] = {}
    for url in urls:
        folders.setdefault(url_dirname(url), []).append(url)
    total = 0
    for folder, shards in folders.items():
        prefix = f"{folder}/" if folder else ""
        sizes = read_url(f"{prefix}sizes.json")
        if sizes is not None:
            table = json.loads(sizes)
            missing = [url_basename(s) for s in shards if url_basename(s) not in table]
            if missing:
                raise ValueError(
                    f"{prefix}sizes.json has no count for {missing[:3]} (and {max(len(missing) - 3, 0)} more)"
                )
            total += sum(int(table[url_basename(s)]) for s in shards)
            continue
        length = read_url(f"{prefix}__len__")
        if length is None:
            return None
        total += int(length.decode().strip())
    return total


class ShardPlan:
    """Which shard a process reads at each cursor position of an epoch.

    Training: a seeded per-epoch permutation of all shards, ``[rank::world]`` for this process, then more passes
    over the same shards in new seeded orders (an epoch ends by sample count, not by shards). Resampled: draw
    ``i`` is a weighted choice seeded from ``(seed, epoch, rank, i)``. Evaluation: ``shards[rank::world]`` in
    order, once.
    """

    def __init__(
        self, urls: list[str], weights: list[float], dist_info: dist.DistInfo, seed: int, train: bool, resampled: bool
    ):
        self.urls = urls
        self.rank, self.world = dist_info.rank, dist_info.world_size
        self.seed = seed
        self.train = train
        self.resampled = resampled
        self._cumulative = np.cumsum(weights).tolist()
        self._epoch_shards: tuple[int, list[int]] | None = None

    @property
    def shards_per_pass(self) -> int:
        """Shards this process reads before any repeats (all shards when resampling)."""
        return len(self.urls) if self.resampled else len(range(self.rank, len(self.urls), self.world))

    def url(self, epoch: int, cursor: int) -> str | None:
        """The shard at ``cursor``, or ``None`` after the last one of a single (evaluation) pass."""
        if self.resampled:
            draw = mix64(self.seed, epoch, self.rank, cursor) / 2**64 * self._cumulative[-1]
            return self.urls[min(bisect.bisect_right(self._cumulative, draw), len(self.urls) - 1)]
        if not self.train:
            mine = range(self.rank, len(self.urls), self.world)
            return self.urls[mine[cursor]] if cursor < len(mine) else None
        mine = self._mine(epoch)
        passes, index = divmod(cursor, len(mine))
        if passes:
            order = np.random.default_rng(mix64(self.seed, epoch, self.rank, passes)).permutation(len(mine))
            return self.urls[mine[order[index]]]
        return self.urls[mine[index]]

    def _mine(self, epoch: int) -> list[int]:
        if self._epoch_shards is None or self._epoch_shards[0] != epoch:
            order = np.random.default_rng(mix64(self.seed, epoch)).permutation(len(self.urls))
            self._epoch_shards = (epoch, order[self.rank :: self.world].tolist())
        return self._epoch_shards[1]


# -- tar reading ------------------------------------------------------------------------------------------
class TarSample(NamedTuple):
    """The members of one sample; ``start`` / ``end`` are its byte range in the shard."""

    key: str
    parts: dict[str, bytes]
    start: int
    end: int
    problem: str | None = None  # set for a malformed sample (duplicate members)


def _split_name(name: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def _is_metadata(name: str) -> bool:
    """WebDataset's metadata members (``__index__``, ``__meta__.json``) are not samples."""
    base = name.rsplit("/", 1)[-1].split(".", 1)[0]
    return len(base) > 4 and base.startswith("__") and base.endswith("__")


def iter_tar(url: str, start: int = 0, end: int | None = None) -> Iterator[tuple[TarSample | Skipped, int]]:
    """Samples of a shard from byte ``start`` (a header boundary), each with the offset to resume after it.

    Members are grouped into samples by key (the name up to its first dot, WebDataset's rule). The resume
    offset is the header of the next sample, or ``SHARD_DONE`` after the last one. A shard that cannot be
    opened, a truncated or corrupt archive, and a member without an extension become ``Skipped`` items.
    """
    try:
        stream = open_url(url, start, end)
    except (OSError, ObjectStoreError) as error:
        yield Skipped(f"cannot read shard {url} ({error})"), SHARD_DONE
        return
    current: TarSample | None = None
    member_end = start
    with stream:
        try:
            archive = tarfile.open(fileobj=stream, mode="r|")
            for member in archive:
                if not member.isfile():
                    continue
                header = start + member.offset
                member_end = start + member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                if _is_metadata(member.name):
                    continue
                key, extension = _split_name(member.name)
                if current is not None and key != current.key:
                    yield current, header  # complete: the next member starts another sample
                    current = None
                if key is None:
                    yield Skipped(f"{url}: member '{member.name}' has no extension"), member_end
                    continue
                if current is None:
                    current = TarSample(key, {}, header, member_end)
                data = archive.extractfile(member).read()
                extension = extension.lower()
                problem = current.problem
                if extension in current.parts:
                    problem = f"duplicate member '{member.name}'"
                current.parts[extension] = data
                current = current._replace(end=member_end, problem=problem)
        except (tarfile.TarError, EOFError, OSError) as error:
            where = f"{current.key} at byte {current.start}" if current is not None else f"byte {member_end}"
            yield Skipped(f"{url}: truncated or corrupt tar, stopped at sample {where} ({error})"), SHARD_DONE
            return
        if end is None and stream.size - member_end < 2 * _BLOCK:
            yield Skipped(f"{url}: truncated tar, no end-of-archive marker after byte {member_end}"), SHARD_DONE
            return
        if current is not None:
            yield current, SHARD_DONE


class _Raw(NamedTuple):
    """A sample on its way to a decoding worker: what it needs, nothing more."""

    name: str  # shard url + key, for messages
    image: bytes | None
    caption: bytes | dict[str, bytes] | None  # the .txt member, or the members ``captions`` may name
    problem: str | None
    epoch: int
    position: int  # its index in this process's stream of the epoch (seeds its augmentation)


def _raw(url: str, sample: TarSample, epoch: int, position: int, fields: tuple[str, ...] | None = None) -> _Raw:
    image = next((sample.parts[e] for e in IMAGE_EXTENSIONS if e in sample.parts), None)
    problem = sample.problem
    if problem is None and image is None:
        problem = f"no image member ({'/'.join(IMAGE_EXTENSIONS)})"
    if fields is None:
        caption = sample.parts.get(CAPTION_EXTENSION)
    else:  # the named members, and the .json member that may hold the others
        caption = {name: sample.parts[name] for name in (*fields, "json") if name in sample.parts}
    return _Raw(f"{url} sample {sample.key}", image, caption, problem, epoch, position)


def caption_getter(caption: bytes | dict[str, bytes] | None):
    """``get(field)`` for ``CaptionRule.read``: a member, else a key of the ``.json`` member (parsed once)."""
    if not isinstance(caption, dict):
        return lambda field: caption
    parsed: list[Any] = []

    def get(field: str) -> Any:
        if field.lower() in caption:
            return caption[field.lower()]
        if "json" not in caption:
            return None
        if not parsed:
            try:
                parsed.append(json.loads(caption["json"]))
            except ValueError as error:
                raise SampleError(f"the .json member is not JSON ({error})") from None
        return parsed[0].get(field) if isinstance(parsed[0], dict) else None

    return get


# -- the sample stream of one process ---------------------------------------------------------------------
class SampleStream:
    """One process's samples of one epoch, read shard by shard and shuffled through a seeded buffer.

    Its state (``snapshot``) is the shard cursor, the byte offset of the next sample in that shard, the number
    of samples emitted (the shuffle RNG's position) and the byte ranges of the buffered samples.
    """

    def __init__(
        self, plan: ShardPlan, epoch: int, buffer_size: int, source: str, fields: tuple[str, ...] | None = None
    ) -> None:
        self.plan = plan
        self.fields = fields
        self.epoch = epoch
        self.buffer_size = buffer_size
        self.source = source
        self.cursor = 0
        self.offset = 0
        self.emitted = 0
        self._buffer: list[tuple[tuple[int, int, int], str, TarSample]] = []
        self._reader: Iterator[Any] | None = None
        self._url = ""
        self._exhausted = False
        self._shard_samples = 0  # samples read from the open shard
        self._empty_shards = 0  # shards in a row that gave no sample
        self._last_problem = "the shards hold no samples"

    # state
    def snapshot(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "offset": self.offset,
            "emitted": self.emitted,
            "buffer": tuple(ids for ids, _, _ in self._buffer),
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Continue from ``snapshot``: re-read the buffered samples by byte range, reopen the shard at the offset."""
        self.cursor, self.offset, self.emitted = snapshot["cursor"], snapshot["offset"], snapshot["emitted"]
        wanted = [tuple(int(v) for v in ids) for ids in snapshot["buffer"]]
        wanted_set = set(wanted)
        found: dict[tuple[int, int, int], tuple[str, TarSample]] = {}
        for cursor in sorted({c for c, _, _ in wanted}):
            url = self.plan.url(self.epoch, cursor)
            ranges = [(s, e) for c, s, e in wanted if c == cursor]
            low, high = min(s for s, _ in ranges), max(e for _, e in ranges)
            for item, _ in iter_tar(url, low, high):  # one read per shard, of the span the samples cover
                if isinstance(item, TarSample) and (cursor, item.start, item.end) in wanted_set:
                    found[(cursor, item.start, item.end)] = (url, item)
        lost = [ids for ids in wanted if ids not in found]
        if lost:
            log.warning(
                "%s: %d samples of the saved shuffle buffer could not be re-read (shards changed?); "
                "the resumed sample order differs from the original run",
                self.source,
                len(lost),
            )
        self._buffer = [(ids, *found[ids]) for ids in wanted if ids in found]
        self._reader = None

    # reading
    def take(self, count: int) -> list[_Raw | Skipped]:
        """The next ``count`` samples (fewer only at the end of a single pass), plus any skips met on the way."""
        items: list[_Raw | Skipped] = []
        taken = 0
        while taken < count:
            item = self._next()
            if item is None:
                break
            items.append(item)
            taken += isinstance(item, _Raw)
        return items

    def _next(self) -> _Raw | Skipped | None:
        while True:
            item = None if self._exhausted else self._read()
            if item is None:
                self._exhausted = True
                if not self._buffer:
                    return None
            elif item is _PASS_END:
                pass  # drain the buffer before the next pass, so one pass shows every sample once
            elif isinstance(item, Skipped):
                return item
            else:
                self._buffer.append(item)
                if len(self._buffer) < self.buffer_size:
                    continue
            pick = mix64(self.plan.seed, self.epoch, self.plan.rank, self.emitted, _SHUFFLE_SALT) % len(self._buffer)
            self._buffer[pick], self._buffer[-1] = self._buffer[-1], self._buffer[pick]
            _, url, sample = self._buffer.pop()
            self.emitted += 1
            return _raw(url, sample, self.epoch, self.emitted - 1, self.fields)

    def _read(self) -> tuple[tuple[int, int, int], str, TarSample] | Skipped | object | None:
        """The next sample (with its id) or skip in shard order; ``None`` after a single pass; ``_PASS_END``
        while a pass over this process's shards is finished but the buffer still holds samples of it."""
        while True:
            if self._reader is None:
                if self.offset == SHARD_DONE:
                    if self._buffer and self._at_pass_end():
                        return _PASS_END
                    self.cursor, self.offset = self.cursor + 1, 0
                url = self.plan.url(self.epoch, self.cursor)
                if url is None:
                    return None
                self._url, self._reader, self._shard_samples = url, iter_tar(url, self.offset), 0
            step = next(self._reader, None)
            if step is None:
                self._reader = None
                self.offset = SHARD_DONE
                self._count_empty_shard()
                continue
            item, self.offset = step
            if isinstance(item, Skipped):
                self._last_problem = item.reason
                return item
            self._shard_samples += 1
            self._empty_shards = 0
            return (self.cursor, item.start, item.end), self._url, item

    def _at_pass_end(self) -> bool:
        return self.plan.train and not self.plan.resampled and (self.cursor + 1) % self.plan.shards_per_pass == 0

    def _count_empty_shard(self) -> None:
        """A pass over every shard (twice, plus a margin for resampling) without one sample: give up."""
        if self._shard_samples:
            return
        self._empty_shards += 1
        if self._empty_shards >= 2 * self.plan.shards_per_pass + 10:
            raise DataError(f"no sample can be read from any shard of {self.source}: {self._last_problem}")


# -- decoding in workers ----------------------------------------------------------------------------------
class _Decoder(Dataset):
    """Decodes and transforms raw samples (in DataLoader workers); a failure becomes ``Skipped``."""

    def __init__(self, transform, seed: int, rank: int, rule: CaptionRule, train: bool) -> None:
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.rule = rule
        self.train = train

    def __getitems__(self, items: list[_Raw | Skipped]) -> list[Sample | Skipped]:
        return [self[item] for item in items]

    def __getitem__(self, item: _Raw | Skipped) -> Sample | Skipped:
        if isinstance(item, Skipped):
            return item
        try:
            if item.problem is not None:
                raise SampleError(item.problem)
            captions = self.rule.read(caption_getter(item.caption))
            image = decode_image(item.image)
            seed = sample_seed(self.seed, item.epoch, item.position, self.rank, _AUGMENT_SALT)
            caption = self.rule.choose(
                captions, sample_seed(self.seed, item.epoch, item.position, self.rank, CAPTION_SALT), self.train
            )
            try:
                tensor = transform_sample(self.transform, image, seed)
            except Exception as error:  # noqa: BLE001 - an odd image must not stop the run
                raise SampleError(f"transform failed ({type(error).__name__}: {error})") from None
        except SampleError as error:
            return Skipped(f"{item.name}: {error}")
        return Sample(tensor, caption)


class _RawBatches:
    """The DataLoader's batch sampler: lists of raw samples from the current stream, with a snapshot of the
    stream's state before each list (kept until the loader consumes that batch)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.stream: SampleStream | None = None
        self.snapshots: deque[dict[str, Any]] = deque()

    def __iter__(self) -> Iterator[list[_Raw | Skipped]]:
        stream, snapshots = self.stream, self.snapshots
        while True:
            snapshot = stream.snapshot()
            items = stream.take(self.batch_size)
            if not items:
                return
            snapshots.append(snapshot)
            yield items


@dataclass(frozen=True)
class _Position:
    """How far the consumer got: ``batch`` batches of ``epoch`` yielded; the last one ended with the ``used``-th
    sample of the raw batch that starts at stream state ``stream``."""

    epoch: int
    batch: int
    stream: dict[str, Any]
    used: int


def _piece(decoded: SampleBatch, begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    extras = {key: value[begin:end] for key, value in (decoded.extras or {}).items()}
    return decoded.images[begin:end], decoded.tokens[begin:end], extras


# -- the loader ------------------------------------------------------------------------------------------
@DATASETS.register("webdataset")
class WebDataset:
    """Batches of ``(images, tokens)`` from WebDataset tar shards, with exact ``state_dict`` resume.

    A ``cadenza.engine.loader.Loader`` (``batches_per_epoch``, ``skipped``, ``set_epoch``, ``__iter__``,
    ``state_dict``, ``load_state_dict``).

    Args:
        path: OpenCLIP's ``--train-data`` string: shard paths or ``s3://`` URLs with brace expansion, sources
            joined by ``::``.
        context: set by the trainer.
        num_samples: samples per epoch (OpenCLIP's ``--train-num-samples``); default from ``sizes.json`` /
            ``__len__`` next to the shards. Required for training when neither exists.
        resampled: draw shards with replacement (OpenCLIP's ``--dataset-resampled``); training only.
        upsampling_factors: one weight per ``::`` source (a list, or OpenCLIP's ``::``-joined string); needs
            ``resampled``.
        shuffle_buffer: samples in the shuffle buffer (training; default 5000, as OpenCLIP, at most a process's
            share of an epoch; 1 disables it).
        captions: several caption fields instead of the ``.txt`` member: a field or a list of them (one caption
            drawn uniformly per step), or a mapping of fields to weights; a field is a member (``txt``, ``syn.txt``)
            or a key of the ``.json`` member, holding one caption or a JSON list (see ``samples.CaptionRule``).
    """

    def __init__(
        self,
        path: str,
        context: LoaderContext,
        num_samples: int | None = None,
        resampled: bool = False,
        upsampling_factors: list[float] | str | None = None,
        shuffle_buffer: int | None = None,
        captions: str | list[str] | dict[str, float] | None = None,
    ) -> None:
        if context.extras:
            raise ValueError(
                f"webdataset data cannot carry {', '.join(sorted(context.extras))} (stored teacher embeddings come "
                "from MDS shards written by composer convert --teacher: type streaming)"
            )
        self.rule = CaptionRule(captions, CAPTION_EXTENSION)
        if not context.train:
            for name, value in (
                ("resampled", resampled),
                ("upsampling_factors", upsampling_factors),
                ("shuffle_buffer", shuffle_buffer),
            ):
                if value:
                    raise ValueError(
                        f"{name} applies to training data only; evaluation reads every sample once, in order"
                    )
        if upsampling_factors is not None and not resampled:
            raise ValueError("upsampling_factors needs resampled: true (as OpenCLIP's --train-data-upsampling-factors)")
        if shuffle_buffer is not None and shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        self.path = path
        self.source = f"webdataset {path}"
        self.train = context.train
        self.batch_size = context.batch_size
        self.dist = context.dist
        urls, weights = expand_sources(path, upsampling_factors)
        if num_samples is None:
            num_samples = dataset_size(urls)
        if num_samples is None and context.train:
            raise ValueError(
                f"the number of samples of '{path}' is unknown: set num_samples, or put a sizes.json "
                "({shard file name: count}) next to the shards"
            )
        self.num_samples = num_samples
        if context.train and not resampled and len(urls) < self.dist.world_size:
            raise ValueError(
                f"'{path}' has {len(urls)} shards for {self.dist.world_size} processes; each process needs at "
                "least one (or set resampled: true)"
            )
        if context.train and self.batches_per_epoch == 0:
            raise ValueError(
                f"num_samples={num_samples} is less than one global batch ({self.batch_size} x "
                f"{self.dist.world_size} processes); lower data.batch_size or add data"
            )
        self.plan = ShardPlan(urls, weights, self.dist, context.seed, context.train, resampled)
        self.buffer_size = 1
        if context.train:  # a buffer larger than this process's share of an epoch only delays the first batch
            share = max(num_samples // self.dist.world_size, 1)
            self.buffer_size = min(shuffle_buffer or DEFAULT_SHUFFLE_BUFFER, share)
        self.pin_memory = context.pin_memory
        self._raw_batches = _RawBatches(self.batch_size)
        self.loader = DataLoader(
            _Decoder(context.transform, context.seed, self.dist.rank, self.rule, context.train),
            batch_sampler=self._raw_batches,
            num_workers=context.workers,
            collate_fn=SampleCollator(
                context.tokenizer, (3, context.image_size, context.image_size), context.context_length
            ),
            pin_memory=context.pin_memory,
            generator=torch.Generator().manual_seed(context.seed),  # worker seeds never draw from the training RNG
            **context.worker_options(),
        )
        self._skips = SkipCounter(self.source)
        self._decoded = 0
        self._early_failures: list[str] = []
        self.set_epoch(0)
        log.info(
            "%s: %d shards, %s samples per epoch%s",
            self.source,
            len(urls),
            num_samples if num_samples is not None else "unknown",
            ", resampled" if resampled else "",
        )

    # -- the loader contract (cadenza.engine.loader.Loader) -----------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        """Batches per process and epoch: ``num_samples // global batch`` when training (every process yields
        exactly that many, full); for evaluation the rounded-up count (0 when the sample count is unknown)."""
        if self.num_samples is None:
            return 0
        global_batch = self.batch_size * self.dist.world_size
        return self.num_samples // global_batch if self.train else math.ceil(self.num_samples / global_batch)

    @property
    def skipped(self) -> int:
        """Samples this process skipped since the loader was built."""
        return self._skips.skipped

    @property
    def epoch(self) -> int:
        return self._position.epoch

    def close(self) -> None:
        """Stop the worker processes (a later iteration starts new ones)."""
        stop_workers(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``."""
        start = {"cursor": 0, "offset": 0, "emitted": 0, "buffer": ()}
        self._position = _Position(epoch, 0, start, 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the rest of the current epoch."""
        position = self._position
        if self.train and position.batch >= self.batches_per_epoch:
            return
        fields = self.rule.fields if self.rule.listed else None
        stream = SampleStream(self.plan, position.epoch, self.buffer_size, self.source, fields)
        stream.restore(position.stream)
        self._raw_batches.stream, self._raw_batches.snapshots = stream, deque()
        snapshots = self._raw_batches.snapshots
        drop = position.used  # samples of the first raw batch that were already yielded before
        batch_index = position.batch
        pending: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
        pending_count = 0
        pending_skips: list[str] = []
        decoded_here = 0
        for decoded in self.loader:
            snapshot = snapshots.popleft()
            used = 0  # samples of this raw batch consumed so far
            begin = 0  # first sample of this raw batch not yet in ``pending``
            for event in decoded.events:
                if drop:  # resuming inside this raw batch: its first ``drop`` samples (and skips before) are done
                    if event is None:
                        drop -= 1
                        used += 1
                        begin += 1
                    continue
                if event is not None:
                    pending_skips.append(event)
                    self._watch(event)
                    continue
                used += 1
                pending_count += 1
                decoded_here += 1
                self._decoded += 1
                if pending_count == self.batch_size:
                    pending.append(_piece(decoded, begin, used))
                    begin = used
                    batch_index += 1
                    self._position = _Position(position.epoch, batch_index, snapshot, used)
                    yield self._emit(pending, pending_skips)
                    pending, pending_count, pending_skips = [], 0, []
                    if self.train and batch_index >= self.batches_per_epoch:
                        return
            if begin < used:
                pending.append(_piece(decoded, begin, used))
        # Only a single (evaluation) pass ends: the last, partial batch.
        if pending_count:
            yield self._emit(pending, pending_skips)
        elif pending_skips:
            self._skips.add(pending_skips)
        if decoded_here == 0 and position.batch == 0 and self.plan.shards_per_pass > 0:
            if self._early_failures:
                raise nothing_decodes(self.source, self._early_failures)
            raise DataError(f"{self.source} holds no samples (for process {self.dist.rank})")

    def state_dict(self) -> dict[str, Any]:
        """The consumed position of every process (a collective: every process calls it at the same step)."""
        position = self._position
        stream = dict(position.stream)
        stream["buffer"] = torch.tensor(stream["buffer"], dtype=torch.int64).reshape(-1, 3)
        mine = {"stream": stream, "used": position.used}
        return {
            "epoch": position.epoch,
            "batch_in_epoch": position.batch,
            "world_size": self.dist.world_size,
            "processes": dist.all_gather_object(mine),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["world_size"]) != self.dist.world_size:
            raise DataError(
                f"{self.source}: the checkpoint's loader state comes from {state['world_size']} processes; a "
                f"webdataset epoch cannot be re-split mid-way, so resume with {state['world_size']} processes "
                "(or use the streaming format, which can)"
            )
        mine = state["processes"][self.dist.rank]
        stream = dict(mine["stream"])
        stream["buffer"] = tuple(tuple(row) for row in stream["buffer"].tolist())
        stream = {k: (int(v) if k != "buffer" else v) for k, v in stream.items()}
        self._position = _Position(int(state["epoch"]), int(state["batch_in_epoch"]), stream, int(mine["used"]))

    # -- helpers ------------------------------------------------------------------------------------------
    def _emit(
        self, pending: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]], skips: list[str]
    ) -> tuple:
        self._skips.add(skips)
        if len(pending) == 1:
            images, tokens, extras = pending[0]
        else:
            images, tokens = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
            extras = concat_extras([p[2] for p in pending])
            if self.pin_memory:
                images, tokens = images.pin_memory(), tokens.pin_memory()
        return batch_tuple(images, tokens, extras)

    def _watch(self, reason: str) -> None:
        """Stop with ``DataError`` when the first ``MAX_SUBSTITUTES`` samples all failed: nothing decodes."""
        if self._decoded:
            return
        self._early_failures.append(reason)
        if len(self._early_failures) >= MAX_SUBSTITUTES:
            raise nothing_decodes(self.source, self._early_failures)


__all__ = ["SampleBatch", "ShardPlan", "WebDataset", "dataset_size", "expand_sources", "iter_tar"]
