"""End-to-end training behaviour on the tiny config: resume, accumulation, events, precision, failures."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from cadenza.engine import Callback, Event, TrainingError
from cadenza.engine.checkpoint import load_checkpoint
from cadenza.train.trainer import Trainer

from .conftest import ROOT, TINY

NO_EVAL = ("data.val=null", "optim.grad_clip_norm=null")


def weights(state) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.model.state_dict().items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class RecordBatches(Callback):
    """Records the token ids of every micro-batch the model is given."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def after_dataloader(self, state, logger):
        self.seen.extend(tokens.clone() for _, tokens in state.batch)


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_with_longer_duration_is_bit_identical(tiny, accum):
    """8 steps in one go == 4 steps, then resumed to 8 (const schedule: the LR does not depend on the length)."""
    common = (*NO_EVAL, "optim.scheduler=const", "optim.warmup=3ba", f"optim.accum_freq={accum}", "data.batch_size=8")
    straight = RecordBatches()
    full = weights(Trainer(tiny(*common, "run.name=full", "run.duration=8ba"), callbacks=[straight]).fit())
    Trainer(tiny(*common, "run.name=split", "run.duration=4ba")).fit()
    resumed_batches = RecordBatches()
    resumed = Trainer(
        tiny(*common, "run.name=split", "run.duration=8ba", "checkpoint.resume=latest"), callbacks=[resumed_batches]
    )
    assert resumed.state.timestamp.batch == 4
    state = resumed.fit()
    assert state.timestamp.batch == 8
    assert_bit_identical(full, weights(state))
    assert all(torch.equal(a, b) for a, b in zip(straight.seen[4 * accum :], resumed_batches.seen, strict=True))


def test_resume_mid_cosine_run_is_bit_identical(tiny):
    """A checkpoint from the middle of a cosine run, resumed with the same config, ends where the run ends."""
    common = (*NO_EVAL, "run.duration=24ba", "data.batch_size=16", "checkpoint.save_interval=5ba", "checkpoint.keep=-1")
    full = Trainer(tiny(*common, "run.name=full"))
    full_state = full.fit()  # crosses an epoch boundary at step 16
    folder = full.run_dir / "checkpoints"
    assert sorted(p.name for p in folder.glob("ep*-ba*.pt")) == [
        "ep0-ba10.pt",
        "ep0-ba15.pt",
        "ep0-ba5.pt",
        "ep1-ba20.pt",
        "ep1-ba24.pt",
    ]
    resumed = Trainer(tiny(*common, "run.name=other", f"checkpoint.resume={folder / 'ep0-ba10.pt'}")).fit()
    assert_bit_identical(weights(full_state), weights(resumed))
    assert resumed.scheduler.last_epoch == full_state.scheduler.last_epoch == 24


