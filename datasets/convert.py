"""``composer convert``: CSV, WebDataset or an image folder → MDS shards (a local folder or ``s3://``).

    composer convert --from csv /data/train.csv --to s3://bucket/mds/train
    composer convert --from webdataset '/data/{00000..00099}.tar' --to /data/mds/train
    composer convert --from imagefolder /data/digits/train --to /data/mds/digits --templates 'a photo of a {}.'
    composer -n 8 convert --from csv /data/train.csv --to /data/mds/dr --captions title syn_caption \
        --teacher ViT-L-14:openai --teacher ViT-L-14:datacomp_xl_s13b_b90k --views 30

Each sample is written as its original encoded image bytes (no re-encoding) and its caption, in the
columns ``jpg`` (MDS encoding ``jpeg``: plain ``streaming.StreamingDataset`` readers get a PIL image)
and ``txt`` (``str``), with xxh64 hashes of every shard. ``--image-encoding pil`` stores decoded pixels
instead, which are read without decoding: for small images, whose decode is a large part of loading them
(a sixth of the quickstart loader's time for its 32 px PNG digits). An image folder also gets ``cls`` (the class
index). Every image is decoded once to check it; a sample whose image is missing or corrupt, or whose
caption is empty, is skipped and counted. When the conversion completes, ``index.json`` holds exactly
the samples written and ``cadenza-convert.json`` records the counts; a conversion that fails removes
its ``index.json``, so a partial output never passes for a complete one.

``--captions FIELD ...`` carries several caption fields (CSV columns; WebDataset members or keys of a sample's
``.json`` member), each holding one caption or a JSON list, into one ``json`` column per field (a list of captions),
for ``captions:`` in training YAML.

``--teacher MODEL[:pretrained]`` (repeatable: an ensemble) writes a reinforced dataset (``reinforced.py``): a seed per
sample, each teacher's fp16 embedding of ``--views`` augmented views of every image and of every caption, and the
teachers' names, dimensions, scales and the views' augmentation settings in ``cadenza-convert.json``. Such a
conversion (and any run on several processes, ``composer -n N convert``, or with ``--resume``) writes the source in
parts of ``--part-size`` samples, each a folder of shards finished by its own marker; the processes share the parts
out, a conversion that stopped continues with ``--resume`` from the parts it had finished, and a last step lists every
part's shards in one ``index.json``, which plain ``streaming.StreamingDataset`` reads.

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
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cadenza.datasets.reinforced import (
    MARKER,
    SEED_COLUMN,
    VERSION,
    Teacher,
    image_column,
    load_teacher,
    text_column,
)
from cadenza.datasets.samples import (
    SampleError,
    SkipCounter,
    Skipped,
    caption_list,
    clean_caption,
    decode_image,
    sample_seed,
)
from cadenza.datasets.streaming_import import load_streaming
from cadenza.datasets.webdataset import CAPTION_EXTENSION, caption_getter, expand_sources, iter_tar
from cadenza.datasets.webdataset import IMAGE_EXTENSIONS as TAR_IMAGE_EXTENSIONS
from cadenza.engine import dist
from cadenza.engine.errors import CadenzaError, ConfigError, DataError
from cadenza.engine.object_store import check_storage, get_object_store, is_remote

log = logging.getLogger("cadenza")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
#: a conversion in parts: its settings (a resumed conversion must have the same), and each finished part's marker
PLAN = "cadenza-convert-plan.json"
PART_DONE = "cadenza-part.json"


@dataclass
class Item:
    """One source sample before checking: encoded image bytes (or a file to read them from, in a checking thread),
    a caption, and why it is unusable if that is already known."""

    name: str
    image: bytes | None
    caption: str | bytes | dict[str, Any] | None  # one caption, or each field's value (--captions)
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
    path: str,
    separator: str = "\t",
    img_key: str = "filepath",
    caption_key: str = "title",
    fields: Sequence[str] | None = None,
) -> Iterator[Item]:
    """Rows of an OpenCLIP CSV; relative image paths resolve against the CSV's folder. With ``fields`` each row's
    captions come from those columns (one caption or a JSON list each) instead of ``caption_key``."""
    folder = Path(path).parent
    captions = list(fields) if fields else [caption_key]
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=separator)
        missing = [key for key in (img_key, *captions) if key not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: no column {missing[0]!r}; its columns are {reader.fieldnames} "
                f"(separator {separator!r}; set --csv-img-key / --csv-caption-key / --captions / --csv-separator)"
            )
        for line, row in enumerate(reader, start=2):
            image_path, values = row.get(img_key), [row.get(key) for key in captions]
            if image_path is None or None in values or None in row:
                yield Item(f"{path}:{line}", None, None, error=f"malformed row at line {line}")
                continue
            yield _file_item(
                str(folder / image_path), dict(zip(captions, values, strict=True)) if fields else values[0]
            )


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


def webdataset_items(path: str, fields: Sequence[str] | None = None) -> Iterator[Item]:
    """Samples of WebDataset tar shards, read as the ``webdataset`` loader reads them (``iter_tar``): members
    grouped by key; a missing shard, a truncated tar or a sample without image or caption is an error item. With
    ``fields`` the captions are those members, or keys of the sample's ``.json`` member."""
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
            elif fields:
                try:
                    get = caption_getter({k: v for k, v in sample.parts.items() if k in (*fields, "json")})
                    yield Item(name, image, {field: get(field) for field in fields})
                except SampleError as error:
                    yield Item(name, None, None, error=f"{name}: {error}")
            elif CAPTION_EXTENSION not in sample.parts:
                yield Item(name, None, None, error=f"{name}: no .{CAPTION_EXTENSION} member")
            else:
                yield Item(name, image, sample.parts[CAPTION_EXTENSION])


