"""Training throughput, OpenCLIP's trainer against Cadenza on the same machine, alternating A B A B.

    python benchmarks/train_throughput.py            # the CPU configs (minutes on 2 cores)
    python benchmarks/train_throughput.py --gpu      # the GPU configs (ViT-B-16, bf16, batch 256)

Same architecture, batch size, precision, synthetic data and number of steps; each run logs every
step with the device synchronized; the median samples/s after warm-up steps is compared. Results go
to benchmarks/results/train_throughput_{cpu,gpu}.{md,json} (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_cadenza, run_openclip, steady, write_results  # noqa: E402

#: (label, model, batch, precision, steps, warm-up steps, workers, OpenCLIP extra flags, Cadenza extra overrides)
CPU_CONFIGS = [
    ("ViT-B-32 fp32", "ViT-B-32", 32, "fp32", 6, 2, 2, [], []),
    ("ViT-B-32 amp_bf16", "ViT-B-32", 32, "amp_bf16", 6, 2, 2, [], []),
]
GPU_CONFIGS = [
    ("ViT-B-16 amp_bf16", "ViT-B-16", 256, "amp_bf16", 40, 10, 8, [], []),
    (
        "ViT-B-16 amp_bf16 + compile",
        "ViT-B-16",
        256,
        "amp_bf16",
        40,
        15,
        8,
        ["--torchcompile"],
        ["algorithms.torch_compile={}"],
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the GPU configs")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds per config")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    configs = GPU_CONFIGS if args.gpu else CPU_CONFIGS
    rows = []
    for label, model, batch, precision, steps, warmup, workers, oc_extra, cz_extra in configs:
        openclip, cadenza = [], []
        for _ in range(args.rounds):
            openclip.append(steady(run_openclip(model, batch, precision, steps, workers, oc_extra), warmup))
            cadenza.append(steady(run_cadenza(model, batch, precision, steps, workers, cz_extra), warmup))
        oc, cz = statistics.median(openclip), statistics.median(cadenza)
        rows.append(
            {
                "config": label,
                "batch": batch,
                "openclip_sps": oc,
                "cadenza_sps": cz,
                "ratio": cz / oc,
                "openclip_runs": openclip,
                "cadenza_runs": cadenza,
            }
        )
        print(f"{label:32s} openclip {oc:8.1f}/s  cadenza {cz:8.1f}/s  ratio {cz / oc:.2f}", flush=True)  # noqa: T201
    name = "train_throughput_gpu" if args.gpu else "train_throughput_cpu"
    path = write_results(
        name,
        rows,
        ["config", "batch", "openclip_sps", "cadenza_sps", "ratio"],
        notes="samples/s: median over steps after warm-up, then median over rounds; ratio = Cadenza / OpenCLIP",
        out_dir=args.out,
    )
    print(path.read_text())  # noqa: T201


if __name__ == "__main__":
    main()
