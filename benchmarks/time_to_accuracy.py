"""Time to accuracy: wall-clock from process start to a zero-shot top-1 target on held-out handwritten digits,
OpenCLIP's trainer (``open_clip_train`` 3.3.0) against Cadenza, the same network on the same samples.

    python benchmarks/time_to_accuracy.py                # 4 systems x 3 seeds and the floors (10 minutes, 2 idle cores)
    python benchmarks/time_to_accuracy.py --quick        # 2 systems x 1 seed, short budget (about 2-3 minutes)
    python benchmarks/time_to_accuracy.py --split-seed 1 --name time_to_accuracy_split1   # another random split
    python benchmarks/time_to_accuracy.py --algorithms   # the method cards: the fastest recipe with each algorithm
                                                         # switched, -> time_to_accuracy_algorithms.{md,json}
    python benchmarks/time_to_accuracy.py --systems openclip-best --openclip-best "--batch-size 32 ..."  # a sweep
    python benchmarks/time_to_accuracy.py --recipe "optim.lr=2e-3"    # a recipe variant

1. **Data.** ``cadenza.datasets.digits`` (``--split-seed`` draws the split and the captions): the training split as
   MDS shards (what Cadenza's recipes read) and as OpenCLIP's CSV with PNG files (what its trainer reads; Cadenza's
   "defaults" system reads it too), the same image-caption samples; the held-out split as an image folder.
2. **Same network.** ``tiny-vit``'s OpenCLIP model config (``cadenza.models.convert.openclip_model_config``) is
   written as ``cadenza-tiny-vit.json`` and registered with ``open_clip.add_model_config`` in the process that runs
   OpenCLIP's trainer. Before any run, parity of the initial forward is checked: a Cadenza ``tiny-vit`` with its
   initial weights, converted into the OpenCLIP model built from that config, gives the same image and text
   embeddings on held-out digits and the zero-shot prompts.
3. **Runs.** Every system trains from scratch in a fresh process with a checkpoint at the end of every epoch (the
   finest interval OpenCLIP's trainer has; the same for Cadenza) and is stopped at ``--budget`` seconds. Seeds run
   in turn, and within a seed the systems alternate, so that load from other jobs on a shared machine falls on all
   of them alike. The time of a checkpoint is its file's modification time minus the moment just before its
   process was started: process start, imports, data loading and checkpoint writing all count.
4. **Scoring.** After each run, every checkpoint is loaded through Cadenza's import path
   (``create_model("tiny-vit", pretrained=<checkpoint>)`` reads OpenCLIP's ``epoch_K.pt`` and Cadenza's
   checkpoints alike; a run with ``ema`` is scored on its average, as ``evaluate_with_ema`` does) and scored by
   Cadenza's zero-shot evaluator (``train/zero_shot.py``) with the quickstart's class names and prompts, on the
   held-out digits at full resolution. Scoring happens between runs, never while one trains.
5. **Report.** Per run: seconds to the first checkpoint at >= 80% and >= 90% top-1 and the best top-1 within the
   budget; per system the median over seeds (a seed that never reaches a target counts as never; the median exists
   when most seeds reach it). ``ratio_to_80`` / ``ratio_to_90``: OpenCLIP's best flags over Cadenza's fastest recipe
   (above 1: Cadenza is sooner). Where the time went: each run's start and epoch (``pace``), and the floors no
   trainer of this job goes below, measured in the same run in fresh processes (``measure_floors``): importing torch
   and timm and taking one step, and one epoch of bare forward and backward with and without the recipe's optimizer
   step; their sum is the first checkpoint of a trainer that paid nothing else (``lower_bound_s``), and OpenCLIP
   best's time over it the highest ratio any such trainer could reach (``ratio_ceiling``). Results in
   ``benchmarks/results/<name>.{md,json}`` and ``<name>.png`` (top-1 against wall-clock, every run).

The systems:

- ``openclip-defaults``: ``python -m open_clip_train.main`` with the flags the job needs (data, model, seed, a
  checkpoint every epoch, run folder) and OpenCLIP's defaults for everything else (batch 64, lr 5e-4, warmup 10000
  steps, 32 epochs, 4 workers, ``--precision amp``).
- ``cadenza-defaults``: ``composer openclip`` with exactly those flags (Cadenza's engine, OpenCLIP's settings, the
  CSV data).
- ``openclip-best``: OpenCLIP's trainer with the flags that reached 90% soonest in our sweep of its settings
  (``OPENCLIP_BEST``; the sweep is in README): the hyperparameters of Cadenza's recipe where they were best for
  OpenCLIP too, its optimizer (Muon, through the trainer's ``--opt timm/muon``), and the text embeddings and the
  patch embedding frozen (``--lock-text``, ``--lock-image``: the recipe freezes only the first, OpenCLIP reached 90%
  sooner with both). Its trainer has no weight averaging, the recipe's EMA.
- ``cadenza-fast``: Cadenza's fastest recipe, ``yamls/digits_fast.yaml`` (MDS data).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, write_results  # noqa: E402

ARCH = "tiny-vit"
OPENCLIP_ARCH = "cadenza-tiny-vit"  # the name the registered config gets in OpenCLIP
FAST_RECIPE = ROOT / "yamls" / "digits_fast.yaml"
QUICKSTART = ROOT / "yamls" / "quickstart.yaml"  # the class names and prompts scored
TARGETS = (0.8, 0.9)
#: one torch thread for every trainer: the data worker gets the other core (on 2 cores more threads contend)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
#: runs OpenCLIP's trainer with the network registered by add_model_config (argv: config folder, trainer flags)
OPENCLIP_MAIN = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
    "from open_clip_train.main import main; main(sys.argv[2:])"
)
#: the least a trainer pays before its first step (``{modules}``: ``torch``, or ``torch, timm`` for one on timm's
#: towers, as both trainers here are: timm imports torchvision, whose ops import ``torch._dynamo``, and torch's
#: optimizers import it at their first ``step`` and ``zero_grad`` anyway, compiled or not): a fresh process imports
#: them and takes one optimizer step, timed to the end of the step as a checkpoint is (its exit takes 0.8 s more)
START_FLOOR = (
    "import time, {modules}; model = torch.nn.Linear(4, 4); optimizer = torch.optim.SGD(model.parameters(), lr=0.1); "
    "model(torch.ones(1, 4)).sum().backward(); optimizer.step(); optimizer.zero_grad(); print(time.time())"
)
#: OpenCLIP's best flags for this job (see the module doc and the sweep in README): the recipe's hyperparameters
#: where they were best for OpenCLIP too, its text embeddings frozen (``--lock-text``, 2.4x sooner to 90%: its
#: unfused AdamW no longer steps the 3.2M-parameter token embedding) and the patch embedding frozen
#: (``--lock-image``: without it lr 1.2e-2 reached 90% later in every seed); Muon, through its trainer's ``--opt
#: timm/muon`` (timm's ``Muon``; ``--eps`` must be given with a timm optimizer): 90% after 2 epochs where AdamW took
#: 4-5; no warmup; and Muon's momentum shortened and the learning rate raised as they were for the recipe (at 21:10:
#: lr 8e-3 and momentum 0.6 gave medians of 12.6 s and 11.5 s in two tries, lr 1.2e-2 and 0.5 12.2 s, lr 1e-2 and
#: 0.6 12.9 s; the flags of 19:00, lr 2e-3 and 0.9, 14.0-16.6 s)
OPENCLIP_BEST = (
    "--batch-size 32 --lr 8e-3 --wd 0.1 --warmup 0 --epochs 6 --workers 1 --precision fp32 "
    "--opt timm/muon --eps 1e-6 --momentum 0.6 "
    "--lock-text --lock-text-unlocked-layers 3 --lock-text-freeze-layer-norm "
    "--lock-image --lock-image-unlocked-groups 3"
).split()
#: the method cards: (label, overrides of the fastest recipe); those the recipe has are measured switched off
ALGORITHM_VARIANTS = {
    "without_muon": ["optim.name=adamw", "optim.args={}"],  # torch's fused AdamW instead (no Muon momentum)
    "without_lock_text": ["~algorithms.lock_text"],
    "patch_dropout": ["+algorithms.patch_dropout={prob: 0.5}"],
    "without_ema": ["~algorithms.ema"],
    "lock_image": ["+algorithms.lock_image={unlocked_groups: 3}"],  # the patch embedding frozen
    "torch_compile": ["+algorithms.torch_compile={}"],
    "progressive_resizing": ["+algorithms.progressive_resizing={initial_scale: 0.5}"],
    # CLIPA cuts captions itself (to 8 tokens until its full-size phase): in place of the recipe's reduction
    "clipa": [
        "~algorithms.text_token_reduction",
        "+algorithms.clipa={image_scale: 0.5, text_length: 8, finetune_fraction: 0.2}",
    ],
    "without_text_token_reduction": ["~algorithms.text_token_reduction"],
}


# -- data and the network --------------------------------------------------------------------------------------------
def write_data(folder: Path, split_seed: int, captions: int = 2) -> dict[str, Path]:
    """The digits as MDS, CSV + PNG files and a held-out image folder; the OpenCLIP model config."""
    from cadenza.datasets.digits import build
    from cadenza.models import create_model
    from cadenza.models.convert import openclip_model_config

    build(folder / "digits", captions=captions, seed=split_seed, progress=False, csv=True)
    configs = folder / "openclip-configs"
    configs.mkdir()
    config = openclip_model_config(create_model(ARCH))
    (configs / f"{OPENCLIP_ARCH}.json").write_text(json.dumps(config, indent=2))
    return {
        "mds": folder / "digits" / "mds",
        "csv": folder / "digits" / "csv" / "train.csv",
        "test": folder / "digits" / "test",
        "configs": configs,
    }


def zero_shot_evaluator(test: Path, model):
    """The trainer's own zero-shot evaluator, with the quickstart's class names and prompts."""
    from cadenza.train.config import listed, load_config
    from cadenza.train.zero_shot import build_zero_shot, load_templates

    cfg = load_config(QUICKSTART, [f"eval.zero_shot.path={test}"])
    templates = load_templates(listed(cfg.eval.zero_shot.templates))
    return build_zero_shot(cfg.eval.zero_shot, templates, model, ARCH, batch_size=128, workers=0)


def check_parity(paths: dict[str, Path], seed: int = 0) -> dict[str, float]:
    """The initial forward of Cadenza's ``tiny-vit`` and of OpenCLIP's model from the registered config, with the
    same weights, on held-out digits and the zero-shot prompts: the largest relative difference of the embeddings."""
    import open_clip
    import torch

    from cadenza.models import create_model
    from cadenza.models.convert import cadenza_to_openclip

    open_clip.add_model_config(paths["configs"])
    torch.manual_seed(seed)
    cadenza = create_model(ARCH).eval()
    openclip = open_clip.create_model(OPENCLIP_ARCH).eval()
    missing, unexpected = openclip.load_state_dict(cadenza_to_openclip(cadenza.state_dict(), cadenza), strict=True)
    evaluator = zero_shot_evaluator(paths["test"], cadenza)
    images = torch.stack([evaluator.dataset[i][0] for i in range(0, len(evaluator.dataset), 12)])  # (30, 3, 32, 32)
    prompts = [t.format(c) for c in evaluator.classnames for t in evaluator.templates]
    tokens = open_clip.get_tokenizer(OPENCLIP_ARCH)(prompts)
    with torch.no_grad():
        pairs = {
            "image": (openclip.encode_image(images), cadenza.encode_image(images)),
            "text": (openclip.encode_text(tokens), cadenza.encode_text(tokens)),
        }
    errors = {k: ((a - b).abs().max() / a.abs().max()).item() for k, (a, b) in pairs.items()}
    if max(errors.values()) > 1e-4:
        raise RuntimeError(f"the two networks differ at initialisation (relative errors {errors})")
    return {"images": len(images), "prompts": len(prompts), **{f"{k}_relative_error": v for k, v in errors.items()}}


# -- the systems -----------------------------------------------------------------------------------------------------
def openclip_flags(paths: dict[str, Path], logs: Path, name: str, seed: int, model: str) -> list[str]:
    """The flags every run needs: data, model, seed, a checkpoint every epoch, its run folder."""
    return [
        "--train-data",
        str(paths["csv"]),
        "--dataset-type",
        "csv",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--model",
        model,
        "--seed",
        str(seed),
        "--save-frequency",
        "1",
        "--logs",
        str(logs),
        "--name",
        name,
    ]


def system_command(system: str, paths: dict[str, Path], logs: Path, name: str, seed: int, extra: list[str]) -> list:
    python = sys.executable
    if system.startswith("openclip"):
        flags = openclip_flags(paths, logs, name, seed, OPENCLIP_ARCH)
        if system == "openclip-best":
            flags += OPENCLIP_BEST
        return [python, "-c", OPENCLIP_MAIN, str(paths["configs"]), *flags, *extra]
    if system == "cadenza-defaults":
        flags = openclip_flags(paths, logs, name, seed, ARCH)
        return [python, "-m", "cadenza.train.openclip", *flags, *extra]
    recipe = [
        f"data.train.remote={paths['mds']}",
        "eval.zero_shot.path=null",  # scored afterwards, like OpenCLIP's checkpoints
        f"run.seed={seed}",
        f"run.logs={logs}",
        f"run.name={name}",
        "checkpoint.save_interval=1ep",
        "checkpoint.save_latest=false",
        "loggers.console.progress_bar=false",
    ]
    return [python, "-m", "cadenza.train.cli", str(FAST_RECIPE), *recipe, *extra]


def run(command: list[str], budget: float, log_file: Path) -> tuple[float, float, int | None]:
    """Run ``command`` until it exits or ``budget`` seconds pass (then its process group is killed).

    Returns:
        The wall-clock start (``time.time()`` just before the process started), the seconds it ran, and its exit
        status (``None`` when stopped at the budget).
    """
    with open(log_file, "w") as out:
        started = time.time()
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=log_file.parent, start_new_session=True
        )
        try:
            status = process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the trainer and its loader workers
            process.wait()
            status = None
    return started, time.time() - started, status


def checkpoints(system: str, run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    pattern = "epoch_*.pt" if system.startswith("openclip") else "ep*-ba*.pt"
    return sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)


def score(path: Path, evaluator) -> float:
    """Zero-shot top-1 of a checkpoint (OpenCLIP's or Cadenza's), loaded through Cadenza's import path."""
    import torch

    from cadenza.engine.checkpoint import stored_config
    from cadenza.engine.state import State
    from cadenza.models import create_model

    model = create_model(ARCH, pretrained=str(path)).eval()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    ema = (checkpoint.get("algorithms") or {}).get("EMA")
    if ema and stored_config(checkpoint, path)["algorithms"]["ema"].get("evaluate_with_ema", True):
        model.load_state_dict(ema["ema"])  # what the run evaluates: its average
    metrics = evaluator.evaluate(State(model=model))
    return next(v for k, v in metrics.items() if k.endswith("-top1"))