def _file_item(path: str, caption: str | dict[str, Any], label: int | None = None) -> Item:
    return Item(path, None, caption, label, file=path)


# -- checking and writing ---------------------------------------------------------------------------------
def check(
    item: Item, pixels: bool = False, decoded: bool = False
) -> tuple[bytes | Image.Image, str | dict[str, list[str]], int | None] | tuple | str:
    """``(image, caption, label)`` if the sample is usable, else the reason it is not. The image is the encoded
    bytes, or with ``pixels`` the decoded image for the MDS encoding ``pil`` (see ``stored_pixels``); the caption is
    text, or each field's captions (``Item.caption`` a mapping). With ``decoded`` a fourth item: the image as
    training decodes what is stored (what teachers see)."""
    if item.error is not None:
        return item.error
    image = item.image
    try:
        if item.file is not None:
            image = read_file(item.file)
        if isinstance(item.caption, dict):
            caption = {name: caption_list(value) for name, value in item.caption.items()}
            if not any(caption.values()):
                raise SampleError(f"no caption in {', '.join(caption)}")
        else:
            caption = clean_caption(item.caption)
        picture = decode_image(image)
    except SampleError as error:
        return str(error) if item.name in str(error) else f"{item.name}: {error}"
    stored = stored_pixels(picture) if pixels else image
    if decoded:
        return stored, caption, item.label, stored if pixels else picture
    return stored, caption, item.label


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
                    writer.write(_sample(image_key, image, caption_key, caption, label, columns))
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


def _sample(
    image_key: str, image: Any, caption_key: str, caption: str | dict[str, list[str]], label: int | None, columns: dict
) -> dict[str, Any]:
    """The MDS sample: the image, the caption (or one column per caption field), the class index if stored."""
    sample = {image_key: image, **(caption if isinstance(caption, dict) else {caption_key: caption})}
    if "cls" in columns:
        sample["cls"] = label
    return sample


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


