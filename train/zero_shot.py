"""Zero-shot classification: ``eval.zero_shot`` scores the model on an image folder without training on it.

As in CLIP (Radford et al., 2021) and OpenCLIP's ``zero_shot_classifier``: every class name is put into
each prompt template, the normalized text embeddings of a class are averaged and normalized again; an
image's logits are ``100 * image_embedding @ class_embeddings.T``. Reports OpenCLIP's metric names,
``val/<name>-zeroshot-val-top1`` and ``-top5``, at ``eval.interval`` and at the end of training, with or
without ``data.val``. Images are split over processes and the counts summed.

ImageNet ships as data (``train/zero_shot_data/``, from OpenAI's CLIP notebook, MIT licence): the 1000 class
names OpenAI curated, in class-index order, and their 80 prompt templates (``openai``, the default, as in
OpenCLIP's ImageNet evaluation) and the 7-prompt subset (``simple``). Folders named by WordNet id
(``n01440764``, ImageNet's layout) are named from that list through timm's ImageNet synset table, so an
ImageNet validation folder needs no class-name file. A subset of ImageNet's folders is scored against all 1000
classes, each folder as its own class, as published ImageNet numbers (and OpenCLIP's) are.

Example:
    >>> import torch
    >>> text = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)  # (classes, templates, D)
    >>> build_classifier_weights(text).shape
    torch.Size([2, 8])
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cadenza.datasets.samples import SampleError, read_image_file
from cadenza.datasets.transforms import image_transform
from cadenza.engine import dist
from cadenza.engine.algorithm import Callback
from cadenza.engine.errors import ConfigError
from cadenza.engine.precision import autocast_context
from cadenza.models.tokenizer import get_tokenizer

if TYPE_CHECKING:
    from cadenza.engine.logger import Logger
    from cadenza.engine.state import State

log = logging.getLogger("cadenza")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DATA = Path(__file__).parent / "zero_shot_data"
#: named template sets for ``eval.zero_shot.templates``
TEMPLATE_SETS = {"openai": "openai_imagenet_templates.txt", "simple": "simple_imagenet_templates.txt"}
WORDNET_ID = re.compile(r"n\d{8}")


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def imagenet_classnames() -> dict[str, str]:
    """ImageNet-1k WordNet id → OpenAI's class name, in class-index order (timm's synset table gives the ids)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = _lines(DATA / "imagenet_classnames.txt")
    return {info.index_to_label_name(i): name for i, name in enumerate(names)}


def load_templates(templates: str | Sequence[str] | None) -> list[str]:
    """Prompt templates: a named set (``openai``, 80 prompts, the default; ``simple``, 7), a file with one per
    line, or a list. Each must hold ``{}`` for the class name."""
    if templates is None:
        templates = "openai"
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            templates = _lines(DATA / TEMPLATE_SETS[templates])
        elif Path(templates).is_file():
            templates = _lines(Path(templates))
        else:
            raise ConfigError(
                "eval.zero_shot.templates",
                f"'{templates}' is neither a template set ({', '.join(TEMPLATE_SETS)}) nor a file; give one of "
                "those or a list of prompts with '{}' for the class name.",
            )
    templates = [str(t) for t in templates]
    if not templates:
        raise ConfigError("eval.zero_shot.templates", "empty: give at least one prompt with '{}' for the class name.")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ConfigError("eval.zero_shot.templates", f"{bad[0]!r} has no '{{}}' for the class name.")
    return templates


def build_classifier_weights(text_features: torch.Tensor) -> torch.Tensor:
    """Class embeddings from normalized prompt embeddings ``(C, T, D)``: the normalized mean over templates."""
    return F.normalize(text_features.mean(dim=1), dim=-1)  # (C, D)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows have their label among the ``k`` largest logits, for each ``k`` (capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, K)
    hits = top == labels[:, None]  # (N, K)
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def imagenet_labels(classnames: str | Sequence[str] | None, folders: list[str]) -> list[int] | None:
    """Each folder's class index among ImageNet-1k's 1000, when the class names are ImageNet's (``classnames`` unset
    or ``imagenet``) and every folder is an ImageNet-1k WordNet id; else ``None``."""
    if not (classnames is None or classnames == "imagenet") or not all(WORDNET_ID.fullmatch(f) for f in folders):
        return None
    index = {wnid: i for i, wnid in enumerate(imagenet_classnames())}
    return [index[f] for f in folders] if all(f in index for f in folders) else None


