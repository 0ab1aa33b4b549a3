"""``composer convert``: CSV, WebDataset or an image folder → MDS shards (a local folder or ``s3://``).

    composer convert --from csv /data/train.csv --to s3://bucket/mds/train
    composer convert --from webdataset '/data/{00000..00099}.tar' --to /data/mds/train
    composer convert --from imagefolder /data/digits/train --to /data/mds/digits --templates 'a photo of a {}.'

Each sample is written as its original encoded image bytes (no re-encoding) and its caption, in the
columns ``jpg`` (MDS encoding ``jpeg``: plain ``streaming.StreamingDataset`` readers get a PIL image)
and ``txt`` (``str``), with xxh64 hashes of every shard. ``--image-encoding pil`` stores decoded pixels
instead, which are read without decoding: for small images, whose decode is a large part of loading them
(a sixth of the quickstart loader's time for its 32 px PNG digits). An image folder also gets ``cls`` (the class
index). Every image is decoded once to check it; a sample whose image is missing or corrupt, or whose
caption is empty, is skipped and counted. When the conversion completes, ``index.json`` holds exactly
the samples written and ``cadenza-convert.json`` records the counts; a conversion that fails removes
its ``index.json``, so a partial output never passes for a complete one.

Sources follow OpenCLIP's conventions: CSV with ``--csv-separator`` (tab), ``--csv-img-key``
(``filepath``) and ``--csv-caption-key`` (``title``), image paths relative to the CSV's folder;
WebDataset ``.tar`` shards (brace expansion, ``::`` between sources, local or ``s3://``) of
``key.jpg|jpeg|png|webp`` + ``key.txt``; an image folder of class-named subfolders, captioned with
``--templates`` (``{}`` is the class name; template ``i % len(templates)`` for the ``i``-th image of
a class).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image

from cadenza.datasets.samples import SampleError, SkipCounter, Skipped, clean_caption, decode_image
from cadenza.datasets.streaming_import import load_streaming
from cadenza.datasets.webdataset import CAPTION_EXTENSION, expand_sources, iter_tar
from cadenza.datasets.webdataset import IMAGE_EXTENSIONS as TAR_IMAGE_EXTENSIONS
from cadenza.engine.errors import CadenzaError, DataError
from cadenza.engine.object_store import check_storage, get_object_store, is_remote

log = logging.getLogger("cadenza")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: what ``composer convert`` writes next to ``index.json`` once every shard is written
MARKER = "cadenza-convert.json"
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass
class Item:
    """One source sample before checking: encoded image bytes (or a file to read them from, in a checking thread),
    a caption, and why it is unusable if that is already known."""

    name: str
    image: bytes | None
    caption: str | bytes | None
    label: int | None = None
    error: str | None = None
    file: str | None = None


@dataclass
class Report:
    """What a conversion wrote and skipped."""

    samples: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)  # the first 5


# -- sources --------------------------------------------------------------------------------------------
def csv_items(
    path: str, separator: str = "\t", img_key: str = "filepath", caption_key: str = "title"
) -> Iterator[Item]:
    """Rows of an OpenCLIP CSV; relative image paths resolve against the CSV's folder."""
    folder = Path(path).parent
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=separator)
        missing = [key for key in (img_key, caption_key) if key not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: no column {missing[0]!r}; its columns are {reader.fieldnames} "
                f"(separator {separator!r}; set --csv-img-key / --csv-caption-key / --csv-separator)"
            )
        for line, row in enumerate(reader, start=2):
            image_path, caption = row.get(img_key), row.get(caption_key)
            if image_path is None or caption is None or None in row:
                yield Item(f"{path}:{line}", None, None, error=f"malformed row at line {line}")
                continue
            yield _file_item(str(folder / image_path), caption)


def imagefolder_items(root: str, templates: list[str], classnames: list[str] | None = None) -> Iterator[Item]:
    """Images in class-named subfolders, captioned ``templates[i % n].format(class name)``."""
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{root}: no class subfolders (expected {root}/<class>/<image>)")
    if classnames is not None and len(classnames) != len(folders):
        raise DataError(f"{root}: {len(folders)} class folders but {len(classnames)} class names")
    names = classnames or [folder.name.replace("_", " ") for folder in folders]
    for label, (folder, name) in enumerate(zip(folders, names, strict=True)):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        for index, file in enumerate(files):
            yield _file_item(str(file), templates[index % len(templates)].format(name), label)