# -- in parts: several processes, resumable, teachers ---------------------------------------------------------
@dataclass
class Plan:
    """What a conversion in parts writes; a resumed conversion must have the same (``PLAN`` in the output)."""

    source: str
    columns: dict[str, str]
    image_key: str
    captions: list[str]  # the caption fields whose captions get text embeddings (the one caption column without)
    teachers: list[str] = field(default_factory=list)  # MODEL[:pretrained] specs
    views: int = 0
    seed: int = 0
    augment: dict[str, Any] = field(default_factory=dict)
    part_size: int = 1024


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def convert_in_parts(
    items: Iterable[Item],
    out: str,
    plan: Plan,
    overwrite: bool = False,
    resume: bool = False,
    threads: int = 4,
    batch_size: int = 64,
    device: str = "auto",
    size_limit: str | int = "64mb",
    progress: bool = True,
) -> Report:
    """Write the usable ``items`` to ``out`` in parts of ``plan.part_size`` source samples; with ``plan.teachers``
    add the reinforced columns. Every process of the job (``RANK`` / ``WORLD_SIZE``, as ``composer -n N`` sets) runs
    this on the same items and writes the parts ``p`` with ``p % world == rank``; rank 0 then lists every part's
    shards in ``index.json`` and writes the marker. Parts finished before a stop are kept with ``resume``."""
    load_streaming()  # without transformers
    info = dist.dist_info_from_env()
    backend_device = _device(device, info)
    dist.init_process_group(info, "gloo", torch.device("cpu"))  # for the barriers only: the teachers run alone
    store = get_object_store(out)
    if info.is_main:
        _prepare_parts(out, plan, overwrite, resume)
    dist.barrier()
    teachers = [load_teacher(spec, plan.augment, backend_device) for spec in plan.teachers]
    columns = dict(plan.columns)
    if teachers:
        columns[SEED_COLUMN] = "int64"
        for index, teacher in enumerate(teachers):
            meta = teacher.metadata(index)
            columns[meta["image_column"]] = f"ndarray:float16:{plan.views},{teacher.dim}"
            columns[meta["text_column"]] = "ndarray:float16"
    done = {name.split("/")[0] for name in store.list() if name.endswith(f"/{PART_DONE}")}
    parts = 0
    from tqdm import tqdm

    bar = tqdm(unit="img", desc=f"convert → {out} (rank {info.rank})", disable=not progress, dynamic_ncols=True)
    try:
        for part, chunk in enumerate(_chunks(items, plan.part_size)):
            parts = part + 1
            if part % info.world_size != info.rank or part_name(part) in done:
                continue
            _write_part(
                part, part * plan.part_size, chunk, out, plan, columns, teachers, threads, batch_size, size_limit
            )
            bar.update(len(chunk))
    finally:
        bar.close()
    dist.barrier()
    report = Report()
    if info.is_main:
        report = _finish_parts(out, plan, parts, teachers)
    dist.barrier()
    return report


