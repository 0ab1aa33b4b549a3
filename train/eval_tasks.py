"""Evaluation tasks: what ``eval.tasks`` and ``composer eval --tasks yamls/eval/<suite>.yaml`` name.

A suite is a YAML file (or an inline mapping under ``eval.tasks``) of named tasks, each zero-shot classification
or image–text retrieval with its data, class names, templates and metrics::

    root: data                    # relative paths of the tasks start here (eval.data_root overrides it)
    tasks:
      cifar10:
        type: classification      # or retrieval
        path: wds_cifar10         # format auto-detected: imagefolder | wds | csv | mds (retrieval: karpathy | csv | wds)
        classnames: cifar10       # a list, a file, or a shipped list; default: what the data ships
        templates: cifar          # a set name, a file, or a list, with {} or {c} for the class name
        metrics: [top1, top5, mean_per_class_recall]
        main_metric: top1         # what the suite average takes from this task

``parse_tasks`` checks the definitions (keys, types, values) without touching the data; ``load_tasks`` then scans
each task's data (file lists, labels, captions; never the images) and checks it against the definition: a missing
class list, an empty folder, a label outside the class list fail here, before any model work, as a
``ConfigError`` naming the task and the field (``eval.tasks.<task>.<field>``).

Shipped class lists (``classnames:``): ``imagenet`` (OpenAI's 1000 names), ``imagenet_r`` and ``imagenet_a`` (their
200-class subsets, WordNet ids in ``suite_data/``), ``cifar10``, ``cifar100``. With an ImageNet list, image folders
named by WordNet id (``n01440764``) or by class index (ImageNetV2's ``0`` ... ``999``) get their class from the name,
not from their sorted position. Template sets (``templates:``): ``openai`` (80, the default), ``simple`` (7),
``cifar`` (18).

Example:
    >>> [task.name for task in parse_tasks({"pets": {"type": "classification", "path": "pets/val"}}, "/data")]
    ['pets']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from cadenza.datasets import eval_sets
from cadenza.datasets.eval_sets import CaptionedImages, ImageReader, LabelledImages
from cadenza.engine.errors import ConfigError, suggest
from cadenza.train.zero_shot import DATA as ZERO_SHOT_DATA
from cadenza.train.zero_shot import TEMPLATE_SETS as ZERO_SHOT_TEMPLATES
from cadenza.train.zero_shot import WORDNET_ID, imagenet_classnames

SUITE_DATA = Path(__file__).parent / "suite_data"
TYPES = ("classification", "retrieval")
FORMATS = {"classification": ("imagefolder", "wds", "csv", "mds"), "retrieval": ("karpathy", "csv", "wds")}
#: every format's own keys, with their defaults (``separator`` unset: tab for .tsv, else comma; ``images`` unset:
#: the folder of the CSV or JSON file)
FORMAT_KEYS: dict[str, dict[str, Any]] = {
    "imagefolder": {},
    "wds": {"split": "test"},
    "csv": {"image_key": "filepath", "label_key": "label", "caption_key": "title", "separator": None, "images": None},
    "mds": {"split": None, "image_key": "jpg", "label_key": "cls"},
    "karpathy": {"split": "test", "images": None},
}
COMMON_KEYS = ("type", "path", "format", "metrics", "main_metric")
CLASSIFICATION_KEYS = ("classnames", "templates")
CLASSIFICATION_METRICS = ("top1", "top5", "mean_per_class_recall")
DEFAULT_RECALLS = ("R@1", "R@5", "R@10")
#: class lists that ship with Cadenza: ImageNet's by WordNet id, CIFAR's as names
NAMED_CLASSES = ("imagenet", "imagenet_r", "imagenet_a", "cifar10", "cifar100")
TEMPLATE_FILES = {**{name: ZERO_SHOT_DATA / file for name, file in ZERO_SHOT_TEMPLATES.items()}}
TEMPLATE_FILES["cifar"] = SUITE_DATA / "cifar_templates.txt"
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RECALL = re.compile(r"R@([1-9]\d*)")


@dataclass(frozen=True)
class TaskSpec:
    """A checked task definition, its relative paths resolved against the suite's root."""

    name: str
    type: str
    format: str  # "auto" until load_task looks at the data
    path: str
    options: dict[str, Any]  # the format's keys as given (defaults filled in by load_task)
    classnames: Any = None
    templates: Any = None
    metrics: tuple[str, ...] | None = None  # None: the type's default (top-5 only with 5 classes or more)
    main_metric: str | None = None
    root: str = "."

    @property
    def key(self) -> str:
        return f"eval.tasks.{self.name}"


