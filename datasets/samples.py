"""What every dataset format shares: per-sample seeding, bad-sample skips, collation and skip counting.

**Per-sample determinism.** A training sample's augmentation (random crop, jitter, erasing) is drawn from
generators seeded by ``sample_seed(seed, epoch, index)``: it depends on the sample and the epoch only, not on
the number of processes or DataLoader workers, nor on where a run resumed. ``seeded_rng`` forks the three
generators transforms use — torch's CPU generator (torchvision), Python's ``random`` (timm) and NumPy's global
one — and, in the main process, restores them afterwards, so loading there (``data.workers: 0``) leaves the
training RNG exactly as it was.

**Bad samples.** ``decode_image`` and ``clean_caption`` raise ``SampleError`` with a reason. A stream format
turns it into a ``Skipped(reason)`` item and the loader takes the next sample; a map-style format replaces the
sample by the first of its ``substitutes`` that decodes and reports the failed attempts in ``Sample.skipped``.
``SampleCollator`` keeps samples and skips in stream order (``SampleBatch.events``); the loader, in the main
process, strips them and counts them with a ``SkipCounter`` (``data/skipped``, reasons in ``out.log``).

**Several captions per sample.** ``CaptionRule`` reads a sample's caption fields (CSV columns, MDS columns, WebDataset
members or keys of its ``.json`` member), each holding one caption or a JSON list of them, and draws the caption a
training step uses — uniformly over all of them, or first a field by its weight, then uniformly within it — from
``sample_seed(seed, epoch, index, CAPTION_SALT)``: a function of the sample and the epoch, so exact resume holds.
Evaluation keeps every caption (``Sample.caption`` is then a tuple, collated into ``extras["captions"]``).

Example:
    >>> import torch
    >>> from torchvision import transforms as T
    >>> crop = T.RandomCrop(2)
    >>> image = torch.arange(16.0).reshape(1, 4, 4)
    >>> seed = sample_seed(0, epoch=3, index=17)
    >>> torch.equal(transform_sample(crop, image, seed), transform_sample(crop, image, seed))
    True
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

from cadenza.engine.errors import DataError

log = logging.getLogger("cadenza")

_MASK64 = (1 << 64) - 1
#: keeps the caption draw apart from a sample's other seeded draws (augmentation, stored view)
CAPTION_SALT = 0x4341_5054
#: a map-style sample that fails is replaced by one of this many candidates before the source is declared dead
MAX_SUBSTITUTES = 1000


# -- seeding --------------------------------------------------------------------------------------------
def mix64(*values: int) -> int:
    """A 64-bit hash of a tuple of integers (SplitMix64 steps): stable across runs, platforms and versions."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state