def _device(name: str, info: dist.DistInfo) -> torch.device:
    """Where the teachers run: ``auto`` is this process's GPU when there is one."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DataError("--device cuda: no GPU is visible; use --device cpu")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _prepare_parts(out: str, plan: Plan, overwrite: bool, resume: bool) -> None:
    """Rank 0, before any part: check the output against ``resume`` / ``overwrite`` and record the plan. A stale
    ``index.json`` and marker go first, so an output being written never passes for a complete one."""
    check_storage(out, "--to")
    store = get_object_store(out)
    wanted = json.dumps(asdict(plan), indent=2, sort_keys=True)
    existing = store.read_bytes(PLAN)
    if resume and existing is not None:  # without a plan there is nothing to resume: a fresh start, as without
        if json.loads(existing) != json.loads(wanted):
            before = json.loads(existing)
            changed = sorted(k for k in set(before) | set(asdict(plan)) if before.get(k) != asdict(plan).get(k))
            raise DataError(
                f"{out} holds a conversion with other settings ({', '.join(changed)} differ): resume it with the same "
                "command, or write to another --to (or pass --overwrite instead of --resume to start again)"
            )
    elif store.list():
        if not overwrite:
            hint = " or --resume to continue the conversion it holds" if existing is not None else ""
            raise DataError(
                f"{out} is not empty; choose another --to or pass --overwrite (which deletes its contents){hint}"
            )
        _clear(out)
    store.delete("index.json")
    store.delete(MARKER)
    store.write_bytes(PLAN, wanted.encode())


def _clear(out: str) -> None:
    if is_remote(out):
        store = get_object_store(out)
        for key in store.list():
            store.delete(key)
    else:
        for path in Path(out).iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _write_part(
    part: int,
    first: int,
    items: list[Item],
    out: str,
    plan: Plan,
    columns: dict[str, str],
    teachers: list[Teacher],
    threads: int,
    batch_size: int,
    size_limit: str | int,
) -> None:
    """One part: its source samples checked, embedded by every teacher, written as shards, then its marker."""
    from streaming import MDSWriter

    name = part_name(part)
    store = get_object_store(out)
    for key in store.list(f"{name}/"):  # what a stopped run left of this part
        store.delete(key)
    target = f"{out.rstrip('/')}/{name}"
    pixels = plan.columns[plan.image_key] == "pil"
    report = Report()
    skips = SkipCounter(plan.source)
    with (
        ThreadPoolExecutor(max(threads, 1)) as pool,
        MDSWriter(out=target, columns=columns, hashes=["xxh64"], size_limit=size_limit, exist_ok=True) as writer,
    ):
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            results = list(pool.map(partial(check, pixels=pixels, decoded=True), chunk))
            usable = []
            for offset, result in enumerate(results):
                if isinstance(result, str):
                    report.skipped += 1
                    if len(report.reasons) < 5:
                        report.reasons.append(result)
                    skips.add([result])
                else:
                    usable.append((first + start + offset, *result))
            for sample in _reinforce(usable, plan, teachers, batch_size):
                writer.write(sample)
                report.samples += 1
    marker = {"samples": report.samples, "skipped": report.skipped, "reasons": report.reasons, "items": len(items)}
    store.write_bytes(f"{name}/{PART_DONE}", json.dumps(marker).encode())


def _reinforce(usable: list[tuple], plan: Plan, teachers: list[Teacher], batch_size: int) -> Iterator[dict[str, Any]]:
    """The MDS samples of checked items ``(source index, stored image, caption(s), label, decoded image)``, with a
    seed and every teacher's embeddings of the views and the captions when there are teachers."""
    if not usable:
        return
    caption_key = plan.captions[0]
    samples = [_sample(plan.image_key, image, caption_key, caption, label, plan.columns) for _, image, caption, label, _ in usable]  # fmt: skip
    if teachers:
        seeds = [sample_seed(plan.seed, 0, index) for index, *_ in usable]
        per_sample = [
            caption if isinstance(caption, dict) else {caption_key: [caption]} for _, _, caption, _, _ in usable
        ]
        texts = [text for fields in per_sample for name in plan.captions for text in fields[name]]
        for number, teacher in enumerate(teachers):
            views = teacher.embed_views([decoded for *_, decoded in usable], seeds, plan.views, batch_size)
            embedded = teacher.embed_texts(texts, batch_size)  # (M, D): every caption, sample by sample, field by field
            row = 0
            for sample, view, fields in zip(samples, views, per_sample, strict=True):
                count = sum(len(fields[name]) for name in plan.captions)
                sample[image_column(number)] = view  # (K, D)
                sample[text_column(number)] = embedded[row : row + count]  # (C, D): every caption, field by field
                row += count
        for sample, seed in zip(samples, seeds, strict=True):
            sample[SEED_COLUMN] = seed
    yield from samples


