"""Muon for CLIP towers (``optim.name: muon``): orthogonalised momentum for the weight matrices, AdamW for the rest,
in one optimizer.

Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks"; at scale: Liu et al., 2025,
"Muon is Scalable for LLM Training") keeps an SGD momentum for each weight matrix and replaces the update by its
nearest semi-orthogonal matrix, computed by a few Newton-Schulz iterations, so every direction of the matrix moves
at the same rate. Everything that is not a matrix, and the embedding tables, are stepped by AdamW, as the method
prescribes. The pieces are timm's (``timm.optim.muon``: the Newton-Schulz iteration and its coefficient presets,
the learning-rate scale ``match_rms_adamw`` that lets Muon take AdamW's learning rate and weight decay, and the rule
for which parameters are matrices); the AdamW part is torch's fused kernel. What this class adds:

- **one Newton-Schulz per shape, not per parameter**: the matrices of one shape (a tower's qkv projections, its MLP
  layers, ...) are orthogonalised as one batch, a tall one transposed to join the wide ones of its sides; ``tiny-vit``
  has 19 matrices in 4 such batches.
- **fp32 iterations on a CPU** (``ns_dtype: auto``): bf16 on CUDA, where it runs on tensor cores; on a CPU a small
  bf16 matmul costs about 30 us against 5-11 us in fp32 (64 x 64, one Sapphire Rapids core), so bf16 is slower.
- **the embedding tables in fused AdamW**: timm's fallback steps them with its own unfused AdamW.

On ``tiny-vit`` (one CPU thread, batch 16, Sapphire Rapids) the optimizer step took 53 ms with timm's ``Muon`` and
9.8 ms with this class, against 4.8 ms for fused AdamW (with the text embeddings frozen: 13.7, 5.4 and 0.8 ms).
``tests/test_muon.py`` checks the update by hand.

**Measured** (time to accuracy, `python benchmarks/time_to_accuracy.py --algorithms --seeds 0 1 2 --budget 30`;
digits, `tiny-vit`, seeds 0, 1, 2, 2 idle CPU cores (Sapphire Rapids), 2026-12-06 21:39-21:50 UTC): Muon is part of
the fastest recipe (`yamls/digits_fast.yaml`: Muon at lr 1.2e-2 with momentum 0.5 and no warmup, an average of the
weights with a half-life of 10 steps, the text embeddings frozen, captions cut to 8 tokens); switched off there, 90%
zero-shot top-1 in no seed (median; per seed never, never, never), after epochs never, never, never (with it: 1, 1,
1), against 7.5 s with it (it never reaches 90% without), best top-1 within 30 s 0.1003 without against 0.9749 with
it. README's method-card table has every algorithm side by side.
Switched off, AdamW runs with the recipe's settings: at lr 1.2e-2 without warmup it stays at chance (8-10% after every
epoch); AdamW's own best recipe here is batch 16 at lr 1e-3 with warmup (90% after 3-5 epochs). OpenCLIP's trainer runs
timm's ``Muon`` (``--opt timm/muon``) in the benchmark's best flags and reaches 90% after two epochs.
In the sweep before it (README, "Time to accuracy"; batch 16, lr 1e-3, seeds 0, 1, 2): 90% after two or three
epochs where AdamW took three to five; with timm's ``Muon`` 35.0 s to 90%, with this class 16.3 s, AdamW 20.6 s.

Not supported: ``dist.fsdp`` (the iteration needs whole matrices; each process holds shards) and a ``found_inf``
input (one host check per step, as ``optim.fused: false``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

#: the dtypes ``ns_dtype`` names
NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_matrix(param: torch.Tensor, name: str = "") -> bool:
    """Whether Muon steps ``param``: timm's rule (``_is_suitable_for_muon``: at least two dimensions, neither of the
    first two of size 1, both sides of the matrix, convolutions flattened to ``(out, in * kh * kw)``, at least 4 and
    their ratio at most 128), and not an embedding table (a name with ``embedding``: tokens and positions are looked
    up, not multiplied, so the method gives them to AdamW)."""
    from timm.optim.muon import _is_suitable_for_muon

    return "embedding" not in name and _is_suitable_for_muon(param)


class Muon(torch.optim.Optimizer):
    """Muon for the matrices (see :func:`is_matrix`), fused AdamW for the other parameters, per parameter group.

    Args:
        params: parameters, or groups (``lr``, ``weight_decay`` per group, as every optimizer of the trainer).
        lr: AdamW's learning rate; a matrix's Muon step is scaled by ``adjust_lr_fn`` from it.
        weight_decay: decoupled weight decay, for both kinds of parameter.
        betas, eps: AdamW's, for the parameters that are not matrices.
        momentum: Muon's momentum. ``nesterov``: Nesterov's form of it (the method's default).
        ns_steps: Newton-Schulz iterations. ``ns_coefficients``: one of timm's presets (``quintic``, ``original``,
            ``polar_express``, ``polar_express_safer``) or a list of ``[a, b, c]``.
        adjust_lr_fn: ``match_rms_adamw`` (Liu et al.: 0.2 sqrt(max(out, in)), so AdamW's learning rate and weight
            decay carry over), ``original`` or ``rms_to_rms`` (timm's ``get_lr_scale``).
        ns_dtype: ``auto`` (bf16 on CUDA, fp32 elsewhere), ``float32`` or ``bfloat16``.

    Give ``params`` as named parameters (``(name, parameter)`` pairs, torch's ``param_names``) so that the embedding
    tables are told by name; unnamed, a parameter is a matrix by its shape alone.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: str | list = "quintic",
        adjust_lr_fn: str = "match_rms_adamw",
        ns_dtype: str = "auto",
    ) -> None:
        from timm.optim.muon import _COEFFICIENTS, resolve_ns_coefficients

        if ns_dtype not in ("auto", *NS_DTYPES):
            raise ValueError(f"ns_dtype must be auto, float32 or bfloat16, got {ns_dtype!r}")
        if adjust_lr_fn not in ("match_rms_adamw", "original", "rms_to_rms"):
            raise ValueError(f"adjust_lr_fn must be match_rms_adamw, original or rms_to_rms, got {adjust_lr_fn!r}")
        if not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"momentum must be in [0, 1) and ns_steps at least 1, got {momentum} and {ns_steps}")
        coefficients = resolve_ns_coefficients(ns_coefficients, _COEFFICIENTS)
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, momentum=momentum)
        defaults.update(nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        self._coefficients = coefficients
        self._matrix: dict[int, bool] = {}
        for group in self.param_groups:
            names = group.get("param_names") or [""] * len(group["params"])
            self._matrix.update({id(p): is_matrix(p, name) for name, p in zip(names, group["params"], strict=True)})

    def _is_matrix(self, param: torch.Tensor) -> bool:
        known = self._matrix.get(id(param))
        return is_matrix(param) if known is None else known  # a group added later: by its shape

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            matrices = [p for p in with_grad if self._is_matrix(p)]
            others = [p for p in with_grad if not self._is_matrix(p)]
            if matrices:
                self._muon(group, matrices)
            if others:
                self._adamw(group, others)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        from timm.optim.muon import get_lr_scale, zeropower_via_newtonschulz

        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        momentum = group["momentum"]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
        # one batch per (short side, long side): a tall matrix joins the wide ones of its shape transposed (the
        # iteration runs on the wide form either way), so (192, 64) qkv and (64, 192) patch projections go together
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            rows, cols = p.shape[0], math.prod(p.shape[1:])
            by_shape[(p.device, min(rows, cols), max(rows, cols))].append(i)
        lr, decay = group["lr"], group["weight_decay"]
        for (device, short, _), indices in by_shape.items():
            dtype = group["ns_dtype"]
            dtype = NS_DTYPES[dtype] if dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
            flat = [updates[i].reshape(params[i].shape[0], -1) for i in indices]
            batch = torch.stack([u if u.shape[0] == short else u.mT for u in flat])
            ortho = zeropower_via_newtonschulz(batch, group["ns_steps"], self._coefficients, dtype=dtype)
            for row, (i, u) in enumerate(zip(indices, flat, strict=True)):
                p = params[i]
                update = ortho[row] if u.shape[0] == short else ortho[row].mT
                if decay:
                    p.mul_(1 - lr * decay)
                scale = get_lr_scale(u.shape, group["adjust_lr_fn"])  # by (out, in): rms_to_rms is not symmetric
                p.add_(update.reshape(p.shape).to(p.dtype), alpha=-lr * scale)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        from torch.optim.adamw import adamw

        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None if fused else True,
            fused=fused or None,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


__all__ = ["Muon", "is_matrix"]