def sample_seed(seed: int, epoch: int, index: int, *salt: int) -> int:
    """The seed of sample ``index`` in ``epoch`` of a run seeded ``seed`` (63 bits; ``salt`` adds more keys)."""
    return mix64(seed, epoch, index, *salt) >> 1


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator, ``random`` and NumPy's global generator seeded from ``seed``.

    In the main process the previous states are restored on exit. A DataLoader worker skips that: nothing
    there draws from these generators but the transforms, and every sample seeds them afresh — while saving
    and restoring NumPy's state alone costs 0.2 ms a sample. CUDA generators are not touched (transforms run
    on CPU).
    """
    in_worker = get_worker_info() is not None
    if not in_worker:
        torch_state = torch.get_rng_state()
        python_state = random.getstate()
        numpy_state = np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    try:
        yield
    finally:
        if not in_worker:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def transform_sample(transform: Callable[[Any], torch.Tensor], image: Any, seed: int) -> torch.Tensor:
    """``transform(image)`` with every random draw seeded from ``seed`` (see ``sample_seed``)."""
    with seeded_rng(seed):
        return transform(image)


# -- decoding ---------------------------------------------------------------------------------------------
class SampleError(Exception):
    """One sample cannot be used; the message is the reason logged when it is skipped."""


def decode_image(data: bytes | None):
    """Decode image bytes into a fully loaded PIL image, or raise ``SampleError`` (corrupt, truncated, empty)."""
    from PIL import Image

    if not data:
        raise SampleError("empty image")
    try:
        image = open_image(data)
        image.load()  # decode now: a truncated file fails here, not inside the transform
    except Image.UnidentifiedImageError:
        raise SampleError("undecodable image (not a format PIL recognizes)") from None
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad data
        raise SampleError(f"undecodable image ({type(error).__name__}: {error})") from None
    return image


#: leading bytes of the formats datasets mostly hold, and their PIL format names
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))


def open_image(data: bytes):
    """``Image.open`` on the bytes (not yet decoded). A PNG or JPEG goes straight to its format's opener, as
    ``Image.open`` would after trying each registered format in turn (31 instead of 39 µs for a 32 px PNG on a
    2-core EPYC); the size limit against decompression bombs is checked the same way."""
    from PIL import Image

    for signature, name in _SIGNATURES:
        if data.startswith(signature) and name in Image.OPEN and hasattr(Image, "_decompression_bomb_check"):
            factory, _ = Image.OPEN[name]
            image = factory(io.BytesIO(data), None)
            Image._decompression_bomb_check(image.size)
            return image
    return Image.open(io.BytesIO(data))


def read_image_file(path: str):
    """Read and decode an image file, or raise ``SampleError`` (missing, unreadable, corrupt)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise SampleError(f"missing file {path}") from None
    except OSError as error:
        raise SampleError(f"unreadable file {path} ({error.strerror or error})") from None
    try:
        return decode_image(data)
    except SampleError as error:
        raise SampleError(f"{error} in {path}") from None


def clean_caption(value: bytes | str | None) -> str:
    """The caption as text, stripped; ``SampleError`` when it is missing, empty or not UTF-8."""
    if value is None:
        raise SampleError("no caption")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise SampleError("caption is not valid UTF-8") from None
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SampleError("caption is not valid UTF-8") from None
    text = value.strip()
    if not text:
        raise SampleError("empty caption")
    return text


def substitutes(index: int, num_samples: int, limit: int = MAX_SUBSTITUTES) -> Iterator[int]:
    """``index``, then the candidates that replace it when it fails: a fixed pseudo-random order of other rows.

    Depends on ``index`` only (not on the worker or the epoch), so a replaced sample is replaced the same way
    in every run. Every row is tried when there are at most ``limit``; otherwise ``limit`` candidates.
    """
    yield index
    if num_samples <= limit:
        order = np.random.default_rng(mix64(index, num_samples)).permutation(num_samples)
        yield from (int(i) for i in order if i != index)
        return
    for attempt in range(1, limit):
        yield mix64(index, attempt) % num_samples


# -- captions ---------------------------------------------------------------------------------------------
def caption_list(value: Any) -> list[str]:
    """The captions a field holds: one caption, or a JSON list of them (a ``json`` column or member gives the list
    itself). Empty and blank entries are dropped; a caption that is not UTF-8 is a ``SampleError``.

    Example:
        >>> caption_list('["a cat", " a black cat ", ""]'), caption_list("a cat"), caption_list(None)
        (['a cat', 'a black cat'], ['a cat'], [])
    """
    if value is None:
        return []
    if isinstance(value, (bytes, str)):
        try:
            text = clean_caption(value)
        except SampleError as error:
            if str(error) == "empty caption":
                return []
            raise
        if text.startswith("[") and text.endswith("]"):
            try:
                parsed = json.loads(text)
            except ValueError:
                return [text]  # a caption that happens to be bracketed
            if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
                return caption_list(parsed)
        return [text]
    if isinstance(value, (list, tuple)):
        captions = []
        for item in value:
            if not isinstance(item, str):
                raise SampleError(f"a caption list holds a {type(item).__name__}, not text")
            captions.extend(caption_list(item) if item.strip() else [])
        return captions
    raise SampleError(f"a caption field holds a {type(value).__name__}, not text or a list of texts")


def uniform(seed: int, count: int) -> int:
    """An index in ``range(count)`` drawn from a 64-bit ``seed`` (uniform up to 2^-64)."""
    return min(int((mix64(seed) / 2**64) * count), count - 1)