@dataclass
class ClassificationTask:
    """Zero-shot classification: ``labels[i]`` is the class of image ``i``, an index into ``classnames``."""

    name: str
    images: ImageReader
    labels: np.ndarray  # (N,) int64
    classnames: list[str]
    templates: list[str]  # each with {} for the class name
    metrics: tuple[str, ...]
    main_metric: str
    type: str = "classification"


@dataclass
class RetrievalTask:
    """Image–text retrieval: ``captions[i]`` are the captions of image ``i`` (every one counts as correct)."""

    name: str
    images: ImageReader
    captions: list[list[str]]
    metrics: tuple[str, ...]  # R@k
    main_metric: str
    type: str = "retrieval"

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(int(RECALL.fullmatch(m).group(1)) for m in self.metrics)


Task = ClassificationTask | RetrievalTask


# -- definitions ---------------------------------------------------------------------------------------------------
def read_suite(path: str) -> tuple[dict[str, Any], str | None]:
    """A suite file's ``tasks`` mapping and its ``root``."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError("eval.tasks", f"suite file '{path}' does not exist (see yamls/eval/ for the shipped suites).")
    try:
        suite = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    except Exception as error:  # noqa: BLE001 - a YAML syntax or interpolation error
        raise ConfigError("eval.tasks", f"cannot read suite file '{path}': {error}") from None
    if not isinstance(suite, dict) or not isinstance(suite.get("tasks"), dict) or not suite["tasks"]:
        raise ConfigError("eval.tasks", f"'{path}' holds no 'tasks:' mapping of task names to tasks.")
    unknown = [k for k in suite if k not in ("root", "tasks")]
    if unknown:
        raise ConfigError(f"eval.tasks.{unknown[0]}", f"unknown key in '{path}' (a suite has root and tasks).")
    root = suite.get("root")
    if root is not None and not isinstance(root, str):
        raise ConfigError("eval.tasks.root", f"expected a folder in '{path}', got {root!r}.")
    return suite["tasks"], root


def parse_tasks(tasks: Any, data_root: str | None = None) -> list[TaskSpec]:
    """The task definitions of ``eval.tasks`` (a suite file or a mapping), checked without touching the data."""
    if tasks is None:
        return []
    root = None
    if isinstance(tasks, str):
        tasks, root = read_suite(tasks)
    elif isinstance(tasks, DictConfig | ListConfig):
        tasks = OmegaConf.to_container(tasks, resolve=True)
    if not isinstance(tasks, dict) or not tasks:
        raise ConfigError("eval.tasks", f"expected a suite file or a mapping of task names to tasks, got {tasks!r}.")
    root = data_root or root or "."
    return [_parse_task(str(name), entry, root) for name, entry in tasks.items()]


def _parse_task(name: str, entry: Any, root: str) -> TaskSpec:
    key = f"eval.tasks.{name}"
    if not TASK_NAME.fullmatch(name):
        raise ConfigError(key, "a task name is letters, digits, '_', '-' and '.' (it names metrics and table rows).")
    if not isinstance(entry, dict):
        raise ConfigError(key, f"expected a mapping (type, path, ...), got {entry!r}.")
    kind = entry.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{key}.type", f"{'missing' if kind is None else repr(kind)}: one of {', '.join(TYPES)}.")
    fmt = entry.get("format", "auto")
    if fmt != "auto" and fmt not in FORMATS[kind]:
        hint = suggest(str(fmt), FORMATS[kind])
        raise ConfigError(f"{key}.format", f"'{fmt}' is not a {kind} format: auto or {', '.join(FORMATS[kind])}.{hint}")
    allowed = (
        set(COMMON_KEYS)
        | set(_format_keys(kind, fmt))
        | (set(CLASSIFICATION_KEYS) if kind == "classification" else set())
    )
    for field_name in entry:
        if field_name not in allowed:
            where = f"{kind} tasks" + (f" in format {fmt}" if fmt != "auto" else "")
            raise ConfigError(f"{key}.{field_name}", f"unknown key for {where}.{suggest(str(field_name), allowed)}")
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}.path", "missing: the task's data (a folder or a file).")
    options = {k: v for k, v in entry.items() if k in _format_keys(kind, fmt)}
    for option, value in options.items():
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{key}.{option}", f"expected text, got {value!r}.")
    if "images" in options and options["images"] is not None:
        options["images"] = _under(root, options["images"])
    metrics = _parse_metrics(key, kind, entry.get("metrics"))
    main = entry.get("main_metric")
    if main is not None:
        _check_main_metric(key, kind, str(main), metrics)
    for field_name in CLASSIFICATION_KEYS:
        value = entry.get(field_name)
        if value is not None and not isinstance(value, str | list):
            raise ConfigError(f"{key}.{field_name}", f"expected a name, a file or a list, got {value!r}.")
    return TaskSpec(
        name,
        kind,
        fmt,
        _under(root, path),
        options,
        entry.get("classnames"),
        entry.get("templates"),
        metrics,
        None if main is None else str(main),
        root,
    )


def _format_keys(kind: str, fmt: str) -> tuple[str, ...]:
    formats = FORMATS[kind] if fmt == "auto" else (fmt,)
    keys = {k for f in formats for k in FORMAT_KEYS[f]}
    keys.discard("caption_key" if kind == "classification" else "label_key")
    return tuple(sorted(keys))


def _under(root: str, path: str) -> str:
    return str(Path(root) / path) if not Path(path).is_absolute() else path


def _parse_metrics(key: str, kind: str, metrics: Any) -> tuple[str, ...] | None:
    if metrics is None:
        return None
    if not isinstance(metrics, list) or not metrics:
        raise ConfigError(f"{key}.metrics", f"expected a list of metric names, got {metrics!r}.")
    for metric in metrics:
        if kind == "classification" and metric not in CLASSIFICATION_METRICS:
            hint = suggest(str(metric), CLASSIFICATION_METRICS)
            raise ConfigError(f"{key}.metrics", f"'{metric}' is not a classification metric.{hint}")
        if kind == "retrieval" and not RECALL.fullmatch(str(metric)):
            raise ConfigError(f"{key}.metrics", f"'{metric}' is not a retrieval metric: R@k, e.g. R@1, R@5, R@10.")
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"{key}.metrics", f"lists a metric twice: {metrics}.")
    return tuple(str(m) for m in metrics)


def _check_main_metric(key: str, kind: str, main: str, metrics: tuple[str, ...] | None) -> None:
    if kind == "classification":
        choices = metrics or CLASSIFICATION_METRICS
    else:
        ks = [RECALL.fullmatch(m).group(1) for m in (metrics or DEFAULT_RECALLS)]
        choices = tuple(f"{d}_R@{k}" for k in ks for d in ("image_to_text", "text_to_image", "mean"))
    if main not in choices:
        raise ConfigError(f"{key}.main_metric", f"'{main}' is not one of this task's metrics.{suggest(main, choices)}")


# -- data ----------------------------------------------------------------------------------------------------------
def load_tasks(tasks: Any, data_root: str | None = None) -> list[Task]:
    """``parse_tasks``, then every task's data scanned and checked against its definition (no model involved)."""
    return [load_task(spec) for spec in parse_tasks(tasks, data_root)]


