"""Resume cost: time from process start to the first training step when resuming at increasing positions in an
epoch, Cadenza (CSV, WebDataset, streaming/MDS) next to OpenCLIP's trainer.

    python benchmarks/resume_cost.py            # about 7 minutes on 2 shared cores
    python benchmarks/resume_cost.py --quick    # 1 repeat, 3 positions: about 3 minutes

1. **Data**: the same small JPEGs as CSV + files, WebDataset tar shards and MDS shards
   (``benchmarks/data_throughput.write_formats``); an epoch is a few hundred steps of ``tiny-vit``.
2. **Checkpoints**: one Cadenza run per format trains one epoch and saves every few steps, so there is a
   checkpoint at each position (0% is the checkpoint at the epoch's end: the next epoch starts at sample 0).
   OpenCLIP's trainer saves only at epoch ends, so its one checkpoint is the end of epoch 0; the same model
   (``tiny-vit``, exported with ``composer export`` and loaded with ``--model local-dir:...``), batch, workers
   and CSV data.
3. **Resume**: a fresh process per measurement (``composer ... checkpoint.resume=<path>``, or
   ``python -m open_clip_train.main --resume <path>``), metrics logged every step; the time from just before the
   process is started to the moment its first ``Train Epoch`` line reaches this script (read as the child
   writes it) is its time to the first step. Also timed: the moment it logs that the checkpoint is loaded.
   Repeats are interleaved (every position and system in turn, then again); the median is reported.

OpenCLIP resumes at the epoch boundary whatever the position was: the samples of the interrupted epoch up to
the position are trained on again (with a new shuffle), so "back at the position" adds position x epoch steps
at its measured step time. Cadenza resumes at the exact sample, so its time to the first step is that time.

Results: benchmarks/results/resume_cost.{md,json} (or --out), with the machine, torch version and date.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, write_results  # noqa: E402
from benchmarks.data_throughput import write_formats  # noqa: E402

FIRST_STEP = re.compile(r"Train Epoch: \d+ \[")
LOADED = re.compile(r"resumed from |=> resuming checkpoint")
_OPENCLIP_STEP_TIME = re.compile(r"Batch \(t\): ([\d.]+),")
#: one torch thread in every trainer: on a shared 2-core machine more threads only add contention
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def timed_run(command: list[str], cwd: str | Path, timeout: float = 600) -> dict[str, float]:
    """Start ``command``; seconds from the start to its checkpoint-loaded line and to its first ``Train Epoch``
    line, read as the child writes them. The child (and its data workers) are killed once the step is seen."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    times: dict[str, float] = {}
    tail: list[str] = []
    try:
        for line in process.stdout:
            now = time.perf_counter() - start
            tail = [*tail[-40:], line]
            if "loaded" not in times and LOADED.search(line):
                times["loaded"] = now
            if FIRST_STEP.search(line):
                times["first_step"] = now
                break
            if now > timeout:
                break
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the trainer and its loader workers
        process.wait()
        process.stdout.close()
    if "first_step" not in times:
        raise RuntimeError(f"no training step logged by {' '.join(command)}:\n{''.join(tail)[-3000:]}")
    return times


# -- Cadenza -------------------------------------------------------------------------------------------------------
def cadenza_command(train: str, logs: Path, name: str, batch: int, workers: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cadenza.train.cli",
        str(ROOT / "yamls" / "tiny.yaml"),
        f"run.name={name}",
        f"run.logs={logs}",
        f"data.train={train}",
        "data.val=null",
        f"data.batch_size={batch}",
        f"data.workers={workers}",
        "run.log_interval=1ba",
        "checkpoint.save_latest=false",
        *extra,
    ]