def test_accumulation_matches_the_full_batch(tiny):
    """accum_freq=2 at batch B gives the loss and gradients of batch 2B without accumulation."""

    class GradientsAtStep(Callback):
        def before_optimizer_step(self, state, logger):
            self.loss = state.loss.item()
            self.grads = {n: p.grad.clone() for n, p in state.model.named_parameters()}
            state.stop_training = True

    results = []
    for batch_size, accum in ((16, 1), (8, 2)):
        probe = GradientsAtStep()
        Trainer(
            tiny(*NO_EVAL, f"run.name=b{batch_size}", f"data.batch_size={batch_size}", f"optim.accum_freq={accum}"),
            callbacks=[probe],
        ).fit()
        results.append(probe)
    full, accumulated = results
    assert accumulated.loss == pytest.approx(full.loss, rel=1e-6)
    for name, grad in full.grads.items():
        torch.testing.assert_close(accumulated.grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


class RecordEvents(Callback):
    def __init__(self):
        self.events: list[Event] = []

    def run_event(self, event, state, logger):
        self.events.append(event)


def documented_order() -> list[Event]:
    """The events in the order the ``Event`` docstring's pseudocode first names them."""
    names = re.findall(r"\b([A-Z][A-Z_]+[A-Z])\b", Event.__doc__)
    order: list[Event] = []
    for name in names:
        if name in Event.__members__ and Event[name] not in order:
            order.append(Event[name])
    return order


def test_docstring_documents_every_event_in_enum_order():
    assert documented_order() == list(Event)


def test_events_of_a_two_batch_run_follow_the_documented_loop(tiny):
    step = [
        Event.BEFORE_DATALOADER,
        Event.AFTER_DATALOADER,
        Event.BATCH_START,
        Event.BEFORE_FORWARD,
        Event.AFTER_FORWARD,
        Event.BEFORE_LOSS,
        Event.AFTER_LOSS,
        Event.BEFORE_BACKWARD,
        Event.AFTER_BACKWARD,
        Event.BEFORE_OPTIMIZER_STEP,
        Event.AFTER_OPTIMIZER_STEP,
        Event.BATCH_END,
        Event.BATCH_CHECKPOINT,
    ]
    evaluation = [Event.EVAL_START, Event.EVAL_BATCH_START, Event.EVAL_BATCH_END, Event.EVAL_END]
    common = ("data.train.num_samples=32", "data.val.num_samples=16", "eval.interval=2ba", "run.duration=2ba")
    Trainer(tiny(*common, "run.name=first", "run.duration=1ba")).fit()
    recorder = RecordEvents()
    trainer = Trainer(tiny(*common, "run.name=first", "checkpoint.resume=latest"), callbacks=[recorder])
    trainer.fit()
    expected = [Event.INIT, Event.BEFORE_LOAD, Event.AFTER_LOAD, Event.FIT_START, Event.EPOCH_START]
    expected += step + evaluation + [Event.EPOCH_END, Event.EPOCH_CHECKPOINT, Event.FIT_END]
    assert recorder.events == expected

    recorder = RecordEvents()
    Trainer(tiny(*common, "run.name=second"), callbacks=[recorder]).fit()
    expected = [Event.INIT, Event.FIT_START, Event.EPOCH_START] + step + step + evaluation
    expected += [Event.EPOCH_END, Event.EPOCH_CHECKPOINT, Event.FIT_END]
    assert recorder.events == expected
    firsts = list(dict.fromkeys(recorder.events))
    assert firsts == [e for e in documented_order() if e in firsts]


def documented_builds() -> list[list[str]]:
    """The ``State`` fields each ``<build ...>`` line of the ``Event`` docstring names, in order."""
    return [[name.strip() for name in line.split(",")] for line in re.findall(r"<build ([^>]+)>", Event.__doc__)]


def test_components_are_built_in_the_documented_order(tiny):
    """At INIT what the docstring builds before INIT exists and what it builds after does not; at BEFORE_LOAD all do."""
    before_init, after_init = documented_builds()
    seen: dict[Event, dict[str, bool]] = {}

    class RecordBuilt(Callback):
        def run_event(self, event, state, logger):
            if event in (Event.INIT, Event.BEFORE_LOAD):
                seen[event] = {name: bool(getattr(state, name)) for name in before_init + after_init}

    Trainer(tiny(*NO_EVAL, "run.name=built", "run.duration=1ba")).fit()
    config = tiny("run.name=built", "run.duration=2ba", "checkpoint.resume=latest")  # with data.val and clipping
    Trainer(config, callbacks=[RecordBuilt()])
    assert seen[Event.INIT] == {**dict.fromkeys(before_init, True), **dict.fromkeys(after_init, False)}
    assert seen[Event.BEFORE_LOAD] == dict.fromkeys(before_init + after_init, True)


def test_gradient_clipping_logs_the_window_mean_of_the_norm_as_train_grad_norm(tiny):
    norms: list[float] = []

    class RecordNorm(Callback):
        def before_optimizer_step(self, state, logger):  # callbacks run after the algorithms of the same event
            norms.append(state.step_metrics["grad_norm"].item())

    trainer = Trainer(tiny(*NO_EVAL, "optim.grad_clip_norm=1.0", "run.duration=8ba"), callbacks=[RecordNorm()])
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [row["train/grad_norm"] for row in rows if "train/grad_norm" in row]
    assert logged == pytest.approx([sum(norms[:4]) / 4, sum(norms[4:]) / 4], rel=1e-5)


def test_accumulation_fires_forward_twice_per_micro_batch(tiny):
    recorder = RecordEvents()
    Trainer(tiny(*NO_EVAL, "run.duration=1ba", "optim.accum_freq=2", "data.batch_size=8"), callbacks=[recorder]).fit()
    assert recorder.events.count(Event.BEFORE_FORWARD) == 4  # 2 caching passes + 2 passes with gradients
    assert recorder.events.count(Event.BEFORE_LOSS) == 2
    assert recorder.events.count(Event.BEFORE_OPTIMIZER_STEP) == 1


@pytest.mark.parametrize("precision", ["amp", "amp_bf16", "bf16", "fp16"])
def test_precisions_train_on_cpu(tiny, precision):
    state = Trainer(tiny(*NO_EVAL, f"run.precision={precision}", "run.duration=2ba", "optim.warmup=0ba")).fit()
    assert state.timestamp.batch == 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    assert state.model.logit_scale.dtype == dtype
    assert (state.scaler is not None) == (precision == "amp")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, monkeypatch):
    from cadenza.models.losses import ClipLoss

    original = ClipLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = original(self, *args, **kwargs)
        if calls["n"] == 5:
            out["contrastive_loss"] = out["contrastive_loss"] * float("nan")
        return out

    monkeypatch.setattr(ClipLoss, "forward", poisoned)
    trainer = Trainer(tiny(*NO_EVAL, "checkpoint.save_interval=2ba", "checkpoint.keep=-1"))
    # found without a per-step sync: at the next check, the save at step 6, naming step 5
    with pytest.raises(TrainingError, match=r"loss is nan at step 5 and training stopped after step 6 .*ep0-ba4\.pt"):
        trainer.fit()
    folder = trainer.run_dir / "checkpoints"
    assert sorted(p.name for p in folder.glob("ep*-ba*.pt")) == ["ep0-ba2.pt", "ep0-ba4.pt"]
    good = load_checkpoint(folder / "ep0-ba4.pt")
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())
    # no update after the bad loss reached the weights or the optimizer: steps 5 and 6 were skipped on the device
    for name, value in trainer.state.model.state_dict().items():
        torch.testing.assert_close(value, good["state_dict"][name], rtol=0, atol=0, msg=name)
    assert all(s["step"].item() == 4 for s in trainer.state.optimizer.state.values())