def read_classnames(classnames: str | Sequence[str] | None, folders: list[str]) -> list[str]:
    """Class names in folder order: the given list, a file with one name per line, ``imagenet`` (OpenAI's 1000
    names), or — unset — OpenAI's names for WordNet-id folders of ImageNet-1k, else the folder names."""
    if classnames is None:
        if all(WORDNET_ID.fullmatch(name) for name in folders):
            known = imagenet_classnames()
            if all(name in known for name in folders):
                return [known[name] for name in folders]
        return [name.replace("_", " ") for name in folders]
    if classnames == "imagenet":
        if len(folders) != 1000:
            raise ConfigError(
                "eval.zero_shot.classnames",
                f"'imagenet' names ImageNet-1k's 1000 classes in class-index order, and there are {len(folders)} class "
                f"folders ({', '.join(folders[:3])}, ...): name the folders by WordNet id (n01440764, ...; a subset is "
                "scored against all 1000 classes), or give one class name per folder.",
            )
        classnames = list(imagenet_classnames().values())
    elif isinstance(classnames, str):
        path = Path(classnames)
        if not path.is_file():
            raise ConfigError("eval.zero_shot.classnames", f"'{classnames}' is neither a list, a file, nor 'imagenet'.")
        classnames = _lines(path)
    names = [str(name) for name in classnames]
    if len(names) != len(folders):
        raise ConfigError(
            "eval.zero_shot.classnames",
            f"{len(names)} class names for {len(folders)} class folders; give one name per folder, in sorted order.",
        )
    return names


