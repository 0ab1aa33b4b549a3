"""Data-test helpers: small real image–caption sets (PIL images in CSV files and WebDataset shards) and the
check that a resumed run sees exactly the samples and reaches exactly the weights of an uninterrupted one.

Sample ``i`` has the caption ``"sample i"`` (``caption_of``), so a test reads which samples a run saw back
from the token ids (``ids_of``).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image

from cadenza.engine import Callback
from cadenza.models.tokenizer import get_tokenizer
from cadenza.train.trainer import Trainer


def caption_of(index: int) -> str:
    return f"sample {index}"


def image_bytes(index: int, size: int = 40, fmt: str = "JPEG") -> bytes:
    """A small image whose colors depend on ``index``, encoded as ``fmt``."""
    image = Image.new("RGB", (size, size + index % 7), ((37 * index) % 256, (91 * index) % 256, (13 * index) % 256))
    image.paste((255 - (37 * index) % 256, 40, 200), (index % 11, 3, size // 2 + index % 5, size // 2))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def ids_of(tokens: torch.Tensor) -> list[int]:
    """Sample indices from a batch of token ids of captions ``"sample i"``."""
    tokenizer = get_tokenizer("tiny-vit")
    ids = []
    for row in tokens.tolist():
        text = tokenizer.decode([t for t in row if t not in (0, 49406, 49407)]).strip()
        ids.append(int(text.removeprefix("sample").replace(" ", "")))
    return ids


def write_csv(
    folder: Path,
    count: int,
    separator: str = "\t",
    img_key: str = "filepath",
    caption_key: str = "title",
    absolute: bool = False,
) -> Path:
    """``count`` JPEGs under ``folder/images`` and ``folder/train.csv`` listing them (relative paths by default)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = [f"{img_key}{separator}{caption_key}"]
    for index in range(count):
        path = images / f"{index:05d}.jpg"
        path.write_bytes(image_bytes(index))
        lines.append(f"{path if absolute else path.relative_to(folder)}{separator}{caption_of(index)}")
    csv_path = folder / "train.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shard(path: Path, indices: Iterable[int], fmt: str = "jpg", overrides: dict | None = None) -> None:
    """One tar of ``key.<fmt>`` + ``key.txt`` per index; ``overrides`` maps an index to ``{extension: bytes
    or None}`` to corrupt or drop members of that sample."""
    overrides = overrides or {}
    pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    with tarfile.open(path, "w") as archive:
        for index in indices:
            members = {fmt: image_bytes(index, fmt=pil_format), "txt": caption_of(index).encode()}
            members.update(overrides.get(index, {}))
            for extension, data in members.items():
                if data is not None:
                    add_member(archive, f"{index:06d}.{extension}", data)


def write_shards(
    folder: Path, shards: int, per_shard: int, sizes: bool = True, overrides: dict | None = None, first: int = 0
) -> str:
    """``shards`` tars of ``per_shard`` samples numbered from ``first``; returns the brace-expansion path.

    With ``sizes`` a ``sizes.json`` is written next to them (OpenCLIP's format).
    """
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for shard in range(shards):
        name = f"{shard:05d}.tar"
        start = first + shard * per_shard
        write_shard(folder / name, range(start, start + per_shard), overrides=overrides)
        names.append(name)
    if sizes:
        (folder / "sizes.json").write_text(json.dumps({name: per_shard for name in names}))
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


# -- a run of N steps against k steps + resume ---------------------------------------------------------
RESUME_COMMON = ("data.val=null", "optim.grad_clip_norm=null", "optim.scheduler=const", "optim.warmup=2ba")


class RecordIds(Callback):
    """Records the token ids of every micro-batch the model is given; ``ids`` reads the sample ids back."""

    def __init__(self) -> None:
        self.tokens: list[torch.Tensor] = []

    def after_dataloader(self, state, logger) -> None:
        self.tokens.extend(tokens.clone() for _, tokens in state.batch)

    @property
    def ids(self) -> list[list[int]]:
        return [ids_of(tokens) for tokens in self.tokens]


def same_batches(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def weights(state) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def check_exact_resume(
    tiny, overrides: Iterable[str], steps: int, split: int, workers: tuple[int, int]
) -> list[list[int]]:
    """Train ``steps`` in one go (``workers[0]`` loader workers) and ``split`` steps + resume to ``steps``
    (``workers[1]``); assert both see the same samples in the same batches and end with identical weights.

    Returns the straight run's record.
    """
    common = (*RESUME_COMMON, *overrides)
    straight = RecordIds()
    full = Trainer(
        tiny(*common, "run.name=straight", f"run.duration={steps}ba", f"data.workers={workers[0]}"),
        callbacks=[straight],
    ).fit()
    first, rest = RecordIds(), RecordIds()
    Trainer(
        tiny(*common, "run.name=split", f"run.duration={split}ba", f"data.workers={workers[1]}"), callbacks=[first]
    ).fit()
    resumed = Trainer(
        tiny(
            *common,
            "run.name=split",
            f"run.duration={steps}ba",
            f"data.workers={workers[1]}",
            "checkpoint.resume=latest",
        ),
        callbacks=[rest],
    )
    assert resumed.state.timestamp.batch == split
    state = resumed.fit()
    assert state.timestamp.batch == steps
    assert same_batches(first.tokens + rest.tokens, straight.tokens)
    assert_same_weights(weights(full), weights(state))
    return straight


def metric_rows(run_dir: Path, name: str) -> list[dict]:
    """The rows of ``metrics.jsonl`` that hold ``name``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if name in row]
