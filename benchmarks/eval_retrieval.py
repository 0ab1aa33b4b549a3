"""The evaluation suite's retrieval metric at MSCOCO's size: time and peak memory, chunked against a dense score matrix.

    python benchmarks/eval_retrieval.py            # about a minute on 2 shared cores

MSCOCO's Karpathy test split is 5,000 images and 25,000 captions; with 512-wide features a dense caption x image score
matrix (what LAION's CLIP_benchmark builds, and a one-shot ``topk`` over it) is 25,000 x 5,000 floats = 500 MB, and
its ``one_hot`` top-k mask several times that. ``cadenza.engine.retrieval.retrieval_recall`` compares 1024 x 1024
blocks. Each variant runs in a fresh process on the same random features (seeded); its peak resident memory over the
features' is reported, with its wall time and its R@1/5/10 (which must agree).

Results: benchmarks/results/eval_retrieval.{md,json}, with the machine, torch version and date.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

IMAGES, CAPTIONS_PER_IMAGE, WIDTH = 5000, 5, 512
RESULTS = Path(__file__).parent / "results"


def features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(IMAGES, WIDTH, generator=generator), dim=-1)
    owner = torch.arange(IMAGES).repeat_interleave(CAPTIONS_PER_IMAGE)
    noise = torch.randn(len(owner), WIDTH, generator=generator)
    texts = torch.nn.functional.normalize(images[owner] + 8 * noise / WIDTH**0.5, dim=-1)  # R@1 well below 1
    return images, texts, owner


def dense(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor) -> dict[str, float]:
    """The whole score matrix at once, a hit when a correct row is among the top k (CLIP_benchmark's way)."""
    scores = texts @ images.T  # (T, I)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), owner] = True
    metrics = {}
    for k in (1, 5, 10):
        metrics[f"text_to_image_R@{k}"] = positive.gather(1, scores.topk(k, dim=1).indices).any(1).float().mean().item()
        metrics[f"image_to_text_R@{k}"] = (
            positive.T.gather(1, scores.T.topk(k, dim=1).indices).any(1).float().mean().item()
        )
    return metrics


def child(variant: str) -> None:
    images, texts, owner = features()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if variant == "chunked":
        from cadenza.engine.retrieval import retrieval_recall

        metrics = retrieval_recall(images, texts, owner)
    else:
        metrics = dense(images, texts, owner)
    seconds = time.perf_counter() - started
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # MiB (ru_maxrss is KiB on Linux)
    print(json.dumps({"variant": variant, "seconds": seconds, "peak_mib_over_features": extra, "metrics": metrics}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=("chunked", "dense"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    runs = []
    for _ in range(args.rounds):  # interleaved: A B A B
        for variant in ("chunked", "dense"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant], capture_output=True, text=True, check=True
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    info = {
        "cpu": cpu,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": torch.get_num_threads(),
    }
    lines = [
        f"# Retrieval metric at MSCOCO size ({IMAGES} images, {IMAGES * CAPTIONS_PER_IMAGE} captions, width {WIDTH})",
        "",
        f"{info['cpu']}, torch {info['torch']}, {info['date']}; {args.rounds} interleaved rounds, each in a fresh process.",
        "",
        "| variant | seconds | peak memory over the features (MiB) | I→T R@1 | T→I R@1 | T→I R@10 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        m = run["metrics"]
        lines.append(
            f"| {run['variant']} | {run['seconds']:.2f} | {run['peak_mib_over_features']:.0f} | "
            f"{m['image_to_text_R@1']:.4f} | {m['text_to_image_R@1']:.4f} | {m['text_to_image_R@10']:.4f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_retrieval.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "eval_retrieval.json").write_text(json.dumps({"machine": info, "runs": runs}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