def _finish_parts(out: str, plan: Plan, parts: int, teachers: list[Teacher]) -> Report:
    """Rank 0, after every process finished its parts: one ``index.json`` over every part's shards, and the marker."""
    store = get_object_store(out)
    report = Report()
    shards = []
    for part in range(parts):
        name = part_name(part)
        raw = store.read_bytes(f"{name}/{PART_DONE}")
        if raw is None:
            raise DataError(f"{out}: part {name} was not finished; run the conversion again with --resume")
        done = json.loads(raw)
        report.samples += done["samples"]
        report.skipped += done["skipped"]
        report.reasons += done["reasons"][: 5 - len(report.reasons)]
        if done["samples"]:
            index = json.loads(store.read_bytes(f"{name}/index.json"))
            for shard in index["shards"]:
                for key in ("raw_data", "zip_data"):
                    if shard.get(key):
                        shard[key]["basename"] = f"{name}/{shard[key]['basename']}"
                shards.append(shard)
    if report.samples == 0:
        raise _nothing_usable(plan.source, report)
    store.write_bytes("index.json", json.dumps({"version": 2, "shards": shards}).encode())
    written = _count_written(out)
    if written != report.samples:
        _remove_index(out)
        raise DataError(f"{out}: index.json lists {written} samples but the parts hold {report.samples}")
    marker: dict[str, Any] = {
        "samples": report.samples,
        "skipped": report.skipped,
        "source": plan.source,
        "columns": plan.columns,
        "parts": parts,
    }
    if teachers:
        marker["reinforced"] = {
            "version": VERSION,
            "views": plan.views,
            "seed": plan.seed,
            "augment": plan.augment,
            "captions": plan.captions,
            "teachers": [teacher.metadata(index) for index, teacher in enumerate(teachers)],
        }
    store.write_bytes(MARKER, json.dumps(marker, indent=2).encode())
    return report


