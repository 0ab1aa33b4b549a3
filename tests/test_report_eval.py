"""`composer report` (plots from metrics.jsonl) and `composer eval` (evaluation without training)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cadenza.train.report import read_series, write_report
from cadenza.train.trainer import Trainer

from .conftest import ROOT, TINY


def test_report_writes_plots_of_the_logged_series(tiny):
    trainer = Trainer(tiny("run.log_interval=2ba"))
    trainer.fit()
    result = subprocess.run(
        [sys.executable, "-m", "cadenza.train.cli", "report", str(trainer.run_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = trainer.run_dir / "report"
    for name in ("losses", "learning_rate", "logit_scale", "throughput", "eval"):
        image = Image.open(report / f"{name}.png")
        image.verify()
        pixels = np.asarray(Image.open(report / f"{name}.png").convert("L"))
        assert pixels.std() > 5, f"{name}.png is blank"
    summary = (report / "summary.md").read_text()
    series = read_series(trainer.run_dir / "metrics.jsonl")
    assert [step for step, _ in series["train/loss"]] == [2, 4, 6, 8, 10, 12, 14, 16]
    last_loss = series["train/loss"][-1][1]
    assert f"| `train/loss` | {last_loss:.6g} |" in summary and "![Evaluation](eval.png)" in summary
    assert "model:" in summary  # the config


def test_report_on_a_folder_without_metrics_fails_clearly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cadenza.train.cli", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2 and "metrics.jsonl does not exist" in result.stderr


def test_eval_only_from_a_checkpoint(tiny, tmp_path):
    trainer = Trainer(tiny("run.duration=4ba"))
    state = trainer.fit()
    checkpoint = trainer.run_dir / "checkpoints" / "ep0-ba4.pt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cadenza.train.cli",
            "eval",
            str(TINY),
            f"run.logs={tmp_path / 'eval'}",
            f"checkpoint.resume={checkpoint}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    printed = dict(line.split(": ") for line in result.stdout.strip().splitlines())
    assert float(printed["val/clip_val_loss"]) == float(f"{state.eval_metrics['val/clip_val_loss']:.6g}")
    assert not (tmp_path / "eval" / "tiny" / "checkpoints").exists()  # nothing trained, nothing saved
    write_report(tmp_path / "eval" / "tiny")  # an eval-only run folder reports too


def test_flops_per_sample_counts_model_flops():
    from cadenza.engine.mfu import flops_per_sample
    from cadenza.models import create_model

    model = create_model("tiny-vit")
    plain = flops_per_sample(model)
    # the text tower's matmuls alone, by hand: 2 layers x (qkv 3D^2 + out D^2 + mlp 8D^2) x L tokens x 2 FLOPs,
    # times 3 for forward + backward (input and weight gradients)
    width, tokens = 64, model.context_length
    text_linear = 2 * (12 * width * width) * tokens * 2 * 3
    assert plain > text_linear
    model.set_grad_checkpointing(True)
    assert flops_per_sample(model) == plain  # recomputation is not model FLOPs
    assert model.text.transformer.grad_checkpointing  # and the setting is restored


def test_flops_per_sample_of_coca_counts_its_decoder():
    import torch

    from cadenza.engine.mfu import flops_per_sample
    from cadenza.models import create_model

    model = create_model("tiny-coca").to(torch.bfloat16)  # run.precision=bf16 casts the weights
    # the caption head alone: (L - 1) positions x width x vocabulary x 2 FLOPs, forward + backward
    head = (model.context_length - 1) * 32 * model.vocab_size * 2 * 3
    assert flops_per_sample(model, "bf16") > head


def _metric_rows(trainer) -> list[dict]:
    import json

    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train/mfu" in row]


def test_mfu_is_counted_flops_times_throughput_over_the_peak(tiny):
    from cadenza.engine.mfu import flops_per_sample
    from cadenza.models import create_model
    from cadenza.train.trainer import Trainer

    trainer = Trainer(tiny("data.val=null", "run.duration=4ba", "run.log_interval=2ba", "run.peak_tflops=0.5"))
    trainer.fit()
    per_sample = flops_per_sample(create_model("tiny-vit"))
    rows = _metric_rows(trainer)
    assert len(rows) == 2
    for row in rows:
        assert row["train/mfu"] == pytest.approx(per_sample * row["train/samples_per_second"] / 0.5e12, rel=1e-6)


@pytest.mark.parametrize("flops_per_second, size", [(1000e9, 2048), (150e9, 1024), (8e9, 512), (0.3e9, 256)])
def test_the_cpu_peak_is_measured_on_a_smaller_matmul_where_matmuls_are_slow(monkeypatch, flops_per_second, size):
    """On a CPU the first power of two from 256 whose matmul takes 10 ms or more, at most 2048²: bf16 emulated on
    AVX2 (0.3 GFLOP/s) took 4 minutes at 2048², and fp32 at 150 GFLOP/s cost 0.9 s of every run's first epoch.
    A fake clock makes each matmul take 2 n³ / flops_per_second."""
    import torch

    from cadenza.engine import mfu

    sizes, real_randn = [], torch.randn

    def randn(*shape, **kwargs):
        sizes.append(shape[0])
        return real_randn(4, 4)  # the matmul itself is not what is measured here

    class Clock:
        now, calls = 0.0, 0

        def perf_counter(self) -> float:  # called before and after each matmul
            self.calls += 1
            if self.calls % 2 == 0:
                self.now += 2 * sizes[-1] ** 3 / flops_per_second
            return self.now

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(mfu, "time", Clock())
    peak = mfu.measured_peak_flops.__wrapped__("cpu", None, torch.bfloat16)
    assert max(sizes) == sizes[-1] == size and sorted(set(sizes)) == [256 << i for i in range(len(set(sizes)))]
    assert peak == pytest.approx(flops_per_second)


def test_an_mfu_above_one_remeasures_a_disturbed_peak(tiny, monkeypatch):
    from cadenza.engine import callbacks
    from cadenza.train.trainer import Trainer

    peaks = iter([1e3, 1e15])  # the start's measurement slowed down by other work, then a true one
    monkeypatch.setattr(callbacks, "peak_flops", lambda *args, **kwargs: next(peaks, 1e15))
    trainer = Trainer(tiny("data.val=null", "run.duration=4ba", "run.log_interval=2ba"))
    trainer.fit()
    assert all(0 < row["train/mfu"] < 1 for row in _metric_rows(trainer))
    assert (trainer.run_dir / "out.log").read_text().count("was disturbed by other work") == 1
