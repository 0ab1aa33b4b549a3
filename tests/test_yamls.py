"""Every config in ``yamls/`` trains 2 steps on CPU, and the command on its first line loads.

What is changed for the run, and only that:

- ``data.train`` becomes ``{type: synthetic, num_samples: 4}`` with ``data.batch_size: 2`` and no worker processes;
  ``data.val`` and ``eval.zero_shot`` are switched off (the files name real datasets);
- the run is 2 steps (``run.duration: 2ba``), on CPU, in a temporary folder, with ``run.peak_tflops`` set (the MFU
  peak is otherwise measured with matmuls in the run's precision: about a second per run on a CPU);
- models too big for a CPU test become the tiny model of the same family (``MODELS``): ViTs → ``tiny-vit``,
  ResNets → ``tiny-rn``, ConvNeXt → ``tiny-convnext``, CoCa → ``tiny-coca``; ``tiny.yaml`` and ``quickstart.yaml``
  keep theirs;
- pretrained tags (``laion2b_s34b_b79k``, the distillation teacher's ``openai``) become a local OpenCLIP file of the
  tiny model, written by ``open_clip``; distillation from stored embeddings (which synthetic data has none of) runs
  that teacher online, with the file's other distillation settings; ``s3://my-bucket`` becomes a bucket on moto's S3 server; W&B is disabled.

Everything else — precision, loss, optimizer, algorithms, checkpointing and their interpolations — is the file's.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cadenza.train.config import build_config, load_config
from cadenza.train.trainer import Trainer

from .conftest import ROOT

YAMLS = sorted(p for p in (ROOT / "yamls").rglob("*.yaml") if p.parent.name != "eval")  # eval/: suites, not configs
#: the tiny model each file trains with here (files not listed keep their model)
MODELS = {
    "vitb32.yaml": "tiny-vit",
    "vitb16.yaml": "tiny-vit",
    "vitl14.yaml": "tiny-vit",
    "siglip_vitb16.yaml": "tiny-vit",
    "distill_vitb32_from_vitl14.yaml": "tiny-vit",
    "finetune_vitb32.yaml": "tiny-vit",
    "finetune_llrd.yaml": "tiny-vit",
    "finetune_lora.yaml": "tiny-vit",
    "finetune_lit.yaml": "tiny-vit",
    "finetune_siglip.yaml": "tiny-vit",
    "small_experiment.yaml": "tiny-vit",
    "laion400m_vitb16.yaml": "tiny-vit",
    "rn50.yaml": "tiny-rn",
    "rn101.yaml": "tiny-rn",
    "convnext_base.yaml": "tiny-convnext",
    "coca_vitb32.yaml": "tiny-coca",
}


@pytest.fixture(scope="module")
def openclip_tiny_vit(tmp_path_factory) -> str:
    """An OpenCLIP checkpoint of tiny-vit, written by open_clip (stands in for the files' pretrained tags)."""
    open_clip = pytest.importorskip("open_clip")
    from cadenza.models import create_model
    from cadenza.models.convert import openclip_model_config

    with torch.device("meta"):
        config = openclip_model_config(create_model("tiny-vit"))
    path = tmp_path_factory.mktemp("openclip") / "tiny-vit.pt"
    torch.save(open_clip.CLIP(**config).state_dict(), path)
    return str(path)


def header_command(path: Path) -> list[str]:
    """The ``composer ... yamls/<file>`` command in the file's leading comment."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if f"yamls/{path.name}" not in line:
            continue
        command = line.removeprefix("#").split("(")[0]  # a parenthesised note may follow the command
        words = shlex.split(command, comments=True)
        if "composer" in words:
            return words[words.index("composer") :]
    raise AssertionError(f"{path.name}: its leading comment does not say `composer ... yamls/{path.name}`")


def test_every_file_starts_with_the_command_that_runs_it():
    for path in YAMLS:
        words = header_command(path)
        at = words.index(f"yamls/{path.name}")
        load_config(ROOT / words[at], words[at + 1 :])


def test_every_file_groups_its_keys():
    for path in YAMLS:
        text = path.read_text()
        for heading in ("# Model", "# Data", "# Optimization"):
            assert f"\n{heading}\n" in text, f"{path.name}: no '{heading}' heading"


def tiny_run(path: Path, tmp_path: Path, pretrained: str, bucket: str | None) -> object:
    cfg = OmegaConf.load(path)
    text = OmegaConf.to_yaml(cfg)
    if bucket is not None:
        cfg = OmegaConf.create(text.replace("s3://my-bucket", f"s3://{bucket}"))
    cfg.run.logs = str(tmp_path / "logs")
    cfg.run.duration = "2ba"
    cfg.run.device = "cpu"
    cfg.run.peak_tflops = 1.0
    cfg.data.train = {"type": "synthetic", "num_samples": 4}
    cfg.data.val = None
    cfg.data.batch_size = 2
    cfg.data.workers = 0
    if OmegaConf.select(cfg, "eval.zero_shot") is not None:
        cfg.eval.zero_shot.path = None
    if path.name in MODELS:
        cfg.model.name = MODELS[path.name]
    if OmegaConf.select(cfg, "model.pretrained"):
        cfg.model.pretrained = pretrained
    if OmegaConf.select(cfg, "algorithms.distillation"):
        if OmegaConf.select(cfg, "algorithms.distillation.source") == "stored":  # synthetic data stores no teachers
            cfg.algorithms.distillation.source = "online"
        cfg.algorithms.distillation.teacher = "tiny-vit"
        cfg.algorithms.distillation.pretrained = pretrained
    return Trainer(build_config(cfg)).fit()


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_file_trains_two_steps(path, tmp_path, openclip_tiny_vit, request, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    bucket = request.getfixturevalue("s3_bucket") if "s3://" in path.read_text() else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a loaded 2-core machine: one thread is several times faster
    try:
        state = tiny_run(path, tmp_path, openclip_tiny_vit, bucket)
    finally:
        torch.set_num_threads(threads)
    assert state.timestamp.batch == 2
    assert torch.isfinite(state.loss)
    if state.config.loss.name == "coca":
        assert set(state.loss_dict) == {"contrastive_loss", "caption_loss"}
