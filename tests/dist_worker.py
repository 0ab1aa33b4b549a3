"""Run by the distributed tests under ``torch.distributed.run``: builds a Trainer from the tiny config
with the given overrides and writes what the test compares into OUT (rank 0, unless noted).

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py MODE OUT key=value ...

MODE ``grads``: one optimizer step; saves the loss, its mean over ranks, the (DDP-averaged or FSDP-gathered)
gradients (after clipping, if on) and the norm gradient clipping saw.
MODE ``fit``: trains; saves the final weights and optimizer state (gathered under FSDP), the learning rate, the
EMA weights if any, and the weights it started from.
MODE ``fit@N``: the same, stopped after step N of its duration, as a preempted job stops (its checkpoints as they were).
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cadenza.engine import Callback  # noqa: E402
from cadenza.engine.dist import all_reduce_mean  # noqa: E402
from cadenza.engine.fsdp import full_tensor, full_tensors, model_state_dict, optimizer_state_dict  # noqa: E402
from cadenza.train.config import load_config  # noqa: E402
from cadenza.train.trainer import Trainer  # noqa: E402


class FirstStepGradients(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def before_optimizer_step(self, state, logger) -> None:
        # every rank: FSDP's gradient shards are gathered collectively
        grads = {
            n: full_tensor(p.grad.detach()).clone() for n, p in state.model.named_parameters() if p.grad is not None
        }
        loss_mean = all_reduce_mean(state.loss.detach())
        if state.dist.is_main:
            grad_norm = state.step_metrics.get("grad_norm")  # set by gradient_clipping, which ran before this callback
            saved = {
                "loss": state.loss.detach().clone(),
                "loss_mean": loss_mean,
                "grads": grads,
                "grad_norm": grad_norm,
            }
            torch.save(saved, self.out / "grads.pt")
        state.stop_training = True


class StopAfter(Callback):
    """Ends ``fit`` after step ``n`` (its checkpoint of that step, if due, is still written)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def batch_end(self, state, logger) -> None:
        if state.timestamp.batch >= self.n:
            state.stop_training = True


def note_threads_at_exit(out: Path) -> None:
    """At exit, after the trainer's own exit handlers (registered later, run earlier), write this process's live
    threads to OUT/threads-rank<R>.txt: no gloo thread may be left for the interpreter's teardown."""

    def note() -> None:
        names = [
            (Path("/proc/self/task") / task / "comm").read_text().strip() for task in os.listdir("/proc/self/task")
        ]
        (out / f"threads-rank{os.environ.get('RANK', '0')}.txt").write_text("\n".join(names))

    if Path("/proc/self/task").is_dir():
        atexit.register(note)


def main() -> None:
    mode, out, *overrides = sys.argv[1:]
    out = Path(out)
    note_threads_at_exit(out)
    cfg = load_config(ROOT / "yamls" / "tiny.yaml", overrides)
    mode, _, stop = mode.partition("@")
    callbacks = [FirstStepGradients(out)] if mode == "grads" else [StopAfter(int(stop))] if stop else []
    trainer = Trainer(cfg, callbacks=callbacks)
    initial = None  # a run from scratch: its initialisation
    if mode == "fit":
        initial = {k: v.detach().clone() for k, v in model_state_dict(trainer.state.model).items()}
    state = trainer.fit()
    if mode != "fit" or state.optimizer is None:
        return
    weights = model_state_dict(state.model)  # every rank: FSDP gathers to rank 0
    optimizer = optimizer_state_dict(state.model, state.optimizer)
    ema = [full_tensors(a.ema) for a in state.algorithms if a.name == "ema"]
    if state.dist.is_main:
        torch.save(
            {
                "weights": weights,
                "initial": initial,
                "lr": state.optimizer.param_groups[0]["lr"],
                "batch": state.timestamp.batch,
                "ema": ema[0] if ema else None,
                "optimizer": optimizer,
            },
            out / "fit.pt",
        )


if __name__ == "__main__":
    main()