def measure(system, paths, logs, name, seed, extra, budget, evaluator) -> dict:
    """One run of ``system``: its checkpoints' times and scores (the checkpoints are deleted once scored)."""
    command = system_command(system, paths, logs, name, seed, extra)
    started, ran, status = run(command, budget, logs / f"{name}.log")
    if status not in (None, 0):
        tail = (logs / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"{system} (seed {seed}) failed with status {status}:\n{tail}")
    curve, scoring = [], time.perf_counter()
    for path in checkpoints(system, logs / name):
        seconds = path.stat().st_mtime - started
        if seconds <= budget:
            curve.append((round(seconds, 2), round(score(path, evaluator), 4), path.name))
        path.unlink()
    if not curve:
        print(f"  {system} seed {seed}: no checkpoint within {budget:.0f} s; its log ends:", flush=True)
        print((logs / f"{name}.log").read_text()[-1500:], flush=True)
    reached = {f"t{round(100 * t)}": next((s for s, acc, _ in curve if acc >= t), None) for t in TARGETS}
    best = max((acc for _, acc, _ in curve), default=None)
    print(
        f"  {system:18s} seed {seed}: {len(curve)} checkpoints, best {best}, {reached} (ran {ran:.0f} s, scored in {time.perf_counter() - scoring:.0f} s)",
        flush=True,
    )
    return {
        "seed": seed,
        "seconds_run": round(ran, 1),
        "curve": curve,
        "best_top1": best,
        **reached,
        **pace([t for t, _, _ in curve], reached["t90"]),
    }


