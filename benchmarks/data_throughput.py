"""Data loading throughput: images/s per worker for each format, decoders compared, and whether the loader keeps
up with the model at the quickstart config.

    python benchmarks/data_throughput.py                 # about 3 minutes on 2 cores
    python benchmarks/data_throughput.py --images 256 --workers 0 1

1. **Decoders** (one thread): PIL against ``torchvision.io.decode_image``, decoding alone and followed by the
   training augmentation (PIL: OpenCLIP's transform; torchvision.io: the same ops on tensors), and PIL in JPEG
   draft mode (what the ``streaming`` loader uses), for several photo sizes.
2. **Formats**: the same generated JPEGs as ``streaming`` (MDS), ``webdataset`` (tar) and ``csv`` (files), read
   through Cadenza's loaders with OpenCLIP's training transform at 224 px, with 0..N DataLoader workers. One
   epoch; the first batch (worker start-up) is not timed. images/s per worker = images/s / max(workers, 1).
3. **Quickstart**: the quickstart model's training step alone (forward, backward, its optimizer's step, on a real
   batch with its captions cut as the trainer cuts them) and its ``streaming`` loader alone over the digits set,
   with the quickstart's loader settings (a persistent worker, consecutive epochs, as in training); medians of
   alternating rounds. Then the real thing: the quickstart config training, where ``train/data_time`` is how long
   each step waited for its batch.

Results: benchmarks/results/data_throughput.{md,json} (or --out), with the machine, torch version and date.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, write_results  # noqa: E402
from cadenza.datasets.context import LoaderContext  # noqa: E402
from cadenza.datasets.transforms import image_transform  # noqa: E402
from cadenza.engine.registry import DATASETS  # noqa: E402
from cadenza.models.tokenizer import get_tokenizer  # noqa: E402

WORDS = "a photo of the small large red blue dog cat tree house car street beach mountain city night".split()


# -- data -------------------------------------------------------------------------------------------------
def photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG (quality 90) with smooth structure, closer to a photo's compressed size than noise."""
    from PIL import Image

    coarse = rng.integers(0, 256, (max(height // 16, 1), max(width // 16, 1), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_formats(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> dict[str, dict]:
    """The same ``count`` samples as MDS shards, tar shards and a CSV of files; the loader args of each."""
    import tarfile

    from cadenza.datasets.convert import Item, convert

    rng = np.random.default_rng(seed)
    samples = [(photo(rng, *size), " ".join(rng.choice(WORDS, 8))) for _ in range(count)]
    (root / "files").mkdir(parents=True)
    rows = ["filepath\ttitle"]
    for i, (image, caption) in enumerate(samples):
        (root / "files" / f"{i:06d}.jpg").write_bytes(image)
        rows.append(f"files/{i:06d}.jpg\t{caption}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    per_shard = 128
    shards = -(-count // per_shard)
    (root / "tar").mkdir()
    for shard in range(shards):
        with tarfile.open(root / "tar" / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_shard, min((shard + 1) * per_shard, count)):
                for name, data in ((f"{i:06d}.jpg", samples[i][0]), (f"{i:06d}.txt", samples[i][1].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    items = (Item(str(i), image, caption) for i, (image, caption) in enumerate(samples))
    convert(items, str(root / "mds"), {"jpg": "jpeg", "txt": "str"}, progress=False)
    return {
        "streaming": {"remote": str(root / "mds")},
        "webdataset": {"path": f"{root}/tar/{{00000..{shards - 1:05d}}}.tar", "num_samples": count},
        "csv": {"path": str(root / "train.csv")},
    }


def build_loader(kind: str, args: dict, context: LoaderContext):
    """What the trainer builds for ``data.train: {type: kind, **args}``."""
    return DATASETS.build(kind, args, f"data.train ({kind})", context=context)


def context_for(image_size: int, batch_size: int, workers: int, cache_dir: str | None = None) -> LoaderContext:
    return LoaderContext(
        train=True,
        batch_size=batch_size,
        image_size=image_size,
        context_length=77,
        transform=image_transform(image_size, True),
        tokenizer=get_tokenizer(None, 77),
        workers=workers,
        persistent_workers=False,
        cache_dir=cache_dir,
    )


def loader_rate(loader, max_batches: int | None = None, epoch: int = 0) -> float:
    """Images/s over one epoch after the first batch."""
    loader.set_epoch(epoch)
    batches = iter(loader)
    next(batches)
    images, start = 0, time.perf_counter()
    for count, (batch, _) in enumerate(batches, start=1):
        images += len(batch)
        if max_batches is not None and count >= max_batches:
            break
    return images / (time.perf_counter() - start)


# -- 1. decoders ----------------------------------------------------------------------------------------------
def decoder_rows(repeats: int) -> list[dict]:
    from torchvision import transforms as T
    from torchvision.io import ImageReadMode, decode_image

    from cadenza.datasets.mds import decode_image_at_least
    from cadenza.datasets.samples import decode_image as decode_pil

    rng = np.random.default_rng(0)
    rows = []
    for width, height, size in ((256, 256, 224), (512, 384, 224), (1024, 768, 224), (64, 64, 32)):
        images = [photo(rng, width, height) for _ in range(16)]
        pil_augment = image_transform(size, True)
        tensor_augment = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                T.ConvertImageDtype(torch.float32),
                T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
            ]
        )
        candidates = {
            "PIL, decode only": lambda data: decode_pil(data).convert("RGB"),
            "torchvision.io, decode only": lambda data: decode_image(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
            ),
            "PIL": lambda data, a=pil_augment: a(decode_pil(data).convert("RGB")),
            "PIL draft (streaming)": lambda data, a=pil_augment, s=size: a(decode_image_at_least(data, s)),
            "torchvision.io": lambda data, a=tensor_augment: a(
                decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            ),
        }
        for data in images[:4]:
            for decode_and_augment in candidates.values():
                decode_and_augment(data)
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(repeats):  # interleaved rounds: load from other processes hits every decoder alike
            for name, decode_and_augment in candidates.items():
                start = time.perf_counter()
                for data in images:
                    decode_and_augment(data)
                times[name].append(time.perf_counter() - start)
        for name, elapsed in times.items():
            rate = len(images) / statistics.median(elapsed)
            rows.append({"photo": f"{width}x{height} → {size}", "decoder": name, "images_per_s": rate})
            print(f"decode+augment {width}x{height}->{size} {name:24s} {rate:8.1f} img/s", flush=True)  # noqa: T201
    return rows


# -- 2. formats -------------------------------------------------------------------------------------------------
def format_rows(count: int, workers: list[int], batch_size: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = write_formats(Path(tmp), count, (320, 240))
        for kind, args in sources.items():
            if kind not in DATASETS:
                continue
            for worker_count in workers:
                context = context_for(224, batch_size, worker_count, cache_dir=f"{tmp}/cache-{kind}-{worker_count}")
                rate = loader_rate(build_loader(kind, args, context))
                per_worker = rate / max(worker_count, 1)
                rows.append({"format": kind, "workers": worker_count, "images_per_s": rate, "per_worker": per_worker})
                print(f"{kind:11s} workers={worker_count}  {rate:8.1f} img/s  {per_worker:8.1f} per worker", flush=True)  # noqa: T201
    return rows


# -- 3. the quickstart --------------------------------------------------------------------------------------------
def quickstart_rows(steps: int, rounds: int) -> list[dict]:
    from cadenza.datasets.digits import build
    from cadenza.engine.optim import build_optimizer
    from cadenza.models import create_model
    from cadenza.models.losses import ClipLoss
    from cadenza.train.config import load_config

    cfg = load_config(ROOT / "yamls" / "quickstart.yaml")
    batch_size, workers = cfg.data.batch_size, cfg.data.workers
    model = create_model(cfg.model.name, **dict(cfg.model.overrides))
    optimizer = build_optimizer(cfg.optim, model)
    loss_fn = ClipLoss()
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, size=model.image_size, progress=False)
        context = context_for(model.image_size, batch_size, workers, cache_dir=f"{tmp}/cache")
        # the quickstart's loader settings: its worker persists from epoch to epoch, as in training
        context = LoaderContext(**{**context.__dict__, "context_length": model.context_length,
                                   "tokenizer": get_tokenizer(None, model.context_length),
                                   "persistent_workers": cfg.data.persistent_workers,
                                   "prefetch_factor": cfg.data.prefetch_factor})  # fmt: skip
        loader = build_loader("streaming", {"remote": f"{tmp}/mds"}, context)
        # A real batch (the first 32 samples), its captions cut after the longest as the trainer does
        # (model.trim_text_padding); read without the loader, which is timed from a fresh state below
        batch = [loader.dataset.get_item(index) for index in range(batch_size)]
        images = torch.stack([sample.image for sample in batch])
        tokens = model.trim_text_padding(context.tokenizer([sample.caption for sample in batch]))
        print(f"quickstart: the model step's captions run {tokens.shape[1]} of {model.context_length} positions")  # noqa: T201

        def step() -> None:
            outputs = model(images, tokens)
            loss = sum(loss_fn(**outputs).values())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def model_rate() -> float:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            return steps * batch_size / (time.perf_counter() - start)

        for _ in range(3):
            step()
        model_rates, data_rates = [], []
        for epoch in range(1, rounds + 1):  # alternately, so that a change in the machine's load hits both
            model_rates.append(model_rate())
            data_rates.append(loader_rate(loader, epoch=epoch))  # consecutive epochs, as training runs them
        model_rate, data_rate = statistics.median(model_rates), statistics.median(data_rates)
        waiting, step_time = data_wait_in_training(tmp, steps)
    ratio, share = data_rate / model_rate, 100 * waiting / step_time
    print(  # noqa: T201
        f"quickstart: model alone {model_rate:.0f} samples/s, loader alone {data_rate:.0f} samples/s ({ratio:.2f}x); "
        f"in training {1000 * waiting:.1f} ms of each {1000 * step_time:.1f} ms step wait for data ({share:.0f}%)"
    )
    return [
        {
            "what": f"samples/s, model step alone ({cfg.model.name}, batch {batch_size}, 1 thread; median)",
            "value": model_rate,
        },
        {"what": f"samples/s, streaming loader alone (digits, {workers} worker; median)", "value": data_rate},
        {"what": "loader / model (>= 1: the loader keeps up)", "value": ratio},
        {"what": "in training: ms per step (train/batch_time)", "value": 1000 * step_time},
        {"what": "in training: ms of it waiting for data (train/data_time)", "value": 1000 * waiting},
        {"what": "in training: % of the step waiting for data", "value": share},
    ]


def data_wait_in_training(data: str, steps: int) -> tuple[float, float]:
    """Mean ``train/data_time`` and ``train/batch_time`` of the quickstart config training on ``data``."""
    import json

    from cadenza.train.config import load_config
    from cadenza.train.trainer import Trainer

    window = max(steps // 4, 1)
    overrides = [
        f"run.logs={data}/logs", f"run.duration={5 * window}ba", f"run.log_interval={window}ba",
        f"data.train.remote={data}/mds", "eval.zero_shot.path=null", "checkpoint.save_interval=100000ba",
        "loggers.console=null",
    ]  # fmt: skip
    trainer = Trainer(load_config(ROOT / "yamls" / "quickstart.yaml", overrides))
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/data_time" in r][1:]  # the first window includes start-up
    return (
        statistics.mean(r["train/data_time"] for r in rows),
        statistics.mean(r["train/batch_time"] for r in rows),
    )


def fastest_decoders(rows: list[dict]) -> str:
    """One sentence per photo size: which decode + augment path was fastest, and by how much."""
    parts = []
    for photo in dict.fromkeys(r["photo"] for r in rows):
        full = sorted(
            (r for r in rows if r["photo"] == photo and "decode only" not in r["decoder"]),
            key=lambda r: -r["images_per_s"],
        )
        parts.append(
            f"{photo}: {full[0]['decoder']} ({full[0]['images_per_s'] / full[1]['images_per_s']:.2f}x the next)"
        )
    return "Fastest decode + augment: " + "; ".join(parts) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="samples per format")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="interleaved rounds: decoders over the test images; quickstart model step and loader",
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # like DataLoader workers, and like make quickstart's training process
    load_before = os.getloadavg()[0]
    decoders = decoder_rows(args.repeats)
    formats = format_rows(args.images, args.workers, args.batch_size)
    quickstart = quickstart_rows(steps=40, rounds=args.repeats)
    rows = [{"section": "decode + augment, 1 thread", **r} for r in decoders]
    rows += [{"section": "loader, 224 px train transform", **r} for r in formats]
    rows += [{"section": "quickstart", **r} for r in quickstart]
    notes = (
        f"Load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"({os.cpu_count()} cores). {fastest_decoders(decoders)} "
        "One torch thread per process (as in DataLoader workers and make quickstart). Decoders: median of "
        f"{args.repeats} interleaved rounds over 16 photos. images/s per worker = images/s / max(workers, 1) "
        f"(0 workers: the training process decodes). Formats: {args.images} JPEGs of 320x240 (quality 90), "
        f"batch {args.batch_size}. Quickstart: the model step against its loader at the quickstart's batch and workers, medians of "
        f"{args.repeats} alternating rounds."
    )
    columns = [
        "section",
        "photo",
        "decoder",
        "format",
        "workers",
        "images_per_s",
        "per_worker",
        "what",
        "value",
    ]
    path = write_results("data_throughput", rows, columns, notes=notes, out_dir=args.out)
    print(path.read_text())  # noqa: T201


if __name__ == "__main__":
    main()