def cadenza_checkpoints(
    train: str, logs: Path, name: str, steps: int, every: int, batch: int, workers: int
) -> dict[int, Path]:
    """Train one epoch of ``steps`` saving every ``every`` steps; the checkpoint of each step."""
    extra = [f"run.duration={steps}ba", f"checkpoint.save_interval={every}ba", "checkpoint.keep=-1"]
    command = cadenza_command(train, logs, name, batch, workers, extra)
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"composer failed:\n{(result.stdout + result.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (logs / name / "metrics.jsonl").read_text().splitlines()]
    step_time = statistics.median(r["train/batch_time"] for r in rows[2:] if "train/batch_time" in r)
    saved = {int(p.stem.rpartition("-ba")[2]): p for p in (logs / name / "checkpoints").glob("ep*-ba*.pt")}
    return saved, step_time


# -- OpenCLIP ------------------------------------------------------------------------------------------------------
def openclip_command(data: Path, model: Path, logs: Path, name: str, batch: int, workers: int, epochs: int) -> list:
    return [
        sys.executable,
        "-m",
        "open_clip_train.main",
        "--model",
        f"local-dir:{model}",
        "--train-data",
        str(data / "train.csv"),
        "--dataset-type",
        "csv",
        "--batch-size",
        str(batch),
        "--epochs",
        str(epochs),
        "--workers",
        str(workers),
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--log-every-n-steps",
        "1",
        "--logs",
        str(logs),
        "--name",
        name,
        "--report-to",
        "",
        "--save-frequency",
        "1",
    ]


def openclip_epoch(data: Path, model: Path, logs: Path, batch: int, workers: int) -> tuple[Path, float]:
    """One epoch of OpenCLIP's trainer: its end-of-epoch checkpoint and its median step time (s)."""
    command = openclip_command(data, model, logs, "epoch0", batch, workers, epochs=1)
    result = subprocess.run(command, capture_output=True, text=True, cwd=data, env=ENV, timeout=900)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{output[-3000:]}")
    step_times = [float(t) for t in _OPENCLIP_STEP_TIME.findall(output)]
    return logs / "epoch0" / "checkpoints" / "epoch_1.pt", statistics.median(step_times[2:])


def export_model(checkpoint: Path, out: Path) -> None:
    """``tiny-vit`` as an OpenCLIP ``local-dir:`` model (config + weights)."""
    command = [sys.executable, "-m", "cadenza.train.cli", "export", str(checkpoint), "--format", "openclip", str(out)]
    subprocess.run(command, check=True, capture_output=True, env=ENV, timeout=300)


