"""The quickstart pipeline end to end, shortened: digits → MDS + held-out image folder → streaming training →
zero-shot score. (``make quickstart`` runs the full-length version; its accuracy is in the README.)"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from cadenza.datasets.digits import TEMPLATES, WORDS, caption, split
from cadenza.train.cli import main as composer

from .conftest import ROOT


def test_split_is_stratified_and_disjoint():
    labels = [d for d in range(10) for _ in range(20)]
    train, test = split(np.array(labels), 0.2, seed=0)
    assert not set(train) & set(test) and len(train) + len(test) == 200
    assert sorted(labels[i] for i in test) == sorted(list(range(10)) * 4)


def test_captions_vary_and_name_the_digit():
    captions = {caption(7, template) for template in TEMPLATES}
    assert len(captions) == len(TEMPLATES)
    assert all(WORDS[7] in c or "7" in c for c in captions)


def test_quickstart_pipeline_runs_end_to_end(tmp_path, capsys):
    data = tmp_path / "digits"
    subprocess.run(
        [sys.executable, "-m", "cadenza.datasets.digits", "--out", str(data), "--captions", "1"], check=True, cwd=ROOT
    )
    assert (data / "mds" / "index.json").is_file()
    assert sorted(p.name for p in (data / "test").iterdir()) == [str(d) for d in range(10)]
    status = composer(
        [
            str(ROOT / "yamls" / "quickstart.yaml"),
            f"run.logs={tmp_path / 'logs'}",
            "run.duration=3ba",
            "eval.interval=2ba",
            "run.log_interval=1ba",
            "data.workers=0",
            f"data.train.remote={data / 'mds'}",
            f"eval.zero_shot.path={data / 'test'}",
        ]
    )
    assert status == 0
    rows = [json.loads(line) for line in (tmp_path / "logs" / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in rows if "val/digits-zeroshot-val-top1" in r]
    assert [r["step"] for r in scores] == [2, 3]
    assert all(0.0 <= r["val/digits-zeroshot-val-top1"] <= 1.0 for r in scores)
    assert [r["data/skipped"] for r in rows if "data/skipped" in r] == [0, 0, 0]

    # then the suite of make quickstart's last step: the held-out digits classified and retrieved, one table
    checkpoint = tmp_path / "logs" / "quickstart" / "checkpoints" / "epoch_latest.pt"
    suite = ["eval", "--tasks", str(ROOT / "yamls" / "eval" / "digits.yaml"), str(checkpoint)]
    capsys.readouterr()
    assert composer([*suite, f"run.logs={tmp_path / 'logs'}", f"eval.data_root={data}", "data.workers=0"]) == 0
    table = capsys.readouterr().out
    assert "| digits | 359 | 10 |" in table and "| digits-captions | 359 | 1795 |" in table and "Suite average" in table


def test_quickstart_config_reads_the_digits_through_streaming():
    from cadenza.train.config import load_config

    cfg = load_config(ROOT / "yamls" / "quickstart.yaml")
    assert cfg.data.train.type == "streaming" and cfg.eval.zero_shot.path == "data/digits/test"
    assert len(cfg.eval.zero_shot.classnames) == 10
