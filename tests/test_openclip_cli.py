"""``composer openclip``: open_clip_train 3.3.0's flags, translated into Cadenza configs and run.

Every trainer command of OpenCLIP's training guide (``tests/openclip_guide.py`` holds its bash blocks verbatim) is
translated as written, and the translated config is checked against the meaning the guide gives each flag
(``MEANING``). Flag fragments (``--model RN50``, the troubleshooting lines) are translated on top of the guide's usual
``--train-data=/path/to/data.csv``.

These commands also *run*, a few steps each, through ``composer openclip`` with the guide's paths replaced by
generated data (CSV and WebDataset shards of PIL images, a 3-class ImageFolder for ImageNet, moto's S3 server for
``s3://my-bucket``), its models by tiny ones of the same family (ViT → ``tiny-vit``, RN → ``tiny-rn``, CoCa →
``tiny-coca``) and its
pretrained tags by OpenCLIP checkpoint files written by ``open_clip`` itself: 4.0 (minimal), 9.0 (single node,
``composer -n 2 openclip``, 2 gloo processes), 11.0 (SLURM: two ``python -u -m cadenza.train.openclip`` tasks with
SLURM's variables), 13.0 (W&B, offline), 15.0 + 16.0 + 16.1 (checkpoint frequency, then resume from a path and from
``latest``), 17.0 (remote sync to S3), 18.0, 19.0, 20.0, 22.0 (ImageNet zero-shot), 23.0 (evaluation only), 24.0
(CoCa), 25.0
(SigLIP), 26.0 (distillation), 27.0 (small experiment), 28.0 (the large-scale recipe: ``torchrun --nproc_per_node 2
-m cadenza.train.openclip``, WebDataset train/val, zero-shot, S3 sync, W&B offline), 29.0 (fine-tuning with a locked
image tower) and the CSV troubleshooting lines 33.0-33.2.

Translated only: 5.x (architectures; ``tests/test_yamls.py`` builds their families), 6.0 (pretrained: run as part of
29.0), 7.x, 8.0, 10.0 (multi-node: torchrun's rendezvous flags, the same worker as 9.0), 12.0 and 14.0 (loggers:
TensorBoard runs in 27.0 and 29.0, W&B in 13.0 and 28.0), 21.0 and 31.3 (torch.compile: minutes of compilation on CPU),
30.x-32.x, 33.3, 34.0 and 35.0 (``--debug``: an error).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from cadenza.engine.errors import ConfigError
from cadenza.train import openclip

from .conftest import ROOT
from .data_helpers import image_bytes, metric_rows, write_csv, write_shards
from .openclip_guide import GUIDE_BLOCKS, GuideCommand, guide_commands, logical_lines
from .s3 import free_port

COMMANDS = {command.id: command for command in guide_commands()}
GUIDE = ROOT.parent / "shared" / "reference" / "openclip-training-guide.ko.md"
#: flags a fragment of the guide is translated with (the guide's usual data, unless the fragment needs other)
FRAGMENT_BASE = ("--train-data=/path/to/data.csv",)
FRAGMENT_BASES = {
    "31.2": ("--train-data=/path/to/data.csv", "--model", "ViT-B-16"),  # "패치 드롭아웃 사용 (ViT 모델의 경우)"
    "33.3": ("--train-data=/path/to/dataset.tar", "--dataset-type", "webdataset"),  # "WebDataset 샘플 수"
}
VIT_ADAM = {"optim.betas": [0.9, 0.98], "optim.eps": 1e-6}
RESNET_ADAM = {"optim.betas": [0.9, 0.999], "optim.eps": 1e-8}  # OpenCLIP's defaults for non-ViT model names
CSV = {"image_root": ".", "csv_separator": "\t", "csv_img_key": "filepath", "csv_caption_key": "title"}
GUIDE_CSV = {"data.train": {"type": "csv", "path": "/path/to/data.csv", **CSV}}
OPENCLIP_DEFAULTS = {  # what a flag left out means: OpenCLIP's defaults, written explicitly
    "model.name": "RN50",
    "run.precision": "amp",
    "run.duration": "32ep",
    "run.log_interval": "100ba",
    "run.logs": "./logs/",
    "data.batch_size": 64,
    "data.workers": 4,
    "optim.lr": 5e-4,
    "optim.warmup": "10000ba",
    "optim.scheduler": "cosine",
    "checkpoint.save_interval": "1ep",
    "checkpoint.save_latest": False,
    "checkpoint.keep": -1,
    **RESNET_ADAM,
}

#: the meaning the guide gives each command's flags, as keys of the translated config
MEANING: dict[str, dict[str, Any]] = {
    "4.0": {
        "data.train": {"type": "csv", "path": "/path/to/train_data.csv", **CSV},
        "data.val": {"type": "csv", "path": "/path/to/validation_data.csv", **CSV},
        "model.name": "ViT-B-32",
        "data.batch_size": 64,
        "optim.lr": 1e-3,
        "run.duration": "10ep",
        "data.workers": 4,
        "run.logs": "./logs/",
        "eval.interval": "1ep",
        "run.precision": "amp",
        **VIT_ADAM,
    },
    "5.0": {"model.name": "ViT-B-32", **VIT_ADAM},
    "5.1": {"model.name": "ViT-B-16", **VIT_ADAM},
    "5.2": {"model.name": "ViT-L-14", **VIT_ADAM},
    "5.3": {"model.name": "RN50", **RESNET_ADAM},
    "5.4": {"model.name": "RN101", **RESNET_ADAM},
    "5.5": {"model.name": "convnext_base", **RESNET_ADAM},
    "6.0": {
        "model.name": "ViT-B-32",
        "model.pretrained": "laion2b_s34b_b79k",
        **GUIDE_CSV,
        "optim.lr": 1e-4,
        "run.duration": "5ep",
    },
    "7.0": {"algorithms.lock_image": {"unlocked_groups": 2, "freeze_bn_stats": False}},
    "7.1": {"algorithms.lock_text": {"unlocked_layers": 2, "freeze_layer_norm": False}},
    "8.0": {
        "data.augment.scale": [0.9, 1.0],
        "data.augment.color_jitter": [0.4, 0.4, 0.4, 0.1],
        "data.augment.color_jitter_prob": 0.8,
        "data.augment.gray_scale_prob": 0.2,
    },
    "9.0": {
        "data.train": {"type": "webdataset", "path": "/path/to/dataset.tar"},
        "data.batch_size": 320,
        "run.precision": "amp",
        "data.workers": 4,
        "model.name": "ViT-B-32",
    },
    "10.0": {
        "data.train": {"type": "webdataset", "path": "/path/to/dataset.tar"},
        "data.batch_size": 256,
        "model.name": "ViT-B-32",
    },
    "11.0": {
        "checkpoint.save_interval": "1ep",
        "data.train": {"type": "webdataset", "path": "/data/dataset/{00000..99999}.tar"},
        "optim.warmup": "2000ba",
        "data.batch_size": 256,
        "run.duration": "32ep",
        "data.workers": 8,
        "model.name": "ViT-B-32",
        "run.precision": "amp",
        "loss.local_loss": True,
        "loss.gather_with_grad": True,
    },
    "12.0": {"loggers.tensorboard": {}, "run.logs": "./logs/", **GUIDE_CSV, **OPENCLIP_DEFAULTS},
    "13.0": {
        "loggers.wandb": {"project": "my-clip-training", "notes": "Initial CLIP training experiment"},
        **GUIDE_CSV,
    },
    "14.0": {"loggers.wandb.project": "open-clip", "loggers.tensorboard": {}},
    "15.0": {"checkpoint.save_interval": "2ep", "checkpoint.save_latest": True, "checkpoint.keep": 1, **GUIDE_CSV},
    "16.0": {"checkpoint.resume": "/path/to/checkpoints/epoch_10.pt", **GUIDE_CSV},
    "17.0": {"callbacks.remote_sync.frequency": 300, **GUIDE_CSV},
    "18.0": {
        "run.precision": "amp",
        "algorithms.grad_checkpointing": {},
        "loss.local_loss": True,
        "loss.gather_with_grad": True,
    },
    "19.0": {"data.batch_size": 64, "optim.accum_freq": 4},
    "20.0": {"algorithms.patch_dropout": {"prob": 0.5}, "model.name": "ViT-B-16"},
    "21.0": {"algorithms.torch_compile": {}},
    "22.0": {"eval.zero_shot.path": "/path/to/imagenet/val", "eval.zero_shot.name": "imagenet", "eval.interval": "2ep"},
    "23.0": {
        "data.train": None,
        "eval.zero_shot.path": "/path/to/imagenet/val",
        "model.name": "ViT-B-32",
        "model.pretrained": "laion2b_s34b_b79k",
    },
    "24.0": {
        "model.name": "coca_ViT-B-32",
        "loss.name": "coca",
        "loss.clip_loss_weight": 1.0,
        "loss.caption_loss_weight": 2.0,
        "data.train.path": "/path/to/data.csv",
    },
    "25.0": {"loss.name": "siglip", "model.name": "ViT-B-32"},
    "26.0": {"model.name": "ViT-B-32", "algorithms.distillation": {"teacher": "ViT-L-14", "pretrained": "openai"}},
    "27.0": {
        "data.train": {"type": "csv", "path": "./data/small_dataset.csv", **CSV, "csv_caption_key": "caption"},
        "data.val": {"type": "csv", "path": "./data/validation.csv", **CSV, "csv_caption_key": "caption"},
        "model.name": "ViT-B-32",
        "data.batch_size": 32,
        "optim.lr": 1e-3,
        "run.duration": "5ep",
        "data.workers": 2,
        "run.precision": "amp",
        "loggers.tensorboard": {},
        "run.logs": "./logs/small_exp",
    },
    "28.0": {
        "data.train": {"type": "webdataset", "path": "/data/laion400m/{00000..41455}.tar", "num_samples": 400000000},
        "data.val": {"type": "webdataset", "path": "/data/validation/{00000..00099}.tar", "num_samples": 10000},
        "model.name": "ViT-B-16",
        "data.batch_size": 128,
        "optim.lr": 5e-4,
        "optim.weight_decay": 0.2,
        "optim.warmup": "10000ba",
        "run.duration": "32ep",
        "data.workers": 6,
        "run.precision": "amp",
        "algorithms.grad_checkpointing": {},
        "loss.local_loss": True,
        "loss.gather_with_grad": True,
        "checkpoint.save_interval": "1ep",
        "checkpoint.save_latest": True,
        "checkpoint.keep": 1,
        "eval.interval": "1ep",
        "eval.zero_shot.path": "/data/imagenet/val",
        "loggers.wandb.project": "laion400m-vitb16",
        "callbacks.remote_sync.frequency": 300,
        "run.logs": "./logs/laion400m_training",
        **VIT_ADAM,
    },
    "29.0": {
        "data.train.path": "./data/domain_specific.csv",
        "model.name": "ViT-B-32",
        "model.pretrained": "laion2b_s34b_b79k",
        "optim.lr": 1e-5,
        "run.duration": "3ep",
        "data.batch_size": 64,
        "optim.warmup": "500ba",
        "algorithms.lock_image": {"unlocked_groups": 1, "freeze_bn_stats": False},
        "run.precision": "amp",
        "loggers.tensorboard": {},
    },
    "30.0": {"data.batch_size": 32},
    "30.1": {"algorithms.grad_checkpointing": {}},
    "30.2": {"loss.local_loss": True, "loss.gather_with_grad": True},
    "30.3": {"run.precision": "fp16"},
    "31.0": {"data.workers": 8},
    "31.1": {"data.batch_size": 128},
    "31.2": {"algorithms.patch_dropout.prob": 0.5},
    "31.3": {"algorithms.torch_compile": {}},
    "32.0": {"dist.backend": "nccl"},
    "32.1": {"dist.static_graph": True},
    "33.0": {"data.train.csv_separator": "\t"},  # the shell passes a backslash and a t; pandas reads a tab
    "33.1": {"data.train.csv_img_key": "image_path"},
    "33.2": {"data.train.csv_caption_key": "text"},
    "33.3": {"data.train": {"type": "webdataset", "path": "/path/to/dataset.tar", "num_samples": 1000000}},
    "34.0": {"run.name": "experiment_$(date +%Y%m%d_%H%M%S)"},  # unexpanded: no shell here
}
#: commands that cannot run on Cadenza (yet), and what the error says
ERRORS = {
    "16.1": "--resume latest: needs --name",  # OpenCLIP would name the run by date and find nothing to resume
    "35.0": "--debug True: no log-level key",
}


def guide_flags(command: GuideCommand) -> list[str]:
    return list(command.flags) if command.launcher else [*FRAGMENT_BASES.get(command.id, FRAGMENT_BASE), *command.flags]


def translated(flags: list[str]):
    return openclip.build(flags)[2]


# -- the flags themselves ---------------------------------------------------------------------------------------
def openclip_parser():
    """open_clip_train's own parser (``parse_args`` builds it inside; catch it as it parses)."""
    import argparse

    from open_clip_train import params

    caught = []
    original = argparse.ArgumentParser.parse_args

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = catch
    try:
        with pytest.raises(SystemExit):
            params.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return caught[0]


