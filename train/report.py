"""``composer report RUN_FOLDER``: PNG plots and a one-page summary from ``metrics.jsonl``.

Writes ``<run>/report/{losses,learning_rate,logit_scale,throughput,eval}.png`` and
``<run>/report/summary.md`` (final and best values, the plots, the run's config), so a run can be
looked at without TensorBoard.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

#: plot file -> (title, the metric names it shows: a predicate on the name)
PLOTS = {
    "losses": ("Training losses", lambda k: k.startswith("train/") and k.endswith("loss")),
    "learning_rate": ("Learning rate", lambda k: k == "train/lr"),
    "logit_scale": ("Logit scale (temperature)", lambda k: k in ("train/scale", "train/logit_scale")),  # and old runs
    "throughput": (
        "Throughput",
        lambda k: k in ("train/samples_per_second", "train/samples_per_second_per_gpu", "train/mfu"),
    ),
    "eval": ("Evaluation", lambda k: k.startswith("val/") and k not in ("val/num_samples", "val/epoch")),
}
#: metrics where lower is better (for "best" in the summary)
LOWER_IS_BETTER = ("loss", "rank")


def read_series(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.jsonl`` → ``{metric: [(step, value), ...]}`` (non-numeric values skipped)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        step = row.pop("step")
        for key, value in row.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                series[key].append((step, float(value)))
    return dict(series)


def plot(series: dict[str, list[tuple[int, float]]], names: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(names), 3)
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names, strict=False):
        steps, values = zip(*series[name], strict=True)
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(run_dir: Path) -> Path:
    """Write the plots and ``summary.md`` for ``run_dir``; return the summary's path."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist: is {run_dir} a Cadenza run folder?")
    series = read_series(metrics)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    lines = [f"# Run report: {run_dir.name}", ""]
    for stem, (title, wanted) in PLOTS.items():
        names = sorted(k for k in series if wanted(k))
        if not names:
            continue
        plot(series, names, title, out / f"{stem}.png")
        lines += [
            f"## {title}",
            "",
            f"![{title}]({stem}.png)",
            "",
            "| metric | last | best | at step |",
            "| --- | --- | --- | --- |",
        ]
        for name in names:
            last_step, last = series[name][-1]
            pick = min if any(word in name for word in LOWER_IS_BETTER) else max
            best_step, best = pick(series[name], key=lambda point: point[1])
            lines.append(f"| `{name}` | {last:.6g} | {best:.6g} | {best_step} |")
        lines.append("")
    config = run_dir / "config.yaml"
    if config.is_file():
        lines += ["## Config", "", "```yaml", config.read_text().rstrip(), "```", ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="composer report", description="Plots and a summary of a run folder.")
    parser.add_argument("run_folder", type=Path, help="logs/<run name>")
    args = parser.parse_args(argv)
    try:
        summary = write_report(args.run_folder)
    except FileNotFoundError as error:
        parser.error(str(error))
    print(f"wrote {summary} and the plots beside it")  # noqa: T201 - the command's output
    return 0