class CaptionRule:
    """Which caption fields a sample has and which caption a training step uses (the ``captions`` argument).

    Args:
        captions: ``None`` — one caption in ``default_field`` (the format's caption column or member, read as it
            always was); a field name, or a list of them — every caption they hold, drawn uniformly; a mapping of
            field names to weights — a field drawn by weight among those the sample has captions in, then one of
            its captions uniformly (``{txt: 0.5, syn_caption: 0.5}``: half the steps see the alt-text). A field
            holds one caption or a JSON list of them.
        default_field: the format's single caption field.

    Example:
        >>> rule = CaptionRule({"txt": 3, "syn": 1}, "txt")
        >>> fields = rule.read({"txt": "a cat", "syn": '["a black cat", "a cat on a mat"]'}.get)
        >>> fields
        [['a cat'], ['a black cat', 'a cat on a mat']]
        >>> rule.flatten(fields)
        ('a cat', 'a black cat', 'a cat on a mat')
        >>> draws = [rule.draw(fields, sample_seed(0, 0, i, CAPTION_SALT)) for i in range(4000)]
        >>> round(sum(field == 0 for field, _ in draws) / 4000, 1)  # the weights: 3 to 1
        0.8
    """

    def __init__(self, captions: str | Sequence[str] | Mapping[str, float] | None, default_field: str) -> None:
        self.listed = captions is not None  # fields named in YAML may hold JSON lists; the default field never did
        self.weights: tuple[float, ...] | None = None
        if captions is None:
            fields: tuple[str, ...] = (default_field,)
        elif isinstance(captions, str):
            fields = (captions,)
        elif isinstance(captions, Mapping):
            fields = tuple(str(field) for field in captions)
            weights = tuple(captions.values())
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
                raise ValueError(f"captions: the weights must be numbers, got {dict(captions)}")
            if any(not (math.isfinite(w) and w >= 0) for w in weights) or not sum(weights) > 0:
                raise ValueError(f"captions: the weights must be non-negative and not all zero, got {dict(captions)}")
            self.weights = tuple(float(w) for w in weights)
        elif isinstance(captions, Sequence):
            fields = tuple(captions)
            if not all(isinstance(field, str) for field in fields):
                raise ValueError(f"captions: a list of field names, got {list(captions)}")
        else:
            raise ValueError(
                f"captions: a field name, a list of them or a mapping of field names to weights, got {captions!r}"
            )
        if not fields or not all(fields) or len(set(fields)) != len(fields):
            raise ValueError(f"captions: name each field once, got {captions!r}")
        self.fields = fields

    def __repr__(self) -> str:
        if self.weights is not None:
            return f"CaptionRule({dict(zip(self.fields, self.weights, strict=True))})"
        return f"CaptionRule({list(self.fields)})"

    def read(self, get: Callable[[str], Any]) -> list[list[str]]:
        """Each field's captions (``get(field)`` is its raw value, ``None`` when the sample lacks it); a
        ``SampleError`` when the sample has none at all."""
        if not self.listed:
            return [[clean_caption(get(self.fields[0]))]]
        per_field = [caption_list(get(field)) for field in self.fields]
        if not any(per_field):
            raise SampleError(f"no caption in {', '.join(self.fields)}")
        if self.weights is not None and not any(c and w > 0 for c, w in zip(per_field, self.weights, strict=True)):
            raise SampleError(f"no caption in the fields with a weight above 0 ({', '.join(self.fields)})")
        return per_field

    def draw(self, per_field: list[list[str]], seed: int) -> tuple[int, int]:
        """``(field, index)`` of the caption a training step uses, drawn from ``seed`` (see the class)."""
        if self.weights is None:
            pick = uniform(seed, sum(len(captions) for captions in per_field))
            for field, captions in enumerate(per_field):
                if pick < len(captions):
                    return field, pick
                pick -= len(captions)
        weights = [w if captions else 0.0 for captions, w in zip(per_field, self.weights, strict=True)]
        point = (mix64(seed) / 2**64) * sum(weights)
        field = len(weights) - 1
        for index, weight in enumerate(weights):
            if point < weight:
                field = index
                break
            point -= weight
        while not weights[field]:  # rounding at the top end: the last field with a weight
            field -= 1
        return field, uniform(mix64(seed, 1), len(per_field[field]))

    @staticmethod
    def flatten(per_field: list[list[str]]) -> tuple[str, ...]:
        """Every caption, field by field: what evaluation scores (an image's correct texts)."""
        return tuple(caption for captions in per_field for caption in captions)

    def choose(self, per_field: list[list[str]], seed: int, train: bool) -> str | tuple[str, ...]:
        """Training: the drawn caption. Evaluation: every caption, or the one caption of a sample without a rule."""
        if train:
            field, index = self.draw(per_field, seed)
            return per_field[field][index]
        return self.flatten(per_field) if self.listed else per_field[0][0]