def options(parser) -> dict[str, Any]:
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_open_clip_flag_is_accepted_with_its_default():
    theirs, ours = options(openclip_parser()), options(openclip.build_parser())
    assert set(ours) - {"--print-config"} == set(theirs)

    def definition(action) -> tuple:  # argparse reads a value with no type as a string
        choices = list(action.choices) if action.choices is not None else None
        return action.default, choices, action.nargs, action.type or str, type(action).__name__.startswith("_StoreTrue")

    for option, action in theirs.items():
        assert definition(ours[option]) == definition(action), option
    assert [f.option for f in openclip.FLAGS] == list(theirs)  # the table follows params.py's order


def test_flag_table_is_in_the_readme():
    assert openclip.flag_table() in (ROOT / "README.md").read_text()


def test_flags_without_an_equivalent_are_errors_listing_every_one():
    with pytest.raises(openclip.FlagError) as info:
        openclip.translate(
            openclip.parse_flags(["--horovod", "--debug", "--opt", "timm/adahessian", "--cache-dir", "/c"])
        )
    assert [p.split(" ")[0] for p in info.value.problems] == ["--cache-dir", "--debug", "--horovod", "--opt"]
    # at their defaults, or at a value that means what Cadenza does anyway, they are fine
    flags = ["--opt", "adamw", "--dist-url", "env://", "--image-interpolation", "bicubic", "--log-local"]
    openclip.translate(openclip.parse_flags([*FRAGMENT_BASE, *flags, "--coca-caption-loss-weight", "2.0"]))


def test_timm_optimizers_translate_as_openclip_builds_them():
    """``--opt timm/<name>``: betas and eps only where given (else the optimizer's own), momentum where it is taken."""
    optim = openclip.translate(openclip.parse_flags([*FRAGMENT_BASE, "--opt", "timm/sgd", "--momentum", "0.8"]))[
        "optim"
    ]
    assert (optim["name"], optim["args"], optim["betas"], optim["eps"]) == ("sgd", {"momentum": 0.8}, None, None)
    flags = [*FRAGMENT_BASE, "--opt", "timm/lamb", "--beta1", "0.8", "--beta2", "0.9", "--eps", "1e-7"]
    optim = openclip.translate(openclip.parse_flags(flags))["optim"]
    assert (optim["name"], optim["betas"], optim["eps"]) == ("lamb", [0.8, 0.9], 1e-7)
    for flags, problem in (
        (["--opt", "timm/lion", "--momentum", "0.9"], "lion takes no momentum"),
        (["--momentum", "0.9"], "only for timm optimizers"),
        (["--opt", "timm/lamb", "--beta1", "0.8"], "both or neither"),
    ):
        with pytest.raises(openclip.FlagError, match=problem):
            openclip.translate(openclip.parse_flags([*FRAGMENT_BASE, *flags]))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lock-image-unlocked-groups", "2"], "--lock-image-unlocked-groups: has no effect without --lock-image"),
        (["--wandb-notes", "x"], "--wandb-notes: needs --report-to wandb"),
        (["--distill-model", "ViT-L-14"], "needs both --distill-model and --distill-pretrained"),
        (["--siglip", "--local-loss"], "SigLIP loss ignores them"),
        (["--skip-scheduler", "--warmup", "5"], "--warmup: OpenCLIP ignores it with --skip-scheduler"),
        (["--dataset-resampled"], "only for webdataset"),
        (["--remote-sync", "s3://b/x", "--resume", "latest", "--name", "n"], "checkpoint.save_folder"),
        (["--val-frequency", "3", "--val-data", "v.csv", "--imagenet-val", "/in"], "give both the same frequency"),
        (["--force-image-size", "224", "160"], "square images"),
        (["--dist-backend", "hccl"], "nccl (GPUs) or gloo"),
        (["--report-to", "mlflow"], "mlflow unknown"),
        (["--device", "mps"], "cuda (one device per process) or cpu"),
    ],
)
def test_meaningless_combinations_are_errors(flags, message):
    with pytest.raises(openclip.FlagError, match=message.replace("(", r"\(").replace(")", r"\)")):
        openclip.translate(openclip.parse_flags([*FRAGMENT_BASE, *flags]))


