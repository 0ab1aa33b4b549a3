"""Evaluation sets in the formats the field publishes: labelled images and images with several captions.

Each ``scan_*`` function reads a set's metadata once — file lists, labels, captions, tar member offsets, never the
images — and checks it, so a bad set fails before any model work with a ``ConfigError`` naming the task's field
(``key`` is the task's config path, ``eval.tasks.<name>``). Images are read later, one by one, from an
``ImageReader`` (random access, so they can be split over processes and DataLoader workers).

Formats:

- ``imagefolder``: ``<path>/<class>/<image>`` (ImageNet's layout; ImageNetV2's folders ``0`` ... ``999``).
- ``wds``: LAION CLIP_benchmark's WebDataset layout (``clip_benchmark.webdataset_builder``)::

      <path>/<split>/0.tar 1.tar ... nshards.txt   members s0000000.webp|png|jpg + s0000000.cls (or .txt)
      <path>/classnames.txt                          one class name per line, in label order
      <path>/zeroshot_classification_templates.txt   prompts with {c} for the class name
      <path>/dataset_type.txt                        "retrieval" for image–caption sets (.txt: one caption a line)

- ``csv``: a header row; an image column (paths relative to ``images``) and a label column (class index or class
  name), or a caption column with one row per caption (rows of one image share its path).
- ``mds``: MDS shards (``composer convert --from imagefolder`` writes them) with an image and a label column.
- ``karpathy``: Karpathy's COCO / Flickr30k split files (``{"images": [{"filepath", "filename", "split",
  "sentences": [{"raw"}]}]}``), or the list form CLIP_benchmark and BLIP use (``[{"image", "caption": [...]}]``).
"""

from __future__ import annotations

import csv
import json
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cadenza.datasets.samples import SampleError, StringTable, decode_image, read_image_file
from cadenza.engine.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: image members of a CLIP_benchmark shard, in the order its reader tries them
WDS_IMAGE_MEMBERS = ("webp", "png", "jpg", "jpeg")


# -- reading images -----------------------------------------------------------------------------------------------
class ImageReader:
    """Random access to a set's images: ``read(i)`` decodes image ``i`` or raises ``SampleError``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int):
        raise NotImplementedError


class FileImages(ImageReader):
    """Image files by path."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = StringTable(paths)  # no per-string objects for forked workers to copy

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int):
        return read_image_file(self.paths[index])


class TarMembers(ImageReader):
    """Members of uncompressed tar files, read by byte range (no tar parsing at read time)."""

    def __init__(self, shards: list[str], shard: list[int], offset: list[int], size: list[int]) -> None:
        self.shards = shards
        self.where = np.array([shard, offset, size], dtype=np.int64).reshape(3, -1)  # (3, N)

    def __len__(self) -> int:
        return self.where.shape[1]

    def read(self, index: int):
        shard, offset, size = (int(v) for v in self.where[:, index])
        try:
            with open(self.shards[shard], "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        except OSError as error:
            raise SampleError(f"unreadable shard {self.shards[shard]} ({error})") from None
        try:
            return decode_image(data)
        except SampleError as error:
            raise SampleError(f"{error} at byte {offset} of {self.shards[shard]}") from None


class MDSImages(ImageReader):
    """The image column of local MDS shards (``streaming.LocalDataset``, opened in each process that reads)."""

    def __init__(self, folder: str, split: str | None, image_key: str, size: int) -> None:
        self.folder, self.split, self.image_key, self.size = folder, split, image_key, size
        self._dataset = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None}

    def __len__(self) -> int:
        return self.size

    def read(self, index: int):
        if self._dataset is None:
            self._dataset = open_mds(self.folder, self.split, {self.image_key})
        try:
            value = self._dataset.get_item(index)[self.image_key]
        except Exception as error:  # noqa: BLE001 - a damaged shard is one sample's problem
            raise SampleError(f"sample {index} of {self.folder} cannot be read ({error})") from None
        return decode_image(value) if isinstance(value, bytes) else value


# -- what a scan finds --------------------------------------------------------------------------------------------
@dataclass
class LabelledImages:
    """Images with one label each. ``labels`` are class indices (``int``) or, where the data names classes by text
    (folder names, CSV cells), strings the task maps to indices; ``classnames`` / ``templates`` are those shipped
    with the data (``None`` if it has none)."""

    images: ImageReader
    labels: list[Any]
    where: list[str]  # names each label's place in messages: a file, a row, a tar member
    classnames: list[str] | None = None
    templates: list[str] | None = None
    folders: list[str] = field(default_factory=list)  # imagefolder: the class folders, sorted


