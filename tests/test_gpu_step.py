"""The step a GPU needs, tested on the CPU: no host sync in steady-state steps, non-finite losses and gradients
skipped on the device and reported at the next check, the profiler and memory-monitor callbacks."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch

from cadenza.engine import Callback, TrainingError
from cadenza.engine.profiling import HostSyncCounter
from cadenza.train.trainer import Trainer

from .conftest import ROOT

NO_EVAL = ("data.val=null", "optim.warmup=0ba")


class SyncsPerStep(Callback):
    """Host syncs counted from the batch's arrival on the device to the end of its step (the data loader, which
    works on host tensors by design, is outside), per step."""

    def __init__(self, counter: HostSyncCounter) -> None:
        self.counter = counter
        self.steps: dict[int, Counter] = {}

    def after_dataloader(self, state, logger):
        self._before = Counter(self.counter.calls)

    def batch_end(self, state, logger):  # user callbacks run last: after the metrics of a logging window
        self.steps[state.timestamp.batch] = Counter(self.counter.calls) - self._before


@pytest.mark.parametrize(
    "setting",
    [
        # fused AdamW, gradient clipping, EMA, accumulation (its caching pass) and the metrics of every step
        ("optim.grad_clip_norm=1.0", "algorithms.ema={decay: 0.9}", "optim.accum_freq=2", "data.batch_size=8"),
        ("run.precision=amp",),  # GradScaler: unscale, inf checks and the scale update stay on the device
    ],
    ids=["fp32-clip-ema-accum", "amp"],
)
def test_steady_state_steps_make_no_host_sync(tiny, setting):
    # logging windows (every 100 steps, and the last), saves and evaluation are the checks; steps 2-4 are steady
    overrides = (*NO_EVAL, "run.duration=5ba", "run.log_interval=100ba", "checkpoint.save_interval=100ba", *setting)
    counter = HostSyncCounter()
    recorder = SyncsPerStep(counter)
    trainer = Trainer(tiny(*overrides), callbacks=[recorder])
    with counter:
        trainer.fit()
    assert {step: dict(calls) for step, calls in recorder.steps.items() if 2 <= step <= 4} == {2: {}, 3: {}, 4: {}}
    assert recorder.steps[5]  # the last step is a logging window: its check and metrics do sync (the counter works)


class Poison(Callback):
    """Makes the loss or one gradient non-finite at ``step``, and keeps the weights as they were after step 1."""

    def __init__(self, what: str, step: int) -> None:
        self.what, self.step = what, step
        self.after_step_1: dict[str, torch.Tensor] = {}

    def after_loss(self, state, logger):
        if self.what == "loss" and state.timestamp.batch + 1 == self.step:
            state.loss = state.loss * float("nan")

    def before_optimizer_step(self, state, logger):  # after clipping: the NaN reaches the optimizer
        if self.what == "gradients" and state.timestamp.batch + 1 == self.step:
            next(state.model.parameters()).grad.view(-1)[0] = float("nan")

    def batch_end(self, state, logger):
        if state.timestamp.batch == 1:
            self.after_step_1 = {k: v.detach().clone() for k, v in state.model.state_dict().items()}


@pytest.mark.parametrize(
    ("setting", "what", "message"),
    [
        # amp: the non-finite loss joins the GradScaler's findings, which skip the step on the device; the logging
        # window at step 3 is the first check
        (("run.precision=amp",), "loss", r"the loss is nan at step 2 and training stopped after step 3 "),
        # bf16 weights: gradients are watched each step, on the device
        (("run.precision=bf16",), "gradients", r"gradients are not finite at step 2 .* stopped after step 3 "),
        # an optimizer without found_inf: checked on the host before each update
        (("optim.fused=false",), "loss", r"the loss is nan at step 2 and training stopped after step 1 "),
        # fp32 and a finite loss: the gradient reaches the weights, and the check before the save at step 2 finds it
        (
            ("checkpoint.save_interval=2ba",),
            "gradients",
            r"weights are not finite .* and training stopped after step 2 ",
        ),
    ],
    ids=["amp-loss", "bf16-gradients", "unfused-loss", "fp32-gradients-before-a-save"],
)
def test_non_finite_values_never_reach_the_weights_or_a_checkpoint(tiny, setting, what, message):
    overrides = ("optim.grad_clip_norm=null", "run.duration=4ba", "run.log_interval=3ba")
    poison = Poison(what, step=2)
    trainer = Trainer(tiny(*NO_EVAL, *overrides, "checkpoint.save_interval=100ba", *setting), callbacks=[poison])
    with pytest.raises(TrainingError, match=message):
        trainer.fit()
    assert not list((trainer.run_dir / "checkpoints").glob("ep*-ba*.pt"))
    if what == "gradients" and "run.precision=bf16" not in setting:
        return  # fp32 does not watch gradients every step: the save's check stopped them reaching a checkpoint
    for name, value in trainer.state.model.state_dict().items():  # steps 2 and after were skipped
        torch.testing.assert_close(value, poison.after_step_1[name], rtol=0, atol=0, msg=name)


def test_profiler_and_memory_monitor_write_what_they_promise(tiny):
    callbacks = ("+callbacks.profiler={wait: 1, warmup: 1, active: 2, top: 5}", "+callbacks.memory_monitor={}")
    trainer = Trainer(tiny(*NO_EVAL, "run.duration=6ba", "run.log_interval=3ba", *callbacks))
    trainer.fit()
    profiler = trainer.run_dir / "profiler"
    trace = json.loads((profiler / "rank0.step4.pt.trace.json").read_text())  # steps 3-4 traced (1 wait, 1 warmup)
    assert len([e for e in trace["traceEvents"] if str(e.get("name")).startswith("ProfilerStep#")]) == 2
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    (summary,) = json.loads((profiler / "summary_rank0.json").read_text())
    assert summary["steps"] == 2 and summary["step_ms"] > 0 and summary["device_busy"] is None  # no GPU here
    assert len(summary["top"]) == 5 and sum(op["share"] for op in summary["top"]) <= 1
    log = (trainer.run_dir / "out.log").read_text()
    assert "profiler: 2 steps to step 4 traced" in log and "Self CPU" in log  # torch's table of the top ops
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    memory = [row for row in rows if "memory/rss_gib" in row]
    assert [row["step"] for row in memory] == [3, 6]
    assert all(0 < row["memory/rss_gib"] <= row["memory/peak_rss_gib"] for row in memory)


def test_profiler_settings_are_checked_when_the_config_loads(tiny):
    from cadenza.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="callbacks.profiler.activ"):
        tiny("+callbacks.profiler={activ: 3}")
    with pytest.raises(ConfigError, match="callbacks.memory_monitor.log_every"):  # given by the trainer, not YAML
        tiny("+callbacks.memory_monitor={log_every: 3}")
    with pytest.raises(ConfigError, match="active and top at least 1"):
        Trainer(tiny("+callbacks.profiler={active: 0}"))


def test_gpu_check_runs_every_part_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.py in its CPU mode: every part runs (those needing CUDA say what they did instead), the
    table and JSON name the machine, and Cadenza's steady-state step makes no host sync there either."""
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--model", "tiny-vit"]
    command += ["--quick", "--budget", "7200", "--out", str(tmp_path)]  # a budget no loaded machine reaches
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["machine"]["cpu"] and "gpu" not in record["machine"]
    rows = {}
    for row in record["rows"]:
        rows.setdefault(row["part"], []).append(row)
    assert set(rows) == {"user_yaml", "side_by_side", "profile", "ddp", "fsdp", "resume", "streaming"}
    for part, part_rows in rows.items():  # every row has a number or says why it has none
        for row in part_rows:
            assert row["samples_per_second"] != "" or row["result"], (part, row)
            assert not str(row["result"]).startswith(("failed", "timeout")), (part, row)
    assert rows["user_yaml"][0]["samples_per_second"] > 0 and rows["user_yaml"][0]["peak_gib"] > 0
    assert rows["user_yaml"][1]["result"].startswith("skipped: --quick")
    assert "x OpenCLIP" in rows["side_by_side"][0]["result"]
    cadenza_profile = record["details"]["profile"][0]
    assert cadenza_profile["syncs_per_step"] == [0, 0] and cadenza_profile["summary"]["steps"] == 2
    assert "NCCL needs CUDA" in rows["ddp"][0]["result"] and "loss equal" in rows["ddp"][0]["result"]
    assert rows["resume"][0]["result"].startswith("bit-identical weights")
    assert rows["streaming"][0]["samples_per_second"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert record["machine"]["cpu"] in table and "| profile | Cadenza's training step" in table


def test_fast_cpu_paths_keep_the_function():
    """The patch embedding as a matmul and matmul attention on a CPU (models/vision.py, models/text.py) compute what
    the convolution and fused SDPA compute: exactly in fp32, within bf16 rounding under amp_bf16, gradients too."""
    from cadenza.engine.registry import LOSSES
    from cadenza.models import create_model
    from cadenza.models.vision import PatchifyConv2d

    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    patchify = PatchifyConv2d(3, 8, 4, stride=4)
    patchify.load_state_dict(conv.state_dict())
    images = torch.randn(2, 3, 16, 12)
    torch.testing.assert_close(patchify(images), conv(images), rtol=1e-5, atol=1e-5)

    def loss_and_grads(model, fast: bool, precision: torch.dtype | None):
        model.zero_grad(set_to_none=True)
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = not fast
            if hasattr(module, "matmul_attention"):
                module.matmul_attention = fast
        torch.manual_seed(0)
        images = torch.randn(8, 3, model.image_size, model.image_size)
        tokens = torch.randint(1, model.vocab_size, (8, model.context_length))
        with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
            loss = sum(LOSSES.build("clip", {}, "loss")(**model(images, tokens)).values())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    model = create_model("tiny-vit")
    assert isinstance(model.visual.trunk.patch_embed.proj, PatchifyConv2d)
    assert model.text.transformer.resblocks[0].attn.matmul_attention  # chosen for the CPU
    exact_loss, exact = loss_and_grads(model, fast=False, precision=None)
    fast_loss, fast = loss_and_grads(model, fast=True, precision=None)
    torch.testing.assert_close(fast_loss, exact_loss, rtol=1e-5, atol=1e-6)
    for name, grad in exact.items():  # fp32 rounding of a different summation order, relative to the largest value
        assert (fast[name] - grad).abs().max() <= 1e-5 * grad.abs().max().clamp_min(1e-6), name

    def errors(loss, grads):  # against fp32: the loss's, and the worst parameter's gradient (relative norms)
        worst = max(((grads[n].float() - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in exact.items())
        return abs(loss.item() - exact_loss.item()) / abs(exact_loss.item()), worst

    # amp_bf16: both paths round; the fast one's distance from fp32 is of bf16's size, like the fused one's
    fused_error = errors(*loss_and_grads(model, fast=False, precision=torch.bfloat16))
    fast_error = errors(*loss_and_grads(model, fast=True, precision=torch.bfloat16))
    assert fast_error[0] <= 2 * fused_error[0] + 1e-3, (fast_error, fused_error)
    assert fast_error[1] <= 2 * fused_error[1] + 1e-2, (fast_error, fused_error)
    assert fused_error[1] < 0.1  # the comparison is between small numbers
