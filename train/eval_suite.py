"""The evaluation suite: every task of ``eval.tasks`` scored at each evaluation, one results table per evaluation.

Metrics are those the field reports (LAION's CLIP_benchmark computes the same numbers):

- classification: ``top1`` and ``top5`` accuracy, and ``mean_per_class_recall`` (the mean over classes of the share
  of each class's images classified right: balanced accuracy, for unbalanced sets). Class embeddings are CLIP's:
  every class name in every template, the normalized text embeddings averaged and normalized again.
- retrieval: R@k image → text and text → image with every caption of an image counted correct
  (``cadenza.engine.retrieval.retrieval_recall``).
- the suite average: the mean over tasks of each task's ``main_metric`` (top-1; the mean of both R@1 for retrieval).

Logged as ``val/<task>-zeroshot-val-top1`` (OpenCLIP's name for ImageNet), ``-top5``, ``-mean_per_class_recall``,
``val/<task>-image_to_text_R@k``, ``val/<task>-text_to_image_R@k`` and ``val/suite-average``, so TensorBoard and W&B
show them during training; each evaluation also writes ``<run folder>/results/ep<E>-ba<B>.md`` (the table) and
``.json`` (every number, unrounded).

Distributed and memory-bounded: each task's images are split over all processes (every ``world``-th image); class
embeddings are computed once per task per evaluation, each process encoding its share of the classes, and shared
(``all_gather``); classification keeps only per-class counts, summed over processes; retrieval streams every process's
features past the others in chunks. Every process takes part in every step, so no process waits on a rank-0 loop,
and the numbers equal one process's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from cadenza.datasets.samples import SampleError
from cadenza.datasets.transforms import image_transform
from cadenza.engine import dist
from cadenza.engine.algorithm import Callback
from cadenza.engine.fsdp import is_sharded
from cadenza.engine.precision import autocast_context
from cadenza.engine.retrieval import retrieval_recall
from cadenza.models.tokenizer import get_tokenizer
from cadenza.train.eval_tasks import ClassificationTask, RetrievalTask, Task
from cadenza.train.zero_shot import build_classifier_weights

if TYPE_CHECKING:
    from cadenza.engine.logger import Logger
    from cadenza.engine.state import State

log = logging.getLogger("cadenza")

#: how the table names each metric
LABELS = {"top1": "top-1", "top5": "top-5", "mean_per_class_recall": "mean per-class recall"}
#: skipped images whose reasons are logged, per task and evaluation
LOGGED_SKIPS = 5


class TaskImages(Dataset):
    """A task's images → ``(tensor, index, None)``, or ``(None, index, reason)`` for one that does not decode."""

    def __init__(self, task: Task, transform: Callable[[Any], torch.Tensor]) -> None:
        self.images, self.transform = task.images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            image = self.images.read(index)
        except SampleError as error:
            return None, index, str(error)
        return self.transform(image.convert("RGB")), index, None