def test_metrics_jsonl_uses_openclip_names(tiny):
    trainer = Trainer(tiny("run.log_interval=4ba"))
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [4, 8, 12, 16]
    for name in (
        "train/loss",
        "train/contrastive_loss",
        "train/lr",
        "train/scale",
        "train/samples_per_second",
        "train/data_time",
        "train/batch_time",
    ):
        assert all(name in r for r in train_rows), name
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    val_rows = [r for r in rows if "val/clip_val_loss" in r]
    assert [r["step"] for r in val_rows] == [8, 16]
    assert "val/image_to_text_R@1" in val_rows[0]
    assert "Train Epoch: 0 [256/256 (100%)]" in (trainer.run_dir / "out.log").read_text()


def test_logit_scale_is_clamped_at_100(tiny):
    trainer = Trainer(tiny(*NO_EVAL, "run.duration=1ba"))
    with torch.no_grad():
        trainer.state.model.logit_scale.fill_(10.0)
    state = trainer.fit()
    assert state.model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item())


def test_checkpoint_contents(tiny):
    trainer = Trainer(tiny(*NO_EVAL, "run.duration=2ba"))
    trainer.fit()
    checkpoint = load_checkpoint(trainer.run_dir / "checkpoints" / "epoch_latest.pt")
    for key in (
        "state_dict",
        "optimizer",
        "scheduler",
        "scaler",
        "timestamp",
        "rng",
        "dataloader",
        "algorithms",
        "callbacks",
        "epoch",
        "name",
        "config",
    ):
        assert key in checkpoint
    assert checkpoint["timestamp"]["batch"] == 2 and checkpoint["dataloader"] == {"epoch": 0, "sample_in_epoch": 32}
    assert "tiny-vit" in checkpoint["config"]


def test_cli_trains_the_tiny_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cadenza.train.cli", str(TINY), f"run.logs={tmp_path}", "run.duration=4ba"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    run = tmp_path / "tiny"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "out.log", "metrics.jsonl", "checkpoints"}
    assert (run / "checkpoints" / "ep0-ba4.pt").is_file()


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cadenza.train.cli", str(TINY), "optim.lrr=1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert "optim.lrr" in result.stderr and "Did you mean 'lr'" in result.stderr
    assert not (tmp_path / "tiny").exists()