class ImageFolderFiles(Dataset):
    """``root/<class>/<image>`` (classes in sorted folder order) → ``(image tensor, label)``; a file that does
    not decode becomes ``None`` (skipped and counted by the evaluator)."""

    def __init__(self, root: str, transform: Callable[[Any], torch.Tensor]) -> None:
        folders = sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        if not folders:
            raise ConfigError(
                "eval.zero_shot.path", f"'{root}' has no class folders (expected {root}/<class>/<image>)."
            )
        self.classes = [folder.name for folder in folders]
        self.files = [
            (str(file), label)
            for label, folder in enumerate(folders)
            for file in sorted(folder.iterdir())
            if file.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.files:
            raise ConfigError("eval.zero_shot.path", f"'{root}' has class folders but no images.")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.files[index]
        try:
            image = read_image_file(path)
        except SampleError as error:
            log.warning("zero-shot: skipped %s", error)
            return None
        return self.transform(image.convert("RGB")), label


def _collate(items: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
    good = [item for item in items if item is not None]
    skipped = len(items) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    return torch.stack([image for image, _ in good]), torch.tensor([label for _, label in good]), skipped


class ZeroShotEvaluator(Callback):
    """Zero-shot top-1 / top-5 accuracy on an image folder, at every evaluation.

    Args:
        path: ``root/<class>/<image>``.
        classnames: one name per class folder (sorted order), a file of them, ``imagenet``, or ``None``
            (``read_classnames``).
        templates: a template set name, a file, or prompts with ``{}`` for the class name (``load_templates``).
        name: the metric prefix (``imagenet`` → ``val/imagenet-zeroshot-val-top1``).
        transform: PIL image → tensor (the model's evaluation transform).
        tokenizer: prompts → ``(N, L)`` token ids.
        batch_size, workers: of the image loader.
    """

    def __init__(
        self,
        path: str,
        classnames: str | Sequence[str] | None,
        templates: str | Sequence[str] | None,
        name: str,
        transform: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        batch_size: int = 64,
        workers: int = 0,
    ) -> None:
        self.templates = load_templates(templates)
        self.dataset = ImageFolderFiles(path, transform)
        labels = imagenet_labels(classnames, self.dataset.classes)
        if labels is None:
            self.classnames = read_classnames(classnames, self.dataset.classes)
        else:  # ImageNet folders, all or some: every image is scored against the 1000 classes
            self.classnames = list(imagenet_classnames().values())
            self.dataset.files = [(file, labels[label]) for file, label in self.dataset.files]
        self.name = name
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.workers = workers

    @torch.no_grad()
    def classifier(self, model: torch.nn.Module, device: torch.device) -> torch.Tensor:
        """``(C, D)`` class embeddings."""
        prompts = [template.format(name) for name in self.classnames for template in self.templates]
        features = [
            model.encode_text(self.tokenizer(prompts[i : i + self.batch_size]).to(device), normalize=True).float()
            for i in range(0, len(prompts), self.batch_size)
        ]
        text = torch.cat(features).view(len(self.classnames), len(self.templates), -1)  # (C, T, D)
        return build_classifier_weights(text)

    def eval_start(self, state: State, logger: Logger) -> None:
        # At EVAL_START, after the algorithms: the weights being evaluated are in the model (EMA's average
        # with evaluate_with_ema). At EVAL_END the algorithms run first and EMA has put the training weights back.
        self._metrics = self.evaluate(state)

    def eval_end(self, state: State, logger: Logger) -> None:
        state.eval_metrics.update(self._metrics)
        logger.log_metrics(self._metrics, state.timestamp.batch)

    @torch.no_grad()
    def evaluate(self, state: State) -> dict[str, float]:
        """Accuracy of ``state.model`` over the whole folder (this process scores every world_size-th image)."""
        model, device = state.model, state.device
        dtype = next(model.parameters()).dtype
        with autocast_context(state.precision, device):
            weights = self.classifier(model, device)
        rank, world = dist.get_rank(), dist.get_world_size()
        indices = list(range(rank, len(self.dataset), world))
        loader = DataLoader(
            torch.utils.data.Subset(self.dataset, indices),
            batch_size=self.batch_size,
            num_workers=self.workers,
            collate_fn=_collate,
            generator=torch.Generator(),  # never draws from the training RNG
        )
        counts = torch.zeros(4, dtype=torch.float64)  # top1, top5, scored, skipped
        for images, labels, skipped in loader:
            counts[3] += skipped
            if not len(images):
                continue
            with autocast_context(state.precision, device):
                features = model.encode_image(images.to(device, dtype=dtype), normalize=True).float()
            logits = 100.0 * features @ weights.T  # (N, C)
            top1, top5 = topk_correct(logits.cpu(), labels)
            counts += torch.tensor([top1, top5, len(labels), 0], dtype=torch.float64)
        if world > 1:
            counts = counts.to(device)
            torch.distributed.all_reduce(counts)
            counts = counts.cpu()
        top1, top5, scored, skipped = counts.tolist()
        if skipped:
            log.warning("zero-shot %s: %d images did not decode and were not scored", self.name, int(skipped))
        prefix = f"val/{self.name}-zeroshot-val"
        return {f"{prefix}-top1": top1 / max(scored, 1), f"{prefix}-top5": top5 / max(scored, 1)}


def build_zero_shot(
    cfg: Any,
    templates: Sequence[str],
    model: torch.nn.Module,
    model_name: str,
    batch_size: int,
    workers: int,
    trim_text: bool = False,
):
    """The evaluator for the ``eval.zero_shot`` section (``None`` when its ``path`` is unset), with the prompts the
    trainer loaded from its ``templates``. ``trim_text``: prompts are cut after the batch's longest
    (``model.trim_text_padding``)."""
    if cfg.path is None:
        return None
    classnames = cfg.classnames if isinstance(cfg.classnames, str) or cfg.classnames is None else list(cfg.classnames)
    tokenizer = get_tokenizer(model_name, context_length=model.context_length)
    return ZeroShotEvaluator(
        cfg.path,
        classnames,
        templates,
        cfg.name,
        transform=image_transform(model.image_size, False, model.image_mean, model.image_std),
        tokenizer=_trimmed(tokenizer, model) if trim_text else tokenizer,
        batch_size=batch_size,
        workers=workers,
    )


def _trimmed(tokenizer: Callable[[list[str]], torch.Tensor], model: torch.nn.Module):
    return lambda texts: model.trim_text_padding(tokenizer(texts))


__all__ = [
    "TEMPLATE_SETS",
    "ZeroShotEvaluator",
    "build_classifier_weights",
    "build_zero_shot",
    "imagenet_classnames",
    "imagenet_labels",
    "load_templates",
    "read_classnames",
    "topk_correct",
]
