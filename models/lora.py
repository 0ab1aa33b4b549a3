"""LoRA adapters on the towers, through Hugging Face ``peft`` (its ``LoraModel`` injects them in place).

Each targeted layer (an ``nn.Linear`` of a tower block, by default) becomes peft's ``lora.Linear``: the frozen
``base_layer`` plus ``lora_A`` (rank x in) and ``lora_B`` (out x rank, zero at the start), so the adapted model equals
the base model until training moves ``lora_B``; its output is ``base(x) + (alpha / rank) * B(A(dropout(x)))``. peft
freezes every other parameter of the model. Parameter names gain ``.base_layer`` and ``.lora_A.default`` /
``.lora_B.default``; a training checkpoint holds them all (exact resume).

- :func:`add_lora` adapts a model (``algorithms.lora`` calls it on ``INIT``; ``composer export`` calls it to read a
  LoRA run's checkpoint);
- ``LoraModel.merge_and_unload`` (peft's) folds the adapters into the base weights: plain weights with the original
  names, what ``composer export --format openclip`` writes;
- :func:`lora_state_dict` / :func:`save_lora_adapter` / :func:`load_lora_adapter`: the adapters alone, in peft's
  format (``adapter_model.safetensors`` + ``adapter_config.json``), what ``composer export --format lora`` writes.

peft imports transformers (seconds of start-up), so it is imported only when LoRA is used.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cadenza.engine.errors import ConfigError, suggest
from cadenza.models.clip import TOWERS

log = logging.getLogger("cadenza")

#: the layers adapted by default: attention and MLP projections of the towers' blocks (timm ViT: ``attn.qkv``,
#: ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``; the text tower: ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj``, its fused
#: ``attn.in_proj_weight`` being a bare parameter, not a layer)
LORA_MODULES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
#: the adapter's name inside peft's layers (``lora_A.default.weight``)
ADAPTER = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: what a Cadenza adapter folder records beside peft's config, to rebuild its base model
BASE_INFO = "cadenza_base.json"


def target_regex(target: Sequence[str], modules: Sequence[str]) -> str:
    """peft's ``target_modules`` as one regular expression (peft matches it against the full module name).

    Example:
        >>> target_regex(["image"], ["attn.qkv"])
        '^(?:visual)\\\\.(?:.*\\\\.)?(?:attn\\\\.qkv)$'
    """
    towers = "|".join(TOWERS[t] for t in target)
    layers = "|".join(re.escape(m) for m in modules)
    return rf"^(?:{towers})\.(?:.*\.)?(?:{layers})$"


def check_lora_arguments(
    rank: int, alpha: float, dropout: float, target: Sequence[str], modules: Sequence[str]
) -> None:
    """Raise ``ValueError`` for arguments LoRA cannot take (the registry names the YAML key)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a whole number, 1 or more, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be greater than 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
    if isinstance(target, str) or not target:
        raise ValueError(f"target must be a list of towers ({', '.join(TOWERS)}), got {target!r}")
    for tower in target:
        if tower not in TOWERS:
            raise ValueError(f"target names towers: '{tower}' is not one.{suggest(str(tower), TOWERS)}")
    if isinstance(modules, str) or not modules or not all(isinstance(m, str) and m for m in modules):
        raise ValueError(f"modules must be a list of layer names such as ['attn.qkv', 'mlp.fc1'], got {modules!r}")


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target: Sequence[str] = ("image", "text"),
    modules: Sequence[str] = LORA_MODULES,
    key: str = "algorithms.lora",
) -> Any:
    """Inject LoRA adapters into ``model`` in place and freeze every other parameter (peft's ``LoraModel``).

    Args:
        model: a CLIP (or CoCa) model.
        rank: the adapters' rank ``r``.
        alpha: the scale numerator: the update is ``alpha / rank * B A``.
        dropout: dropout on the adapters' input, in training.
        target: the towers to adapt (``image``, ``text``).
        modules: layer names (the end of a module's dotted name, e.g. ``attn.qkv`` or ``qkv``) to adapt within the
            targeted towers.
        key: the config key errors name.

    Returns:
        peft's ``LoraModel`` (``.model`` is ``model`` itself); its ``merge_and_unload()`` folds the adapters in.

    Raises:
        ConfigError: a ``modules`` entry names no layer of the targeted towers, or one peft cannot adapt.
    """
    check_lora_arguments(rank, alpha, dropout, target, modules)
    names = [name for name, _ in model.named_modules()]
    towers = [TOWERS[t] for t in target]
    for entry in modules:
        if not any(re.match(target_regex(target, [entry]), name) for name in names):
            layers = [
                n
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear | nn.Conv2d) and n.split(".")[0] in towers
            ]
            candidates = sorted({".".join(n.split(".")[-2:]) for n in layers})
            raise ConfigError(
                f"{key}.modules",
                f"'{entry}' names no layer of the {' and '.join(target)} tower.{suggest(entry, candidates)}",
            )
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex(target, modules), bias="none"
    )
    try:
        tuner = LoraModel(model, config, ADAPTER)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{key}.modules", f"peft cannot adapt these layers: {error}") from None
    return tuner


def lora_layers(model: nn.Module) -> dict[str, int]:
    """How many layers of each tower carry LoRA adapters (``{"image": 4, "text": 6}``)."""
    counts = {}
    for tower, attribute in TOWERS.items():
        counts[tower] = sum(
            1
            for name, module in model.named_modules()
            if name.startswith(f"{attribute}.") and hasattr(module, "lora_A")
        )
    return counts


def is_lora_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a model state dict holds LoRA adapters (peft's names)."""
    return any(".lora_A." in key for key in state_dict)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone, under peft's names without the adapter name (``...qkv.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def save_lora_adapter(tuner: Any, out: str | Path, base: dict[str, Any]) -> Path:
    """Write ``tuner``'s adapters as peft does (``adapter_model.safetensors``, ``adapter_config.json``) plus
    ``cadenza_base.json`` (``base``: the model name, overrides and pretrained weights the adapters apply to)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in lora_state_dict(tuner.model).items()}
    save_file(weights, str(out / ADAPTER_WEIGHTS))
    tuner.peft_config[ADAPTER].save_pretrained(str(out))
    (out / BASE_INFO).write_text(json.dumps(base, indent=2) + "\n")
    return out


def load_lora_adapter(model: nn.Module, folder: str | Path) -> Any:
    """Adapt ``model`` (the base the adapters were trained on) with the adapters saved in ``folder``.

    Returns:
        peft's ``LoraModel`` over ``model``.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    tuner = LoraModel(model, LoraConfig.from_pretrained(str(folder)), ADAPTER)
    result = set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS)), adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ConfigError(
            "lora",
            f"'{folder}' does not fit this model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}",
        )
    return tuner
