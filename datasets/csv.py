"""OpenCLIP's CSV format: one row per image, an image-path column and a caption column.

``data.train: {type: csv, path: /data/train.csv}`` reads a tab-separated file (``csv_separator``) whose
header names the columns (``csv_img_key: filepath``, ``csv_caption_key: title``), like OpenCLIP's
``--csv-separator`` / ``--csv-img-key`` / ``--csv-caption-key``. Relative image paths resolve against the
CSV's folder, or against ``image_root`` when it is set (``image_root: .`` is the working directory, OpenCLIP's rule,
which ``composer openclip`` sets). When the first relative path is missing under the rule in force but present under
the other one, the dataset stops at once with an error naming both paths. ``captions`` names several caption
columns instead (each cell one caption or a JSON list of them), with weights or without (see ``samples.CaptionRule``):
a training step draws one caption per row, seeded by ``(run.seed, epoch, row)``; evaluation scores every caption of a
row. The rows are indexed once, in the main process, into two flat buffers (cheap to share with
forked workers); images are read and decoded in the DataLoader workers.

Loading goes through ``ResumableLoader`` (``csv`` is registered as ``resumable(CsvDataset)``): a seeded per-epoch
order split across processes, exact resume. Each sample's augmentation is seeded from ``(run.seed, epoch, row)``,
so it does not depend on the worker count.

A row that cannot be used — malformed (a parse error, missing or extra fields, an empty path), a missing or
corrupt image, an empty caption — is replaced by the first of a fixed pseudo-random list of other rows that
decodes (``samples.substitutes``), so batches stay full; each failed attempt is counted in ``data/skipped``
with its reason in ``out.log``. When none of up to 1000 rows decodes, the run stops with a ``DataError``.
"""

from __future__ import annotations

import csv
import logging
import os
import sys

from torch.utils.data import Dataset

from cadenza.datasets.context import LoaderContext
from cadenza.datasets.loader import resumable
from cadenza.datasets.samples import (
    CAPTION_SALT,
    CaptionRule,
    Sample,
    SampleCollator,
    SampleError,
    StringTable,
    nothing_decodes,
    read_image_file,
    sample_seed,
    substitutes,
    transform_sample,
)
from cadenza.engine.registry import DATASETS

log = logging.getLogger("cadenza")