def test_config_errors_name_the_flags_behind_the_key():
    with pytest.raises(ConfigError) as info:
        translated([*FRAGMENT_BASE, "--lr-scheduler", "cosin"])
    assert info.value.key == "optim.scheduler" and "Did you mean 'cosine'" in str(info.value)
    assert "--lr-scheduler" in str(info.value)


def test_skip_scheduler_quick_gelu_sizes_and_auto_types():
    cfg = translated(
        ["--train-data", "/d/{0..3}.tar::/e/{0..1}.tar", "--val-data", "/v.tsv", "--model", "ViT-B-32"]
        + ["--skip-scheduler", "--force-quick-gelu", "--force-image-size", "160", "--force-context-length", "40"]
        + ["--image-mean", "0.5", "--image-std", "0.5", "0.4", "0.3", "--precision", "pure_bf16"]
        + ["--save-frequency", "0", "--epochs", "3", "--dataset-resampled", "--train-data-upsampling-factors", "1::4"]
    )
    assert (cfg.optim.scheduler, cfg.optim.warmup) == ("const", "0ba")
    assert cfg.model.name == "ViT-B-32-quickgelu"
    assert OmegaConf.to_container(cfg.model.overrides) == {
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.4, 0.3],
        "vision": {"image_size": 160},
        "text": {"context_length": 40},
    }
    assert cfg.run.precision == "bf16"
    assert cfg.checkpoint.save_interval == "3ep"  # --save-frequency 0: only the final checkpoint
    assert cfg.data.train.type == "webdataset" and cfg.data.train.resampled
    assert cfg.data.train.upsampling_factors == "1::4"
    assert cfg.data.val.type == "csv"  # .tsv, as OpenCLIP's auto
    cooldown = translated([*FRAGMENT_BASE, "--lr-scheduler", "const-cooldown", "--epochs-cooldown", "2"])
    assert (cooldown.optim.scheduler, cooldown.optim.cooldown) == ("const-cooldown", "2ep")
    with pytest.raises(ConfigError, match="--epochs-cooldown"):
        translated([*FRAGMENT_BASE, "--epochs-cooldown", "2"])  # OpenCLIP ignores it under cosine


def test_print_config_gives_a_yaml_that_composer_runs_the_same(tmp_path, capsys):
    from cadenza.train.config import load_config

    flags = guide_flags(COMMANDS["28.0"])
    assert openclip.main([*flags, "--name", "big", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Translated by `composer openclip`")
    (tmp_path / "big.yaml").write_text(text)
    assert load_config(tmp_path / "big.yaml") == translated([*flags, "--name", "big"])


# -- every command of the guide, translated -----------------------------------------------------------------------
def test_the_guide_copy_is_complete():
    if not GUIDE.is_file():
        pytest.skip(f"the guide is not at {GUIDE}")
    import re

    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert blocks == [text for _, text in GUIDE_BLOCKS]


def test_every_command_is_checked():
    assert set(COMMANDS) == set(MEANING) | set(ERRORS)
    assert len(COMMANDS) == 49


@pytest.mark.parametrize("command_id", [c for c in COMMANDS if c in MEANING])
def test_guide_command_translates_to_its_meaning(command_id):
    cfg = translated(guide_flags(COMMANDS[command_id]))
    for key, expected in MEANING[command_id].items():
        value = OmegaConf.select(cfg, key, default="<missing>")
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        assert value == expected, f"{command_id}: {key} is {value!r}, the guide means {expected!r}"


@pytest.mark.parametrize("command_id", list(ERRORS))
def test_guide_command_that_cannot_run_says_why(command_id):
    with pytest.raises((ConfigError, openclip.FlagError), match=ERRORS[command_id].replace("(", r"\(")):
        translated(guide_flags(COMMANDS[command_id]))


def test_coca_translates_to_the_coca_loss_and_its_weights():
    user = openclip.translate(openclip.parse_flags(guide_flags(COMMANDS["24.0"])))
    assert user["loss"]["name"] == "coca" and user["model"]["name"] == "coca_ViT-B-32"
    weights = ["--coca-contrastive-loss-weight", "0.5", "--coca-caption-loss-weight", "3"]
    cfg = translated([*FRAGMENT_BASE, "--model", "coca_ViT-B-32", *weights])
    assert (cfg.loss.clip_loss_weight, cfg.loss.caption_loss_weight) == (0.5, 3.0)
    assert translated([*FRAGMENT_BASE, "--model", "ViT-B-32"]).loss.caption_loss_weight is None
    with pytest.raises(openclip.FlagError) as info:
        openclip.translate(openclip.parse_flags([*FRAGMENT_BASE, "--model", "ViT-B-32", *weights]))
    assert [p.split(" ")[0] for p in info.value.problems] == [
        "--coca-contrastive-loss-weight:",
        "--coca-caption-loss-weight:",
    ]


def test_remote_sync_folder_is_named_after_the_run_as_in_openclip(tmp_path):
    """<remote>/<run name>: the name the trainer settles (rank 0's date-model-lr-b-j-p without --name, shared by every
    rank; a name drawn while translating would be each process's own date)."""
    from cadenza.engine.remote_sync import RemoteSync

    cfg = translated(guide_flags(COMMANDS["17.0"]))
    assert cfg.run.name is None
    assert dict(cfg.callbacks.remote_sync) == {
        "remote": "s3://my-bucket/checkpoints",
        "frequency": 300,
        "under_run": True,
    }
    sync = RemoteSync(tmp_path / "2026_12_06-08_00_00-model_RN50-lr_0.0005-b_64-j_4-p_amp", **cfg.callbacks.remote_sync)
    assert sync.remote == "s3://my-bucket/checkpoints/2026_12_06-08_00_00-model_RN50-lr_0.0005-b_64-j_4-p_amp"
    named = translated([*guide_flags(COMMANDS["17.0"]), "--name", "exp"])
    assert named.run.name == "exp" and named.callbacks.remote_sync.under_run


def test_guide_lines_that_are_not_the_trainer():
    """Setup, shell and monitoring lines: what they are on Cadenza is in the README; here, that none is missed."""
    others = [line for _, text in GUIDE_BLOCKS for line in logical_lines(text) if "open_clip_train" not in line]
    others = [line for line in others if not line.startswith("--")]
    assert len(others) == 21  # venv/pip/git/make, cd, conda, exports, tensorboard, torch.load, nvidia-smi


# -- the guide's commands, run -----------------------------------------------------------------------------------
TINY = {
    "ViT-B-32": "tiny-vit",
    "ViT-B-16": "tiny-vit",
    "ViT-L-14": "tiny-vit",
    "RN50": "tiny-rn",
    "coca_ViT-B-32": "tiny-coca",
}
FAST = {"--epochs": "1", "--batch-size": "4", "--workers": "0"}
#: ImageNet zero-shot scores every image against 1000 classes: one prompt a class (OpenCLIP's 80 take a minute here)
ONE_PROMPT = "a photo of a {}."
#: Cadenza overrides for every run: the MFU peak is otherwise measured with matmuls in the run's precision, about a
#: second per process on a CPU (fp16, OpenCLIP's default amp, is emulated and slow there); one zero-shot prompt
NO_PEAK = ("--", "run.peak_tflops=1.0", f"eval.zero_shot.templates=['{ONE_PROMPT}']")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # for subprocesses (see the one_thread fixture)


def replaced(flags: list[str], values: dict[str, str | None]) -> list[str]:
    """``flags`` with the values of some flags replaced or added (``None`` drops the flag)."""
    out: list[str] = []
    words = list(flags)
    while words:
        word = words.pop(0)
        option, eq, inline = word.partition("=")
        flag = openclip.BY_DEST.get(option[2:].replace("-", "_")) if option.startswith("--") else None
        takes = [] if flag is None or flag.action == "store_true" or eq else [words.pop(0)]
        while flag is not None and flag.nargs in ("+", "*") and words and not words[0].startswith("--"):
            takes.append(words.pop(0))
        if option in values:
            if values[option] is not None:
                out += [option, values[option]]
            continue
        out += [word, *takes]
    for option, value in values.items():
        if value is not None and option not in out:
            out += [option, value]
    return out


def substituted(command_id: str, values: dict[str, str | None]) -> list[str]:
    """The guide's command with tiny models, a few steps, and its paths replaced."""
    flags = guide_flags(COMMANDS[command_id])
    model = dict(zip(flags, [*flags[1:], None], strict=True)).get("--model", "RN50")
    return replaced(flags, {"--model": TINY[model], **FAST, **values})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine, tiny models step several times faster than with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Any]:
    """Local stand-ins for the guide's paths: CSVs, WebDataset shards, an ImageNet-like folder, OpenCLIP files."""
    import open_clip

    from cadenza.models import create_model
    from cadenza.models.convert import openclip_model_config

    root = tmp_path_factory.mktemp("guide-data")
    found: dict[str, Any] = {"root": root}
    # absolute image paths: OpenCLIP reads relative ones from the working directory, and so does composer openclip
    found["csv"] = str(write_csv(root / "csv", 8, absolute=True))
    found["val_csv"] = str(write_csv(root / "val", 8, absolute=True))
    found["caption_csv"] = str(write_csv(root / "small", 8, caption_key="caption", absolute=True))
    found["text_csv"] = str(write_csv(root / "keys", 8, img_key="image_path", caption_key="text", absolute=True))
    found["shards"] = write_shards(root / "wds", 2, 8)
    found["val_shards"] = write_shards(root / "wds-val", 2, 4, first=100)  # a shard per process
    imagenet = root / "imagenet" / "val"  # ImageNet's layout: its first three classes, by WordNet id
    for label, name in enumerate(("n01440764", "n01443537", "n01484850")):
        (imagenet / name).mkdir(parents=True)
        for index in range(2):
            (imagenet / name / f"{index}.jpg").write_bytes(image_bytes(10 * label + index))
    found["imagenet"] = str(imagenet)
    for name in ("tiny-vit",):
        with torch.device("meta"):
            config = openclip_model_config(create_model(name))
        torch.manual_seed(3)
        path = root / f"{name}-openclip.pt"
        torch.save(open_clip.CLIP(**config).state_dict(), path)  # an OpenCLIP checkpoint, as open_clip saves it
        found[name] = str(path)
        (root / f"{name}.json").write_text(json.dumps(config))  # open_clip.add_model_config reads it (open_clip_tiny)
    return found


@pytest.fixture(scope="module")
def open_clip_tiny(data) -> None:
    """open_clip_train runs ``tiny-vit`` too: its OpenCLIP config (as ``composer export`` writes it) registered."""
    import open_clip

    open_clip.add_model_config(data["root"] / "tiny-vit.json")


def run_inprocess(flags: list[str]) -> None:
    assert openclip.main([*flags, *NO_PEAK]) == 0


def open_clip_train(argv: list[str], cwd: Path | None = None) -> int | None:
    """``python -m open_clip_train.main ARGV`` in this process (in ``cwd``): what it returns (``None`` when it ran,
    ``-1`` when it refused). Its logging setup (handlers on the root logger, every logger's level) is undone after."""
    import contextlib
    import logging

    from open_clip_train.main import main

    root = logging.getLogger()
    handlers, levels = list(root.handlers), {name: logging.getLogger(name).level for name in root.manager.loggerDict}
    level = root.level
    try:
        with contextlib.chdir(cwd or Path.cwd()):
            return main(argv)
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)