def detect_format(spec: TaskSpec) -> str:
    """The format of a task's data: a file by its suffix, a folder by what it holds."""
    path, key = Path(spec.path), spec.key
    if not path.exists():
        raise ConfigError(f"{key}.path", f"'{spec.path}' does not exist (relative paths start at root '{spec.root}').")
    if path.is_file():
        found = {".json": "karpathy", ".csv": "csv", ".tsv": "csv"}.get(path.suffix.lower())
    elif (path / "index.json").is_file() or (path / (spec.options.get("split") or "") / "index.json").is_file():
        found = "mds"
    elif any((path / name).is_file() for name in ("classnames.txt", "dataset_type.txt")) or any(path.glob("*/*.tar")):
        found = "wds"
    else:
        found = "imagefolder"
    if found not in FORMATS[spec.type]:
        raise ConfigError(
            f"{key}.format",
            f"'{spec.path}' looks like {found or 'no known format'}, not a {spec.type} format "
            f"({', '.join(FORMATS[spec.type])}); set format.",
        )
    return found


def load_task(spec: TaskSpec) -> Task:
    """Scan a task's data and bind it to the definition."""
    fmt = spec.format if spec.format != "auto" else detect_format(spec)
    extra = [k for k in spec.options if k not in _format_keys(spec.type, fmt)]
    if extra:
        raise ConfigError(f"{spec.key}.{extra[0]}", f"not a key of format {fmt} (the data at '{spec.path}').")
    options = {k: v for k, v in FORMAT_KEYS[fmt].items() if k in _format_keys(spec.type, fmt)}
    options.update(spec.options)
    key = spec.key
    if spec.type == "retrieval":
        if fmt == "karpathy":
            data = eval_sets.scan_karpathy(spec.path, options["split"], key, options["images"])
        elif fmt == "csv":
            data = eval_sets.scan_csv_captions(
                spec.path, key, options["image_key"], options["caption_key"], options["separator"], options["images"]
            )
        else:
            data = eval_sets.scan_wds(spec.path, options["split"], key, retrieval=True)
        return _retrieval(spec, data)
    if fmt == "imagefolder":
        data = eval_sets.scan_image_folder(spec.path, key)
    elif fmt == "wds":
        data = eval_sets.scan_wds(spec.path, options["split"], key, retrieval=False)
    elif fmt == "csv":
        data = eval_sets.scan_csv_labels(
            spec.path, key, options["image_key"], options["label_key"], options["separator"], options["images"]
        )
    else:
        data = eval_sets.scan_mds(spec.path, options["split"], key, options["image_key"], options["label_key"])
    return _classification(spec, fmt, data)


