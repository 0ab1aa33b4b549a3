"""Built-in callbacks: training metrics with windowed throughput, and validation retrieval metrics.

User-selectable callbacks register here under ``CALLBACKS`` (YAML ``callbacks:``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cadenza.engine import dist
from cadenza.engine.algorithm import Callback
from cadenza.engine.mfu import FlopsByTextLength, peak_flops
from cadenza.engine.optim import group_lr
from cadenza.engine.registry import CALLBACKS  # noqa: F401 - the registry user callbacks join
from cadenza.engine.retrieval import retrieval_ranks

if TYPE_CHECKING:
    from cadenza.engine.logger import Logger
    from cadenza.engine.state import State

log = logging.getLogger("cadenza")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock windows measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainMetrics(Callback):
    """Every ``interval`` steps and at each epoch's last step: losses, LR, logit scale, throughput and the algorithms'
    ``state.step_metrics`` (``train/grad_norm``) averaged over the window.

    ``train/lr`` and ``train/scale`` are the values the logged step used (read before its optimizer step, scheduler
    step and clamp), as OpenCLIP logs them.

    Losses are accumulated on the device without synchronizing; the device is synchronized once per
    window, so samples/s is the real rate over the whole window, not one step's. Time between the end
    of one step and the start of the next (checkpoint saves, evaluation, epoch ends) is not counted.

    ``train/mfu`` is the FLOPs counted for the window's samples (forward + backward, at the caption length the text
    tower ran: see ``engine/mfu.py``) per second and device, over the device's peak (``peak_tflops``, else a
    measured matmul peak), averaged over processes.

    Args:
        interval: steps per logging window.
        peak_tflops: the device's peak in TFLOP/s for ``train/mfu`` (``run.peak_tflops``).
    """

    def __init__(self, interval: int, peak_tflops: float | None = None) -> None:
        self.interval = max(interval, 1)
        self.peak_tflops = peak_tflops
        self._flops_per_sample: FlopsByTextLength | None = None
        self._peak = 0.0
        self._warned_peak = False
        self._skipped_before = 0  # data/skipped counted by the runs this one resumed
        self._reset()

    def _reset(self) -> None:
        self._window_start = time.perf_counter()
        self._paused_at: float | None = None
        self._excluded = 0.0
        self._data_time = 0.0
        self._steps = 0
        self._samples = 0
        self._flops = 0.0  # this process's
        self._window_sums: dict[str, torch.Tensor] = {}

    def init(self, state: State, logger: Logger) -> None:
        # After the algorithms changed the model, before DDP or FSDP wraps it (FSDP's hooks cannot run on meta).
        self._flops_per_sample = FlopsByTextLength(state.model, state.precision)

    def fit_start(self, state: State, logger: Logger) -> None:
        # measured (a matmul, ~0.1 s on CPU) at the first log, not here: a (re)started job's first step comes sooner
        self._peak = peak_flops(state.device, state.precision, self.peak_tflops) if self.peak_tflops else 0.0
        synchronize(state.device)
        self._state = state
        self._reset()

    def skipped(self, state: State) -> int | None:
        """Samples skipped by every process since the job started (``None``: no training data)."""
        if state.train_loader is None:
            return None
        return self._skipped_before + dist.all_reduce_sum(state.train_loader.skipped, state.device)

    def state_dict(self) -> dict[str, int]:
        # Called on every process at the same step (checkpoint saving), so the sum over processes is safe here.
        state = getattr(self, "_state", None)
        total = self.skipped(state) if state is not None else None
        return {"skipped": self._skipped_before if total is None else total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skipped_before = int(state.get("skipped", 0))

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._paused_at = time.perf_counter()  # runs before the checkpoint saver and any evaluation

    def batch_start(self, state: State, logger: Logger) -> None:
        # what this step trains with: the scheduler and the clamp change both after its optimizer step
        self._lr = group_lr(state.optimizer.param_groups[0])
        self._scale = state.model.logit_scale.detach().exp()  # a device tensor: read at the log, no sync here

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self._data_start = time.perf_counter()
        if self._paused_at is not None:
            self._excluded += self._data_start - self._paused_at
            self._paused_at = None

    def after_dataloader(self, state: State, logger: Logger) -> None:
        self._data_time += time.perf_counter() - self._data_start

    def batch_end(self, state: State, logger: Logger) -> None:
        self._steps += 1
        self._samples += state.samples_per_batch
        for _, tokens in state.batch:  # (images, tokens) micro-batches, tokens maybe cut to the longest caption
            self._flops += self._flops_per_sample(tokens.shape[-1]) * tokens.shape[0]
        for name, value in {"loss": state.loss, **state.loss_dict, **state.step_metrics}.items():
            value = value.detach().float()
            self._window_sums[name] = self._window_sums[name] + value if name in self._window_sums else value
        ts = state.timestamp
        if ts.batch % self.interval == 0 or state.is_done or ts.batch_in_epoch == state.batches_per_epoch:
            self._log(state, logger)

    def _log(self, state: State, logger: Logger) -> None:
        synchronize(state.device)
        elapsed = time.perf_counter() - self._window_start - self._excluded
        if not self._peak:  # after the window's clock stopped; _reset starts the next one after it
            self._peak = peak_flops(state.device, state.precision)
        losses = {name: dist.all_reduce_mean(total / self._steps).item() for name, total in self._window_sums.items()}
        metrics = {f"train/{name}": value for name, value in losses.items()}
        metrics.update(
            {
                "train/lr": self._lr,
                "train/scale": self._scale.item(),
                "train/samples_per_second": self._samples / elapsed,
                "train/samples_per_second_per_gpu": self._samples / elapsed / state.dist.world_size,
                "train/mfu": dist.all_reduce_mean(
                    torch.tensor(self._flops / elapsed / self._peak, device=state.device)
                ).item(),
                "train/data_time": self._data_time / self._steps,
                "train/batch_time": elapsed / self._steps,
                "train/epoch": state.timestamp.epoch,
                "train/samples": state.timestamp.sample,
            }
        )
        if metrics["train/mfu"] > 1.0 and self.peak_tflops is None:
            metrics["train/mfu"] = self._remeasure_peak(state, metrics["train/mfu"])
        skipped = self.skipped(state)
        if skipped is not None:
            metrics["data/skipped"] = skipped
        logger.log_metrics(metrics, state.timestamp.batch)
        self._reset()

    def _remeasure_peak(self, state: State, mfu: float) -> float:
        """An MFU above 1 means the matmul peak measured at the start was slowed by other work on the machine:
        measure again, keep the higher peak, and say so (once). Runs outside any throughput window."""
        old = self._peak
        self._peak = max(old, peak_flops(state.device, state.precision))
        if not self._warned_peak:
            self._warned_peak = True
            log.warning(
                "train/mfu was %.2f: the matmul peak measured at the start (%.1f GFLOP/s) was disturbed by other "
                "work on this machine; re-measured: %.1f GFLOP/s. Set run.peak_tflops for a fixed reference.",
                mfu,
                old / 1e9,
                self._peak / 1e9,
            )
        return mfu * old / self._peak


class RetrievalEvaluator(Callback):
    """Validation loss and image↔text retrieval (mean/median rank, R@1/5/10) on ``data.val``, as OpenCLIP's
    ``evaluate``.

    ``val/clip_val_loss`` is OpenCLIP's: each evaluation batch's in-batch contrastive loss, averaged over the batches
    weighted by their sizes (so it depends on ``data.batch_size``; several processes each score their own batches).
    ``val/clip_val_loss_whole_set`` is the contrastive loss of every image against every caption of the set. Features
    of every process are gathered for it, computed in chunks of ``chunk_size`` rows, so memory grows with N·chunk, not
    N²; the ranks are computed without gathering (``retrieval_metrics``). CoCa models also give OpenCLIP's ``val/val_generative_loss`` (averaged the same way).
    ``val/epoch`` is the number of epochs trained, as OpenCLIP writes it.

    When the validation data holds several captions per image (a batch's ``extras["captions"]``, ``(B, C, L)``),
    every caption is encoded and scored COCO-style (see ``retrieval_metrics``); the losses pair each image with its
    first caption.
    """

    def __init__(self, chunk_size: int = 1024) -> None:
        self.chunk_size = chunk_size

    def eval_start(self, state: State, logger: Logger) -> None:
        self._images: list[torch.Tensor] = []
        self._texts: list[torch.Tensor] = []  # each image's first caption
        self._captions: list[torch.Tensor] = []  # every caption, when there are several
        self._caption_image: list[torch.Tensor] = []  # the image (row of this process's images) of each caption
        self._count = 0
        self._scale = state.model.logit_scale.exp().item()  # the evaluated weights' (EMA swaps back at EVAL_END)
        self._sums = torch.zeros(3, dtype=torch.float64)  # batch losses x sizes, generative losses x sizes, samples

    def eval_batch_end(self, state: State, logger: Logger) -> None:
        images, texts = state.outputs["image_features"].float(), state.outputs["text_features"].float()
        self._images.append(images.cpu())
        self._texts.append(texts.cpu())
        logits = self._scale * images @ texts.T  # (B, B)
        labels = torch.arange(len(images), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        generative = 0.0
        if "logits" in state.outputs and "labels" in state.outputs:  # CoCa's captioning loss, as OpenCLIP's
            generative = F.cross_entropy(state.outputs["logits"].float().permute(0, 2, 1), state.outputs["labels"])
        self._sums += torch.tensor([float(loss) * len(images), float(generative) * len(images), len(images)])
        every = state.extras.get("captions")  # (B, C, L): rows of zeros past an image's last caption
        if every is not None:
            present = every[:, :, 0] != 0  # a caption starts with its start token; padding rows are all zeros
            image_of, _ = present.nonzero(as_tuple=True)
            tokens = every[present]  # (M, L)
            if getattr(state.model, "trims_text_padding", False):
                tokens = state.model.trim_text_padding(tokens)
            self._captions.append(state.model.encode_text(tokens, normalize=True).float().cpu())
            self._caption_image.append(image_of.cpu() + self._count)
        self._count += len(images)

    def eval_end(self, state: State, logger: Logger) -> None:
        images, texts = torch.cat(self._images), torch.cat(self._texts)  # this process's rows
        if self._captions:  # every caption of every image
            captions, caption_image = torch.cat(self._captions), torch.cat(self._caption_image)
            retrieval = retrieval_metrics(images, captions, self.chunk_size, text_image=caption_image)
            retrieval["val/num_captions"] = dist.all_reduce_sum(len(captions), images.device)
        else:
            retrieval = retrieval_metrics(images, texts, self.chunk_size)
        sums = torch.stack(dist.all_gather_object(self._sums)).sum(dim=0)
        images, texts = _gather_rows(images), _gather_rows(texts)
        metrics = {
            "val/clip_val_loss": (sums[0] / sums[2]).item(),
            "val/clip_val_loss_whole_set": contrastive_loss(images, texts, self._scale, self.chunk_size),
        }
        if sums[1]:
            metrics["val/val_generative_loss"] = (sums[1] / sums[2]).item()
        metrics.update(retrieval)
        metrics["val/epoch"] = trained_epochs(state)
        metrics["val/num_samples"] = len(images)
        state.eval_metrics.update(metrics)
        logger.log_metrics(metrics, state.timestamp.batch)


def trained_epochs(state: State) -> float:
    """Epochs trained so far: whole at an epoch's end (OpenCLIP evaluates only there), fractional between."""
    if state.batches_per_epoch:
        return state.timestamp.batch / state.batches_per_epoch
    return float(state.timestamp.epoch)


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every process's rows, in rank order."""
    if dist.get_world_size() == 1:
        return local
    return torch.cat(dist.all_gather_object(local))


def retrieval_metrics(
    images: torch.Tensor, texts: torch.Tensor, chunk_size: int = 1024, text_image: torch.Tensor | None = None
) -> dict[str, float]:
    """OpenCLIP's retrieval metrics (mean and median rank, R@1/5/10, both directions) over the rows of every process,
    from ``cadenza.engine.retrieval.retrieval_ranks``; each process passes its own rows.

    Without ``text_image``, row ``i`` of ``texts`` is the caption of image ``i`` (OpenCLIP's metrics). With it,
    ``texts`` holds every caption and ``text_image[j]`` is the image (a row of this process's ``images``) caption ``j``
    describes, COCO-style: an image's rank is that of its best-ranked caption among all captions (image→text R@k: any
    of its captions in the top k), a caption's that of its one image. Every image needs at least one caption. Ranks
    start at 1; ties count in the query's favour.

    Example:
        >>> images = torch.eye(3)
        >>> texts = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0], [0.6, 0.8, 0]])  # image 1 has two captions
        >>> m = retrieval_metrics(images, texts, text_image=torch.tensor([0, 2, 1, 1]))
        >>> m["val/image_to_text_R@1"], m["val/text_to_image_R@1"]  # caption 3 is nearer image 1 than image 0
        (1.0, 1.0)
        >>> retrieval_metrics(images, texts, text_image=torch.tensor([0, 2, 1, 0]))["val/text_to_image_R@1"]
        0.75
    """
    if text_image is None:
        text_image = torch.arange(len(images))
    text_image = text_image.long()
    if len(text_image) != len(texts):
        raise ValueError(f"text_image has {len(text_image)} entries for {len(texts)} texts")
    if len(torch.unique(text_image)) != len(images) or text_image.min() < 0 or text_image.max() >= len(images):
        raise ValueError("every image needs at least one caption, and every caption one image")
    metrics = {}
    image_ranks, text_ranks = retrieval_ranks(images, texts, text_image, chunk_size)
    for name, ranks in (("image_to_text", image_ranks), ("text_to_image", text_ranks)):
        ranks = _gather_rows(ranks.cpu()).float()  # every process's queries: the median needs them all
        metrics[f"val/{name}_mean_rank"] = ranks.mean().item() + 1
        metrics[f"val/{name}_median_rank"] = float(torch.floor(torch.quantile(ranks, 0.5)).item() + 1)
        for k in (1, 5, 10):
            metrics[f"val/{name}_R@{k}"] = (ranks < k).float().mean().item()
    return metrics


def contrastive_loss(images: torch.Tensor, texts: torch.Tensor, scale: float, chunk_size: int = 1024) -> float:
    """Symmetric cross-entropy over the whole validation set, chunked by rows."""
    total = 0.0
    for queries, keys in ((images, texts), (texts, images)):
        for start in range(0, len(queries), chunk_size):
            logits = scale * queries[start : start + chunk_size] @ keys.T  # (C, N)
            labels = torch.arange(start, start + len(logits))
            total += F.cross_entropy(logits, labels, reduction="sum").item()
    return total / (2 * len(images))