def openclip_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars open_clip_train wrote to ``<run>/tensorboard``: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_folder(tmp_path: Path, name: str) -> Path:
    return tmp_path / "logs" / name


def log_flags(tmp_path: Path, name: str) -> dict[str, str]:
    return {"--logs": str(tmp_path / "logs"), "--name": name}


def read_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_minimal_training(data, tmp_path):
    run_inprocess(
        substituted(
            "4.0",
            {"--train-data": data["csv"], "--val-data": data["val_csv"], **log_flags(tmp_path, "minimal")},
        )
    )
    folder = run_folder(tmp_path, "minimal")
    assert (folder / "checkpoints" / "ep1-ba2.pt").is_file()
    assert not (folder / "checkpoints" / "epoch_latest.pt").exists()  # no --save-most-recent
    assert metric_rows(folder, "val/image_to_text_R@1")
    config = OmegaConf.load(folder / "config.yaml")
    assert (config.run.precision, config.optim.lr, config.data.train.csv_caption_key) == ("amp", 1e-3, "title")


def test_checkpoint_frequency_then_resume_from_a_path_and_from_latest(data, tmp_path):
    name = log_flags(tmp_path, "ckpt")
    four_steps = {"--train-data": data["csv"], "--epochs": "4", "--batch-size": "8", **name}
    run_inprocess(substituted("15.0", four_steps))
    checkpoints = run_folder(tmp_path, "ckpt") / "checkpoints"
    # every 2 epochs, only the newest kept (--delete-previous-checkpoint), and epoch_latest.pt (--save-most-recent);
    # each also under OpenCLIP's name
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == ["ep4-ba4.pt", "epoch_4.pt", "epoch_latest.pt"]
    saved = read_checkpoint(checkpoints / "ep4-ba4.pt")
    assert {"epoch", "name", "state_dict", "optimizer"} <= set(saved)  # the guide's torch.load(...).keys() check
    assert saved["epoch"] == 4

    resumed = {
        "--train-data": data["csv"],
        "--epochs": "5",
        "--batch-size": "8",
        "--resume": str(checkpoints / "epoch_4.pt"),  # the guide's name for it
    }
    run_inprocess(substituted("16.0", {**resumed, **log_flags(tmp_path, "from-path")}))
    assert metric_rows(run_folder(tmp_path, "from-path"), "train/loss")[-1]["step"] == 5
    assert (run_folder(tmp_path, "from-path") / "checkpoints" / "ep5-ba5.pt").is_file()

    # 16.1 with the --name that 'latest' needs: continues the ckpt run itself
    run_inprocess(substituted("16.1", {"--train-data": data["csv"], "--epochs": "6", "--batch-size": "8", **name}))
    rows = metric_rows(run_folder(tmp_path, "ckpt"), "train/loss")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]  # each epoch's (one) step, then the resumed two


def test_remote_sync_to_s3(data, tmp_path, s3_bucket, moto_server):
    flags = substituted("17.0", {"--train-data": data["csv"], **log_flags(tmp_path, "synced")})
    flags = [f.replace("s3://my-bucket", f"s3://{s3_bucket}") for f in flags]
    run_inprocess(flags)
    listed = moto_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="checkpoints/synced/")
    keys = {item["Key"] for item in listed.get("Contents", [])}
    assert {
        "checkpoints/synced/out.log",
        "checkpoints/synced/config.yaml",
        "checkpoints/synced/checkpoints/ep1-ba2.pt",
    } <= keys


