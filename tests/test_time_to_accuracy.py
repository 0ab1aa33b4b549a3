"""``benchmarks/time_to_accuracy.py`` end to end, shortened: OpenCLIP's trainer and Cadenza each train one epoch of
the digits (one caption per image), their checkpoints are scored zero-shot, and the results are written.
(The full benchmark's numbers are in README; timings are never asserted.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

pytest.importorskip("open_clip_train")


def test_time_to_accuracy_runs_both_trainers_and_scores_them(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "time_to_accuracy.py"), "--quick", "--epochs", "1"]
    command += ["--captions", "1", "--budget", "600", "--out", str(tmp_path)]
    subprocess.run(command, check=True, cwd=tmp_path, timeout=900)
    results = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert results["parity"]["image_relative_error"] < 1e-4 and results["parity"]["text_relative_error"] < 1e-4
    assert set(results["systems"]) == {"openclip-best", "cadenza-fast"}
    for system in results["systems"].values():
        (run,) = system["runs"]
        (checkpoint,) = run["curve"]  # one epoch: one checkpoint, scored
        seconds, top1, _ = checkpoint
        assert 0 < seconds <= 600 and 0.0 <= top1 <= 1.0 and run["best_top1"] == top1
    assert "ratio_to_90" in results and "ratio_to_80" in results and len(results["load_average_after"]) == 3
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 0
    assert "openclip-best" in (tmp_path / "time_to_accuracy.md").read_text()
