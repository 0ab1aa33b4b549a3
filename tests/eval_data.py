"""Tiny evaluation sets in every format the suite reads, and a model whose scores can be computed by hand.

``ColorModel`` embeds an image as its mean RGB and a text as the RGB of the first color word in it, so every score
is a cosine between two colors: which class an image lands in, and where a caption ranks, follow from the colors.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
CLASSES = list(COLORS)  # label order
ORANGE = (255, 128, 0)  # nearest yellow (0.949), then red (0.894): a miss at top-1, a hit at top-5


def image_bytes(pixels: np.ndarray) -> bytes:
    """``(H, W, 3)`` uint8 pixels as a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    return image_bytes(np.full((size, size, 3), rgb, np.uint8))


#: the labelled set every classification format holds: (color of the image, its label)
#: red: 2 images, one orange (wrong at top-1); green 1; blue 3, one cyan (wrong); yellow 1; cyan 1; magenta 0
LABELLED = [
    ((255, 0, 0), 0),
    (ORANGE, 0),
    ((0, 255, 0), 1),
    ((0, 0, 255), 2),
    ((0, 0, 250), 2),
    ((0, 255, 255), 2),
    ((255, 255, 0), 3),
    ((0, 250, 250), 4),
]
#: by hand: 6 of 8 right at top-1; the orange image's class (red) is its 2nd nearest, the cyan one's (blue) is its
#: 3rd (cyan 1, green .707 = magenta .707... blue .707 ties, ranked by index), so 8 of 8 at top-5; per class
#: red 1/2, green 1, blue 2/3, yellow 1, cyan 1 (magenta has no image and is left out of the mean)
TOP1, TOP5 = 6 / 8, 8 / 8
MEAN_PER_CLASS_RECALL = (1 / 2 + 1 + 2 / 3 + 1 + 1) / 5

#: the captioned set every retrieval format holds: (color of the image, its captions)
CAPTIONED = [
    ((255, 0, 0), ["a red square", "a yellow thing"]),  # "yellow" ranks the yellow image first: a text miss
    ((0, 255, 0), ["green", "a green field"]),
    ((0, 0, 255), ["a blue sky"]),
    ((255, 255, 0), ["a red sun"]),  # its only caption is nearer the red image: a text miss, and an image miss
]
#: image -> text: red's best caption "a red square" (1.0): nothing above; green 1.0; blue 1.0; yellow's best is
#: "a red sun" (.707), above it "a yellow thing" (1.0) and nothing else at 1.0 ... so the yellow image has rank 1:
#: R@1 = 3/4, R@5 = 1. text -> image: "a yellow thing" ranks yellow (1.0) above red (.707): rank 1; "a red sun"
#: ranks red (1.0) above yellow: rank 1; the other 4 captions rank their image first: R@1 = 4/6, R@5 = 1.
I2T_R1, T2I_R1 = 3 / 4, 4 / 6


class ColorModel(torch.nn.Module):
    """Image → mean RGB; text → the RGB of the first color word's first token (white when it names none)."""

    def __init__(self, tokenizer, colors: dict[str, tuple[int, int, int]] = COLORS) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.words = {int(tokenizer([name])[0, 1]): color for name, color in colors.items()}
        assert len(self.words) == len(colors), "two color names share their first token"

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return torch.nn.functional.normalize(images.float().mean(dim=(2, 3)), dim=-1)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        rows = [next((self.words[int(t)] for t in row if int(t) in self.words), (255, 255, 255)) for row in tokens]
        return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float) + 1e-3, dim=-1)


# -- classification sets ------------------------------------------------------------------------------------------
def image_folder(root: Path) -> Path:
    for number, (rgb, label) in enumerate(LABELLED):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{number}.png").write_bytes(png(rgb))
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)  # magenta: a class without images
    return root


