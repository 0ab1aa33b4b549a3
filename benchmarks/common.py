"""Shared pieces of the benchmarks: run OpenCLIP's trainer and Cadenza side by side, parse their
throughput, describe the machine, write results (markdown + JSON) under benchmarks/results/."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
_OPENCLIP_RATE = re.compile(r"Batch \(t\): [\d.]+, ([\d.]+)/s,")


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_cores": str(os.cpu_count()),
        "load_average_1_5_15min": " / ".join(f"{x:.1f}" for x in os.getloadavg()),  # at writing: others' work
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_openclip(
    model: str, batch: int, precision: str, steps: int, workers: int, extra: list[str] = (), device: str = "auto"
) -> list[float]:
    """Per-step samples/s of ``open_clip_train.main`` on synthetic data (logged every step, so each is synchronized).

    A Cadenza architecture OpenCLIP has no config for (``tiny-vit``) is given to OpenCLIP as the config that builds the
    same model (``openclip_model_config``). ``device="cpu"`` hides the GPUs from OpenCLIP's trainer.
    """
    with tempfile.TemporaryDirectory() as logs:
        command = [
            sys.executable,
            *openclip_entry(model, Path(logs)),
            "--model",
            model,
            "--dataset-type",
            "synthetic",
            "--train-num-samples",
            str(batch * steps),
            "--batch-size",
            str(batch),
            "--precision",
            precision,
            "--epochs",
            "1",
            "--workers",
            str(workers),
            "--log-every-n-steps",
            "1",
            "--logs",
            logs,
            "--name",
            "bench",
            "--report-to",
            "",
            "--warmup",
            "1",
            "--save-frequency",
            "0",
            *extra,
        ]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None
        result = subprocess.run(command, capture_output=True, text=True, cwd=logs, timeout=3600, env=env)
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise RuntimeError(f"open_clip_train failed:\n{output[-3000:]}")
        return [float(rate) for rate in _OPENCLIP_RATE.findall(output)]


def openclip_entry(model: str, folder: Path) -> list[str]:
    """How to start ``open_clip_train.main`` for ``model``: ``-m open_clip_train.main``, or, for a Cadenza architecture
    OpenCLIP does not know, a launcher that first registers its OpenCLIP config (written into ``folder``)."""
    import open_clip

    if model in open_clip.list_models():
        return ["-m", "open_clip_train.main"]
    from cadenza.models import create_model
    from cadenza.models.convert import openclip_model_config

    with torch.device("meta"):
        config = openclip_model_config(create_model(model))
    (folder / f"{model}.json").write_text(json.dumps(config))
    launcher = (
        "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
        "from open_clip_train.main import main; main(sys.argv[2:])"
    )
    return ["-c", launcher, str(folder / f"{model}.json")]


def run_cadenza(
    model: str,
    batch: int,
    precision: str,
    steps: int,
    workers: int,
    extra: list[str] = (),
    device: str = "auto",
    code: Path | None = None,
) -> list[float]:
    """Per-step samples/s of ``composer`` on synthetic data (metrics every step, device synchronized); ``code``: a
    folder holding another Cadenza as the ``cadenza`` package (``cadenza_at``), imported instead of this one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as logs:
        command = [sys.executable, "-m", "cadenza.train.cli", str(ROOT / "yamls" / "tiny.yaml")]
        command += [*speed_run_overrides(model, batch, precision, steps, workers, logs), f"run.device={device}", *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env if code else None)
        if result.returncode != 0:
            raise RuntimeError(f"composer failed:\n{(result.stdout + result.stderr)[-3000:]}")
        rows = [json.loads(line) for line in (Path(logs) / "tiny" / "metrics.jsonl").read_text().splitlines()]
        return [row["train/samples_per_second"] for row in rows if "train/samples_per_second" in row]


def cadenza_at(revision: str, folder: Path) -> Path:
    """This repository's Cadenza at git ``revision``, exported into ``folder`` as an importable ``cadenza`` package
    (``folder`` is what goes on ``PYTHONPATH``): the earlier code measured in the same run as the current one."""
    source = folder / "source"
    source.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    package = folder / "cadenza"
    package.mkdir()
    for name in ("engine", "train", "algorithms", "datasets", "models"):
        (package / name).symlink_to(source / name)
    return folder


def speed_run_overrides(model: str, batch: int, precision: str, steps: int, workers: int, logs: str) -> list[str]:
    """``yamls/tiny.yaml`` turned into a speed run: synthetic data, metrics every step, no eval or saves."""
    return [
        f"model.name={model}",
        f"data.batch_size={batch}",
        f"run.precision={precision}",
        f"run.duration={steps}ba",
        f"data.train.num_samples={batch * steps}",
        "data.val=null",
        f"data.workers={workers}",
        "run.device=auto",
        "run.log_interval=1ba",
        "optim.warmup=1ba",
        "optim.grad_clip_norm=null",  # OpenCLIP's default (tiny.yaml clips); equal settings, equal work
        f"run.logs={logs}",
        "checkpoint.save_interval=100000ba",
        "loggers.console=null",
        "checkpoint.save_latest=false",
    ]


def steady(rates: list[float], warmup: int) -> float:
    """Median rate after the first ``warmup`` steps (compilation, allocator and cache warm-up)."""
    kept = rates[warmup:]
    if not kept:
        raise RuntimeError(f"only {len(rates)} steps were measured; need more than the {warmup} warm-up steps")
    return statistics.median(kept)


def write_results(
    name: str,
    rows: list[dict],
    columns: list[str],
    notes: str = "",
    out_dir: Path | None = None,
    details: dict | None = None,
    appendix: str = "",
) -> Path:
    """``<name>.json`` and ``<name>.md`` (a table with the machine stated) in ``out_dir``; ``details`` go to the JSON
    only, ``appendix`` (markdown) below the table."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    record = {"machine": info, "rows": rows, "notes": notes, **({"details": details} if details else {})}
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
    lines = [f"# {name}", "", " · ".join(f"{k}: {v}" for k, v in info.items()), ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    if appendix:
        lines += ["", appendix]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
