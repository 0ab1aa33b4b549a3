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

if TYPE_CHECKING:
    from cadenza.engine.logger import Logger
    from cadenza.engine.state import State

log = logging.getLogger("cadenza")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock windows measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainMetrics(Callback):
    """Every ``interval`` steps: losses, LR, logit scale, throughput and the algorithms' ``state.step_metrics``
    (``train/grad_norm``) averaged over the window.

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
        # measured (a matmul, ~1 s on CPU) at the first log, not here: a (re)started job's first step comes sooner
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
        if state.timestamp.batch % self.interval == 0 or state.is_done:
            self._log(state, logger)

    def _log(self, state: State, logger: Logger) -> None:
        synchronize(state.device)
        elapsed = time.perf_counter() - self._window_start - self._excluded
        if not self._peak:  # after the window's clock stopped; _reset starts the next one after it
            self._peak = peak_flops(state.device, state.precision)
        losses = {name: dist.all_reduce_mean(total / self._steps).item() for name, total in self._window_sums.items()}
        model = state.model
        metrics = {f"train/{name}": value for name, value in losses.items()}
        metrics.update(
            {
                "train/lr": group_lr(state.optimizer.param_groups[0]),
                "train/logit_scale": model.logit_scale.exp().item(),
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
    """Validation contrastive loss and image↔text retrieval (mean/median rank, R@1/5/10) on ``data.val``.

    Features of every process are gathered; ranks are computed in chunks of ``chunk_size`` rows, so
    memory grows with N·chunk, not N².
    """

    def __init__(self, chunk_size: int = 1024) -> None:
        self.chunk_size = chunk_size

    def eval_start(self, state: State, logger: Logger) -> None:
        self._images: list[torch.Tensor] = []
        self._texts: list[torch.Tensor] = []
        self._scale = state.model.logit_scale.exp().item()  # the evaluated weights' (EMA swaps back at EVAL_END)

    def eval_batch_end(self, state: State, logger: Logger) -> None:
        self._images.append(state.outputs["image_features"].float().cpu())
        self._texts.append(state.outputs["text_features"].float().cpu())

    def eval_end(self, state: State, logger: Logger) -> None:
        images, texts = _gather_rows(torch.cat(self._images)), _gather_rows(torch.cat(self._texts))
        metrics = {"val/clip_val_loss": contrastive_loss(images, texts, self._scale, self.chunk_size)}
        metrics.update(retrieval_metrics(images, texts, self.chunk_size))
        metrics["val/num_samples"] = len(images)
        state.eval_metrics.update(metrics)
        logger.log_metrics(metrics, state.timestamp.batch)


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    if dist.get_world_size() == 1:
        return local
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(parts, local)
    return torch.cat(parts)


def _ranks(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """0-based rank of the matching key (same row index) for each query, computed chunk by chunk."""
    ranks = []
    for start in range(0, len(queries), chunk_size):
        chunk = queries[start : start + chunk_size]  # (C, D)
        scores = chunk @ keys.T  # (C, N)
        target = scores[torch.arange(len(chunk)), torch.arange(start, start + len(chunk))]  # (C,)
        ranks.append((scores > target[:, None]).sum(dim=1))
    return torch.cat(ranks)


def retrieval_metrics(images: torch.Tensor, texts: torch.Tensor, chunk_size: int = 1024) -> dict[str, float]:
    """OpenCLIP's retrieval metrics for paired rows of normalized features."""
    metrics = {}
    for name, queries, keys in (("image_to_text", images, texts), ("text_to_image", texts, images)):
        ranks = _ranks(queries, keys, chunk_size).float()
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
