"""The ``StreamingDataset`` behind ``data.*.type: streaming``: image–caption MDS shards → ``Sample``.

With ``captions`` a sample's caption comes from several columns (``str`` columns holding one caption or a JSON list,
``json`` columns holding a list); with ``reinforced`` (the metadata of a ``composer convert --teacher`` dataset) a
training sample is one of its stored views, replayed from its seed, with the stored teacher embeddings of that view
and of the drawn caption in ``Sample.extras`` (see ``reinforced.py``).

Kept apart from ``streaming.py`` because importing ``streaming`` takes a while (0.3 s here, seconds more with the
transformers it imports, which ``load_streaming`` avoids): the loader imports this module only when a streaming
dataset is built.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from time import sleep
from typing import Any

import numpy as np
import torch
from PIL import Image

from cadenza.datasets.reinforced import MARKER, SEED_COLUMN, view_seed
from cadenza.datasets.samples import (
    CAPTION_SALT,
    CaptionRule,
    Sample,
    SampleError,
    caption_list,
    decode_image,
    nothing_decodes,
    open_image,
    sample_seed,
    substitutes,
    transform_sample,
    uniform,
)
from cadenza.datasets.streaming_import import load_streaming
from cadenza.engine.errors import ConfigError, DataError

load_streaming()  # before the first import from it

from streaming import StreamingDataset  # noqa: E402
from streaming.base.constant import TICK  # noqa: E402
from streaming.base.dataset import _ShardState  # noqa: E402
from streaming.base.format.mds.reader import MDSReader  # noqa: E402

#: MDS encodings of an image column that hold an encoded file (read back as its bytes, decoded here)
ENCODED_IMAGE = ("jpeg", "png", "bytes")
#: MDS encodings an image column may have
IMAGE_ENCODINGS = (*ENCODED_IMAGE, "pil")
#: MDS encodings a caption column may have with ``captions`` (``json``: a list of captions, or one)
CAPTION_ENCODINGS = ("str", "json")
_VIEW_DRAW_SALT = 0x5649_4557_4452


def decode_image_at_least(data: bytes, min_size: int | None) -> Image.Image:
    """``decode_image``, but a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides at least ``min_size`` pixels: the same picture for a 224 px crop, several times faster for large
    photos (see ``benchmarks/data_throughput.py``)."""
    if min_size is None or data[:3] != b"\xff\xd8\xff":
        return decode_image(data)
    try:
        image = open_image(data)
        image.draft("RGB", (min_size, min_size))
        image.load()
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad data
        raise SampleError(f"undecodable image ({type(error).__name__}: {error})") from None
    return image


class MDSImageCaptions(StreamingDataset):
    """``StreamingDataset`` of image–caption MDS shards whose items are ``Sample``s.

    The image and caption columns are read as raw bytes and decoded here. A sample that does not decode
    (corrupt image, empty or non-UTF-8 caption) is replaced by the first of its ``substitutes`` that does,
    and the failures travel with the replacement (``Sample.skipped``): every batch stays full, so the
    position in the epoch — and exact, elastic resume — is unaffected, and processes keep equal batch
    sizes. Training augmentation is seeded by ``(seed, epoch, sample id)``.

    Args:
        image_key, caption_key: the columns.
        captions: several caption columns instead of ``caption_key`` (see ``samples.CaptionRule``).
        train: draw one caption per sample (else every caption of the image is kept).
        transform: PIL image → tensor.
        augment_seed: seeds augmentation per sample (training); ``None`` for a deterministic transform.
        draft_size: decode JPEGs at a reduced scale no smaller than this (the model's image size).
        reinforced: the metadata of stored teacher embeddings to read (training draws a stored view and yields the
            embeddings); ``None`` reads none.
        source: names the data in messages.
        kwargs: ``StreamingDataset``'s arguments.
    """

    #: shards kept memory-mapped per process (see ``read_sample``)
    MAPPED_SHARDS = 64

    def __init__(
        self,
        *,
        image_key: str,
        caption_key: str,
        transform: Callable[[Any], torch.Tensor],
        augment_seed: int | None,
        draft_size: int | None,
        source: str,
        captions: str | list[str] | dict[str, float] | None = None,
        train: bool = True,
        reinforced: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_key, self.caption_key = image_key, caption_key
        self.rule = CaptionRule(captions, caption_key)
        self.train = train
        self.transform = transform
        self.reinforced = reinforced
        if reinforced is not None:
            draft_size = None  # a view's crop is drawn on the full image, as the teachers saw it
            self.views = int(reinforced["views"])
            self.stored_fields = list(reinforced["captions"])  # the text embeddings' fields, in their row order
            self.teachers = [
                (t["image_column"], t["text_column"], np.float32(t["logit_scale"])) for t in reinforced["teachers"]
            ]
        self.augment_seed, self.draft_size = augment_seed, draft_size
        self.source = source
        self.current_epoch = 0
        self._ready_shards: set[int] = set()  # shards this process saw ready to read (see prepare_shard)
        self._mapped: OrderedDict[int, mmap.mmap] = OrderedDict()  # shard id -> its raw file, memory-mapped
        self._read_columns_as_bytes()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_mapped": OrderedDict()}  # maps are per process: a new one maps anew

    def _read_columns_as_bytes(self) -> None:
        """Check the columns of every shard; switch encoded images and ``str`` captions to raw bytes."""
        captions = self.rule.fields
        expected = [(self.image_key, "image_key", IMAGE_ENCODINGS)]
        if self.rule.listed:
            expected += [(field, "captions", CAPTION_ENCODINGS) for field in captions]
        else:
            expected.append((self.caption_key, "caption_key", ("str",)))
        for shard in self.shards:
            where = os.path.join(shard.dirname, shard.split or "", "index.json")
            if not isinstance(shard, MDSReader):
                raise DataError(f"{where}: a {type(shard).__name__} shard; 'streaming' reads MDS shards")
            columns = dict(zip(shard.column_names, shard.column_encodings, strict=True))
            for key, role, allowed in expected:
                if key not in columns:
                    raise DataError(f"{where}: no column '{key}' ({role}); the shards have columns {sorted(columns)}")
                if columns[key] not in allowed:
                    raise DataError(
                        f"{where}: column '{key}' ({role}) is encoded as '{columns[key]}', "
                        f"expected one of {', '.join(allowed)}"
                    )
            for key, role, encoding in self._stored_columns():
                if columns.get(key) != encoding:
                    found = f"is encoded as '{columns[key]}'" if key in columns else "is missing"
                    raise ConfigError(
                        "data.train",
                        f"{where}: column '{key}' ({role}) {found}, where the dataset's metadata promises "
                        f"'{encoding}' (its teachers' embeddings): the shards and {MARKER} do not belong together; "
                        "convert the data again",
                    )
            encodings = list(shard.column_encodings)
            for index, name in enumerate(shard.column_names):
                caption = name in captions and encodings[index] == "str"
                if caption or (name == self.image_key and encodings[index] in ENCODED_IMAGE):
                    encodings[index] = "bytes"
            shard.column_encodings = encodings

    def _stored_columns(self) -> list[tuple[str, str, str]]:
        """The columns of stored teacher embeddings, with the encodings the metadata promises."""
        if self.reinforced is None:
            return []
        expected = [(SEED_COLUMN, "the views' seeds", "int64")]
        for index, teacher in enumerate(self.reinforced["teachers"]):
            who = f"teacher {index}, {teacher['name']}"
            expected.append((teacher["image_column"], who, f"ndarray:float16:{self.views},{teacher['dim']}"))
            expected.append((teacher["text_column"], who, "ndarray:float16"))
        return expected

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's ``prepare_shard``, skipped for a shard this process already saw ready.

        streaming calls it for every sample, in a thread beside decoding, and each call takes a file
        lock and checks the shard's file on disk even when the shard is long since local: 0.6 ms a
        call on a 2-core EPYC, more than decoding and augmenting a 32 px image (the quickstart loader
        went from 390 to about 1050 samples/s with this and the two changes in ``samples`` and
        ``transforms``).
        Once a shard is local it stays so unless ``cache_limit`` evicts shards, so without one the
        first call per shard and process is the only one that does anything.
        """
        if shard_id in self._ready_shards and not self.cache_limit:
            return
        super().prepare_shard(shard_id, blocking)
        if self._shard_states[shard_id] == _ShardState.LOCAL:
            self._ready_shards.add(shard_id)

    def _ready_thread(self, it: Any) -> None:
        """streaming's ready thread, which also fetches again a shard evicted while it waited for it.

        The ready thread walks the epoch's samples ahead of the reader and waits for each one's shard to be
        local; the reader yields nothing past it. streaming 0.13 checks for an evicted shard only before it
        starts waiting: under ``cache_limit``, when the shard it waits for is finished and then evicted within
        one of its 7 ms sleeps (by a later download; concurrent downloads do not reserve their room, so the
        cache can overshoot and the next download evict several shards), the shard stays remote, nothing
        fetches it again, and training stops with no error. Without ``cache_limit`` nothing is evicted, and
        streaming's own thread runs.
        """
        if not self.cache_limit:
            return super()._ready_thread(it)
        while not it.should_exit() and it.ready_index < it.total and not self._event.is_set():
            if self.predownload is not None and it.ready_index - it.yield_index > self.predownload:
                sleep(TICK)  # far enough ahead of the reader
                continue
            sample_id = it.sample_ids[it.ready_index]
            if sample_id != -1:  # -1: padding, nothing to wait for
                shard_id, _ = self.spanner[sample_id]
                while self._shard_states[shard_id] != _ShardState.LOCAL:
                    if it.should_exit() or self._event.is_set():
                        break
                    if self._shard_states[shard_id] == _ShardState.REMOTE:  # never fetched, or evicted meanwhile
                        self.prepare_shard(shard_id, False)
                    else:
                        sleep(TICK)  # another thread or process is fetching it
            it.ready_index += 1
        it.on_exit()

    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self.current_epoch = epoch  # this worker's epoch, for augmentation seeds
        return epoch, sample_in_epoch

    def get_item(self, sample_id: int, retry: int = 7) -> Sample:
        """Sample ``sample_id`` decoded and transformed, or the first substitute that decodes."""
        sample_id = int(sample_id)  # streaming passes NumPy integers
        reasons: list[str] = []
        for candidate in substitutes(sample_id, int(self.num_samples)):
            try:
                image, captions, sample = self._decode(candidate, retry)
            except SampleError as error:
                reasons.append(f"sample {candidate}: {error}")
                continue
            if self.augment_seed is None:
                return Sample(self.transform(image), self.rule.choose(captions, 0, False), tuple(reasons))
            epoch = self.current_epoch
            caption_seed = sample_seed(self.augment_seed, epoch, sample_id, CAPTION_SALT)
            if self.reinforced is None:
                pixels = transform_sample(self.transform, image, sample_seed(self.augment_seed, epoch, sample_id))
                return Sample(pixels, self.rule.choose(captions, caption_seed, True), tuple(reasons))
            view = uniform(sample_seed(self.augment_seed, epoch, sample_id, _VIEW_DRAW_SALT), self.views)
            pixels = transform_sample(self.transform, image, view_seed(int(sample[SEED_COLUMN]), view))
            field, index = self.rule.draw(captions, caption_seed)
            row = sample["_rows"][self.rule.fields[field]] + index  # the caption's row in the text embeddings
            extras = {}
            for teacher, (image_key, text_key, scale) in enumerate(self.teachers):
                extras[f"teacher{teacher}_image"] = sample[image_key][view]  # (D,) float16
                extras[f"teacher{teacher}_text"] = sample[text_key][row]  # (D,) float16
                extras[f"teacher{teacher}_scale"] = scale
            return Sample(pixels, captions[field][index], tuple(reasons), extras)
        raise nothing_decodes(self.source, reasons)

    def read_sample(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        """The sample's columns (images and captions as bytes), as ``StreamingDataset.get_item`` reads them.

        A shard that is local for good (seen ready, no ``cache_limit``) is read from a memory map of its
        file, kept for the ``MAPPED_SHARDS`` most recently read shards: streaming opens, seeks and closes the
        file for every sample (33 against 11 µs a sample on a 2-core EPYC). Any other shard goes through
        streaming, which downloads it first when needed.
        """
        shard_id, index = self.spanner[sample_id]
        if shard_id not in self._ready_shards or self.cache_limit:
            return super().get_item(sample_id, retry)
        mapped = self._mapped.get(shard_id)
        if mapped is None:
            shard = self.shards[shard_id]
            with open(os.path.join(shard.dirname, shard.split or "", shard.raw_data.basename), "rb") as file:
                mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            if len(self._mapped) >= self.MAPPED_SHARDS:
                self._mapped.popitem(last=False)[1].close()
            self._mapped[shard_id] = mapped
        else:
            self._mapped.move_to_end(shard_id)
        begin, end = struct.unpack_from("<II", mapped, 4 * (1 + index))  # the shard's offset table
        if end <= begin or end > len(mapped):
            raise ValueError(f"sample {index} of shard {shard_id} has a bad offset ({begin}, {end})")
        return self.shards[shard_id].decode_sample(mapped[begin:end])

    def _decode(self, sample_id: int, retry: int) -> tuple[Image.Image, list[list[str]], dict[str, Any]]:
        try:
            sample = self.read_sample(sample_id, retry)
        except (ValueError, OSError, struct.error) as error:  # a 'pil' column decodes inside streaming
            raise SampleError(f"unreadable sample ({type(error).__name__}: {error})") from None
        captions = self.rule.read(sample.get)
        if self.reinforced is not None:
            self._check_stored(sample, captions)
        image = sample[self.image_key]
        if not isinstance(image, Image.Image):
            image = decode_image_at_least(image, self.draft_size)
        return image, captions, sample

    def _check_stored(self, sample: dict[str, Any], captions: list[list[str]]) -> None:
        """Note in ``sample["_rows"]`` where each stored field's captions start in the text embeddings; a sample
        whose stored text embeddings do not match its captions one to one cannot be used."""
        counts = {field: len(found) for field, found in zip(self.rule.fields, captions, strict=True)}
        rows, total = {}, 0
        for field in self.stored_fields:
            rows[field] = total
            if field not in counts:  # stored, not drawn from: counted for the rows after it
                counts[field] = len(caption_list(sample[field]))
            total += counts[field]
        for _, text_key, _ in self.teachers:
            if len(sample[text_key]) != total:
                raise SampleError(
                    f"{total} captions but {len(sample[text_key])} stored text embeddings in '{text_key}'"
                )
        sample["_rows"] = rows