@pytest.mark.parametrize(
    ("command_id", "check"),
    [
        ("18.0", "GradCheckpointing()"),
        ("19.0", "accum"),
        ("20.0", "PatchDropout(prob=0.5)"),
        ("24.0", "coca"),
        ("25.0", "siglip"),
    ],
)
def test_techniques(data, tmp_path, command_id, check):
    values = {"--train-data": data["csv"], **log_flags(tmp_path, command_id)}
    if command_id == "19.0":
        values.update({"--batch-size": "2"})  # 2 x accum 4 = 8 rows: one step
    run_inprocess(substituted(command_id, values))
    folder = run_folder(tmp_path, command_id)
    rows = metric_rows(folder, "train/loss")
    assert rows and all(torch.isfinite(torch.tensor(row["train/loss"])) for row in rows)
    out = (folder / "out.log").read_text()
    if check == "accum":
        assert "1 steps (1 per epoch) of 8 samples (1 processes x 2 x accum 4)" in out
    elif check == "coca":
        assert {"train/contrastive_loss", "train/caption_loss"} <= set(rows[-1])
    elif check == "siglip":
        assert "train/contrastive_loss" in rows[-1] and rows[-1]["train/scale"] == pytest.approx(10, rel=0.01)
    else:
        assert check in out  # the algorithm is listed as active


def test_zero_shot_during_training_and_evaluation_only_as_open_clip_train(data, open_clip_tiny, tmp_path, monkeypatch):
    """22.0 trains and scores; 23.0 only scores, here beside open_clip_train itself: three of ImageNet's folders, each
    image scored against all 1000 classes (a subset scored among its own 3 classes had top-5 1.0 by construction)."""
    run_inprocess(
        substituted(
            "22.0", {"--train-data": data["csv"], "--imagenet-val": data["imagenet"], **log_flags(tmp_path, "zs")}
        )
    )
    assert metric_rows(run_folder(tmp_path, "zs"), "val/imagenet-zeroshot-val-top1")
    values = {"--imagenet-val": data["imagenet"], "--pretrained": data["tiny-vit"], "--precision": "fp32"}
    flags = substituted("23.0", {**values, "--batch-size": "64", **log_flags(tmp_path, "eval")})
    run_inprocess(flags)
    folder = run_folder(tmp_path, "eval")
    rows = metric_rows(folder, "val/imagenet-zeroshot-val-top5")
    assert not list(folder.glob("checkpoints/*.pt"))  # nothing trained
    from open_clip_train import zero_shot

    monkeypatch.setattr(zero_shot, "OPENAI_IMAGENET_TEMPLATES", (ONE_PROMPT,))  # the prompt Cadenza's run used
    assert open_clip_train([*replaced(flags, log_flags(tmp_path, "theirs")), "--device", "cpu"]) is None
    theirs = json.loads((run_folder(tmp_path, "theirs") / "checkpoints" / "results.jsonl").read_text())
    assert len(rows) == 1 and theirs.keys() == {"imagenet-zeroshot-val-top1", "imagenet-zeroshot-val-top5"}
    for name, value in theirs.items():
        assert rows[0][f"val/{name}"] == pytest.approx(value), name


def test_distillation_from_an_openclip_teacher(data, tmp_path):
    teacher = {"--distill-model": "tiny-vit", "--distill-pretrained": data["tiny-vit"]}
    run_inprocess(substituted("26.0", {"--train-data": data["csv"], **teacher, **log_flags(tmp_path, "distil")}))
    assert "train/distill_loss" in metric_rows(run_folder(tmp_path, "distil"), "train/loss")[-1]


def test_small_experiment_with_tensorboard(data, tmp_path):
    values = {"--train-data": data["caption_csv"], "--val-data": data["caption_csv"], **log_flags(tmp_path, "small")}
    run_inprocess(substituted("27.0", values))
    folder = run_folder(tmp_path, "small")
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    assert metric_rows(folder, "val/clip_val_loss")


def test_fine_tuning_a_pretrained_model_with_a_locked_image_tower(data, tmp_path):
    from cadenza.models import create_model

    values = {"--train-data": data["csv"], "--pretrained": data["tiny-vit"], **log_flags(tmp_path, "finetune")}
    run_inprocess(substituted("29.0", {**values, "--lr": "1e-2", "--warmup": "1"}))  # a visible step
    trained = read_checkpoint(run_folder(tmp_path, "finetune") / "checkpoints" / "ep1-ba2.pt")["state_dict"]
    start = create_model("tiny-vit", pretrained=data["tiny-vit"]).state_dict()
    changed = {k for k, v in start.items() if not torch.equal(v, trained[k])}
    assert "text.token_embedding.weight" in changed and "visual.trunk.patch_embed.proj.weight" not in changed
    assert any(k.startswith("visual.") for k in changed)  # the last group (--lock-image-unlocked-groups 1) trains
    assert not any(k.startswith("visual.trunk.blocks.0.") for k in changed)
    assert (run_folder(tmp_path, "finetune") / "tensorboard").is_dir()


def test_csv_separator_and_keys_from_troubleshooting(data, tmp_path):
    flags = [*COMMANDS["33.0"].flags, *COMMANDS["33.1"].flags, *COMMANDS["33.2"].flags]
    values = {"--train-data": data["text_csv"], "--model": "tiny-vit", **FAST, **log_flags(tmp_path, "keys")}
    run_inprocess(replaced(flags, values))
    assert metric_rows(run_folder(tmp_path, "keys"), "train/loss")


def test_wandb_report(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_inprocess(substituted("13.0", {"--train-data": data["csv"], **log_flags(tmp_path, "wb")}))
    assert list(run_folder(tmp_path, "wb").glob("wandb/offline-run-*/run-*.wandb"))


# -- several processes ------------------------------------------------------------------------------------------
def run_command(command: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
    environment = {**os.environ, **ONE_THREAD, **(env or {})}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_single_node_multi_gpu_with_composer_n(data, tmp_path):
    flags = substituted("9.0", {"--train-data": data["shards"], **log_flags(tmp_path, "two")})
    run_command([sys.executable, "-m", "cadenza.train.cli", "-n", "2", "openclip", *flags, *NO_PEAK])
    row = metric_rows(run_folder(tmp_path, "two"), "train/loss")[-1]
    assert row["step"] == 2  # 16 samples, 2 processes x 4
    assert row["train/samples_per_second"] == pytest.approx(2 * row["train/samples_per_second_per_gpu"])


def test_large_scale_recipe_with_torchrun(data, tmp_path, s3_bucket, moto_server):
    """torchrun itself stops at ``--logs`` (argparse reads it as an abbreviation of torchrun's ``--logs-specs``, for
    OpenCLIP too), so this run drops it and runs in a folder whose ``./logs/`` is the run folder's parent."""
    values = {
        "--train-data": data["shards"],
        "--train-num-samples": "16",
        "--val-data": data["val_shards"],
        "--val-num-samples": "8",
        "--imagenet-val": data["imagenet"],
        "--remote-sync": f"s3://{s3_bucket}/checkpoints",
        "--logs": None,
        "--name": "laion",
    }
    flags = substituted("28.0", values)
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_command([*launcher, "-m", "cadenza.train.openclip", *flags, *NO_PEAK], env, cwd=tmp_path)
    folder = run_folder(tmp_path, "laion")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert any("val/imagenet-zeroshot-val-top1" in r for r in rows) and any("val/clip_val_loss" in r for r in rows)
    assert sorted(p.name for p in (folder / "checkpoints").glob("*.pt")) == [
        "ep1-ba2.pt",
        "epoch_1.pt",
        "epoch_latest.pt",
    ]
    listed = moto_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="checkpoints/laion/")
    assert "checkpoints/laion/checkpoints/epoch_latest.pt" in {item["Key"] for item in listed.get("Contents", [])}
    assert list(folder.glob("wandb/offline-run-*"))
    assert "(2 processes x 4 x accum 1)" in (folder / "out.log").read_text()


def test_slurm_tasks(data, tmp_path):
    flags = substituted("11.0", {"--train-data": data["shards"], **log_flags(tmp_path, "slurm")})
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": str(rank),
            "SLURM_NTASKS_PER_NODE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            **ONE_THREAD,
        }
        command = [sys.executable, "-u", "-m", "cadenza.train.openclip", *flags, *NO_PEAK]  # srun python -u ...
        processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=600)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    out = (run_folder(tmp_path, "slurm") / "out.log").read_text()
    assert "(2 processes x 4 x accum 1)" in out
    config = OmegaConf.load(run_folder(tmp_path, "slurm") / "config.yaml")
    assert config.loss.local_loss and config.loss.gather_with_grad