def pace(times: list[float], t90: float | None) -> dict[str, float | None]:
    """Where a run's time went: ``epoch_s``, the median time between consecutive checkpoints (an epoch and a save);
    ``start_s``, the first checkpoint's time less one such epoch (process start, imports, building the model and the
    loader, and whatever made the first epoch slower than the rest); ``t90_after_start``, the time to 90% less
    ``start_s``. ``times``: the checkpoints' seconds; ``None`` with fewer than two."""
    if len(times) < 2:
        return {"start_s": None, "epoch_s": None, "t90_after_start": None}
    epoch = statistics.median(b - a for a, b in itertools.pairwise(times))
    start = times[0] - epoch
    return {
        "start_s": round(start, 2),
        "epoch_s": round(epoch, 2),
        "t90_after_start": round(t90 - start, 2) if t90 is not None else None,
    }


def start_floor(modules: str, runs: int = 3) -> float:
    """Median seconds from the start of a fresh process that imports ``modules`` and takes one optimizer step
    (``START_FLOOR``) to the end of that step, run as the trainers are (same interpreter, same environment)."""
    seconds = []
    for _ in range(runs):
        started = time.time()  # as in run(): just before the process starts
        done = subprocess.run(
            [sys.executable, "-c", START_FLOOR.format(modules=modules)], check=True, env=ENV, capture_output=True
        )
        seconds.append(float(done.stdout) - started)
    return round(statistics.median(seconds), 2)