# -- the command ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="composer convert",
        description="Write MDS shards (for data.train.type: streaming) from CSV, WebDataset or an image folder; with "
        "--teacher, a reinforced dataset of stored teacher embeddings (several processes: composer -n N convert).",
    )
    parser.add_argument("--from", dest="kind", required=True, choices=("csv", "webdataset", "imagefolder"))
    parser.add_argument("source", help="a CSV file, tar shards ('/data/{00000..00099}.tar', s3://...), or a folder")
    parser.add_argument("--to", dest="out", required=True, help="an empty local folder or s3://bucket/prefix")
    parser.add_argument("--csv-separator", default="\t", help="csv: the column separator (default: tab)")
    parser.add_argument("--csv-img-key", default="filepath", help="csv: the image path column")
    parser.add_argument("--csv-caption-key", default="title", help="csv: the caption column")
    parser.add_argument(
        "--captions",
        nargs="+",
        metavar="FIELD",
        help="several caption fields (csv columns; webdataset members or keys of the .json member), each one caption "
        "or a JSON list; written as one json column per field, for data.*.captions in training",
    )
    parser.add_argument(
        "--templates",
        nargs="+",
        default=list(DEFAULT_TEMPLATES),
        help="imagefolder: caption templates, '{}' is the class name (image i of a class uses template i %% n)",
    )
    parser.add_argument("--classnames", help="imagefolder: a file of class names, one per line, in folder order")
    parser.add_argument("--image-key", default="jpg", help="output image column (default: jpg)")
    parser.add_argument("--caption-key", default="txt", help="output caption column without --captions (default: txt)")
    parser.add_argument(
        "--image-encoding",
        default="jpeg",
        choices=("jpeg", "bytes", "pil"),
        help="MDS encoding of the image column: jpeg and bytes store the original file; pil stores its decoded "
        "pixels (palette images as RGB), read without decoding: for small images, whose decoding costs more "
        "than the larger shards (default: jpeg)",
    )
    reinforce = parser.add_argument_group("reinforced data (stored teacher embeddings)")
    reinforce.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="MODEL[:PRETRAINED]",
        help="a teacher whose embeddings of every view and caption are stored (repeat for an ensemble), e.g. "
        "ViT-L-14:openai or tiny-vit:/ckpt/teacher.pt (a Cadenza checkpoint brings its model.overrides)",
    )
    reinforce.add_argument("--views", type=int, default=8, help="augmented views stored per image (default: 8)")
    reinforce.add_argument("--seed", type=int, default=0, help="seeds every sample's views (default: 0)")
    reinforce.add_argument(
        "--augment",
        default="{}",
        help="the views' data.augment settings as a YAML mapping, e.g. '{scale: [0.08, 1.0]}' (default: Cadenza's "
        "defaults); training must use the same",
    )
    reinforce.add_argument("--batch-size", type=int, default=64, help="teacher forward batch (default: 64)")
    reinforce.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where teachers run")
    parser.add_argument(
        "--part-size",
        type=int,
        default=1024,
        help="source samples per part, with --teacher, several processes or --resume (default: 1024)",
    )
    parser.add_argument("--resume", action="store_true", help="continue a conversion in parts that stopped")
    parser.add_argument("--size-limit", default="64mb", help="shard size (default: 64mb)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    parser.add_argument("--overwrite", action="store_true", help="delete what --to holds first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fields = list(args.captions) if args.captions else None
    caption_columns = {name: "json" for name in fields} if fields else {args.caption_key: "str"}
    columns = {args.image_key: args.image_encoding, **caption_columns}
    total = None
    try:
        if fields and (len(set(fields)) != len(fields) or args.image_key in fields):
            raise DataError(f"--captions {' '.join(fields)}: name each field once, and not the image column")
        if args.kind == "csv":
            items = csv_items(args.source, args.csv_separator, args.csv_img_key, args.csv_caption_key, fields)
        elif args.kind == "webdataset":
            items = webdataset_items(args.source, fields)
        else:
            if fields:
                raise DataError("--captions: an image folder's captions come from --templates")
            if not all("{}" in template for template in args.templates):
                raise DataError("--templates: every template needs '{}' where the class name goes")
            classnames = None
            if args.classnames:
                classnames = [line.strip() for line in Path(args.classnames).read_text().splitlines() if line.strip()]
            columns["cls"] = "int"
            total = sum(1 for p in Path(args.source).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            items = imagefolder_items(args.source, args.templates, classnames)
        source = f"{args.kind} {args.source}"
        if args.teacher or args.resume or dist.dist_info_from_env().world_size > 1:
            plan = _plan(args, source, columns, fields or [args.caption_key])
            report = convert_in_parts(
                items,
                args.out,
                plan,
                overwrite=args.overwrite,
                resume=args.resume,
                threads=args.threads,
                batch_size=args.batch_size,
                device=args.device,
                size_limit=args.size_limit,
                progress=not args.no_progress,
            )
            if dist.get_rank() != 0:
                return 0
        else:
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
                source=source,
            )
    except (CadenzaError, FileNotFoundError, NotADirectoryError) as error:
        sys.stderr.write(f"composer convert: {error}\n")
        return 2 if isinstance(error, ConfigError) else 1
    log.info("wrote %d samples to %s (%d skipped)", report.samples, args.out, report.skipped)
    return 0


def _plan(args: argparse.Namespace, source: str, columns: dict[str, str], captions: list[str]) -> Plan:
    """The conversion's settings, checked (the views' augmentation as a full ``data.augment`` mapping)."""
    from omegaconf import OmegaConf

    from cadenza.datasets.transforms import AUGMENT_DEFAULTS, check_augment

    if args.part_size < 1 or args.batch_size < 1:
        raise DataError("--part-size and --batch-size must be at least 1")
    augment: dict[str, Any] = {}
    if args.teacher:
        if args.views < 1:
            raise DataError("--views must be at least 1")
        try:
            given = OmegaConf.to_container(OmegaConf.create(args.augment))
        except Exception as error:  # noqa: BLE001 - any YAML error is the flag's
            raise DataError(f"--augment {args.augment!r} is not a YAML mapping ({error})") from None
        if not isinstance(given, dict) or set(given) - set(AUGMENT_DEFAULTS):
            unknown = sorted(set(given) - set(AUGMENT_DEFAULTS)) if isinstance(given, dict) else given
            raise DataError(f"--augment: expected data.augment keys ({', '.join(AUGMENT_DEFAULTS)}), got {unknown}")
        augment = {**AUGMENT_DEFAULTS, **given}
        try:
            check_augment(**augment)
        except (TypeError, ValueError) as error:
            raise DataError(f"--augment: {error}") from None
    return Plan(
        source=source,
        columns=columns,
        image_key=args.image_key,
        captions=captions,
        teachers=list(args.teacher),
        views=args.views if args.teacher else 0,
        seed=args.seed,
        augment=augment,
        part_size=args.part_size,
    )


if __name__ == "__main__":
    sys.exit(main())