def _retrieval(spec: TaskSpec, data: CaptionedImages) -> RetrievalTask:
    metrics = spec.metrics or DEFAULT_RECALLS
    return RetrievalTask(spec.name, data.images, data.captions, metrics, spec.main_metric or "mean_R@1")


def _classification(spec: TaskSpec, fmt: str, data: LabelledImages) -> ClassificationTask:
    key = spec.key
    if fmt == "imagefolder":
        classnames, labels = _folder_classes(spec, data)
    else:
        classnames, wnids = _classnames(spec, data.classnames)
        if classnames is None:
            raise ConfigError(
                f"{key}.classnames",
                "missing: this format names classes by index; give a list, a file (one name per line, in label order) "
                f"or one of {', '.join(NAMED_CLASSES)}"
                + (" (or put classnames.txt beside the shards, as CLIP_benchmark does)." if fmt == "wds" else "."),
            )
        labels = _label_indices(spec, fmt, data, classnames, wnids)
    templates = _templates(spec, data.templates)
    metrics = spec.metrics or tuple(m for m in CLASSIFICATION_METRICS if m != "top5" or len(classnames) >= 5)
    if "top5" in metrics and len(classnames) < 5:
        raise ConfigError(f"{key}.metrics", f"top5 needs at least 5 classes; this task has {len(classnames)}.")
    return ClassificationTask(
        spec.name, data.images, labels, classnames, templates, metrics, spec.main_metric or metrics[0]
    )


def _named_classes(name: str) -> tuple[list[str], list[str] | None]:
    """A shipped class list: ``(names, WordNet ids)`` (ids ``None`` for CIFAR's)."""
    if name.startswith("imagenet"):
        known = imagenet_classnames()
        wnids = list(known) if name == "imagenet" else eval_sets.read_lines(SUITE_DATA / f"{name}_wnids.txt")
        return [known[w] for w in wnids], wnids
    return eval_sets.read_lines(SUITE_DATA / f"{name}_classnames.txt"), None


def _classnames(spec: TaskSpec, shipped: list[str] | None) -> tuple[list[str] | None, list[str] | None]:
    """The task's class names (and WordNet ids for ImageNet lists): its ``classnames``, else what the data ships."""
    value, key = spec.classnames, f"{spec.key}.classnames"
    if value is None:
        return shipped, None
    if isinstance(value, list):
        names = [str(v) for v in value]
    elif value in NAMED_CLASSES:
        return _named_classes(value)
    else:
        file = Path(_under(spec.root, value))
        if not file.is_file():
            hint = suggest(value, NAMED_CLASSES)
            raise ConfigError(
                key, f"'{value}' is neither a shipped list ({', '.join(NAMED_CLASSES)}) nor a file.{hint}"
            )
        names = eval_sets.read_lines(file)
    if not names:
        raise ConfigError(key, "is empty: give one name per class.")
    return names, None