def collate(items: list) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decoded images stacked, their indices, and the reasons of those skipped."""
    good = [(image, index) for image, index, _ in items if image is not None]
    skipped = [reason for image, _, reason in items if image is None]
    if not good:
        return torch.empty(0), [], skipped
    return torch.stack([image for image, _ in good]), [index for _, index in good], skipped


class SuiteEvaluator(Callback):
    """Scores the model on every task at each evaluation; logs the metrics and writes the results table.

    Args:
        tasks: loaded tasks (``load_tasks``).
        transform: PIL image → tensor (the model's evaluation transform).
        tokenizer: texts → ``(N, L)`` token ids.
        batch_size: images (and prompts or captions) per forward pass.
        workers: DataLoader workers per process.
        run_dir: where ``results/`` is written (rank 0); ``None``: nowhere.
        model_name: names the model in the table.
        chunk_size: retrieval rows compared (and sent between processes) at a time.
    """

    def __init__(
        self,
        tasks: list[Task],
        transform: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        batch_size: int = 64,
        workers: int = 0,
        run_dir: Path | None = None,
        model_name: str = "",
        chunk_size: int = 1024,
    ) -> None:
        self.tasks, self.transform, self.tokenizer = tasks, transform, tokenizer
        self.batch_size, self.workers, self.chunk_size = batch_size, workers, chunk_size
        self.run_dir, self.model_name = run_dir, model_name
        self.results: dict[str, Any] | None = None  # of the last evaluation
        self.markdown = ""
        self.written: Path | None = None  # the last table's files, without their suffixes

    def eval_start(self, state: State, logger: Logger) -> None:
        # At EVAL_START, after the algorithms: the weights evaluated are in the model (EMA's with evaluate_with_ema).
        self._scores = self.evaluate(state)

    def eval_end(self, state: State, logger: Logger) -> None:
        ts = state.timestamp
        results = {"step": ts.batch, "epoch": ts.epoch, "model": self._model_label(state), **self._scores}
        self.results, self.markdown = results, results_markdown(results)
        metrics = logged_metrics(results)
        state.eval_metrics.update(metrics)
        logger.log_metrics(metrics, ts.batch)
        if state.dist.is_main and self.run_dir is not None:
            folder = self.run_dir / "results"
            folder.mkdir(parents=True, exist_ok=True)
            stem = folder / f"ep{ts.epoch}-ba{ts.batch}"
            stem.with_suffix(".md").write_text(self.markdown)
            stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
            self.written = stem
            # the table itself is in the .md (``composer eval`` prints it): the numbers are in the metrics line already
            log.info("evaluation suite at step %d: the table in %s.md, every number in .json", ts.batch, stem)

    def _model_label(self, state: State) -> str:
        """The architecture, and where its weights came from."""
        cfg = state.config
        if cfg is None:
            return self.model_name
        source = cfg.checkpoint.resume or cfg.model.pretrained
        return f"{cfg.model.name} ({source})" if source else cfg.model.name

    @torch.no_grad()
    def evaluate(self, state: State) -> dict[str, Any]:
        """Every task's numbers and the suite average (every process takes part; each gets the same result)."""
        model, device = state.model, state.device
        dtype = next(model.parameters()).dtype
        with autocast_context(state.precision, device):
            self._dim = self._warm_up(model, device, dtype)
        tasks = {}
        for task in self.tasks:
            started = time.perf_counter()
            with autocast_context(state.precision, device):
                if isinstance(task, ClassificationTask):
                    tasks[task.name] = self._classify(task, model, device, dtype)
                else:
                    tasks[task.name] = self._retrieve(task, model, device, dtype)
            log.info("evaluated %s in %.1fs", task.name, time.perf_counter() - started)
        mains = [result["main"] for result in tasks.values()]
        return {"tasks": tasks, "average": sum(mains) / len(mains) if mains else None}

    def _warm_up(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> int:
        """The embedding width; with FSDP, a first forward of each tower on every process, in step (each unit's
        weights then stay gathered, so processes may run different numbers of batches)."""
        width = model.encode_text(self.tokenizer(["a photo."]).to(device), normalize=True).shape[-1]
        if is_sharded(model):
            size = model.image_size
            model.encode_image(torch.zeros(1, 3, size, size, device=device, dtype=dtype), normalize=True)
        return width

    def _loader(self, task: Task) -> DataLoader:
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = range(rank, len(task.images), world)
        return DataLoader(
            Subset(TaskImages(task, self.transform), mine),
            batch_size=self.batch_size,
            num_workers=min(self.workers, -(-len(mine) // self.batch_size)),  # no more workers than batches
            collate_fn=collate,
            generator=torch.Generator(),  # never draws from the training RNG
        )

    def _encode_texts(self, texts: list[str], model: torch.nn.Module, device: torch.device) -> torch.Tensor:
        features = [
            model.encode_text(self.tokenizer(texts[i : i + self.batch_size]).to(device), normalize=True).float()
            for i in range(0, len(texts), self.batch_size)
        ]
        return torch.cat(features) if features else torch.empty(0, self._dim, device=device)

    def _class_embeddings(self, task: ClassificationTask, model: torch.nn.Module, device: torch.device) -> torch.Tensor:
        """``(C, D)``: each process encodes its share of the classes; the shares are gathered."""
        classes, world, rank = len(task.classnames), dist.get_world_size(), dist.get_rank()
        share = -(-classes // world)
        mine = task.classnames[rank * share : (rank + 1) * share]
        prompts = [template.format(name) for name in mine for template in task.templates]
        text = self._encode_texts(prompts, model, device).view(len(mine), len(task.templates), self._dim)
        local = build_classifier_weights(text)  # (len(mine), D)
        if world == 1:
            return local
        padded = torch.zeros(share, self._dim, device=device)
        padded[: len(mine)] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat(parts)[:classes]

    def _classify(
        self, task: ClassificationTask, model: torch.nn.Module, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        weights = self._class_embeddings(task, model, device)  # (C, D)
        classes = len(task.classnames)
        k = min(5 if "top5" in task.metrics else 1, classes)
        counts = torch.zeros(
            2 * classes + 2, dtype=torch.float64, device=device
        )  # per class: scored, right; top-5; skipped
        scored, right = counts[:classes], counts[classes : 2 * classes]
        reasons: list[str] = []
        for images, index, skipped in self._loader(task):
            counts[-1] += len(skipped)
            reasons += skipped[: LOGGED_SKIPS - len(reasons)]
            if not len(images):
                continue
            features = model.encode_image(images.to(device, dtype=dtype), normalize=True).float()  # (N, D)
            labels = torch.from_numpy(task.labels[index]).to(device)  # (N,)
            hits = (features @ weights.T).topk(k, dim=1).indices == labels[:, None]  # (N, k): logits' order is CLIP's
            scored.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64, device=device))
            right.index_add_(0, labels, hits[:, 0].double())
            counts[-2] += hits.any(dim=1).sum()
        if dist.get_world_size() > 1:
            torch.distributed.all_reduce(counts)
        counts = counts.cpu()
        scored, right = counts[:classes], counts[classes : 2 * classes]
        total = float(scored.sum())
        present = scored > 0
        values = {
            "top1": float(right.sum()) / max(total, 1.0),
            "top5": float(counts[-2]) / max(total, 1.0),
            "mean_per_class_recall": float((right[present] / scored[present]).mean()) if present.any() else 0.0,
        }
        metrics = {name: values[name] for name in task.metrics}
        self._report_skips(task, int(counts[-1]), reasons)
        return {
            "type": "classification",
            "images": int(total),
            "skipped": int(counts[-1]),
            "classes": classes,
            "metrics": metrics,
            "main_metric": task.main_metric,
            "main": metrics[task.main_metric],
        }

    def _retrieve(
        self, task: RetrievalTask, model: torch.nn.Module, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        images, texts, owner, reasons = [], [], [], []
        skipped = seen = 0
        for batch, index, bad in self._loader(task):
            skipped += len(bad)
            reasons += bad[: LOGGED_SKIPS - len(reasons)]
            if not len(batch):
                continue
            captions = [caption for i in index for caption in task.captions[i]]
            owner += [seen + j for j, i in enumerate(index) for _ in task.captions[i]]  # each caption's image row
            seen += len(index)
            images.append(model.encode_image(batch.to(device, dtype=dtype), normalize=True).float())
            texts.append(self._encode_texts(captions, model, device))
        image_features = torch.cat(images) if images else torch.empty(0, self._dim, device=device)
        text_features = torch.cat(texts) if texts else torch.empty(0, self._dim, device=device)
        recall = retrieval_recall(
            image_features, text_features, torch.tensor(owner, dtype=torch.long), task.ks, self.chunk_size
        )
        counts = torch.tensor([len(image_features), len(text_features), skipped], dtype=torch.float64, device=device)
        if dist.get_world_size() > 1:
            torch.distributed.all_reduce(counts)
        num_images, num_texts, skipped = (int(c) for c in counts.cpu())
        self._report_skips(task, skipped, reasons)
        return {
            "type": "retrieval",
            "images": num_images,
            "skipped": skipped,
            "captions": num_texts,
            "metrics": recall,
            "main_metric": task.main_metric,
            "main": _retrieval_main(recall, task.main_metric),
        }

    def _report_skips(self, task: Task, skipped: int, reasons: list[str]) -> None:
        if not skipped:
            return
        for reason in reasons:
            log.warning("evaluation %s: skipped an image: %s", task.name, reason)
        log.warning("evaluation %s: %d images did not decode and were not scored", task.name, skipped)


def _retrieval_main(recall: dict[str, float], main: str) -> float:
    if main.startswith("mean_"):
        k = main.removeprefix("mean_")
        return (recall[f"image_to_text_{k}"] + recall[f"text_to_image_{k}"]) / 2
    return recall[main]


def logged_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The numbers logged to the console, metrics.jsonl, TensorBoard and W&B."""
    metrics = {}
    for name, task in results["tasks"].items():
        for metric, value in task["metrics"].items():
            key = f"val/{name}-zeroshot-val-{metric}" if task["type"] == "classification" else f"val/{name}-{metric}"
            metrics[key] = value
    if results["average"] is not None:
        metrics["val/suite-average"] = results["average"]
    return metrics


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def results_markdown(results: dict[str, Any]) -> str:
    """One table per task type (percentages), then the suite average."""
    tasks = results["tasks"]
    model = f" of {results['model']}" if results.get("model") else ""
    lines = [f"Evaluation{model} at step {results['step']} (epoch {results['epoch']})", ""]
    classification = {n: t for n, t in tasks.items() if t["type"] == "classification"}
    retrieval = {n: t for n, t in tasks.items() if t["type"] == "retrieval"}
    if classification:
        columns = [m for m in LABELS if any(m in t["metrics"] for t in classification.values())]
        lines.append("| classification | images | classes | " + " | ".join(LABELS[m] for m in columns) + " |")
        lines.append("| --- | ---: | ---: |" + " ---: |" * len(columns))
        for name, task in classification.items():
            values = " | ".join(_percent(task["metrics"].get(m)) for m in columns)
            lines.append(f"| {name} | {task['images']} | {task['classes']} | {values} |")
        lines.append("")
    if retrieval:
        ks = sorted({int(m.rsplit("@", 1)[1]) for t in retrieval.values() for m in t["metrics"]})
        heads = [f"{d} R@{k}" if i == 0 else f"R@{k}" for d in ("image→text", "text→image") for i, k in enumerate(ks)]
        lines.append("| retrieval | images | captions | " + " | ".join(heads) + " |")
        lines.append("| --- | ---: | ---: |" + " ---: |" * len(heads))
        for name, task in retrieval.items():
            values = [
                _percent(task["metrics"].get(f"{d}_R@{k}")) for d in ("image_to_text", "text_to_image") for k in ks
            ]
            lines.append(f"| {name} | {task['images']} | {task['captions']} | " + " | ".join(values) + " |")
        lines.append("")
    mains = ", ".join(f"{name}: {task['main_metric']}" for name, task in tasks.items())
    lines.append(f"**Suite average: {_percent(results['average'])}** (the mean of each task's main metric; {mains})")
    skipped = [f"{name}: {task['skipped']}" for name, task in tasks.items() if task["skipped"]]
    if skipped:
        lines.append(f"\nImages that did not decode and were not scored: {', '.join(skipped)}.")
    return "\n".join(lines) + "\n"


def build_suite(
    tasks: list[Task],
    model: torch.nn.Module,
    model_name: str,
    batch_size: int,
    workers: int,
    run_dir: Path,
    trim_text: bool = False,
) -> SuiteEvaluator | None:
    """The evaluator of ``eval.tasks`` (``None`` without tasks), with the model's evaluation transform and tokenizer.
    ``trim_text``: prompts and captions are cut after the batch's longest (``model.trim_text_padding``)."""
    if not tasks:
        return None
    tokenizer = get_tokenizer(model_name, context_length=model.context_length)
    return SuiteEvaluator(
        tasks,
        transform=image_transform(model.image_size, False, model.image_mean, model.image_std),
        tokenizer=(lambda texts: model.trim_text_padding(tokenizer(texts))) if trim_text else tokenizer,
        batch_size=batch_size,
        workers=workers,
        run_dir=run_dir,
        model_name=model_name,
    )


__all__ = ["SuiteEvaluator", "build_suite", "logged_metrics", "results_markdown"]