# -- the benchmark ---------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat at 0%%, 50%% and 95%%")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per system and position")
    parser.add_argument("--positions", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 0.95])
    parser.add_argument("--steps", type=int, default=200, help="steps per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (both trainers)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.positions = 1, [0, 0.5, 0.95]
    steps, batch = args.steps, args.batch_size
    every = 5 if steps % 20 else steps // 20  # a checkpoint every 5% of the epoch
    at = {p: round(p * steps / every) * every or steps for p in args.positions}  # 0%: the epoch's end
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = write_formats(tmp / "data", steps * batch, (64, 48))
        trains = {
            "csv": f"{{type: csv, path: {sources['csv']['path']}}}",
            "webdataset": f"{{type: webdataset, path: '{sources['webdataset']['path']}', "
            f"num_samples: {steps * batch}, shuffle_buffer: {steps * batch // 4}}}",
            "streaming": f"{{type: streaming, remote: {sources['streaming']['remote']}}}",
        }
        checkpoints, step_times = {}, {}
        for kind, train in trains.items():
            start = time.perf_counter()
            checkpoints[kind], step_times[kind] = cadenza_checkpoints(
                train, tmp / "logs", kind, steps, every, batch, args.workers
            )
            print(  # noqa: T201
                f"cadenza {kind}: one epoch with checkpoints in {time.perf_counter() - start:.0f} s, "
                f"{1000 * step_times[kind]:.0f} ms per step",
                flush=True,
            )
        export_model(checkpoints["csv"][every], tmp / "tiny-vit-openclip")
        openclip_checkpoint, openclip_step = openclip_epoch(
            tmp / "data", tmp / "tiny-vit-openclip", tmp / "openclip", batch, args.workers
        )
        print(f"openclip: one epoch, {1000 * openclip_step:.0f} ms per step", flush=True)  # noqa: T201

        measured: dict[tuple[str, float], list[dict[str, float]]] = {}
        openclip: list[dict[str, float]] = []
        for repeat in range(args.repeats):
            # every position in turn (reversed every other repeat): load from other processes spreads over all
            for position in args.positions[:: -1 if repeat % 2 else 1]:
                for kind, train in trains.items():
                    name = f"{kind}-resume-{at[position]}-{repeat}"
                    extra = [
                        f"checkpoint.resume={checkpoints[kind][at[position]]}",
                        f"run.duration={at[position] + 1}ba",
                    ]
                    extra += ["checkpoint.save_interval=100000ba"]
                    command = cadenza_command(train, tmp / "logs", name, batch, args.workers, extra)
                    measured.setdefault((f"cadenza {kind}", position), []).append(timed_run(command, tmp))
                line = "  ".join(f"{s} {v[-1]['first_step']:.2f}s" for (s, p), v in measured.items() if p == position)
                print(f"repeat {repeat} at {100 * position:.0f}%: {line}", flush=True)  # noqa: T201
            # OpenCLIP resumes from its one checkpoint whatever the position: the same process every time
            model = tmp / "tiny-vit-openclip"
            command = openclip_command(tmp / "data", model, tmp / "openclip", f"r{repeat}", batch, args.workers, 2)
            openclip.append(timed_run([*command, "--resume", str(openclip_checkpoint)], tmp / "data"))
            print(f"repeat {repeat}: openclip csv {openclip[-1]['first_step']:.2f}s", flush=True)  # noqa: T201
        for position in args.positions:
            measured[("openclip csv", position)] = openclip

    rows = []
    for (system, position), runs in measured.items():
        first = statistics.median(r["first_step"] for r in runs)
        loaded = statistics.median(r["loaded"] for r in runs)
        data_and_step = statistics.median(r["first_step"] - r["loaded"] for r in runs)
        repeated = round(position * steps) if system.startswith("openclip") else 0
        step_time = openclip_step if system.startswith("openclip") else step_times[system.split()[1]]
        rows.append(
            {
                "system": system,
                "position": f"{100 * position:.0f}%",
                "resumed_at_step": at[position] if system.startswith("cadenza") else steps,
                "s_to_checkpoint_loaded": loaded,
                "s_loaded_to_first_step": data_and_step,
                "s_to_first_step": first,
                "steps_trained_again": repeated,
                "s_back_at_position": first + repeated * step_time,
                "runs_s_to_first_step": [r["first_step"] for r in runs],
            }
        )
    rows.sort(key=lambda r: (r["system"], float(r["position"].rstrip("%"))))
    notes = (
        f"Load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"({os.cpu_count()} cores, shared with other work). tiny-vit, fp32, batch {batch}, one torch thread, "
        f"{args.workers} loader worker(s), an epoch of {steps} steps ({steps * batch} JPEGs of 64x48); WebDataset "
        f"shuffle buffer {steps * batch // 4} samples. Seconds from process start, median of {args.repeats} "
        "(s_loaded_to_first_step: the median of each run's difference). OpenCLIP resumes at the start of the epoch "
        "whatever the position (its rows are the same runs): it trains on that part of the epoch again, with a new "
        f"shuffle; s_back_at_position adds those steps at its median step time here ({1000 * openclip_step:.0f} ms). "
        "Cadenza resumes at the exact sample; its 0% is the checkpoint at the epoch's end (the next epoch starts "
        "at sample 0). Cadenza's step times here: "
        + ", ".join(f"{kind} {1000 * t:.0f} ms" for kind, t in step_times.items())
        + "."
    )
    columns = [
        "system",
        "position",
        "resumed_at_step",
        "s_to_checkpoint_loaded",
        "s_loaded_to_first_step",
        "s_to_first_step",
        "steps_trained_again",
        "s_back_at_position",
    ]
    path = write_results("resume_cost", rows, columns, notes=notes, out_dir=args.out)
    print(path.read_text())  # noqa: T201


if __name__ == "__main__":
    main()
