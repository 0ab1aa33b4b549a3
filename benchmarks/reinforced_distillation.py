"""Distillation from stored teacher embeddings (README, "Reinforced data"): its cost and its effect, on the digits.

    python benchmarks/reinforced_distillation.py                 # everything below (about 1 h on 2 shared cores)
    python benchmarks/reinforced_distillation.py --skip-accuracy # the speed table only

In ``--workdir`` (default: the repository, as ``make quickstart``) it runs README's worked example, each step only
when its output is missing: the digits (``python -m cadenza.datasets.digits``), the teacher
(``yamls/quickstart_teacher.yaml``), the reinforced data (``composer convert --teacher ... --views 10``). Then:

- **Speed of a step.** In one process, on the same real batches of the reinforced digits (tiny-vit student, batch
  32, one thread): forward, loss, backward and AdamW step with no distillation, with ``source: stored`` (the
  batch's stored embeddings) and with ``source: online`` (the teacher checkpoint run on the batch), the three
  variants alternating step by step (the machine's load drifts; each variant meets the same drift) for ``--repeats``
  steps each after warm-up; median ms per step.
- **Speed of training.** ``yamls/quickstart_reinforced.yaml`` for ``--steps`` steps without evaluation or
  checkpoints (data loading included), the same three variants interleaved over ``--rounds`` rounds; steps/s is the
  median of the per-step rates after ``--warmup`` steps, and the ratios compare variants within a round.
- **Accuracy.** The student of ``yamls/quickstart_reinforced.yaml`` (tiny-vit, 1068 steps) with stored distillation
  and the same student without it (``algorithms.distillation=null``: the same data, captions and steps), per seed;
  zero-shot top-1 on the held-out digits at the end, beside the teacher's.

Each training run is a ``composer`` process with ``OMP_NUM_THREADS=1`` and one loader worker, as the quickstart
runs. Results: ``benchmarks/results/reinforced_distillation.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, steady, write_results  # noqa: E402

TEACHER = "logs/digits-teacher/checkpoints/epoch_latest.pt"
REINFORCED = "data/digits/reinforced"
STUDENT = str(ROOT / "yamls" / "quickstart_reinforced.yaml")


def run(command: list[str], workdir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")


def composer(*args: str) -> list[str]:
    return [sys.executable, "-m", "cadenza.train.cli", *args]


def prepare(workdir: Path) -> None:
    """README's worked example up to the student, each step skipped when its output exists."""
    if not (workdir / "data/digits/train.csv").exists():
        run([sys.executable, "-m", "cadenza.datasets.digits", "--out", "data/digits"], workdir)
    if not (workdir / TEACHER).exists():
        run(composer(str(ROOT / "yamls" / "quickstart_teacher.yaml")), workdir)
    if not (workdir / REINFORCED / "cadenza-convert.json").exists():
        convert = ["convert", "--from", "csv", "data/digits/train.csv", "--to", REINFORCED, "--captions", "captions"]
        run(composer(*convert, "--views", "10", "--teacher", f"tiny-vit:{TEACHER}", "--no-progress", "--overwrite"), workdir)  # fmt: skip


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


VARIANTS = {
    "no distillation": ["algorithms.distillation=null"],
    "stored (source: stored)": [],
    "online (teacher run every step)": [
        f"algorithms.distillation={{source: online, teacher: tiny-vit, pretrained: {TEACHER}, loss_weights: [1.0, 1.0]}}"
    ],
}


def speed(workdir: Path, steps: int, warmup: int, rounds: int) -> list[dict]:
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(rounds):
        this_round = {}
        for name, overrides in VARIANTS.items():
            with tempfile.TemporaryDirectory() as logs:
                quiet = ["loggers.console=null", "eval.zero_shot.path=null", "checkpoint.save_latest=false"]
                run(composer(STUDENT, f"run.logs={logs}", "run.name=speed", f"run.duration={steps}ba",
                             "run.log_interval=1ba", f"checkpoint.save_interval={steps * 10}ba", *quiet, *overrides),
                    workdir)  # fmt: skip
                per_step = [r["train/samples_per_second"] for r in metrics(Path(logs) / "speed") if "train/samples_per_second" in r]  # fmt: skip
            this_round[name] = steady(per_step, warmup) / 32  # steps/s at batch 32
            rates[name].append(this_round[name])
        for name in VARIANTS:
            ratios[name].append(this_round[name] / this_round["no distillation"])
        print(f"round {round_ + 1}: " + ", ".join(f"{n}: {r:.2f} steps/s" for n, r in this_round.items()), flush=True)
    return [
        {
            "variant": name,
            "steps/s (median of rounds)": statistics.median(rates[name]),
            "range": f"{min(rates[name]):.2f} - {max(rates[name]):.2f}",
            "vs no distillation (per round)": " / ".join(f"{r:.2f}" for r in ratios[name]),
        }
        for name in VARIANTS
    ]


