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

Measured (2-core Xeon (Sapphire Rapids), shared machine, torch 2.14.1; ``python benchmarks/memory.py --only
baseline,lora,lock_image --name memory_cpu_finetune``): see the README's LoRA section for the table; on the
digits worked example (``yamls/finetune_digits_lora.yaml``), see the README's Fine-tuning section.
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