def webdataset_items(path: str) -> Iterator[Item]:
    """Samples of WebDataset tar shards, read as the ``webdataset`` loader reads them (``iter_tar``): members
    grouped by key; a missing shard, a truncated tar or a sample without image or caption is an error item."""
    urls, _ = expand_sources(path)
    for url in urls:
        for sample, _ in iter_tar(url):
            if isinstance(sample, Skipped):
                yield Item(url, None, None, error=sample.reason)
                continue
            name = f"{url}:{sample.key}"
            image = next((sample.parts[ext] for ext in TAR_IMAGE_EXTENSIONS if ext in sample.parts), None)
            if sample.problem is not None:
                yield Item(name, None, None, error=f"{name}: {sample.problem}")
            elif image is None:
                yield Item(name, None, None, error=f"{name}: no image member (has {sorted(sample.parts)})")
            elif CAPTION_EXTENSION not in sample.parts:
                yield Item(name, None, None, error=f"{name}: no .{CAPTION_EXTENSION} member")
            else:
                yield Item(name, image, sample.parts[CAPTION_EXTENSION])


def _file_item(path: str, caption: str, label: int | None = None) -> Item:
    return Item(path, None, caption, label, file=path)


# -- checking and writing ---------------------------------------------------------------------------------
def check(item: Item, pixels: bool = False) -> tuple[bytes | Image.Image, str, int | None] | str:
    """``(image, caption, label)`` if the sample is usable, else the reason it is not. The image is the encoded
    bytes, or with ``pixels`` the decoded image for the MDS encoding ``pil`` (see ``stored_pixels``)."""
    if item.error is not None:
        return item.error
    image = item.image
    try:
        if item.file is not None:
            image = read_file(item.file)
        caption = clean_caption(item.caption)
        decoded = decode_image(image)
    except SampleError as error:
        return str(error) if item.name in str(error) else f"{item.name}: {error}"
    return stored_pixels(decoded) if pixels else image, caption, item.label


def stored_pixels(image: Image.Image) -> Image.Image:
    """What an MDS ``pil`` column stores of a decoded image: the image, except that a palette image becomes RGB,
    as that encoding keeps the mode, size and raw bytes but no palette. Training sees the same pixels for every
    other mode. A palette image is then resized bicubic, where PIL resizes palette images nearest-neighbor
    (OpenCLIP converts to RGB after the crop); its transparency was dropped in training either way."""
    return image.convert("RGB") if image.mode in ("P", "PA") else image