def wds_set(
    root: Path, samples: list[tuple[bytes, object]], member: str, per_shard: int = 3, meta: dict | None = None
) -> Path:
    """CLIP_benchmark's layout, written as ``clip_benchmark.webdataset_builder`` writes it: ``root/test/{0..n}.tar``
    of ``s%07d.png`` + ``.cls`` (or ``.txt``: captions one a line), ``nshards.txt``, and ``meta`` files beside."""
    import webdataset

    (root / "test").mkdir(parents=True)
    with webdataset.ShardWriter(str(root / "test" / "%d.tar"), maxcount=per_shard, verbose=0) as sink:
        for index, (image, value) in enumerate(samples):
            sink.write({"__key__": f"s{index:07d}", "png": image, member: value})
        shards = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    for name, text in (meta or {}).items():
        (root / name).write_text(text)
    return root


def wds_classification(root: Path, classnames: bool = True, templates: bool = True) -> Path:
    meta = {}
    if classnames:
        meta["classnames.txt"] = "\n".join(CLASSES) + "\n"
    if templates:
        meta["zeroshot_classification_templates.txt"] = "a photo of a {c}.\na {c} thing.\n"
    return wds_set(root, [(png(rgb), label) for rgb, label in LABELLED], "cls", meta=meta)


def csv_labels(root: Path, by_name: bool = False) -> Path:
    (root / "images").mkdir(parents=True)
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "label"])
        for number, (rgb, label) in enumerate(LABELLED):
            (root / "images" / f"{number}.png").write_bytes(png(rgb))
            writer.writerow([f"images/{number}.png", CLASSES[label] if by_name else label])
    return root / "labels.csv"


def mds_labels(root: Path) -> Path:
    from cadenza.datasets.streaming_import import load_streaming

    load_streaming()
    from streaming import MDSWriter

    with MDSWriter(out=str(root), columns={"jpg": "png", "cls": "int"}) as writer:
        for rgb, label in LABELLED:
            writer.write({"jpg": Image.open(io.BytesIO(png(rgb))), "cls": label})
    return root


# -- retrieval sets ------------------------------------------------------------------------------------------------
def karpathy(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    entries = []
    for number, (rgb, captions) in enumerate(CAPTIONED):
        (root / "images" / f"{number}.png").write_bytes(png(rgb))
        sentences = [{"raw": c, "tokens": c.split()} for c in captions]
        entries.append({"filepath": "images", "filename": f"{number}.png", "split": "test", "sentences": sentences})
    entries.append({"filepath": "images", "filename": "9.png", "split": "train", "sentences": [{"raw": "a red"}]})
    (root / "dataset.json").write_text(json.dumps({"images": entries, "dataset": "colors"}))
    return root / "dataset.json"


def csv_captions(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for number, (rgb, captions) in enumerate(CAPTIONED):
        (root / "images" / f"{number}.png").write_bytes(png(rgb))
        rows += [(f"images/{number}.png", caption) for caption in captions]
    with (root / "captions.tsv").open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows[::2] + rows[1::2])  # an image's rows need not be together
    return root / "captions.tsv"


def wds_retrieval(root: Path) -> Path:
    samples = [(png(rgb), "\n".join(captions)) for rgb, captions in CAPTIONED]
    return wds_set(root, samples, "txt", meta={"dataset_type.txt": "retrieval\n"})


def suite_over_processes(root: Path) -> Path:
    """A suite of an image folder of 7 images (uneven over 2 processes), a CLIP_benchmark set and a Karpathy set."""
    image_folder(root / "folder")
    next((root / "folder" / "red").iterdir()).unlink()
    wds_classification(root / "wds")
    karpathy(root / "karpathy")
    suite = root / "suite.yaml"
    suite.write_text(
        f"root: {root}\ntasks:\n"
        "  colors: {type: classification, path: folder, templates: ['a {} photo']}\n"
        "  wds: {type: classification, path: wds, metrics: [top1, top5, mean_per_class_recall]}\n"
        "  captions: {type: retrieval, path: karpathy/dataset.json}\n"
    )
    return suite