def bare_steps(steps: int, batch: int, warm: int = 3) -> dict[str, float]:
    """Seconds of ``steps`` bare training steps of the benchmark's network at ``batch``, after ``warm`` untimed ones:
    ``forward_backward``, the forward, the CLIP loss and the backward and nothing else (no data loading, no optimizer
    step, no averaging, nothing logged or saved); ``with_muon``, the same and the recipe's optimizer step (Cadenza's
    ``Muon``, the cheapest step that reached 90% after one epoch here: AdamW needs three or more). Both with the
    cheapest settings either side trains with: the text and the patch embeddings frozen (the recipe's ``lock_text``,
    OpenCLIP best's ``--lock-text`` and ``--lock-image``) and captions of 8 tokens (the recipe's
    ``text_token_reduction``; OpenCLIP's trainer feeds all 77). Random images and tokens: the cost does not depend on
    them."""
    import torch

    from cadenza.algorithms.lock_image import lock_image_tower
    from cadenza.algorithms.lock_text import lock_text_tower
    from cadenza.engine.muon import Muon
    from cadenza.models import create_model
    from cadenza.models.losses import ClipLoss

    torch.manual_seed(0)
    model = create_model(ARCH).train()
    lock_text_tower(model, unlocked_layers=3)
    lock_image_tower(model, unlocked_groups=3)
    images = torch.randn(batch, 3, model.image_size, model.image_size)
    tokens = torch.randint(1, model.vocab_size, (batch, 8))
    loss_fn = ClipLoss()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    muon = Muon([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}], lr=1e-4, momentum=0.5)

    def timed(optimizer: Muon | None) -> float:
        for i in range(warm + steps):
            if i == warm:
                began = time.perf_counter()
            sum(loss_fn(**model(images, tokens)).values()).backward()
            if optimizer is not None:
                optimizer.step()
            model.zero_grad(set_to_none=True)
        return round(time.perf_counter() - began, 3)

    return {"forward_backward": timed(None), "with_muon": timed(muon)}


