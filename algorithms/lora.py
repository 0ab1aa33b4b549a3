"""LoRA: train low-rank adapters beside frozen weights (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models", https://arxiv.org/abs/2106.09685), through Hugging Face ``peft``.

Each adapted layer ``W x`` becomes ``W x + (alpha / rank) * B A x`` with ``A`` (rank x in, random) and ``B``
(out x rank, zero), so training starts exactly at the pretrained model; ``W`` and every other parameter are
frozen, and only ``A`` and ``B`` train. ``target`` picks the towers, ``modules`` the layers (by the end of their
dotted names; by default the attention and MLP projections of every block: ``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2`` in a timm ViT, ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj`` in the text tower). Runs
once, on ``INIT``, after ``model.pretrained`` is loaded and before the optimizer is built; checkpoints hold base
weights and adapters, so runs resume exactly. ``composer export --format openclip`` folds the adapters into plain
weights (peft's ``merge_and_unload``) that OpenCLIP loads; ``--format lora`` writes the adapters alone (peft's
``adapter_model.safetensors`` + ``adapter_config.json``).

When it helps: fine-tuning a large pretrained model on a small domain with little memory: gradients and optimizer
state exist only for the adapters (AdamW keeps 2 values per trained parameter), and the adapters of many tasks are
small files over one base. When it hurts: a large distribution shift that needs the features themselves to change
(full fine-tuning, with layer-wise LR decay, reaches further); activations are still stored for the whole model
(pair with ``grad_checkpointing`` for memory), and each step runs the extra low-rank products (slightly slower
than full fine-tuning at equal batch on small models, where the optimizer step is cheap anyway).

Measured on this project's 2-core Intel Xeon (Sapphire Rapids class), shared with other jobs, torch 2.14.1:

- memory (ViT-B-32, fp32, batch 16, peak process RSS; ``python benchmarks/memory.py --only baseline,lora,lock_image
  --rounds 2 --name memory_cpu_finetune``): 1.77M of 151M values train; 3.27 GiB against full fine-tuning's 3.79
  (0.86x) at 0.98x its speed. The gradients and AdamW state of 149M values (1.7 GiB) go, but peft's layers raise the
  forward pass's peak by 0.6 GiB on a CPU and importing peft costs 0.15 GiB; locking the image tower (LiT) measured
  2.53 GiB (0.67x).
- accuracy (the digits worked example, ``composer yamls/finetune_digits.yaml run.name=ft-lora
  'algorithms.lora={rank: 8, alpha: 16}' optim.layer_decay={} optim.lr=5e-3``): zero-shot top-1 on inverted digits
  from 16.7% to 80.5% training 28,672 of 3.4M values, against 76.3% for full fine-tuning with layer-wise LR decay;
  both forget the original digits (89.1% to 17.3% and 22.3%).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from cadenza.engine.algorithm import Algorithm
from cadenza.engine.event import Event
from cadenza.engine.logger import Logger
from cadenza.engine.registry import ALGORITHMS
from cadenza.engine.state import State
from cadenza.models.lora import LORA_MODULES, add_lora, check_lora_arguments, lora_layers

log = logging.getLogger("cadenza")


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target: Sequence[str] = ("image", "text"),
    modules: Sequence[str] = LORA_MODULES,
) -> dict[str, Any]:
    """Adapt ``model`` with LoRA in place (every other parameter frozen) and count what trains.

    Returns:
        ``{"tuner": peft's LoraModel, "layers": {tower: adapted layers}, "trainable": n, "total": n}``.
    """
    tuner = add_lora(model, rank, alpha, dropout, target, modules)
    return {
        "tuner": tuner,
        "layers": lora_layers(model),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }


@ALGORITHMS.register("lora")
class LoRA(Algorithm):
    """Train LoRA adapters on the chosen towers' layers; freeze everything else.

    Args:
        rank: the adapters' rank (4-16 is usual).
        alpha: the update's scale is ``alpha / rank`` (``2 * rank`` is usual).
        dropout: dropout on the adapters' input in training (0.05-0.1 on small data).
        target: towers to adapt: ``image``, ``text`` or both.
        modules: layer names to adapt within those towers (the end of their dotted names).
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target: Sequence[str] = ("image", "text"),
        modules: Sequence[str] = LORA_MODULES,
    ) -> None:
        check_lora_arguments(rank, alpha, dropout, target, modules)
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.target = list(target)
        self.modules = list(modules)

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        counts = apply_lora(state.model, self.rank, self.alpha, self.dropout, self.target, self.modules)
        trainable, total = counts["trainable"], counts["total"]
        log.info(
            "lora: rank %d, alpha %g on %s layers: %s of %s parameters train (%.2f%%); gradients and AdamW state "
            "(2 values each) for %s values instead of the base model's %s",
            self.rank,
            self.alpha,
            ", ".join(f"{n} {tower}" for tower, n in counts["layers"].items() if n),
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / max(total, 1),
            f"{trainable:,}",
            f"{total - trainable:,}",
        )