# -- batches ----------------------------------------------------------------------------------------------
class Sample(NamedTuple):
    """A decoded, transformed sample; ``skipped`` holds reasons of samples it replaced (map-style formats).

    ``caption`` is one caption (training), or every caption of the image (evaluation with ``captions``).
    ``extras`` are per-sample arrays a batch carries besides images and tokens (stored teacher embeddings).
    """

    image: torch.Tensor  # (3, H, W)
    caption: str | tuple[str, ...]
    skipped: tuple[str, ...] = ()
    extras: Mapping[str, Any] | None = None


class Skipped(NamedTuple):
    """A sample (or a damaged stretch of a shard) that was dropped, with the reason."""

    reason: str


class SampleBatch(NamedTuple):
    """A collated batch: ``events`` lists, in stream order, ``None`` for each sample and a reason for each skip.

    ``extras`` maps names to per-sample tensors (first dimension ``N``): ``captions`` ``(N, C, L)`` holds every
    caption of each image (evaluation with several captions; rows of zeros past an image's last caption), stored
    teacher embeddings ``teacher<i>_image`` / ``teacher<i>_text`` ``(N, D)`` and ``teacher<i>_scale`` ``(N,)``.
    """

    images: torch.Tensor  # (N, 3, H, W)
    tokens: torch.Tensor  # (N, L)
    events: tuple[str | None, ...]
    extras: Mapping[str, torch.Tensor] | None = None

    @property
    def skipped(self) -> list[str]:
        return [event for event in self.events if event is not None]

    def as_tuple(self) -> tuple:
        """What a loader yields: ``(images, tokens)``, or ``(images, tokens, extras)`` when there are extras."""
        return batch_tuple(self.images, self.tokens, self.extras)


def batch_tuple(images: torch.Tensor, tokens: torch.Tensor, extras: Mapping[str, torch.Tensor] | None) -> tuple:
    """``(images, tokens)``, with ``extras`` as a third item when there are any (see ``cadenza.engine.loader``)."""
    return (images, tokens, dict(extras)) if extras else (images, tokens)


def concat_extras(parts: Sequence[Mapping[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """The extras of consecutive pieces of a batch, concatenated; a tensor whose other dimensions differ between
    pieces (``captions``: ``C`` is each piece's most captions) is zero-padded to the largest."""
    parts = [part for part in parts if part]
    if not parts:
        return {}
    joined = {}
    for key in parts[0]:
        tensors = [part[key] for part in parts]
        shape = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors), strict=True)]
        padded = []
        for tensor in tensors:
            pad = []
            for have, want in zip(reversed(tensor.shape[1:]), reversed(shape), strict=True):
                pad += [0, want - have]
            padded.append(torch.nn.functional.pad(tensor, pad) if any(pad) else tensor)
        joined[key] = torch.cat(padded)
    return joined


def stack_shared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; in a DataLoader worker, straight into shared memory, as ``default_collate`` does: the batch
    then goes to the training process without being copied into shared memory once more on the way."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first._typed_storage()._new_shared(len(tensors) * first.numel(), device=first.device)  # torch's own path
    return torch.stack(tensors, out=first.new(storage).resize_(len(tensors), *first.shape))


