"""Training throughput, OpenCLIP's trainer against Cadenza on the same machine, alternating A B A B.

    python benchmarks/train_throughput.py            # the CPU configs (minutes on 2 cores)
    python benchmarks/train_throughput.py --gpu      # the GPU configs (ViT-B-16, bf16, batch 256)
    python benchmarks/train_throughput.py --only fp32 --name train_throughput_cpu_avx2   # a subset, own file
    python benchmarks/train_throughput.py --only "ViT-B-32 amp_bf16" --against HEAD~3   # and Cadenza at a revision

Same architecture, batch size, precision, synthetic data and number of steps; each run logs every
step with the device synchronized; the median samples/s after warm-up steps is compared. MFU is the same
for both sides: FLOPs per sample (torch's FLOP counter, forward + backward) x samples/s / the peak of a
large matmul in the config's precision, measured in this process before the runs. "each at its best"
rows compile both (OpenCLIP's --torchcompile, Cadenza's torch_compile algorithm, which leaves the model's
function unchanged). Results go to benchmarks/results/train_throughput_{cpu,gpu}.{md,json} (or --out,
--name). ``--against REV`` adds Cadenza at git revision REV as a third side, in the same rounds (A B C A B C).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cadenza_at, run_cadenza, run_openclip, steady, write_results  # noqa: E402
from cadenza.engine.mfu import flops_per_sample, matmul_dtype, measured_peak_flops  # noqa: E402
from cadenza.models import create_model  # noqa: E402

COMPILE = {"openclip_extra": ["--torchcompile"], "cadenza_extra": ["algorithms.torch_compile={}"]}
#: Cadenza's synthetic captions hold 1 to 30 BPE ids (MS-COCO's captions average about 10 words); OpenCLIP's synthetic
#: data is always "Dummy caption", and its trainer runs all 77 positions whatever the caption.
SHORT_CAPTIONS = {"caption_ids": 30}


class Config(NamedTuple):
    label: str
    model: str
    batch: int
    precision: str
    steps: int
    warmup: int  # steps left out of the median
    workers: int
    openclip_extra: list[str] = []
    cadenza_extra: list[str] = []
    caption_ids: int | None = None  # the longest synthetic caption Cadenza gets (default: the context's)

    @property
    def cadenza_overrides(self) -> list[str]:
        captions = [] if self.caption_ids is None else [f"data.train.max_caption_length={self.caption_ids}"]
        return [*self.cadenza_extra, *captions]


CPU_CONFIGS = [
    Config("ViT-B-32 fp32", "ViT-B-32", 32, "fp32", 6, 2, 2),
    Config("ViT-B-32 amp_bf16", "ViT-B-32", 32, "amp_bf16", 6, 2, 2),
    Config("ViT-S-32 fp32", "ViT-S-32", 64, "fp32", 10, 3, 2),
    Config("ViT-S-32 amp_bf16", "ViT-S-32", 64, "amp_bf16", 6, 2, 2),
    Config("ViT-S-32 fp32, each at its best (compiled)", "ViT-S-32", 64, "fp32", 12, 4, 2, **COMPILE),
    Config("ViT-S-32 fp32, captions of 1-30 ids", "ViT-S-32", 64, "fp32", 10, 3, 2, **SHORT_CAPTIONS),
]
GPU_CONFIGS = [
    Config("ViT-B-16 amp_bf16", "ViT-B-16", 256, "amp_bf16", 40, 10, 8),
    Config("ViT-B-16 amp_bf16 + compile", "ViT-B-16", 256, "amp_bf16", 40, 15, 8, **COMPILE),
    Config("ViT-B-16 amp_bf16, captions of 1-30 ids", "ViT-B-16", 256, "amp_bf16", 40, 10, 8, **SHORT_CAPTIONS),
]


def cadenza_flops(config: Config, model: torch.nn.Module, precision: str) -> float:
    """FLOPs per sample of what Cadenza runs: with short captions, its text tower stops at the batch's longest
    (``model.trim_text_padding``), which for these batch sizes is the longest the data holds, SOT and EOT added."""
    if config.caption_ids is None:
        return flops_per_sample(model, precision)
    tokens = torch.zeros(1, model.context_length, dtype=torch.long, device="cpu")
    tokens[0, : config.caption_ids + 2] = 1
    return flops_per_sample(model, precision, text_length=model.trim_text_padding(tokens).shape[1])


def measure(config: Config, device: str, rounds: int = 2, earlier: Path | None = None) -> dict:
    """One config, OpenCLIP then Cadenza (then, with ``earlier``, the Cadenza exported there), ``rounds`` times
    (A B A B, or A B C A B C): samples/s, ratio and MFU (a printed line and a results row)."""
    label, model, batch, precision, steps, warmup, workers, oc_extra = config[:8]
    cz_extra = config.cadenza_overrides
    with torch.device("meta"):
        meta_model = create_model(model)
        flops, cz_flops = flops_per_sample(meta_model, precision), cadenza_flops(config, meta_model, precision)
    peak = measured_peak_flops(device, None, matmul_dtype(precision))
    openclip, cadenza, before = [], [], []
    for _ in range(rounds):
        openclip.append(steady(run_openclip(model, batch, precision, steps, workers, oc_extra, device), warmup))
        cadenza.append(steady(run_cadenza(model, batch, precision, steps, workers, cz_extra, device), warmup))
        if earlier is not None:
            before.append(
                steady(run_cadenza(model, batch, precision, steps, workers, cz_extra, device, code=earlier), warmup)
            )
    oc, cz = statistics.median(openclip), statistics.median(cadenza)
    earlier_row = {}
    if before:
        b = statistics.median(before)
        earlier_row = {"earlier_sps": b, "earlier_ratio": b / oc, "earlier_runs": before}
        print(f"{'':44s} cadenza at the earlier revision {b:8.1f}/s  ratio {b / oc:.2f}", flush=True)  # noqa: T201
    print(  # noqa: T201
        f"{label:44s} openclip {oc:8.1f}/s  cadenza {cz:8.1f}/s  ratio {cz / oc:.2f}  "
        f"MFU {flops * oc / peak:.0%} / {cz_flops * cz / peak:.0%}",
        flush=True,
    )
    return {
        "config": label,
        "batch": batch,
        "openclip_sps": oc,
        "cadenza_sps": cz,
        "ratio": cz / oc,
        "openclip_mfu": flops * oc / peak,
        "cadenza_mfu": cz_flops * cz / peak,
        "gflop_per_sample": flops / 1e9,
        "cadenza_gflop_per_sample": cz_flops / 1e9,
        "peak_gflops": peak / 1e9,
        "openclip_runs": openclip,
        "cadenza_runs": cadenza,
        "ratio_per_round": [c / o for c, o in zip(cadenza, openclip, strict=True)],
        **earlier_row,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the GPU configs")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds per config")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--only", default="", help="run the configs whose label contains this text")
    parser.add_argument("--name", default=None, help="results file name (default train_throughput_{cpu,gpu})")
    parser.add_argument("--against", default=None, help="also Cadenza at this git revision, in the same rounds")
    args = parser.parse_args()
    configs = [c for c in (GPU_CONFIGS if args.gpu else CPU_CONFIGS) if args.only in c.label]
    if not configs:
        parser.error(f"no config label contains {args.only!r}")
    device = "cuda" if args.gpu else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        earlier = cadenza_at(args.against, Path(folder)) if args.against else None
        rows = [measure(config, device, args.rounds, earlier) for config in configs]
    name = args.name or ("train_throughput_gpu" if args.gpu else "train_throughput_cpu")
    columns = ["config", "batch", "openclip_sps", "cadenza_sps", "ratio", "openclip_mfu", "cadenza_mfu", "peak_gflops"]
    if args.against:
        columns[5:5] = ["earlier_sps", "earlier_ratio"]
    path = write_results(
        name,
        rows,
        columns,
        notes="samples/s: median over steps after warm-up, then median over rounds; ratio = Cadenza / OpenCLIP; "
        "MFU = GFLOP per sample x samples/s / peak_gflops (a large matmul in the config's precision, this machine); "
        "'captions of 1-30 ids' rows: Cadenza's text tower runs 32 positions (the batch's longest caption), "
        "OpenCLIP's all 77, and each MFU counts the FLOPs its side ran"
        + (f"; earlier: Cadenza at {args.against}, in the same rounds" if args.against else ""),
        out_dir=args.out,
    )
    print(path.read_text())  # noqa: T201


if __name__ == "__main__":
    main()
