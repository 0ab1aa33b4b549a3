"""WiSE-FT: weight-space ensembles of a zero-shot and a fine-tuned model (Wortsman et al. 2022, "Robust fine-tuning
of zero-shot models", https://arxiv.org/abs/2109.01903).

Fine-tuning a CLIP model on a target distribution raises its accuracy there and often lowers it under distribution
shift; the linear interpolation ``(1 - alpha) * zero_shot + alpha * fine_tuned`` of the two models' weights (same
architecture, fine-tuned from the zero-shot one) recovers much of the robustness at little cost on the target, for
no extra inference cost. ``alpha = 0`` is the zero-shot model, ``alpha = 1`` the fine-tuned one; the paper's default
is 0.5. ``composer export --wise-ft ALPHA`` writes one such model, ``composer eval --wise-ft 0,0.25,...`` scores a
list of them.
"""

from __future__ import annotations

import math

import torch

from cadenza.engine.errors import CadenzaError

StateDict = dict[str, torch.Tensor]


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in [0, 1] (0: the zero-shot weights, 1: the fine-tuned ones), else ``ValueError``."""
    alpha = float(alpha)
    if not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise ValueError(f"WiSE-FT's alpha lies in [0, 1] (0: the zero-shot model, 1: the fine-tuned one), got {alpha}")
    return alpha


@torch.no_grad()
def interpolate_weights(zero_shot: StateDict, fine_tuned: StateDict, alpha: float) -> StateDict:
    """``(1 - alpha) * zero_shot + alpha * fine_tuned`` for every floating tensor (``torch.lerp``: exactly
    ``zero_shot`` at 0 and exactly ``fine_tuned`` at 1); other tensors (BatchNorm's step counts) are the fine-tuned
    model's.

    Example:
        >>> a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([1.0, 4.0])}
        >>> interpolate_weights(a, b, 0.25)["w"].tolist()
        [0.25, 2.5]

    Raises:
        CadenzaError: the two do not hold the same tensors (not one architecture).
    """
    alpha = check_alpha(alpha)
    missing, unexpected = sorted(fine_tuned.keys() - zero_shot.keys()), sorted(zero_shot.keys() - fine_tuned.keys())
    reshaped = [k for k in fine_tuned if k in zero_shot and zero_shot[k].shape != fine_tuned[k].shape]
    if missing or unexpected or reshaped:
        raise CadenzaError(
            "WiSE-FT interpolates two models of one architecture: the zero-shot weights lack "
            f"{missing[:3]}, have {unexpected[:3]} besides, and differ in shape at {reshaped[:3]}"
        )
    out = {}
    for key, tuned in fine_tuned.items():
        base = zero_shot[key].to(device=tuned.device)
        if tuned.is_floating_point():
            out[key] = torch.lerp(base.to(torch.float32), tuned.to(torch.float32), alpha).to(tuned.dtype)
        else:
            out[key] = tuned.clone()
    return out