# -- the README's side-by-side table -------------------------------------------------------------------------------
#: README rows whose YAML differs from the OpenCLIP command on purpose (the row says how), and where
README_DIFFERENCES = {
    "Large scale": {"data.train", "data.val", "checkpoint.save_interval", "callbacks.remote_sync", "run.logs"},
    "Distillation": {"algorithms.distillation.teacher"},
}


def readme_guide_rows() -> list[tuple[str, list[str], list[str]]]:
    """(section, OpenCLIP command words, Cadenza command words) of the README's table of the guide's commands."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    table = text[text.index("### The guide's commands") : text.index("### Troubleshooting advice")]
    rows, section = [], ""
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) != 3 or not cells[1].startswith("`"):
            continue
        section = cells[0] or section
        openclip_command, cadenza_command = (re.match(r"`([^`]*)`", cell).group(1) for cell in cells[1:])
        rows.append((section, shlex.split(openclip_command), shlex.split(cadenza_command)))
    return rows


def flag_keys(flags: list[str]) -> set[str]:
    """The config keys that the flags given set (``FLAGS``' key column)."""
    keys = set()
    for word in flags:
        flag = openclip.BY_DEST.get(word.partition("=")[0][2:].replace("-", "_")) if word.startswith("--") else None
        if flag is not None and flag.key:
            keys.update(flag.key.split(", "))
            if flag.dest in ("train_data", "val_data"):
                keys.add(f"data.{flag.dest.split('_')[0]}.type")  # --dataset-type auto reads the path
    return keys


def plain(value: Any) -> Any:
    """A config value with unset (None) entries of mappings dropped."""
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if v is not None}
    return value


def test_readme_guide_table_yamls_mean_what_the_commands_mean():
    from cadenza.train.config import load_config
    from cadenza.train.launch import split_launcher_args

    rows = readme_guide_rows()
    assert len(rows) == 33
    for section, openclip_words, cadenza_words in rows:
        at = next(i for i, w in enumerate(openclip_words) if "open_clip_train" in w)
        flags = openclip_words[at + 1 :]
        words = cadenza_words[1:] if cadenza_words[0] == "srun" else cadenza_words
        assert words[0] == "composer", section
        subcommand = words[1] == "eval"
        _, (config, *overrides) = split_launcher_args(words[2:] if subcommand else words[1:])
        overrides += ["data.train=null"] if subcommand else []  # what composer eval does
        yaml_cfg, flags_cfg = load_config(ROOT / config, overrides), translated(flags)
        allowed = next((keys for name, keys in README_DIFFERENCES.items() if section.startswith(name)), set())
        for key in sorted(flag_keys(flags)):
            if any(key == a or key.startswith(f"{a}.") for a in allowed):
                continue
            ours, theirs = (plain(OmegaConf.select(c, key, default=None)) for c in (yaml_cfg, flags_cfg))
            assert ours == theirs, f"{section}: {key} is {ours!r} in the YAML, {theirs!r} from the flags"


def test_readme_coming_from_openclip_ends_with_one_table_of_what_still_differs():
    import re

    text = (ROOT / "README.md").read_text()
    start = text.index("## Coming from OpenCLIP")
    section = text[start : text.index("\n## ", start)].rstrip() + "\n"
    last = section[section.rindex("\n### ") :]
    assert last.startswith("\n### What still differs from open_clip_train 3.3.0")
    tables = re.findall(r"(?:^\|.*\|\n)+", last, flags=re.M)
    assert len(tables) == 1 and section.endswith(tables[0])  # one table, and nothing after it
    rows = [[cell.strip() for cell in row.strip("|").split(" | ")] for row in tables[0].splitlines()[2:]]
    assert all(len(row) == 4 and row[3] for row in rows)  # every row says whether it is on purpose
    for difference in ("`--aug-cfg` given several times", "`--resume latest` without `--name`", "`--remote-sync`"):
        assert any(row[0] == difference for row in rows), difference
    assert any("pure_bf16" in row[0] for row in rows) and any("val/clip_val_loss" in row[0] for row in rows)


def test_readme_troubleshooting_keys_are_what_the_flags_become():
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Troubleshooting advice") : text.index("### Every flag")]
    checked = 0
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) != 3 or not cells[1].startswith("`--"):
            continue
        flags = shlex.split(re.match(r"`([^`]*)`", cells[1]).group(1))
        base = FRAGMENT_BASES["33.3"] if "--train-num-samples" in flags else FRAGMENT_BASES["31.2"]
        cfg = translated([*base, *flags])
        for key, value in re.findall(r"`([a-z_.]+): ([^`]+)`", cells[2]):
            expected = OmegaConf.create(f"v: {value}").v  # the README's value, read as YAML
            actual = OmegaConf.select(cfg, key)
            assert plain(actual) == plain(expected), f"{cells[0]}: {key} is {actual!r}, the README says {value}"
            checked += 1
    assert checked == 15


# -- side by side with open_clip_train 3.3.0 itself ------------------------------------------------------------------
#: one command for both trainers: the same OpenCLIP weights, fp32, 8 training rows in one batch (both see the same
#: batch whatever their shuffles), whole-image crops (scale 1 on square images), 3 epochs of one step with a warmup of
#: one and a cosine after it, and 16 validation rows in batches of 8
PAIRED = {
    "--model": "tiny-vit",
    "--batch-size": "8",
    "--epochs": "3",
    "--workers": "0",
    "--device": "cpu",
    "--precision": "fp32",
    "--warmup": "1",
    "--lr": "1e-3",
    "--report-to": "tensorboard",
}


@pytest.fixture(scope="module")
def twin(data, open_clip_tiny, tmp_path_factory) -> dict[str, Any]:
    """The same command run by open_clip_train and by ``composer openclip``, in a folder whose CSVs list image paths
    relative to it (``data/imgs/3.png``), as OpenCLIP reads them: from the working directory."""
    from PIL import Image

    root = tmp_path_factory.mktemp("twin")
    (root / "data" / "imgs").mkdir(parents=True)
    for index in range(16):  # square, so a crop of scale 1 is the whole image for both trainers
        color = ((37 * index) % 256, (91 * index) % 256, (13 * index) % 256)
        Image.new("RGB", (32, 32), color).save(root / "data" / "imgs" / f"{index}.png")
    rows = [f"data/imgs/{i}.png\tsample {i}" for i in range(16)]
    (root / "data" / "train.csv").write_text("\n".join(["filepath\ttitle", *rows[:8]]) + "\n")
    (root / "data" / "val.csv").write_text("\n".join(["filepath\ttitle", *rows]) + "\n")
    flags = replaced(
        ["--train-data", "data/train.csv", "--val-data", "data/val.csv", "--aug-cfg", "scale=(1.0, 1.0)"],
        {**PAIRED, "--pretrained": data["tiny-vit"], "--logs": str(root / "logs")},
    )
    assert open_clip_train([*flags, "--name", "theirs"], cwd=root) is None
    with contextlib.chdir(root):
        run_inprocess([*flags, "--name", "ours"])
    return {"root": root, "flags": flags, "theirs": root / "logs" / "theirs", "ours": root / "logs" / "ours"}


