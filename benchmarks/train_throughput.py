"""Training throughput, OpenCLIP's trainer against Cadenza on the same machine, alternating A B A B.

    python benchmarks/train_throughput.py            # the CPU configs (minutes on 2 cores)
    python benchmarks/train_throughput.py --gpu      # the GPU configs (ViT-B-16, bf16, batch 256)
    python benchmarks/train_throughput.py --only fp32 --name train_throughput_cpu_avx2   # a subset, own file

Same architecture, batch size, precision, synthetic data and number of steps; each run logs every
step with the device synchronized; the median samples/s after warm-up steps is compared. MFU is the same
for both sides: FLOPs per sample (torch's FLOP counter, forward + backward) x samples/s / the peak of a
large matmul in the config's precision, measured in this process before the runs. "each at its best"
rows compile both (OpenCLIP's --torchcompile, Cadenza's torch_compile algorithm, which leaves the model's
function unchanged). Results go to benchmarks/results/train_throughput_{cpu,gpu}.{md,json} (or --out,
--name).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_cadenza, run_openclip, steady, write_results  # noqa: E402
from cadenza.engine.mfu import flops_per_sample, matmul_dtype, measured_peak_flops  # noqa: E402
from cadenza.models import create_model  # noqa: E402

COMPILE = (["--torchcompile"], ["algorithms.torch_compile={}"])

#: (label, model, batch, precision, steps, warm-up steps, workers, OpenCLIP extra flags, Cadenza extra overrides)
CPU_CONFIGS = [
    ("ViT-B-32 fp32", "ViT-B-32", 32, "fp32", 6, 2, 2, [], []),
    ("ViT-B-32 amp_bf16", "ViT-B-32", 32, "amp_bf16", 6, 2, 2, [], []),
    ("ViT-S-32 fp32", "ViT-S-32", 64, "fp32", 10, 3, 2, [], []),
    ("ViT-S-32 amp_bf16", "ViT-S-32", 64, "amp_bf16", 6, 2, 2, [], []),
    ("ViT-S-32 fp32, each at its best (compiled)", "ViT-S-32", 64, "fp32", 12, 4, 2, *COMPILE),
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
        *COMPILE,
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the GPU configs")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds per config")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--only", default="", help="run the configs whose label contains this text")
    parser.add_argument("--name", default=None, help="results file name (default train_throughput_{cpu,gpu})")
    args = parser.parse_args()
    configs = [c for c in (GPU_CONFIGS if args.gpu else CPU_CONFIGS) if args.only in c[0]]
    if not configs:
        parser.error(f"no config label contains {args.only!r}")
    device = "cuda" if args.gpu else "cpu"
    rows = []
    for label, model, batch, precision, steps, warmup, workers, oc_extra, cz_extra in configs:
        with torch.device("meta"):
            flops = flops_per_sample(create_model(model), precision)
        peak = measured_peak_flops(device, None, matmul_dtype(precision))
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
                "openclip_mfu": flops * oc / peak,
                "cadenza_mfu": flops * cz / peak,
                "gflop_per_sample": flops / 1e9,
                "peak_gflops": peak / 1e9,
                "openclip_runs": openclip,
                "cadenza_runs": cadenza,
            }
        )
        print(  # noqa: T201
            f"{label:44s} openclip {oc:8.1f}/s  cadenza {cz:8.1f}/s  ratio {cz / oc:.2f}  "
            f"MFU {flops * oc / peak:.0%} / {flops * cz / peak:.0%}",
            flush=True,
        )
    name = args.name or ("train_throughput_gpu" if args.gpu else "train_throughput_cpu")
    path = write_results(
        name,
        rows,
        ["config", "batch", "openclip_sps", "cadenza_sps", "ratio", "openclip_mfu", "cadenza_mfu", "peak_gflops"],
        notes="samples/s: median over steps after warm-up, then median over rounds; ratio = Cadenza / OpenCLIP; "
        "MFU = GFLOP per sample x samples/s / peak_gflops (a large matmul in the config's precision, this machine)",
        out_dir=args.out,
    )
    print(path.read_text())  # noqa: T201


if __name__ == "__main__":
    main()
