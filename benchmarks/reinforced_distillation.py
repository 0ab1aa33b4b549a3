"""Distillation from stored teacher embeddings (README, "Reinforced data"): its cost and its effect, on the digits.

    python benchmarks/reinforced_distillation.py                 # everything below (about 1 h on 2 shared cores)
    python benchmarks/reinforced_distillation.py --skip-accuracy # the speed table only

In ``--workdir`` (default: the repository, as ``make quickstart``) it runs README's worked example, each step only
when its output is missing: the digits (``python -m cadenza.datasets.digits``), the teacher
(``yamls/quickstart_teacher.yaml``), the reinforced data (``composer convert --teacher ... --views 10``). Then:

- **Speed.** ``yamls/quickstart_reinforced.yaml`` for ``--steps`` steps without evaluation or checkpoints, in three
  variants — no distillation, ``source: stored``, and ``source: online`` with the same teacher checkpoint run every
  step — interleaved over ``--rounds`` rounds (A B C A B C: the machine's load drifts); steps/s is the median of the
  per-step rates after ``--warmup`` steps, and the ratios compare variants within a round.
- **Accuracy.** The student of ``yamls/quickstart_reinforced.yaml`` (tiny-vit, 1068 steps) with stored distillation
  and the same student without it (``algorithms.distillation=null``: the same data, captions and steps), per seed;
  zero-shot top-1 on the held-out digits at the end, beside the teacher's.

Each run is a ``composer`` process with ``OMP_NUM_THREADS=1`` and one loader worker, as the quickstart runs.
Results: ``benchmarks/results/reinforced_distillation.{md,json}``.
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
    parser.add_argument("--steps", type=int, default=60, help="steps per speed run")
    parser.add_argument("--warmup", type=int, default=10, help="speed: steps left out of the median")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--name", default="reinforced_distillation", help="results file name")
    args = parser.parse_args()
    prepare(args.workdir)
    speed_rows = speed(args.workdir, args.steps, args.warmup, args.rounds)
    accuracy_rows = [] if args.skip_accuracy else accuracy(args.workdir, args.seeds)
    notes = (
        "Speed: tiny-vit student on the reinforced digits (batch 32, one model thread, one loader worker); the online "
        "teacher is the stored one's checkpoint. Accuracy: zero-shot top-1 on the 359 held-out digits after the "
        "student's 1068 steps (the teacher: its own run)."
    )
    rows = [{"table": "speed", **row} for row in speed_rows] + [{"table": "accuracy", **row} for row in accuracy_rows]
    columns = ["table", "variant", "steps/s (median of rounds)", "range", "vs no distillation (per round)", "model", "seed", "top-1"]  # fmt: skip
    print(write_results(args.name, rows, columns, notes).read_text())


if __name__ == "__main__":
    main()