@dataclass
class CaptionedImages:
    """Images with one or more captions each."""

    images: ImageReader
    captions: list[list[str]]


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _existing(path: str, key: str, what: str) -> Path:
    found = Path(path)
    if str(path).startswith(("s3://", "http://", "https://")):
        raise ConfigError(f"{key}.path", f"'{path}' is not local: evaluation sets are read from local paths.")
    if not found.exists():
        raise ConfigError(f"{key}.path", f"'{path}' does not exist ({what}).")
    return found


# -- image folders -----------------------------------------------------------------------------------------------
def scan_image_folder(path: str, key: str) -> LabelledImages:
    """``<path>/<class>/<image>``; labels are the folder names (the task maps them to class indices)."""
    root = _existing(path, key, "an image folder: <path>/<class>/<image>")
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        raise ConfigError(f"{key}.path", f"'{path}' has no class folders (expected {path}/<class>/<image>).")
    files, labels = [], []
    for folder in folders:
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(str(file))
                labels.append(folder.name)
    if not files:
        raise ConfigError(f"{key}.path", f"'{path}' has {len(folders)} class folders but no images in them.")
    return LabelledImages(FileImages(files), labels, files, folders=[f.name for f in folders])


# -- CLIP_benchmark's WebDataset layout -----------------------------------------------------------------------------
def _natural(path: Path) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


