"""Text tower locking: freeze the text tower except its last ``unlocked_layers`` groups (OpenCLIP's
``--lock-text``, ``--lock-text-unlocked-layers``, ``--lock-text-freeze-layer-norm``).

Groups follow OpenCLIP: [token and positional embeddings], each block but the last, [last block,
final LayerNorm], [projection]. ``freeze_layer_norm: false`` leaves the LayerNorms of the frozen
groups trainable (OpenCLIP asserts it is true for its own text tower; here both work). Runs once,
on ``INIT``, before the optimizer is built.

**Measured** (time to accuracy, `python benchmarks/time_to_accuracy.py --algorithms --seeds 0 1 2 --budget 30`;
digits, `tiny-vit`, seeds 0, 1, 2, 2 idle CPU cores (Sapphire Rapids), 2026-12-06 21:39-21:50 UTC): Text locking
(`unlocked_layers: 3`) is part of the fastest recipe (`yamls/digits_fast.yaml`: Muon at lr 1.2e-2 with momentum 0.5
and no warmup, an average of the weights with a half-life of 10 steps, the text embeddings frozen, captions cut to 8
tokens); switched off there, 90% zero-shot top-1 after 9.8 s (median; per seed 9.8, 11.4, 8.6), after epochs 2, 2, 1
(with it: 1, 1, 1), against 7.5 s with it (1.31x sooner with it), best top-1 within 30 s 0.9861 without against 0.9749
with it. README's method-card table has every algorithm side by side.
"""

from __future__ import annotations

from torch import nn

from cadenza.engine.algorithm import Algorithm
from cadenza.engine.errors import ConfigError
from cadenza.engine.event import Event
from cadenza.engine.logger import Logger
from cadenza.engine.registry import ALGORITHMS
from cadenza.engine.state import State


def text_tower_groups(text: nn.Module) -> list[list[nn.Module | nn.Parameter]]:
    """The text tower's lockable groups, first to last."""
    blocks = list(text.transformer.resblocks)
    embeddings = [text.token_embedding, text.positional_embedding]
    if getattr(text, "cls_emb", None) is not None:
        embeddings.append(text.cls_emb)  # CoCa's class token, grouped with the embeddings as OpenCLIP does
    return [
        embeddings,
        *[[block] for block in blocks[:-1]],
        [blocks[-1], text.ln_final],
        [text.text_projection],
    ]


def _parameters(group: list[nn.Module | nn.Parameter]) -> list[tuple[bool, nn.Parameter]]:
    """(is a LayerNorm parameter, parameter) for every parameter in the group."""
    found = []
    for item in group:
        if isinstance(item, nn.Parameter):
            found.append((False, item))
            continue
        for module in item.modules():
            is_norm = isinstance(module, nn.LayerNorm)
            found += [(is_norm, p) for p in module.parameters(recurse=False)]
    return found


def lock_text_tower(model: nn.Module, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
    """Freeze ``model.text`` except its last ``unlocked_layers`` groups."""
    groups = text_tower_groups(model.text)
    if unlocked_layers > len(groups):
        raise ConfigError(
            "algorithms.lock_text.unlocked_layers",
            f"the text tower has {len(groups)} groups; {unlocked_layers} cannot be left unlocked.",
        )
    for group in groups[: len(groups) - unlocked_layers]:
        for is_norm, param in _parameters(group):
            param.requires_grad_(is_norm and not freeze_layer_norm)


@ALGORITHMS.register("lock_text")
class LockText(Algorithm):
    """Freeze the text tower except its last groups.

    Args:
        unlocked_layers: groups left trainable, counted from the end (0: the whole tower is frozen).
        freeze_layer_norm: freeze LayerNorms in the frozen groups too (false: they keep training).
    """

    def __init__(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        if unlocked_layers < 0:
            raise ValueError("unlocked_layers must be 0 or more")
        self.unlocked_layers = unlocked_layers
        self.freeze_layer_norm = freeze_layer_norm

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        lock_text_tower(state.model, self.unlocked_layers, self.freeze_layer_norm)