def our_series(folder: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for name, value in row.items():
            series.setdefault(name, []).append((row["step"], value))
    return series


def test_train_metrics_are_open_clips_values_under_its_names(twin):
    """Items 7 and 8: the LR and logit scale a step used (OpenCLIP reads them before its scheduler and clamp move
    them on), under OpenCLIP's names (``train/scale``); Cadenza's step counts finished steps (OpenCLIP's 0 is its 1)."""
    theirs, ours = openclip_scalars(twin["theirs"]), our_series(twin["ours"])
    assert set(theirs) <= set(ours), set(theirs) - set(ours)  # every name OpenCLIP writes
    for name in ("train/loss", "train/contrastive_loss", "train/lr", "train/scale"):
        assert [step + 1 for step, _ in theirs[name]] == [step for step, _ in ours[name]], name
        assert [v for _, v in ours[name]] == pytest.approx([v for _, v in theirs[name]], rel=1e-4), name
    assert [v for _, v in ours["train/lr"]] == pytest.approx([1e-3, 1e-3, 5e-4])  # warmup step, then the cosine


def test_validation_metrics_are_open_clips(twin):
    """Item 2: ``val/clip_val_loss`` is OpenCLIP's mean of in-batch losses (two batches of 8), and ``val/epoch`` and the
    retrieval metrics are OpenCLIP's; the loss over the whole set has its own name."""
    theirs, ours = openclip_scalars(twin["theirs"]), our_series(twin["ours"])
    names = [name for name in theirs if name.startswith("val/")]
    assert "val/clip_val_loss" in names and "val/epoch" in names and "val/num_samples" in names
    for name in names:  # OpenCLIP's TensorBoard plots them over the epoch; here over the step (one step an epoch)
        assert [step for step, _ in ours[name]] == [step for step, _ in theirs[name]] == [1, 2, 3], name
        # a tiny random model scores some captions within float rounding of each other: ranks may swap one place
        tolerance = {"abs": 1.0 if "median" in name else 1 / 16} if "rank" in name or "R@" in name else {"rel": 1e-4}
        assert [v for _, v in ours[name]] == pytest.approx([v for _, v in theirs[name]], **tolerance), name
    whole_set = [v for _, v in ours["val/clip_val_loss_whole_set"]]
    assert whole_set != pytest.approx([v for _, v in ours["val/clip_val_loss"]], rel=1e-2)


def test_csv_image_paths_are_read_from_the_working_directory(twin):
    """Item 4: ``data/imgs/3.png`` in an OpenCLIP CSV is read from where the command runs; nothing was skipped."""
    config = OmegaConf.load(twin["ours"] / "config.yaml")
    assert config.data.train.image_root == "." and config.data.val.image_root == "."
    assert all(row["data/skipped"] == 0 for row in metric_rows(twin["ours"], "data/skipped"))


def test_checkpoints_carry_open_clips_names_and_resume_from_its_epoch_files(twin, data, tmp_path, capsys):
    """Item 6: OpenCLIP's ``epoch_K.pt`` names are written, and an OpenCLIP ``epoch_1.pt`` resumes here as in
    OpenCLIP: the next epochs' losses and LRs are OpenCLIP's, and so are the final weights. A bare weights file is
    refused in one line pointing at --pretrained."""
    from cadenza.models import create_model
    from cadenza.models.convert import openclip_to_cadenza

    theirs = {p.name for p in (twin["theirs"] / "checkpoints").glob("epoch_*.pt")}
    assert theirs == {"epoch_1.pt", "epoch_2.pt", "epoch_3.pt"}
    assert {p.name for p in (twin["ours"] / "checkpoints").glob("epoch_*.pt")} == theirs
    resume = ["--name", "resumed", "--resume", str(twin["theirs"] / "checkpoints" / "epoch_1.pt")]
    with contextlib.chdir(twin["root"]):
        run_inprocess([*twin["flags"], *resume])
    scalars, ours = openclip_scalars(twin["theirs"]), our_series(twin["root"] / "logs" / "resumed")
    for name in ("train/loss", "train/lr", "train/scale"):
        assert [step for step, _ in ours[name]] == [2, 3], name
        assert [v for _, v in ours[name]] == pytest.approx([v for _, v in scalars[name][1:]], rel=1e-4), name
    model = create_model("tiny-vit")
    final = read_checkpoint(twin["theirs"] / "checkpoints" / "epoch_3.pt")["state_dict"]
    expected = openclip_to_cadenza(final, model)
    resumed = read_checkpoint(twin["root"] / "logs" / "resumed" / "checkpoints" / "epoch_3.pt")["state_dict"]
    for key, value in expected.items():
        ours = resumed[key]
        if key.endswith(("qkv.bias", "in_proj_bias")):  # the key bias: its gradient is 0 up to rounding, which AdamW
            third = len(value) // 3  # scales up to the learning rate; the two attention kernels round differently
            ours, value = torch.cat([ours[:third], ours[2 * third :]]), torch.cat([value[:third], value[2 * third :]])
        torch.testing.assert_close(ours, value, rtol=1e-3, atol=1e-5, msg=key)
    # --resume latest in a folder OpenCLIP wrote: its newest epoch_K.pt (here the last: nothing left to train)
    shutil.copytree(twin["theirs"] / "checkpoints", tmp_path / "copied" / "checkpoints")
    latest = {"--name": "copied", "--logs": str(tmp_path), "--resume": "latest", "--val-data": None}
    with contextlib.chdir(twin["root"]):
        run_inprocess(replaced(twin["flags"], latest))
    assert (
        f"resumed from OpenCLIP's {tmp_path / 'copied' / 'checkpoints' / 'epoch_3.pt'} at epoch 3"
        in (tmp_path / "copied" / "out.log").read_text()
    )
    with contextlib.chdir(twin["root"]):
        assert openclip.main([*twin["flags"], "--name", "bare", "--resume", data["tiny-vit"], *NO_PEAK]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not a training checkpoint" in error and "(--pretrained)" in error


def test_progress_lines_and_epoch_ends_as_open_clip_logs_them(twin):
    """Item 13: the samples of the epoch in the progress line, rates with significant digits, every epoch's start and
    last step logged, and the default run name with OpenCLIP's ``-j_N``."""
    import re

    from cadenza.train.trainer import default_run_name

    def lines(folder: Path) -> list[str]:
        text = (folder / "out.log").read_text()
        return re.findall(r"Start epoch \d+|Train Epoch: \d+ \[[ \d]+/\d+ \(\d+%\)\]", text)

    assert lines(twin["ours"]) == lines(twin["theirs"])
    assert len(lines(twin["ours"])) == 6  # --log-every-n-steps 100: each epoch's last step is still logged
    rates = re.findall(r"Batch \(t\): [\d.]+, (\S+)/s,", (twin["ours"] / "out.log").read_text())
    assert rates and all(len(rate.replace(".", "").lstrip("0")) >= 6 for rate in rates)  # %#g, as OpenCLIP
    name = default_run_name(translated([*FRAGMENT_BASE, "--model", "ViT-B/32", "--workers", "3"]))
    assert re.fullmatch(r"\d{4}_\d\d_\d\d-\d\d_\d\d_\d\d-model_ViT-B-32-lr_0.0005-b_64-j_3-p_amp", name)


def test_siglip_from_clip_weights_starts_with_bias_zero_as_open_clip_train(twin, data, tmp_path):
    """Item 3: CLIP weights have no logit bias; OpenCLIP starts a SigLIP fine-tune from 0 (open_clip#712), not -10."""
    flags = replaced(twin["flags"], {"--epochs": "1", "--val-data": None, "--logs": str(tmp_path)})
    flags = [*flags, "--siglip"]
    assert open_clip_train([*flags, "--name", "theirs"], cwd=twin["root"]) is None
    with contextlib.chdir(twin["root"]):
        run_inprocess([*flags, "--name", "ours"])
    theirs, ours = openclip_scalars(tmp_path / "theirs"), our_series(tmp_path / "ours")
    assert [v for _, v in ours["train/loss"]] == pytest.approx([v for _, v in theirs["train/loss"]], rel=1e-4)
    bias = read_checkpoint(tmp_path / "ours" / "checkpoints" / "epoch_1.pt")["state_dict"]["logit_bias"]
    expected = read_checkpoint(tmp_path / "theirs" / "checkpoints" / "epoch_1.pt")["state_dict"]["logit_bias"]
    assert abs(float(bias)) < 0.01 and float(bias) == pytest.approx(float(expected), abs=1e-6)


def test_a_used_name_is_refused_as_open_clip_train_refuses_it(data, tmp_path, capsys):
    """Item 5: a --name whose folder holds an earlier run's out.log is refused before any work, unless resuming."""
    flags = ["--train-data", data["csv"], "--model", "tiny-vit", *FAST_FLAGS, "--device", "cpu"]
    flags += ["--logs", str(tmp_path), "--name", "taken"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "out.log").write_text("an earlier run\n")
    assert open_clip_train(flags) == -1
    assert "Experiment already exists" in capsys.readouterr().out
    assert openclip.main([*flags, *NO_PEAK]) == 2
    assert "Experiment already exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "out.log").read_text() == "an earlier run\n"  # untouched


FAST_FLAGS = [word for option, value in FAST.items() for word in (option, value)]


def our_transform(flags: list[str]):
    from cadenza.datasets.transforms import image_transform
    from cadenza.models.clip import OPENAI_MEAN, OPENAI_STD

    augment = OmegaConf.to_container(translated([*FRAGMENT_BASE, *flags]).data.augment)
    return image_transform(32, True, OPENAI_MEAN, OPENAI_STD, **augment)


def test_timm_augmentation_is_open_clips(caplog):
    """Item 1: ``--aug-cfg use_timm=True`` builds the transform OpenCLIP builds: no colour jitter unless asked for
    (timm's own default is 0.4); the SimCLR keys OpenCLIP drops under timm are an error here, not ignored."""
    import open_clip

    from cadenza.models.clip import OPENAI_MEAN, OPENAI_STD

    for aug in ({"use_timm": True}, {"use_timm": True, "scale": (0.5, 1.0), "color_jitter": 0.3, "re_prob": 0.25}):
        words = [f"{key}={value!r}" for key, value in aug.items()]
        theirs = open_clip.image_transform(32, True, OPENAI_MEAN, OPENAI_STD, aug_cfg=dict(aug))
        assert str(our_transform(["--aug-cfg", *words])) == str(theirs)
    assert "ColorJitter" not in str(our_transform(["--aug-cfg", "use_timm=True"]))
    with pytest.raises(ConfigError, match="color_jitter_prob / gray_scale_prob are not used with use_timm"):
        translated([*FRAGMENT_BASE, "--aug-cfg", "use_timm=True", "gray_scale_prob=0.2"])


def test_timm_only_augmentation_without_timm_is_ignored_with_open_clips_warning(caplog):
    """Item 10: ``ratio`` (and ``re_prob``) without ``use_timm``: OpenCLIP warns and keeps its crop's default ratio;
    so does the translation (a YAML's ``data.augment.ratio`` is applied)."""
    import open_clip

    from cadenza.models.clip import OPENAI_MEAN, OPENAI_STD

    with pytest.warns(UserWarning, match="Unused augmentation cfg items"):
        theirs = open_clip.image_transform(32, True, OPENAI_MEAN, OPENAI_STD, aug_cfg={"ratio": (0.5, 2.0)})
    with caplog.at_level("WARNING", logger="cadenza"):
        ours = our_transform(["--aug-cfg", "ratio=(0.5, 2.0)", "re_prob=0.5"])
    assert "Unused augmentation cfg items, specify `use_timm` to use (['ratio', 're_prob'])" in caplog.text
    assert ours.transforms[0].ratio == theirs.transforms[0].ratio == (3 / 4, 4 / 3)


def test_config_errors_name_only_the_flags_given():
    """Item 11: an error about model.name names --model, not --force-quick-gelu that was not passed."""
    for flags in (["--model", "ViT-B-99"], ["--mod", "ViT-B-99"], ["--model=ViT-B-99"]):
        with pytest.raises(ConfigError, match="unknown model") as info:
            translated([*FRAGMENT_BASE, *flags])
        assert str(info.value).endswith("(set by --model)"), str(info.value)
    with pytest.raises(ConfigError, match=r"\(set by --model, --force-quick-gelu\)"):
        translated([*FRAGMENT_BASE, "--model", "ViT-B-99", "--force-quick-gelu"])


def test_model_names_and_flags_open_clip_accepts(data, open_clip_tiny):
    """Item 12: ``ViT-B/32``, ``--force-quick-gelu`` on an architecture without a -quickgelu twin (the embeddings of
    OpenCLIP's model with the same weights), and more unlocked image groups than the tower has (all of it trains)."""
    import open_clip

    from cadenza.algorithms.lock_image import lock_image_tower
    from cadenza.models import create_model

    assert translated([*FRAGMENT_BASE, "--model", "ViT-B/32"]).model.name == "ViT-B-32"
    cfg = translated([*FRAGMENT_BASE, "--model", "tiny-vit", "--force-quick-gelu", "--pretrained", data["tiny-vit"]])
    ours = create_model(cfg.model.name, cfg.model.pretrained, **OmegaConf.to_container(cfg.model.overrides)).eval()
    theirs = open_clip.create_model("tiny-vit", pretrained=data["tiny-vit"], force_quick_gelu=True).eval()
    plain = create_model("tiny-vit", data["tiny-vit"]).eval()
    images, tokens = torch.randn(2, 3, 32, 32), open_clip.get_tokenizer("tiny-vit")(["a cat", "two dogs"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(tokens), theirs.encode_text(tokens), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain.encode_image(images), theirs.encode_image(images), rtol=1e-3)
    locked = translated([*FRAGMENT_BASE, "--lock-image", "--lock-image-unlocked-groups", "99"]).algorithms.lock_image
    model, reference = create_model("tiny-vit"), open_clip.create_model("tiny-vit")
    lock_image_tower(model, locked.unlocked_groups)
    reference.lock_image_tower(unlocked_groups=locked.unlocked_groups)
    assert all(p.requires_grad for p in model.parameters()) and all(p.requires_grad for p in reference.parameters())


def test_local_dir_and_hf_hub_model_names(twin, tmp_path, monkeypatch):
    """Item 12: ``--model local-dir:DIR`` (``composer export --format openclip DIR`` output, or a folder with an
    OpenCLIP config of a known architecture) and ``hf-hub:org/repo`` from the Hub's cache; offline or unreachable, a
    repository not cached is one clear error."""
    import open_clip

    from cadenza.models import create_model
    from cadenza.models.export import export_openclip

    folder = export_openclip(twin["ours"] / "checkpoints" / "epoch_3.pt", tmp_path / "exported")
    cfg = translated([*FRAGMENT_BASE, "--model", f"local-dir:{folder}"])
    assert (cfg.model.name, cfg.model.pretrained) == ("tiny-vit", str(folder / "open_clip_model.safetensors"))
    ours = create_model(cfg.model.name, cfg.model.pretrained, **OmegaConf.to_container(cfg.model.overrides)).eval()
    theirs = open_clip.create_model(f"local-dir:{folder}").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), rtol=1e-4, atol=1e-5)
    with pytest.raises(openclip.FlagError, match="--pretrained x.pt: OpenCLIP ignores it with --model local-dir:"):
        translated([*FRAGMENT_BASE, "--model", f"local-dir:{folder}", "--pretrained", "x.pt"])
    plain = tmp_path / "plain"  # an OpenCLIP config with no Cadenza entry: the architecture it describes
    plain.mkdir()
    (plain / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("ViT-B-32")}))
    assert translated([*FRAGMENT_BASE, "--model", f"local-dir:{plain}"]).model.name == "ViT-B-32"

    hub = tmp_path / "hub"  # the Hub's cache layout: refs/main names the snapshot
    snapshot = hub / "models--someone--tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (hub / "models--someone--tiny" / "refs").mkdir()
    (hub / "models--someone--tiny" / "refs" / "main").write_text("0123abcd")
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = translated([*FRAGMENT_BASE, "--model", "hf-hub:someone/tiny"])
    assert (cfg.model.name, cfg.model.pretrained) == ("tiny-vit", str(snapshot / "open_clip_model.safetensors"))
    with pytest.raises(ConfigError, match="'hf-hub:someone/other' is not in the Hugging Face cache and HF_HUB_OFFLINE"):
        translated([*FRAGMENT_BASE, "--model", "hf-hub:someone/other"])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="cannot reach the Hugging Face Hub at .* for 'hf-hub:someone/other'"):
        translated([*FRAGMENT_BASE, "--model", "hf-hub:someone/other"])