def epoch_floor(steps: int, batch: int, runs: int = 3) -> dict[str, float]:
    """The medians of ``bare_steps`` for one epoch's steps, each measure in a fresh process run as the trainers are
    (same interpreter, same environment: one torch thread)."""
    code = (
        f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.time_to_accuracy import bare_steps; "
        f"print(json.dumps(bare_steps({steps}, {batch})))"
    )
    measures = [
        json.loads(subprocess.run([sys.executable, "-c", code], check=True, env=ENV, capture_output=True).stdout)
        for _ in range(runs)
    ]
    return {key: round(statistics.median(m[key] for m in measures), 2) for key in measures[0]}


def measure_floors(paths: dict[str, Path], recipe: list[str], runs: int = 3) -> dict:
    """The floors of this job, each the median of ``runs`` fresh processes: ``torch_floor_s`` and ``timm_floor_s``
    (``start_floor``: to the end of the first optimizer step, with torch alone and with timm too), and
    ``epoch_floor_s`` (``bare_steps`` for the ``epoch_steps`` steps of one epoch at the batch of the recipe with its
    ``--recipe`` overrides, which OpenCLIP's best flags share: the bare step alone, and with the recipe's optimizer
    step)."""
    from cadenza.train.config import load_config

    batch = load_config(FAST_RECIPE, recipe).data.batch_size
    with open(paths["csv"], newline="") as f:
        steps = sum(1 for _ in csv.DictReader(f)) // batch  # both trainers drop the last partial batch
    return {
        "torch_floor_s": start_floor("torch", runs),
        "timm_floor_s": start_floor("torch, timm", runs),
        "epoch_steps": steps,
        "epoch_floor_s": epoch_floor(steps, batch, runs),
    }