class SampleCollator:
    """``collate_fn`` for lists of ``Sample`` / ``Skipped``: stacks images, tokenizes captions in one call.

    A sample with every caption of its image (a tuple) contributes its first to ``tokens`` and all of them to
    ``extras["captions"]``; the samples' ``extras`` are stacked under their names.

    Args:
        tokenizer: captions → ``(N, L)`` token ids.
        image_shape: ``(3, H, W)``, for the empty image tensor of a batch where every item was skipped.
        context_length: ``L``, likewise.
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], image_shape: Sequence[int], context_length: int):
        self.tokenizer = tokenizer
        self.image_shape = tuple(image_shape)
        self.context_length = context_length

    def __call__(self, items: Sequence[Sample | Skipped]) -> SampleBatch:
        samples = [item for item in items if isinstance(item, Sample)]
        events: list[str | None] = []
        for item in items:
            if isinstance(item, Skipped):
                events.append(item.reason)
            else:
                events.extend(item.skipped)
                events.append(None)
        if not samples:
            empty = torch.empty(0, *self.image_shape), torch.zeros(0, self.context_length, dtype=torch.long)
            return SampleBatch(*empty, tuple(events))
        images = stack_shared([s.image for s in samples])  # (N, 3, H, W)
        captions = [s.caption if isinstance(s.caption, str) else s.caption[0] for s in samples]
        tokens = self.tokenizer(captions)  # (N, L)
        extras: dict[str, torch.Tensor] = {}
        if samples[0].extras:
            for key in samples[0].extras:  # NumPy arrays (read-only views of a shard) or scalars: stacked anew
                extras[key] = torch.from_numpy(np.stack([s.extras[key] for s in samples]))
        if any(isinstance(s.caption, tuple) for s in samples):
            extras["captions"] = self._every_caption(samples)
        return SampleBatch(images, tokens, tuple(events), extras or None)

    def _every_caption(self, samples: list[Sample]) -> torch.Tensor:
        per_sample = [(s.caption,) if isinstance(s.caption, str) else s.caption for s in samples]
        rows = self.tokenizer([caption for captions in per_sample for caption in captions])  # (M, L)
        most = max(len(captions) for captions in per_sample)
        every = torch.zeros(len(samples), most, rows.shape[1], dtype=rows.dtype)  # (N, C, L)
        start = 0
        for index, captions in enumerate(per_sample):
            every[index, : len(captions)] = rows[start : start + len(captions)]
            start += len(captions)
        return every


class SkipCounter:
    """Counts skipped samples in the main process and logs their reasons (``logging.getLogger("cadenza")``).

    The first ``log_first`` reasons are logged one by one, then one summary line per ``log_every`` skips.
    ``skipped`` is what this process has consumed since the loader was built (the trainer sums it over
    processes and adds what earlier runs of a resumed job counted).

    Args:
        source: names the data source in log lines (``csv /data/train.csv``).
    """

    def __init__(self, source: str, log_first: int = 100, log_every: int = 1000) -> None:
        self.source = source
        self.log_first = log_first
        self.log_every = log_every
        self.skipped = 0

    def add(self, reasons: Iterable[str]) -> None:
        for reason in reasons:
            self.skipped += 1
            if self.skipped <= self.log_first:
                log.warning("skipped a sample of %s: %s", self.source, reason)
                if self.skipped == self.log_first:
                    log.warning("further skips of %s are counted in data/skipped and summarized", self.source)
            elif self.skipped % self.log_every == 0:
                log.warning("%d samples of %s skipped so far; latest: %s", self.skipped, self.source, reason)


def nothing_decodes(source: str, reasons: Sequence[str]) -> DataError:
    """The error for a source where no sample could be used, with a few of the reasons."""
    examples = "; ".join(dict.fromkeys(reasons[:5]))
    return DataError(
        f"no sample of {source} can be used: {len(reasons)} tried, all skipped (e.g. {examples}). "
        "Check the path, the format's column / member names and that the files are readable."
    )


# -- compact string storage -------------------------------------------------------------------------------
class StringTable:
    """Strings packed in one bytes buffer with an offsets array.

    A list of millions of Python strings in a dataset makes forked DataLoader workers copy the pages they touch
    (reference counts); two flat buffers do not.
    """

    def __init__(self, strings: Iterable[str]) -> None:
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._data[start:end].tobytes().decode("utf-8", "surrogateescape")