class CsvDataset(Dataset):
    """Image–caption pairs listed in a CSV file (OpenCLIP's ``--dataset-type csv``).

    Args:
        path: the CSV file.
        context: set by the trainer (transform, tokenizer, seed, ...).
        csv_separator: the field separator (OpenCLIP's default: tab).
        csv_img_key: the header of the image-path column.
        csv_caption_key: the header of the caption column.
        num_samples: use only the first ``num_samples`` rows (default: all).
        image_root: the folder relative image paths are read from (``.``: the working directory, as OpenCLIP);
            default: the CSV's folder.
        captions: several caption columns instead of ``csv_caption_key``: a column name or a list of them (one
            caption drawn uniformly per step), or a mapping of column names to weights; each cell holds one caption
            or a JSON list of them (see ``samples.CaptionRule``).
    """

    #: indexed with ``(epoch, row)`` by ``ResumableLoader``, so augmentation is seeded per epoch and row
    epoch_keys = True

    def __init__(
        self,
        path: str,
        context: LoaderContext,
        csv_separator: str = "\t",
        csv_img_key: str = "filepath",
        csv_caption_key: str = "title",
        num_samples: int | None = None,
        image_root: str | None = None,
        captions: str | list[str] | dict[str, float] | None = None,
    ) -> None:
        if captions is not None and csv_caption_key != "title":
            raise ValueError("set either captions (several caption columns) or csv_caption_key (one), not both")
        self.rule = CaptionRule(captions, csv_caption_key)
        self.train = context.train
        if len(csv_separator) != 1:
            raise ValueError(f"csv_separator must be one character, got {csv_separator!r}")
        if not os.path.isfile(path):
            raise ValueError(f"CSV file '{path}' does not exist (path)")
        self.path = path
        self.source = f"csv {path}"
        self.transform = context.transform
        self.seed = context.seed
        self.collate_fn = SampleCollator(
            context.tokenizer, (3, context.image_size, context.image_size), context.context_length
        )
        images, captions, self.malformed = _read_rows(path, csv_separator, csv_img_key, self.rule.fields)
        if not images:
            raise ValueError(f"'{path}' has a header but no rows")
        if num_samples is not None:
            if not 0 < num_samples <= len(images):
                raise ValueError(f"num_samples={num_samples}, but '{path}' has {len(images)} rows")
            images, captions = images[:num_samples], [column[:num_samples] for column in captions]
            self.malformed = {row: reason for row, reason in self.malformed.items() if row < num_samples}
        folder = _image_folder(path, image_root, images, self.malformed)
        self.images = StringTable(p if os.path.isabs(p) or not p else os.path.join(folder, p) for p in images)
        self.captions = {field: StringTable(column) for field, column in zip(self.rule.fields, captions, strict=True)}
        if self.malformed:
            log.warning(
                "%s: %d of %d rows are malformed and will be skipped when drawn (first: %s)",
                self.source,
                len(self.malformed),
                len(self.images),
                next(iter(self.malformed.values())),
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        """The sample of row ``index`` (``key`` is ``index`` or ``(epoch, index)``), or its replacement."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not 0 <= index < len(self):
            raise IndexError(index)
        reasons: list[str] = []
        for row in substitutes(index, len(self)):
            try:
                image, captions = self._load(row)
            except SampleError as error:
                reasons.append(f"row {row + 1}: {error}")
                continue
            tensor = transform_sample(self.transform, image, sample_seed(self.seed, epoch, index))
            caption = self.rule.choose(captions, sample_seed(self.seed, epoch, index, CAPTION_SALT), self.train)
            return Sample(tensor, caption, tuple(reasons))
        raise nothing_decodes(self.source, reasons)

    def _load(self, row: int):
        if row in self.malformed:
            raise SampleError(self.malformed[row])
        captions = self.rule.read(lambda field: self.captions[field][row])
        return read_image_file(self.images[row]), captions


DATASETS.register("csv")(resumable(CsvDataset))


def _image_folder(path: str, image_root: str | None, images: list[str], malformed: dict[int, str]) -> str:
    """The folder relative image paths resolve against; an error naming both candidates when the first relative path
    is only found under the other rule (the CSV's folder against ``image_root`` or the working directory)."""
    csv_folder = os.path.dirname(os.path.abspath(path))
    folder = csv_folder if image_root is None else os.path.abspath(image_root)
    first = next((row for row, p in enumerate(images) if p and not os.path.isabs(p) and row not in malformed), None)
    if first is None:
        return folder
    relative = images[first]
    other = os.getcwd() if image_root is None else csv_folder
    here, there = os.path.join(folder, relative), os.path.join(other, relative)
    if folder != other and not os.path.exists(here) and os.path.exists(there):
        rule = "the CSV's folder (image_root unset)" if image_root is None else f"image_root={image_root}"
        fix = "image_root: . (the working directory, OpenCLIP's rule)" if image_root is None else "image_root unset"
        raise ValueError(
            f"'{path}' lists '{relative}' (row {first + 1}), a relative path: {here} (relative to {rule}) does not "
            f"exist, {there} does. Set {fix}, or write absolute paths."
        )
    return folder


def _read_rows(
    path: str, separator: str, img_key: str, caption_keys: tuple[str, ...]
) -> tuple[list[str], list[list[str]], dict[int, str]]:
    """Image paths, each caption column's cells and ``{row: reason}`` for malformed rows (rows count from 0 after
    the header)."""
    images: list[str] = []
    captions: list[list[str]] = [[] for _ in caption_keys]
    malformed: dict[int, str] = {}
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.reader(handle, delimiter=separator)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"'{path}' is empty") from None
        named = [(img_key, "csv_img_key")]
        named += [(key, "csv_caption_key" if len(caption_keys) == 1 else "captions") for key in caption_keys]
        for key, name in named:
            if key not in header:
                raise ValueError(
                    f"'{path}' has no column '{key}' ({name}); its columns are {header}. "
                    "Set csv_img_key / csv_caption_key (or captions), or csv_separator if the header did not split."
                )
        image_column = header.index(img_key)
        caption_columns = [header.index(key) for key in caption_keys]
        while True:
            line = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                fields, problem = None, f"unparsable ({error})"
            else:
                if not fields:
                    continue  # a blank line is not a row (as in pandas)
                problem = _row_problem(fields, len(header), image_column)
            if problem is not None:
                malformed[len(images)] = f"malformed row at line {line}: {problem}"
                fields = None
            images.append(fields[image_column] if fields else "")
            for cells, column in zip(captions, caption_columns, strict=True):
                cells.append(fields[column] if fields else "")
    return images, captions, malformed


def _row_problem(fields: list[str], width: int, image_column: int) -> str | None:
    if len(fields) != width:
        return f"{len(fields)} fields, the header has {width}"
    if not fields[image_column].strip():
        return "empty image path"
    return None