def median_or_none(values: list[float | None], digits: int = 2) -> float | None:
    """The median, a missing value counting as never (infinite); ``None`` when most runs never got there."""
    ordered = sorted(math.inf if v is None else v for v in values)
    middle = statistics.median(ordered) if ordered else math.inf
    return None if math.isinf(middle) else round(middle, digits)


def summarise(runs: list[dict]) -> dict:
    out = {key: median_or_none([r[key] for r in runs]) for key in (f"t{round(100 * t)}" for t in TARGETS)}
    out["best_top1"] = median_or_none([r["best_top1"] for r in runs], digits=4)
    for key in ("start_s", "epoch_s"):  # medians of the runs that had two checkpoints
        known = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(statistics.median(known), 2) if known else None
    out["t90_after_start"] = median_or_none([r.get("t90_after_start") for r in runs])
    return out


def ratio(slow: float | None, fast: float | None) -> float | None:
    return round(slow / fast, 2) if slow is not None and fast is not None else None


# -- reporting -------------------------------------------------------------------------------------------------------
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for index, (system, entry) in enumerate(results.items()):
        color = f"C{index % 10}"
        for i, run_ in enumerate(entry["runs"]):
            xs, ys = [c[0] for c in run_["curve"]], [c[1] for c in run_["curve"]]
            axis.plot(xs, ys, marker=".", color=color, alpha=0.8, label=system if i == 0 else None)
    for target in TARGETS:
        axis.axhline(target, color="grey", linewidth=0.6, linestyle="--")
    axis.set_xlabel("seconds from process start (checkpoint written)")
    axis.set_ylabel("zero-shot top-1, held-out digits")
    axis.set_ylim(0, 1)
    axis.legend(loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(name: str, out_dir: Path, payload: dict, rows: list[dict], columns: list[str], notes: str) -> None:
    path = write_results(name, rows, columns, notes=notes, out_dir=out_dir)
    data = json.loads((out_dir / f"{name}.json").read_text())
    data.update(payload)
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2))
    print(f"wrote {path}, {out_dir / (name + '.json')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="openclip-best and cadenza-fast, 1 seed, 40 s budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds each run may train, from its start (default 60; quick 40)"
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        default=["openclip-best", "cadenza-fast", "openclip-defaults", "cadenza-defaults"],
        choices=["openclip-best", "cadenza-fast", "openclip-defaults", "cadenza-defaults"],
    )
    parser.add_argument("--split-seed", type=int, default=0, help="the digits splitter's seed (another random split)")
    parser.add_argument("--epochs", type=int, default=None, help="stop every system after this many epochs (tests)")
    parser.add_argument("--captions", type=int, default=2, help="captions per training image (the quickstart's 2)")
    parser.add_argument("--algorithms", action="store_true", help="the method cards instead (cadenza-fast variants)")
    parser.add_argument("--only", nargs="+", default=None, help="with --algorithms: these variants only")
    parser.add_argument("--openclip-best", default=None, help="other flags for openclip-best (a sweep of its settings)")
    parser.add_argument("--recipe", nargs="+", default=[], help="overrides of the fastest recipe (a sweep of it)")
    parser.add_argument("--name", default=None, help="results file name (default time_to_accuracy[_algorithms])")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 40.0 if args.quick else 60.0
    if args.quick:
        args.seeds = args.seeds[:1]
        args.systems = [s for s in args.systems if s in ("openclip-best", "cadenza-fast")]
    if args.openclip_best is not None:
        OPENCLIP_BEST[:] = shlex.split(args.openclip_best)
    name = args.name or ("time_to_accuracy_algorithms" if args.algorithms else "time_to_accuracy")
    out_dir = args.out or ROOT / "benchmarks" / "results"
    load_before = os.getloadavg()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_data(tmp, args.split_seed, args.captions)
        print(f"data written ({time.perf_counter() - began:.0f} s)", flush=True)
        parity = check_parity(paths)
        print(f"parity of the initial forward ({time.perf_counter() - began:.0f} s): {parity}", flush=True)
        from cadenza.models import create_model

        evaluator = zero_shot_evaluator(paths["test"], create_model(ARCH))
        floors = None if args.algorithms else measure_floors(paths, args.recipe, runs=1 if args.quick else 3)
        if floors is not None:
            print(f"the floors (fresh processes): {floors}", flush=True)
        logs = tmp / "logs"
        logs.mkdir()
        if args.algorithms:
            variants = {"recipe": []} | {
                k: v for k, v in ALGORITHM_VARIANTS.items() if args.only is None or k in args.only
            }
            plan = [("cadenza-fast", label, [*args.recipe, *extra]) for label, extra in variants.items()]
        else:
            plan = [(system, system, args.recipe if system == "cadenza-fast" else []) for system in args.systems]
        results: dict[str, dict] = {label: {"command": None, "runs": []} for _, label, _ in plan}
        for seed in args.seeds:  # seeds in turn, systems alternating within each
            for system, label, extra in plan:
                extra = list(extra)
                if args.epochs is not None:
                    extra += epochs_override(system, args.epochs)
                run_name = f"{label}-s{seed}"
                results[label]["command"] = " ".join(system_command(system, paths, logs, run_name, seed, extra))
                results[label]["runs"].append(
                    measure(system, paths, logs, run_name, seed, extra, args.budget, evaluator)
                )
    for entry in results.values():
        entry.update(summarise(entry["runs"]))
    payload, rows, columns, notes = report(args, results, parity, load_before, floors)
    write(name, out_dir, payload, rows, columns, notes)
    plot(results, out_dir / f"{name}.png")
    return 0


