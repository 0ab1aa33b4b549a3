"""The optimizer table: ``optim`` settings per optimizer that the generic resume test runs over.

``adamw`` is torch's (Cadenza's default), ``muon`` Cadenza's own; the others are timm's (``optim.name``), with the
arguments a run would give them. A one-off sweep over timm 1.0.31's whole registry on this table's setup resumed
every optimizer exactly, except ``adahessian`` (second order: refused by the config) and the ``kron`` family (not
run: its preconditioners took over 13 GB on tiny-vit).
"""

from __future__ import annotations

OPTIMIZER_SETTINGS: dict[str, dict] = {
    "adamw": {"fused": False},  # the foreach path; fused is the default (tests/test_trainer.py resumes it)
    "lamb": {},
    "lion": {"betas": [0.9, 0.99]},
    "adafactor": {},
    "nadamw": {},
    "sgd": {"args": {"momentum": 0.9, "nesterov": True}},
    "adan": {"betas": [0.98, 0.92, 0.99]},
    "muon": {},  # Cadenza's (cadenza.engine.muon): Newton-Schulz by shape with timm's pieces, fused AdamW for the rest
}
