"""Peak memory and speed of one training configuration with and without the memory/speed algorithms:
grad checkpointing, patch dropout, torch.compile; and the fine-tuning ones: LoRA, locked-image tuning (LiT).

    python benchmarks/memory.py                 # CPU: ViT-B-32, fp32, batch 16 (peak RSS)
    python benchmarks/memory.py --gpu           # GPU: ViT-B-16, amp_bf16, batch 256 (peak allocated)
    python benchmarks/memory.py --only baseline,lora,lock_image --name memory_cpu_finetune   # a subset, own file

Each variant runs in its own process (clean peak). Results: benchmarks/results/memory_{cpu,gpu}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import speed_run_overrides  # noqa: E402

VARIANTS = {
    "baseline": [],
    "grad_checkpointing": ["algorithms.grad_checkpointing={}"],
    "patch_dropout 0.5": ["algorithms.patch_dropout={prob: 0.5}"],
    "torch_compile": ["algorithms.torch_compile={}"],
    "lora": ["algorithms.lora={}"],  # rank 8 on both towers' attention and MLP layers
    "lock_image": ["algorithms.lock_image={}"],  # LiT: the whole image tower frozen
}
SETTINGS = {
    # compile's first steps take minutes on CPU: 4 warm-up steps are left out of the median
    "cpu": {"model": "ViT-B-32", "batch": 16, "precision": "fp32", "steps": 9, "warmup": 4, "workers": 1},
    "gpu": {"model": "ViT-B-16", "batch": 256, "precision": "amp_bf16", "steps": 30, "warmup": 12, "workers": 8},
}


def worker(overrides: list[str]) -> None:
    """Train with ``overrides``; print one JSON line with peak memory and median samples/s."""
    import torch

    from cadenza.train.config import load_config
    from cadenza.train.trainer import Trainer

    cfg = load_config(ROOT / "yamls" / "tiny.yaml", overrides)
    trainer = Trainer(cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/samples_per_second"] for r in rows if "train/samples_per_second" in r]
    mfu = [r["train/mfu"] for r in rows if "train/mfu" in r]
    trainable = sum(p.numel() for p in trainer.state.model.parameters() if p.requires_grad)
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    result = {"peak_bytes": peak, "rates": rates, "mfu": mfu, "trainable": trainable}
    print("RESULT " + json.dumps(result), flush=True)  # noqa: T201


def run_variant(settings: dict, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as logs:
        s = settings
        overrides = [
            *speed_run_overrides(s["model"], s["batch"], s["precision"], s["steps"], s["workers"], logs),
            *extra,
        ]
        result = subprocess.run(
            [sys.executable, __file__, "--worker", *overrides], capture_output=True, text=True, timeout=3600
        )
        line = next((row for row in result.stdout.splitlines() if row.startswith("RESULT ")), None)
        if result.returncode != 0 or line is None:
            raise RuntimeError((result.stdout + result.stderr)[-3000:])
        data = json.loads(line.removeprefix("RESULT "))
        warm = settings["warmup"]
        return {
            "peak_gib": data["peak_bytes"] / 2**30,
            "samples_per_second": statistics.median(data["rates"][warm:]),
            "mfu": statistics.median(data["mfu"][warm:]),
            "trainable_m": data["trainable"] / 1e6,
        }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    from benchmarks.common import write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all variants")
    parser.add_argument("--only", help="comma-separated variants to run (default: all)")
    parser.add_argument("--name", help="results file name (default: memory_cpu or memory_gpu)")
    args = parser.parse_args()
    kind = "gpu" if args.gpu else "cpu"
    settings = SETTINGS[kind]
    variants = {name: VARIANTS[name] for name in args.only.split(",")} if args.only else VARIANTS
    # Rounds interleave the variants (A B C D A B C D ...), so a slow spell of the machine hits all of them;
    # speed is the median over rounds, memory the highest peak.
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, extra in variants.items():
            result = run_variant(settings, extra)
            runs[name].append(result)
            print(  # noqa: T201
                f"round {round_index + 1}: {name:20s} peak {result['peak_gib']:.2f} GiB  "
                f"{result['samples_per_second']:.2f}/s",
                flush=True,
            )
    rows, base = [], None
    for name, results in runs.items():
        result = {
            "peak_gib": max(r["peak_gib"] for r in results),
            "samples_per_second": statistics.median(r["samples_per_second"] for r in results),
            "mfu": statistics.median(r["mfu"] for r in results),
            "trainable_m": results[0]["trainable_m"],
            "rounds": len(results),
        }
        base = base or result
        rows.append(
            {
                "variant": name,
                **result,
                "memory_vs_baseline": result["peak_gib"] / base["peak_gib"],
                "speed_vs_baseline": result["samples_per_second"] / base["samples_per_second"],
            }
        )
    what = "peak GPU memory allocated" if kind == "gpu" else "peak process RSS"
    notes = (
        f"{settings['model']}, {settings['precision']}, batch {settings['batch']}, synthetic data; {what}; "
        f"samples/s = median after {settings['warmup']} warm-up steps, then over {args.rounds} interleaved rounds"
    )
    columns = ["variant", "trainable_m", "peak_gib", "memory_vs_baseline", "samples_per_second", "speed_vs_baseline"]
    columns.append("mfu")
    path = write_results(args.name or f"memory_{kind}", rows, columns, notes=notes, out_dir=args.out)
    print(path.read_text())  # noqa: T201


if __name__ == "__main__":
    main()