def _shards(root: Path, split: str, key: str) -> list[Path]:
    folder = root / split
    if not folder.is_dir():
        splits = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.tar")))
        raise ConfigError(
            f"{key}.split",
            f"'{folder}' does not exist (CLIP_benchmark's layout: <path>/<split>/0.tar ...); "
            f"splits found: {', '.join(splits) or 'none'}.",
        )
    count = folder / "nshards.txt"
    if count.is_file():
        shards = [folder / f"{i}.tar" for i in range(int(count.read_text().strip()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ConfigError(f"{key}.path", f"{count} lists {len(shards)} shards; missing: {', '.join(missing[:5])}.")
    else:
        shards = sorted(folder.glob("*.tar"), key=_natural)
    if not shards:
        raise ConfigError(f"{key}.path", f"'{folder}' holds no .tar shards.")
    return shards


def _tar_samples(shard: Path, key: str) -> list[tuple[str, dict[str, tuple[int, int]], dict[str, bytes]]]:
    """``(sample key, {extension: (offset, size)}, {extension: bytes of the small text members})`` per sample."""
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, tuple[dict[str, tuple[int, int]], dict[str, bytes]]] = {}
    try:
        with tarfile.open(shard, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                prefix, extension = base_plus_ext(member.name)
                if prefix is None or prefix.rsplit("/", 1)[-1].startswith("__"):
                    continue  # no extension, or WebDataset metadata (__index__, __meta__.json)
                extension = extension.lower()
                places, texts = samples.setdefault(prefix, ({}, {}))
                places[extension] = (member.offset_data, member.size)
                if extension in ("cls", "txt"):
                    texts[extension] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ConfigError(f"{key}.path", f"'{shard}' is not a readable uncompressed tar ({error}).") from None
    return [(prefix, places, texts) for prefix, (places, texts) in samples.items()]


def read_wds_type(path: str, key: str) -> str:
    """``dataset_type.txt`` beside the shards: ``classification`` (the default), ``retrieval`` or ``multilabel``."""
    kind = Path(path) / "dataset_type.txt"
    return kind.read_text().strip().lower() if kind.is_file() else "classification"


def scan_wds(path: str, split: str, key: str, retrieval: bool) -> LabelledImages | CaptionedImages:
    """A CLIP_benchmark WebDataset set: labels from ``.cls`` members (or captions from ``.txt``), class names and
    templates from the text files beside the shards."""
    root = _existing(path, key, "CLIP_benchmark's layout: <path>/<split>/0.tar ...")
    if not root.is_dir():
        raise ConfigError(
            f"{key}.path", f"'{path}' is a file; CLIP_benchmark's layout is a folder <path>/<split>/*.tar."
        )
    kind = read_wds_type(path, key)
    expected = "retrieval" if retrieval else "classification"
    if kind != expected:
        raise ConfigError(
            f"{key}.type",
            f"{root / 'dataset_type.txt'} says '{kind}', and the task is {'retrieval' if retrieval else 'classification'}"
            f"{' (multi-label sets are not supported)' if kind == 'multilabel' else ''}.",
        )
    shards = _shards(root, split, key)
    wanted = "txt" if retrieval else "cls"
    shard_of, offsets, sizes, values, where = [], [], [], [], []
    for number, shard in enumerate(shards):
        for prefix, places, texts in _tar_samples(shard, key):
            image = next((e for e in WDS_IMAGE_MEMBERS if e in places), None)
            name = f"{shard.name}:{prefix}"
            if image is None or wanted not in texts:
                missing = f"an image member ({'/'.join(WDS_IMAGE_MEMBERS)})" if image is None else f"a .{wanted} member"
                raise ConfigError(f"{key}.path", f"sample {name} has no {missing}; found {sorted(places)}.")
            text = texts[wanted].decode("utf-8", "replace")
            if retrieval:
                value: Any = [line for line in text.splitlines() if line.strip()]
                if not value:
                    raise ConfigError(f"{key}.path", f"sample {name} has an empty .txt member (no captions).")
            else:
                try:
                    value = int(text.strip())
                except ValueError:
                    raise ConfigError(
                        f"{key}.path", f"sample {name}: .cls holds {text.strip()!r}, not a class index."
                    ) from None
            shard_of.append(number)
            offsets.append(places[image][0])
            sizes.append(places[image][1])
            values.append(value)
            where.append(name)
    if not values:
        raise ConfigError(f"{key}.path", f"the shards in '{root / split}' hold no samples.")
    images = TarMembers([str(s) for s in shards], shard_of, offsets, sizes)
    if retrieval:
        return CaptionedImages(images, values)
    names, prompts = root / "classnames.txt", root / "zeroshot_classification_templates.txt"
    return LabelledImages(
        images,
        values,
        where,
        classnames=read_lines(names) if names.is_file() else None,
        templates=read_lines(prompts) if prompts.is_file() else None,
    )


# -- CSV --------------------------------------------------------------------------------------------------------
def scan_csv(
    path: str, key: str, image_key: str, value_key: str, value_field: str, separator: str | None, images: str | None
) -> tuple[list[str], list[str], list[str]]:
    """``(image paths, values, row names)`` of a CSV with a header; ``value_key`` is the label or caption column
    (``value_field`` names its task key in messages). Image paths are relative to ``images`` (default: the CSV's
    folder)."""
    file = _existing(path, key, "a CSV file with a header row")
    if separator is None:
        separator = "\t" if file.suffix.lower() == ".tsv" else ","
    base = Path(images) if images is not None else file.parent
    paths, values, rows = [], [], []
    with file.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=separator)
        columns = reader.fieldnames or []
        for column, field_name in ((image_key, "image_key"), (value_key, value_field)):
            if column not in columns:
                raise ConfigError(
                    f"{key}.{field_name}",
                    f"'{path}' has no column '{column}'; its columns are {columns} (separator {separator!r}).",
                )
        for number, row in enumerate(reader, start=2):
            image, value = (row.get(image_key) or "").strip(), (row.get(value_key) or "").strip()
            if not image or not value:
                empty = image_key if not image else value_key
                raise ConfigError(
                    f"{key}.{'image_key' if not image else value_field}",
                    f"line {number} of '{path}' has an empty '{empty}'.",
                )
            paths.append(str(base / image))
            values.append(value)
            rows.append(f"line {number} of {path}")
    if not paths:
        raise ConfigError(f"{key}.path", f"'{path}' has a header but no rows.")
    return paths, values, rows


def scan_csv_labels(path: str, key: str, image_key: str, label_key: str, separator: str | None, images: str | None):
    """A CSV of images and labels (class indices or class names)."""
    paths, labels, rows = scan_csv(path, key, image_key, label_key, "label_key", separator, images)
    parsed = [int(label) if re.fullmatch(r"-?\d+", label) else label for label in labels]
    return LabelledImages(FileImages(paths), parsed, rows)


def scan_csv_captions(
    path: str, key: str, image_key: str, caption_key: str, separator: str | None, images: str | None
) -> CaptionedImages:
    """A CSV with one row per caption; rows with the same image path are one image (first-seen order)."""
    paths, captions, _ = scan_csv(path, key, image_key, caption_key, "caption_key", separator, images)
    grouped: dict[str, list[str]] = {}
    for image, caption in zip(paths, captions, strict=True):
        grouped.setdefault(image, []).append(caption)
    return CaptionedImages(FileImages(list(grouped)), list(grouped.values()))


# -- MDS -------------------------------------------------------------------------------------------------------
def open_mds(folder: str, split: str | None, byte_columns: set[str], raw: tuple[str, ...] = ("jpeg", "png")):
    """``streaming.LocalDataset`` over local MDS shards; columns in ``byte_columns`` encoded as one of ``raw`` are
    read as their bytes (decoded by the caller, only when needed)."""
    from cadenza.datasets.streaming_import import load_streaming

    load_streaming()
    from streaming import LocalDataset

    dataset = LocalDataset(folder, split)
    for shard in dataset.shards:
        encodings = list(shard.column_encodings)
        for index, name in enumerate(shard.column_names):
            if name in byte_columns and encodings[index] in raw:
                encodings[index] = "bytes"
        shard.column_encodings = encodings
    return dataset


def scan_mds(path: str, split: str | None, key: str, image_key: str, label_key: str) -> LabelledImages:
    """Local MDS shards with an image column and an integer label column."""
    root = _existing(path, key, "a folder of MDS shards with an index.json")
    index = root / (split or "") / "index.json"
    if not index.is_file():
        raise ConfigError(f"{key}.path", f"'{index}' does not exist: not a folder of MDS shards.")
    try:
        dataset = open_mds(str(root), split, {image_key}, raw=("jpeg", "png", "pil"))  # images never decoded here
    except Exception as error:  # noqa: BLE001 - any unreadable index is reported the same way
        raise ConfigError(f"{key}.path", f"cannot read the MDS shards in '{root}' ({error}).") from None
    shard = dataset.shards[0]
    columns = dict(zip(shard.column_names, shard.column_encodings, strict=True))
    integers = ("int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    for column, field_name, allowed, what in (
        (image_key, "image_key", ("bytes", "jpeg", "png", "pil"), "an image (jpeg, png, bytes or pil)"),
        (label_key, "label_key", integers, "an integer class index"),
    ):
        if column not in columns:
            message = f"the shards in '{root}' have no column '{column}'; they have {sorted(columns)}."
            raise ConfigError(f"{key}.{field_name}", message)
        if columns[column] not in allowed:
            raise ConfigError(
                f"{key}.{field_name}", f"column '{column}' is encoded as '{columns[column]}', not {what}."
            )
    if not len(dataset):
        raise ConfigError(f"{key}.path", f"the MDS shards in '{root}' hold no samples.")
    labels = []
    for sample in range(len(dataset)):
        try:
            labels.append(int(dataset.get_item(sample)[label_key]))
        except Exception as error:  # noqa: BLE001 - a damaged shard
            raise ConfigError(f"{key}.path", f"sample {sample} of '{root}' cannot be read ({error}).") from None
    where = [f"sample {i} of {root}" for i in range(len(labels))]
    return LabelledImages(MDSImages(str(root), split, image_key, len(labels)), labels, where)


# -- Karpathy splits ---------------------------------------------------------------------------------------------
def scan_karpathy(path: str, split: str | None, key: str, images: str | None) -> CaptionedImages:
    """Karpathy's split file (``dataset_coco.json``, ``dataset_flickr30k.json``): the images of ``split`` with their
    ``sentences``; or a list of ``{"image": path, "caption": [...]}`` (CLIP_benchmark's and BLIP's test files).
    Image paths are relative to ``images`` (default: the JSON's folder)."""
    file = _existing(path, key, "a Karpathy-style JSON file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}.path", f"'{path}' is not readable JSON ({error}).") from None
    base = Path(images) if images is not None else file.parent
    paths, captions = [], []
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        for entry in data["images"]:
            if split is not None and entry.get("split") != split:
                continue
            sentences = [s.get("raw", "").strip() for s in entry.get("sentences", [])]
            paths.append(str(base / entry.get("filepath", "") / entry["filename"]))
            captions.append([s for s in sentences if s])
        found = sorted({str(e.get("split")) for e in data["images"]})
        if not paths:
            raise ConfigError(f"{key}.split", f"no image of '{path}' is in split '{split}'; its splits are {found}.")
    elif isinstance(data, list):
        for entry in data:
            caption = entry.get("caption") if isinstance(entry, dict) else None
            if not isinstance(entry, dict) or "image" not in entry or caption is None:
                raise ConfigError(
                    f"{key}.path", f"'{path}': each entry needs 'image' and 'caption', got {entry!r:.80}."
                )
            texts = [caption] if isinstance(caption, str) else list(caption)
            paths.append(str(base / entry["image"]))
            captions.append([str(t).strip() for t in texts if str(t).strip()])
    else:
        raise ConfigError(f"{key}.path", f"'{path}' is neither Karpathy's {{\"images\": [...]}} nor a list of images.")
    if not paths:
        raise ConfigError(f"{key}.path", f"'{path}' lists no images.")
    bare = [p for p, c in zip(paths, captions, strict=True) if not c]
    if bare:
        raise ConfigError(f"{key}.path", f"{len(bare)} images of '{path}' have no caption, e.g. {bare[0]}.")
    return CaptionedImages(FileImages(paths), captions)