def epochs_override(system: str, epochs: int) -> list[str]:
    if system == "cadenza-fast":
        return [f"run.duration={epochs}ep"]
    return ["--epochs", str(epochs)]  # OpenCLIP's flag, also for composer openclip (the last one given counts)


def report(args, results: dict, parity: dict, load_before: tuple, floors: dict | None) -> tuple[dict, list, list, str]:
    columns = ["system", "median s to 80%", "median s to 90%", "median best top-1", "per seed: s to 90% / best"]
    columns += ["median start s", "median epoch s"]
    rows = []
    for label, entry in results.items():
        per_seed = ", ".join(
            f"{r['t90'] if r['t90'] is not None else 'never'} / {r['best_top1']}" for r in entry["runs"]
        )
        rows.append(
            {
                "system": label,
                "median s to 80%": entry["t80"] if entry["t80"] is not None else "not reached",
                "median s to 90%": entry["t90"] if entry["t90"] is not None else "not reached",
                "median best top-1": entry["best_top1"],
                "per seed: s to 90% / best": per_seed,
                "median start s": entry["start_s"],
                "median epoch s": entry["epoch_s"],
            }
        )
    payload: dict = {
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "seeds": args.seeds,
            "budget_s": args.budget,
            "split_seed": args.split_seed,
            "epochs": args.epochs,
            "captions_per_image": args.captions,
            "checkpoint_interval": "1 epoch (both trainers)",
        },
        "parity": parity,
        "openclip_best_flags": " ".join(OPENCLIP_BEST),
        "recipe_overrides": args.recipe,
        "systems": results,
    }
    if args.algorithms:
        base = results["recipe"]
        for entry in results.values():
            entry["speedup_to_90"] = ratio(base["t90"], entry["t90"])
            entry["top1_change"] = (
                round(entry["best_top1"] - base["best_top1"], 4)
                if entry["best_top1"] is not None and base["best_top1"] is not None
                else None
            )
        columns += ["speed-up to 90% vs recipe", "best top-1 change"]
        for row, entry in zip(rows, results.values(), strict=True):
            row["speed-up to 90% vs recipe"] = entry["speedup_to_90"]
            row["best top-1 change"] = entry["top1_change"]
        notes = (
            "Each algorithm switched on in the fastest recipe (yamls/digits_fast.yaml), or off where the recipe has it "
            "(without_*); recipe: the recipe as is."
        )
    else:
        best, fast = results.get("openclip-best", {}), results.get("cadenza-fast", {})
        for t in TARGETS:
            key = f"t{round(100 * t)}"
            payload[f"ratio_to_{round(100 * t)}"] = ratio(best.get(key), fast.get(key))
            defaults = ratio(
                results.get("openclip-defaults", {}).get(key), results.get("cadenza-defaults", {}).get(key)
            )
            payload[f"ratio_to_{round(100 * t)}_defaults"] = defaults
        payload["best_top1_difference"] = (
            round(fast["best_top1"] - best["best_top1"], 4)
            if fast.get("best_top1") is not None and best.get("best_top1") is not None
            else None
        )
        # where the time goes: the start-up every process pays, and the rest
        payload["ratio_to_90_after_start"] = ratio(best.get("t90_after_start"), fast.get("t90_after_start"))
        payload["needed_for_3x_s"] = round(best["t90"] / 3, 2) if best.get("t90") is not None else None
        # the first checkpoint of a trainer on timm's towers that paid nothing but the floors, and the ratio it
        # would reach against OpenCLIP's best flags were 90% reached after one epoch
        payload.update(floors)
        payload["lower_bound_s"] = {k: round(floors["timm_floor_s"] + v, 2) for k, v in floors["epoch_floor_s"].items()}
        payload["ratio_ceiling"] = {k: ratio(best.get("t90"), v) for k, v in payload["lower_bound_s"].items()}
        notes = (
            f"Wall-clock from process start to the first checkpoint at >= 80% / >= 90% zero-shot top-1 on the held-out "
            f"digits (split seed {args.split_seed}), medians over seeds {args.seeds}, budget {args.budget:.0f} s per "
            f"run; checkpoints every epoch on both sides. ratio_to_90 (OpenCLIP best / Cadenza fastest) = "
            f"{payload['ratio_to_90']}, ratio_to_80 = {payload['ratio_to_80']}. Load average (1 / 5 / 15 min) at the "
            "start: "
            + " / ".join(f"{x:.1f}" for x in load_before)
            + ", at the end: "
            + " / ".join(f"{x:.1f}" for x in os.getloadavg())
            + (
                f" (above {os.cpu_count()} on these {os.cpu_count()} cores: other jobs shared the machine)"
                if max(load_before) > (os.cpu_count() or 1)
                else " (an idle machine)"
            )
            + "; the systems alternate within each seed so that load falls on all of them. Parity of the initial "
            "forward: "
            f"{parity}. Start: the first checkpoint's time less one epoch (the median time between checkpoints); "
            f"counted from the end of each side's start, the ratio to 90% is {payload['ratio_to_90_after_start']}. "
            f"3x would need Cadenza at or below {payload['needed_for_3x_s']} s. The floors, fresh processes: one that "
            f"imports torch and takes one optimizer step is done {floors['torch_floor_s']} s after its start, "
            f"{floors['timm_floor_s']} s when it imports timm too (as both trainers do); one epoch "
            f"({floors['epoch_steps']} steps) of bare forward and backward of the network, with the cheapest settings "
            f"either side uses, takes {floors['epoch_floor_s']['forward_backward']} s, "
            f"{floors['epoch_floor_s']['with_muon']} s with the recipe's optimizer step. A trainer that paid only "
            f"these and reached 90% after one epoch would checkpoint after {payload['lower_bound_s']['forward_backward']}"
            f" s ({payload['lower_bound_s']['with_muon']} s with Muon): a ratio of at most "
            f"{payload['ratio_ceiling']['forward_backward']} ({payload['ratio_ceiling']['with_muon']})."
        )
    return payload, rows, columns, notes


if __name__ == "__main__":
    sys.exit(main())