def step_speed(workdir: Path, repeats: int) -> list[dict]:
    """Median ms per training step of each variant, alternating step by step on the same batches."""
    import time

    import torch

    from cadenza.algorithms.distillation import build_teacher, stored_teacher_outputs, teacher_outputs
    from cadenza.datasets.context import TEACHER_EMBEDDINGS, LoaderContext
    from cadenza.datasets.streaming import StreamingLoader
    from cadenza.datasets.transforms import AUGMENT_DEFAULTS, image_transform
    from cadenza.engine.optim import build_optimizer
    from cadenza.models import create_model
    from cadenza.models.losses import ClipLoss, DistillClipLoss
    from cadenza.models.tokenizer import get_tokenizer
    from cadenza.train.config import load_config

    torch.set_num_threads(1)
    context = LoaderContext(
        train=True, batch_size=32, seed=0, image_size=32, context_length=32,
        transform=image_transform(32, True), tokenizer=get_tokenizer("tiny-vit", context_length=32),
        cache_dir=tempfile.mkdtemp(), augment=AUGMENT_DEFAULTS, extras=frozenset({TEACHER_EMBEDDINGS}),
    )  # fmt: skip
    loader = StreamingLoader(remote=str(workdir / REINFORCED), captions="captions", context=context)
    batches = [batch for batch, _ in zip(loader, range(8), strict=False)]
    teacher = build_teacher("tiny-vit", str(workdir / TEACHER), torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    student = create_model("tiny-vit")
    optimizer = build_optimizer(load_config(STUDENT).optim, student)
    clip, distill = ClipLoss(), DistillClipLoss()

    def step(variant: str, images, tokens, extras) -> None:
        tokens = student.trim_text_padding(tokens)
        outputs = student(images, tokens)
        if variant == "stored (source: stored)":
            losses = distill(**outputs, **stored_teacher_outputs(extras))
        elif variant == "online (teacher run every step)":
            losses = distill(**outputs, **teacher_outputs(teacher, images, tokens))
        else:
            losses = clip(**outputs)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for index in range(repeats + 3):
        for name in VARIANTS:
            started = time.perf_counter()
            step(name, *batches[index % len(batches)])
            if index >= 3:  # warm-up: allocator, first-call costs
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["no distillation"])
    return [
        {
            "variant": name,
            "ms per step (median)": 1000 * statistics.median(times[name]),
            "steps/s": 1 / statistics.median(times[name]),
            "vs no distillation": statistics.median(times[name]) / base,
        }
        for name in VARIANTS
    ]


def final_top1(run_dir: Path) -> float:
    rows = [r for r in metrics(run_dir) if "val/digits-zeroshot-val-top1" in r]
    return rows[-1]["val/digits-zeroshot-val-top1"]


def accuracy(workdir: Path, seeds: list[int]) -> list[dict]:
    rows = [{"model": "teacher (yamls/quickstart_teacher.yaml)", "top-1": final_top1((workdir / TEACHER).parents[1])}]
    for seed in seeds:
        for name, overrides in (("student, distilled from stored embeddings", []), ("student alone", ["algorithms.distillation=null"])):  # fmt: skip
            run_name = f"bench-{'alone' if overrides else 'distilled'}-seed{seed}"
            run(composer(STUDENT, "run.logs=logs", f"run.name={run_name}", f"run.seed={seed}",
                         "checkpoint.overwrite=true", *overrides), workdir)  # fmt: skip
            top1 = final_top1(workdir / "logs" / run_name)
            rows.append({"model": name, "seed": seed, "top-1": top1})
            print(f"seed {seed}, {name}: zero-shot top-1 {top1:.4f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT, help="where data/ and logs/ are (default: the repo)")
    parser.add_argument("--repeats", type=int, default=60, help="step speed: steps per variant")
    parser.add_argument("--steps", type=int, default=80, help="training speed: steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="training speed: steps left out of the median")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--name", default="reinforced_distillation", help="results file name")
    args = parser.parse_args()
    prepare(args.workdir)
    step_rows = step_speed(args.workdir, args.repeats)
    print("\n".join(f"{r['variant']}: {r['ms per step (median)']:.1f} ms per step" for r in step_rows), flush=True)
    speed_rows = speed(args.workdir, args.steps, args.warmup, args.rounds)
    accuracy_rows = [] if args.skip_accuracy else accuracy(args.workdir, args.seeds)
    notes = (
        "Step: forward, loss, backward and AdamW step in one process on the same 8 real batches, variants alternating "
        "step by step. Training: whole runs (data loading included; tiny-vit student on the reinforced digits, batch "
        "32, one model thread, one loader worker). The online teacher is the stored one's checkpoint. Accuracy: "
        "zero-shot top-1 on the 359 held-out digits after the student's 1068 steps (the teacher: its own run). The "
        "machine was shared with other jobs: compare within a table."
    )
    rows = [{"table": "step", **row} for row in step_rows] + [{"table": "training", **row} for row in speed_rows]
    rows += [{"table": "accuracy", **row} for row in accuracy_rows]
    columns = [
        "table", "variant", "ms per step (median)", "steps/s", "vs no distillation", "steps/s (median of rounds)",
        "range", "vs no distillation (per round)", "model", "seed", "top-1",
    ]  # fmt: skip
    print(write_results(args.name, rows, columns, notes).read_text())


if __name__ == "__main__":
    main()
