"""A small real image–caption set for the quickstart: scikit-learn's handwritten digits, captioned.

    python -m cadenza.datasets.digits --out data/digits      (``make quickstart`` runs this first)

scikit-learn ships 1,797 8x8 scans of handwritten digits (the UCI "optdigits" test set, 43 writers).
This splits them (seeded, stratified) into a training set and a held-out test set, upscales them to
``--size`` pixels and writes:

    <out>/mds/            the training split as MDS shards (columns jpg, txt, cls), read by the
                          ``streaming`` loader; each image appears ``--captions`` times, with
                          different captions. The images are stored as pixels (MDS encoding
                          ``pil``, 1 KB each): decoding a 32 px PNG took about a sixth of
                          the loader's time
    <out>/test/<d>/*.png  the held-out split as an image folder, for ``eval.zero_shot``
    <out>/test_captions.json  the held-out images with 5 captions each, in Karpathy's split format
                          (image–text retrieval in ``yamls/eval/digits.yaml``)
    <out>/csv/            with ``--csv``: the same training samples as OpenCLIP's CSV format (``train.csv``:
                          tab-separated ``filepath`` and ``title`` columns, OpenCLIP's defaults; the images as
                          PNG files in ``images/``, named by absolute path), for OpenCLIP's trainer or ``type: csv``
    <out>/train.csv       the training split once more, one row per image with all its captions (a JSON list
                          in the ``captions`` column; images in <out>/train/<d>/*.png): the source of a
                          reinforced dataset (``composer convert --captions captions --teacher ...``)

``--seed`` draws the split (and the captions): another seed is another random split of the same scans.

Captions vary so that the contrastive task is not one fixed sentence per class: several phrasings,
the digit as a word or a numeral ("a handwritten digit seven", "the number 7 written by hand", ...).

``--variant`` writes a shifted copy of the same split, for fine-tuning examples: ``inverted`` (light ink on a
dark background) or ``rotated`` (each scan turned 90 degrees clockwise). The split is the same for every
variant, so a model trained on the original training split never saw the variant's test images in any form.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

from cadenza.datasets.convert import Item, convert

log = logging.getLogger("cadenza")

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: training captions; {word} is "seven", {digit} is "7"
TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit} written by hand",
    "a scan of a handwritten {digit}",
    "a small grayscale picture of the digit {word}",
    "handwriting of the number {word}",
    "a pen-written {word} on white paper",
    "the digit {digit}, drawn by hand",
    "a blurry {word} written by someone",
    "someone wrote the number {word}",
    "a low resolution image of a handwritten {digit}",
    "{word}",
    "a {digit}",
)


def caption(label: int, template: str) -> str:
    return template.format(word=WORDS[label], digit=label)


def split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified train / test split: ``test_fraction`` of every class is held out."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = round(len(members) * test_fraction)
        test.extend(members[:cut])
        train.extend(members[cut:])
    return np.sort(np.array(train)), np.sort(np.array(test))


#: the shifted copies ``--variant`` writes (``original``: as scanned)
VARIANTS = ("original", "inverted", "rotated")


def to_png(pixels: np.ndarray, size: int, variant: str = "original") -> bytes:
    """An 8x8 scan with values 0..16 → dark ink on white paper (``inverted``: light ink on black; ``rotated``: turned
    90 degrees clockwise), upscaled (bicubic) to ``size`` px, as PNG."""
    from PIL import Image

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    ink = pixels * (255 / 16)
    gray = (ink if variant == "inverted" else 255 - ink).clip(0, 255).astype(np.uint8)  # (8, 8)
    if variant == "rotated":
        gray = np.ascontiguousarray(np.rot90(gray, k=-1))
    image = Image.fromarray(gray, mode="L").resize((size, size), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build(
    out: str | Path,
    size: int = 32,
    test_fraction: float = 0.2,
    captions: int = 2,
    seed: int = 0,
    progress: bool = True,
    csv: bool = False,
    variant: str = "original",
) -> dict:
    """Write ``<out>/mds`` and ``<out>/test`` (and ``<out>/csv`` with ``csv``); return the counts."""
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    train, test = split(digits.target, test_fraction, seed)
    rng = np.random.default_rng(seed + 1)
    training = []  # (index, png, captions, label): each training image with its captions
    for index in train:
        label = int(digits.target[index])
        png = to_png(digits.images[index], size, variant)
        texts = [caption(label, str(template)) for template in rng.choice(TEMPLATES, size=captions, replace=False)]
        training.append((int(index), png, texts, label))
    items = [(index, png, text, label) for index, png, texts, label in training for text in texts]  # MDS and CSV

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    columns = {"jpg": "pil", "txt": "str", "cls": "int"}  # pixels: nothing to decode when training
    report = convert(
        (Item(f"digit {index}", png, text, label) for index, png, text, label in items),
        str(out / "mds"),
        columns,
        total=len(items),
        progress=progress,
        source=f"scikit-learn digits ({variant})",
    )
    write_captions_csv(out, training)
    if csv:
        write_csv(out / "csv", items)
    images = []
    for index in test:
        label = int(digits.target[index])
        folder = out / "test" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:04d}.png").write_bytes(to_png(digits.images[index], size, variant))
        sentences = [{"raw": caption(label, str(t))} for t in rng.choice(TEMPLATES, size=5, replace=False)]
        images.append(
            {"filepath": f"test/{label}", "filename": f"{index:04d}.png", "split": "test", "sentences": sentences}
        )
    (out / "test_captions.json").write_text(json.dumps({"images": images, "dataset": "digits"}))
    return {"train_images": len(train), "train_samples": report.samples, "test_images": len(test)}


def write_captions_csv(out: Path, training: list[tuple[int, bytes, list[str], int]]) -> None:
    """``out/train.csv``: one row per training image with all its captions (a JSON list in ``captions``), the images
    in ``out/train/<digit>/`` (paths relative to the CSV's folder)."""
    rows = ["filepath\tcaptions"]
    for index, png, texts, label in training:
        path = Path("train") / str(label) / f"{index:04d}.png"
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(png)
        rows.append(f"{path}\t{json.dumps(texts)}")
    (out / "train.csv").write_text("\n".join(rows) + "\n")


def write_csv(folder: Path, items: list[tuple[int, bytes, str, int]]) -> None:
    """``folder/train.csv`` (tab-separated ``filepath``, ``title``; absolute paths: OpenCLIP's trainer reads them
    from its working directory) and ``folder/images/``."""
    (folder / "images").mkdir(parents=True)
    lines = ["filepath\ttitle"]
    for index, png, text, _ in items:
        path = folder / "images" / f"{index:04d}.png"
        if not path.exists():
            path.write_bytes(png)
        lines.append(f"{path.resolve()}\t{text}")
    (folder / "train.csv").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cadenza.datasets.digits", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/digits", help="output folder (replaced)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (the model's input size)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of each class held out")
    parser.add_argument("--captions", type=int, default=2, help="captions (samples) per training image")
    parser.add_argument("--seed", type=int, default=0, help="draws the split and the captions")
    parser.add_argument("--csv", action="store_true", help="also write the training split as CSV + PNG files")
    parser.add_argument("--variant", choices=VARIANTS, default="original", help="a shifted copy (same split)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = build(
        args.out, args.size, args.test_fraction, args.captions, args.seed, csv=args.csv, variant=args.variant
    )
    log.info(
        "digits: %d training images (%d image-caption samples) in %s/mds, %d held-out images in %s/test",
        counts["train_images"],
        counts["train_samples"],
        args.out,
        counts["test_images"],
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