def read_file(path: str) -> bytes:
    """A file's bytes, or ``SampleError`` (missing, unreadable)."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise SampleError(f"missing file {path}") from None
    except OSError as error:
        raise SampleError(f"unreadable file {path} ({error.strerror or error})") from None


def convert(
    items: Iterable[Item],
    out: str,
    columns: dict[str, str],
    image_key: str = "jpg",
    caption_key: str = "txt",
    size_limit: str | int = "64mb",
    overwrite: bool = False,
    threads: int = 4,
    total: int | None = None,
    progress: bool = True,
    source: str = "",
) -> Report:
    """Write the usable ``items`` to MDS shards in ``out``; return the counts. ``DataError`` if none is usable."""
    load_streaming()  # without transformers
    from streaming import MDSWriter
    from tqdm import tqdm

    _check_output(out, overwrite)
    report = Report()
    skips = SkipCounter(source or "the source")
    bar = tqdm(total=total, unit="img", desc=f"convert → {out}", disable=not progress, dynamic_ncols=True)
    try:
        with (
            ThreadPoolExecutor(max(threads, 1)) as pool,
            MDSWriter(out=out, columns=columns, hashes=["xxh64"], size_limit=size_limit, exist_ok=overwrite) as writer,
        ):
            checked = partial(check, pixels=columns[image_key] == "pil")
            for chunk in _chunks(items, 256):
                for result in pool.map(checked, chunk):  # reading and decoding run in threads; the order is kept
                    bar.update(1)
                    if isinstance(result, str):
                        report.skipped += 1
                        if len(report.reasons) < 5:  # examples for the error message; the log has them all
                            report.reasons.append(result)
                        skips.add([result])
                        continue
                    image, caption, label = result
                    sample = {image_key: image, caption_key: caption}
                    if "cls" in columns:
                        sample["cls"] = label
                    writer.write(sample)
                    report.samples += 1
                bar.set_postfix(skipped=report.skipped)
            if report.samples == 0:
                raise _nothing_usable(source, report)
    except BaseException:
        _remove_index(out)  # the writer wrote index.json on its way out: a partial output must not look complete
        raise
    finally:
        bar.close()
    written = _count_written(out)
    if written != report.samples:
        _remove_index(out)
        raise DataError(f"{out}: index.json lists {written} samples but {report.samples} were written")
    marker = {"samples": report.samples, "skipped": report.skipped, "source": source, "columns": columns}
    get_object_store(out).write_bytes(MARKER, json.dumps(marker, indent=2).encode())
    return report


def _nothing_usable(source: str, report: Report) -> DataError:
    examples = "; ".join(report.reasons[:3]) or "the source is empty"
    return DataError(f"no usable sample in {source}: {report.skipped} skipped (e.g. {examples})")


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_output(out: str, overwrite: bool) -> None:
    check_storage(out, "--to")
    if is_remote(out):
        return  # MDSWriter stages in a fresh temporary folder; existing objects are replaced
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise DataError(f"{out} is not empty; choose another --to or pass --overwrite (which deletes its contents)")


# -- local folders and s3:// (through the one object-store module) -----------------------------------------
def _remove_index(out: str) -> None:
    try:
        get_object_store(out).delete("index.json")
    except Exception as error:  # noqa: BLE001 - best effort while another error propagates
        log.warning("could not remove %s/index.json of the failed conversion: %s", out, error)


def _count_written(out: str) -> int:
    raw = get_object_store(out).read_bytes("index.json")
    if raw is None:
        raise DataError(f"the MDS writer left no index.json in {out}")
    index = json.loads(raw)
    return sum(shard["samples"] for shard in index["shards"])


# -- the command ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="composer convert",
        description="Write MDS shards (for data.train.type: streaming) from CSV, WebDataset or an image folder.",
    )
    parser.add_argument("--from", dest="kind", required=True, choices=("csv", "webdataset", "imagefolder"))
    parser.add_argument("source", help="a CSV file, tar shards ('/data/{00000..00099}.tar', s3://...), or a folder")
    parser.add_argument("--to", dest="out", required=True, help="an empty local folder or s3://bucket/prefix")
    parser.add_argument("--csv-separator", default="\t", help="csv: the column separator (default: tab)")
    parser.add_argument("--csv-img-key", default="filepath", help="csv: the image path column")
    parser.add_argument("--csv-caption-key", default="title", help="csv: the caption column")
    parser.add_argument(
        "--templates",
        nargs="+",
        default=list(DEFAULT_TEMPLATES),
        help="imagefolder: caption templates, '{}' is the class name (image i of a class uses template i %% n)",
    )
    parser.add_argument("--classnames", help="imagefolder: a file of class names, one per line, in folder order")
    parser.add_argument("--image-key", default="jpg", help="output image column (default: jpg)")
    parser.add_argument("--caption-key", default="txt", help="output caption column (default: txt)")
    parser.add_argument(
        "--image-encoding",
        default="jpeg",
        choices=("jpeg", "bytes", "pil"),
        help="MDS encoding of the image column: jpeg and bytes store the original file; pil stores its decoded "
        "pixels (palette images as RGB), read without decoding: for small images, whose decoding costs more "
        "than the larger shards (default: jpeg)",
    )
    parser.add_argument("--size-limit", default="64mb", help="shard size (default: 64mb)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    parser.add_argument("--overwrite", action="store_true", help="delete what a local --to folder holds first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    columns = {args.image_key: args.image_encoding, args.caption_key: "str"}
    total = None
    try:
        if args.kind == "csv":
            items = csv_items(args.source, args.csv_separator, args.csv_img_key, args.csv_caption_key)
        elif args.kind == "webdataset":
            items = webdataset_items(args.source)
        else:
            if not all("{}" in template for template in args.templates):
                raise DataError("--templates: every template needs '{}' where the class name goes")
            classnames = None
            if args.classnames:
                classnames = [line.strip() for line in Path(args.classnames).read_text().splitlines() if line.strip()]
            columns["cls"] = "int"
            total = sum(1 for p in Path(args.source).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            items = imagefolder_items(args.source, args.templates, classnames)
        report = convert(
            items,
            args.out,
            columns,
            args.image_key,
            args.caption_key,
            size_limit=args.size_limit,
            overwrite=args.overwrite,
            threads=args.threads,
            total=total,
            progress=not args.no_progress,
            source=f"{args.kind} {args.source}",
        )
    except (CadenzaError, FileNotFoundError, NotADirectoryError) as error:
        sys.stderr.write(f"composer convert: {error}\n")
        return 1
    log.info("wrote %d samples to %s (%d skipped)", report.samples, args.out, report.skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