def _folder_classes(spec: TaskSpec, data: LabelledImages) -> tuple[list[str], np.ndarray]:
    """Class names and labels of an image folder: by WordNet id or class index where the folders are named so and an
    ImageNet list is given, else by sorted folder position."""
    folders, key = data.folders, f"{spec.key}.classnames"
    numbered = all(f.isdigit() for f in folders)
    names, wnids = _classnames(spec, None)
    if names is None:
        if numbered:
            raise ConfigError(
                key,
                f"the class folders of '{spec.path}' are numbers (class indices): give the class names in index order "
                "(a list, a file, or imagenet for ImageNetV2's layout).",
            )
        known = imagenet_classnames() if all(WORDNET_ID.fullmatch(f) for f in folders) else {}
        names = (
            [known[f] for f in folders] if all(f in known for f in folders) else [f.replace("_", " ") for f in folders]
        )
        index = {f: i for i, f in enumerate(folders)}
    elif numbered:
        index = {f: int(f) for f in folders}
        outside = [f for f in folders if int(f) >= len(names)]
        if outside:
            raise ConfigError(
                key, f"folder '{outside[0]}' of '{spec.path}' is a class index outside the {len(names)} class names."
            )
    elif wnids is not None:
        position = {w: i for i, w in enumerate(wnids)}
        unknown = [f for f in folders if f not in position]
        if unknown:
            raise ConfigError(
                key,
                f"folder '{unknown[0]}' of '{spec.path}' is not a WordNet id of {spec.classnames} ({len(wnids)} classes).",
            )
        index = position
    else:
        if len(names) != len(folders):
            raise ConfigError(
                key,
                f"{len(names)} class names for {len(folders)} class folders; give one name per folder, in sorted order.",
            )
        index = {f: i for i, f in enumerate(folders)}
    return names, np.array([index[label] for label in data.labels], dtype=np.int64)


def _label_indices(
    spec: TaskSpec, fmt: str, data: LabelledImages, names: list[str], wnids: list[str] | None
) -> np.ndarray:
    """Labels as class indices, each checked against the class list."""
    field_name = "label_key" if fmt in ("csv", "mds") else "classnames"
    source = "its classnames" if spec.classnames is not None else "classnames.txt beside the shards"
    lookup = {name: i for i, name in enumerate(names)}
    lookup.update({w: i for i, w in enumerate(wnids or [])})
    labels = np.empty(len(data.labels), dtype=np.int64)
    for i, label in enumerate(data.labels):
        if isinstance(label, str):
            if label not in lookup:
                raise ConfigError(
                    f"{spec.key}.{field_name}", f"{data.where[i]}: label '{label}' is not a class name of {source}."
                )
            label = lookup[label]
        elif not 0 <= label < len(names):
            raise ConfigError(
                f"{spec.key}.{field_name}",
                f"{data.where[i]}: label {label} is outside the {len(names)} classes of {source} (0 to {len(names) - 1}).",
            )
        labels[i] = label
    return labels


def _templates(spec: TaskSpec, shipped: list[str] | None) -> list[str]:
    """The prompts, with ``{}`` for the class name (CLIP_benchmark's ``{c}`` is accepted)."""
    value, key = spec.templates, f"{spec.key}.templates"
    if value is None:
        templates = shipped if shipped else eval_sets.read_lines(TEMPLATE_FILES["openai"])
    elif isinstance(value, list):
        templates = [str(t) for t in value]
    elif value in TEMPLATE_FILES:
        templates = eval_sets.read_lines(TEMPLATE_FILES[value])
    else:
        file = Path(_under(spec.root, value))
        if not file.is_file():
            hint = suggest(value, TEMPLATE_FILES)
            raise ConfigError(
                key, f"'{value}' is neither a template set ({', '.join(TEMPLATE_FILES)}) nor a file.{hint}"
            )
        templates = eval_sets.read_lines(file)
    templates = [t.replace("{c}", "{}") for t in templates]
    if not templates:
        raise ConfigError(key, "empty: give at least one prompt with {} for the class name.")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ConfigError(key, f"{bad[0]!r} has no {{}} (or {{c}}) for the class name.")
    return templates


__all__ = [
    "NAMED_CLASSES",
    "ClassificationTask",
    "RetrievalTask",
    "TaskSpec",
    "load_task",
    "load_tasks",
    "parse_tasks",
]
