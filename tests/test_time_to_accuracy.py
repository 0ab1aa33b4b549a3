"""``benchmarks/time_to_accuracy.py`` end to end, shortened: OpenCLIP's trainer and Cadenza each train two epochs of
the digits (one caption per image), their checkpoints are scored zero-shot, where the time went is worked out from
them, and the results are written. (The full benchmark's numbers are in README; timings are never asserted.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

pytest.importorskip("open_clip_train")


def test_time_to_accuracy_runs_both_trainers_and_scores_them(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "time_to_accuracy.py"), "--quick", "--epochs", "2"]
    command += ["--captions", "1", "--budget", "600", "--out", str(tmp_path)]
    subprocess.run(command, check=True, cwd=tmp_path, timeout=900)
    results = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert results["parity"]["image_relative_error"] < 1e-4 and results["parity"]["text_relative_error"] < 1e-4
    assert set(results["systems"]) == {"openclip-best", "cadenza-fast"}
    for system in results["systems"].values():
        (run,) = system["runs"]
        first, second = run["curve"]  # two epochs: two checkpoints, scored
        for seconds, top1, _ in run["curve"]:
            assert 0 < seconds <= 600 and 0.0 <= top1 <= 1.0
        assert first[0] <= second[0] and run["best_top1"] == max(first[1], second[1])
        # where the time went: one gap between checkpoints is the epoch, the first checkpoint less it the start
        assert run["epoch_s"] == pytest.approx(second[0] - first[0], abs=0.011)
        assert run["start_s"] == pytest.approx(first[0] - run["epoch_s"], abs=0.011)
        assert (system["start_s"], system["epoch_s"]) == (run["start_s"], run["epoch_s"])  # one seed: its own
        t90 = next((seconds for seconds, top1, _ in run["curve"] if top1 >= 0.9), None)
        assert run["t90"] == t90
        assert run["t90_after_start"] == (None if t90 is None else pytest.approx(t90 - run["start_s"], abs=0.011))
    assert "ratio_to_90" in results and "ratio_to_80" in results and len(results["load_average_after"]) == 3
    # the floors: fresh processes that import and take one step (timm's imports on top of torch's), and one epoch of
    # bare steps (one caption per image: 1,424 samples, 44 steps of 32), the optimizer's step on top of the bare one
    assert 0 < results["torch_floor_s"] < results["timm_floor_s"]
    assert results["epoch_steps"] == 1424 // 32
    floor = results["epoch_floor_s"]
    assert 0 < floor["forward_backward"] < floor["with_muon"]
    best = results["systems"]["openclip-best"]["t90"]
    assert results["needed_for_3x_s"] == (None if best is None else pytest.approx(best / 3, abs=0.006))
    for key, epoch in floor.items():
        lower = results["lower_bound_s"][key]
        assert lower == pytest.approx(results["timm_floor_s"] + epoch, abs=0.011)
        assert results["ratio_ceiling"][key] == (None if best is None else pytest.approx(best / lower, abs=0.006))
    assert "median start s" in (tmp_path / "time_to_accuracy.md").read_text()
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 0
    assert "openclip-best" in (tmp_path / "time_to_accuracy.md").read_text()
