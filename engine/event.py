"""The points of the training loop where algorithms and callbacks run."""

from __future__ import annotations

from enum import Enum


class Event(str, Enum):
    """An event fired by the trainer. The loop, with every event where it fires::

        # Trainer.__init__
        <build model, train_loader, eval_loader, loss_fn, algorithms, callbacks>
        INIT                                  # algorithms change the model (and loss) before it is wrapped
        <build optimizer, scheduler>          # the optimizer collects what INIT left trainable
        BEFORE_LOAD                           # when resuming:
        <load checkpoint>
        AFTER_LOAD

        # Trainer.fit
        FIT_START
        while not done:
            EPOCH_START
            while epoch not finished and not done:
                BEFORE_DATALOADER
                micro_batches = next(loader) x accum_freq
                AFTER_DATALOADER
                BATCH_START
                for micro_batch in micro_batches:      # twice per micro-batch when accum_freq > 1:
                    BEFORE_FORWARD                     #   once without grad to cache features,
                    outputs = model(images, texts)     #   once with grad for the loss
                    AFTER_FORWARD
                    BEFORE_LOSS
                    loss = loss_fn(outputs)            # (skipped in the caching pass)
                    AFTER_LOSS
                    BEFORE_BACKWARD
                    loss.backward()
                    AFTER_BACKWARD
                BEFORE_OPTIMIZER_STEP                  # gradients are complete (unscaled)
                optimizer.step(); scheduler.step()
                AFTER_OPTIMIZER_STEP
                BATCH_END
                BATCH_CHECKPOINT
                if evaluation is due:
                    EVAL_START
                    for batch in eval_loader:
                        EVAL_BATCH_START
                        outputs = model(batch)
                        EVAL_BATCH_END
                    EVAL_END
            EPOCH_END
            EPOCH_CHECKPOINT
        FIT_END

    ``BEFORE_X`` / ``AFTER_X`` and ``X_START`` / ``X_END`` come in pairs; the engine runs algorithms
    on an ``AFTER_X`` / ``X_END`` event in the reverse of their order on the matching opening event.
    """

    INIT = "init"
    BEFORE_LOAD = "before_load"
    AFTER_LOAD = "after_load"
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BEFORE_DATALOADER = "before_dataloader"
    AFTER_DATALOADER = "after_dataloader"
    BATCH_START = "batch_start"
    BEFORE_FORWARD = "before_forward"
    AFTER_FORWARD = "after_forward"
    BEFORE_LOSS = "before_loss"
    AFTER_LOSS = "after_loss"
    BEFORE_BACKWARD = "before_backward"
    AFTER_BACKWARD = "after_backward"
    BEFORE_OPTIMIZER_STEP = "before_optimizer_step"
    AFTER_OPTIMIZER_STEP = "after_optimizer_step"
    BATCH_END = "batch_end"
    BATCH_CHECKPOINT = "batch_checkpoint"
    EVAL_START = "eval_start"
    EVAL_BATCH_START = "eval_batch_start"
    EVAL_BATCH_END = "eval_batch_end"
    EVAL_END = "eval_end"
    EPOCH_END = "epoch_end"
    EPOCH_CHECKPOINT = "epoch_checkpoint"
    FIT_END = "fit_end"

    @property
    def is_after(self) -> bool:
        """True for the closing half of a pair (``AFTER_X`` or ``X_END``), whose order is reversed."""
        return self.value.startswith("after_") or self.value.endswith("_end")

    @property
    def is_eval(self) -> bool:
        return self.value.startswith("eval_")
