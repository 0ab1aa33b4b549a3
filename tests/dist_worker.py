"""Run by the distributed tests under ``torch.distributed.run``: builds a Trainer from the tiny config
with the given overrides and writes what the test compares into OUT (rank 0, unless noted).

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py MODE OUT key=value ...

MODE ``grads``: one optimizer step; saves the loss and the (DDP-averaged) gradients.
MODE ``fit``: trains; saves the final weights and the learning rate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cadenza.engine import Callback  # noqa: E402
from cadenza.engine.config import load_config  # noqa: E402
from cadenza.engine.trainer import Trainer  # noqa: E402


class FirstStepGradients(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def before_optimizer_step(self, state, logger) -> None:
        if state.dist.is_main:
            grads = {n: p.grad.detach().clone() for n, p in state.model.named_parameters() if p.grad is not None}
            torch.save({"loss": state.loss.detach().clone(), "grads": grads}, self.out / "grads.pt")
        state.stop_training = True


def main() -> None:
    mode, out, *overrides = sys.argv[1:]
    out = Path(out)
    cfg = load_config(ROOT / "yamls" / "tiny.yaml", overrides)
    callbacks = [FirstStepGradients(out)] if mode == "grads" else []
    trainer = Trainer(cfg, callbacks=callbacks)
    state = trainer.fit()
    if mode == "fit" and state.dist.is_main and state.optimizer is not None:
        torch.save(
            {
                "weights": state.model.state_dict(),
                "lr": state.optimizer.param_groups[0]["lr"],
                "batch": state.timestamp.batch,
            },
            out / "fit.pt",
        )


if __name__ == "__main__":
    main()
