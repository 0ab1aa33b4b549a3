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

import json
import os
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
CSV = {"csv_separator": "\t", "csv_img_key": "filepath", "csv_caption_key": "title"}
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


def test_remote_sync_folder_is_named_after_the_run_as_in_openclip():
    import re

    cfg = translated(guide_flags(COMMANDS["17.0"]))
    assert re.fullmatch(r"\d{4}_\d\d_\d\d-\d\d_\d\d_\d\d-model_RN50-lr_0.0005-b_64-j_4-p_amp", cfg.run.name)
    assert cfg.callbacks.remote_sync.remote == f"s3://my-bucket/checkpoints/{cfg.run.name}"
    named = translated([*guide_flags(COMMANDS["17.0"]), "--name", "exp"])
    assert named.callbacks.remote_sync.remote == "s3://my-bucket/checkpoints/exp"


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
#: a Cadenza override for every run: the MFU peak is otherwise measured with matmuls in the run's precision, about a
#: second per process on a CPU (fp16, OpenCLIP's default amp, is emulated and slow there)
NO_PEAK = ("--", "run.peak_tflops=1.0")
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
    found["csv"] = str(write_csv(root / "csv", 8))
    found["val_csv"] = str(write_csv(root / "val", 8))
    found["caption_csv"] = str(write_csv(root / "small", 8, caption_key="caption"))
    found["text_csv"] = str(write_csv(root / "keys", 8, img_key="image_path", caption_key="text"))
    found["shards"] = write_shards(root / "wds", 2, 8)
    found["val_shards"] = write_shards(root / "wds-val", 2, 4, first=100)  # a shard per process
    imagenet = root / "imagenet" / "val"
    for label, name in enumerate(("cat", "dog", "car")):
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
    return found


def run_inprocess(flags: list[str]) -> None:
    assert openclip.main([*flags, *NO_PEAK]) == 0


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
    # every 2 epochs, only the newest kept (--delete-previous-checkpoint), and epoch_latest.pt (--save-most-recent)
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == ["ep4-ba4.pt", "epoch_latest.pt"]
    saved = read_checkpoint(checkpoints / "ep4-ba4.pt")
    assert {"epoch", "name", "state_dict", "optimizer"} <= set(saved)  # the guide's torch.load(...).keys() check
    assert saved["epoch"] == 4

    resumed = {
        "--train-data": data["csv"],
        "--epochs": "5",
        "--batch-size": "8",
        "--resume": str(checkpoints / "ep4-ba4.pt"),
    }
    run_inprocess(substituted("16.0", {**resumed, **log_flags(tmp_path, "from-path")}))
    assert metric_rows(run_folder(tmp_path, "from-path"), "train/loss")[-1]["step"] == 5
    assert (run_folder(tmp_path, "from-path") / "checkpoints" / "ep5-ba5.pt").is_file()

    # 16.1 with the --name that 'latest' needs: continues the ckpt run itself
    run_inprocess(substituted("16.1", {"--train-data": data["csv"], "--epochs": "6", "--batch-size": "8", **name}))
    rows = metric_rows(run_folder(tmp_path, "ckpt"), "train/loss")
    assert [row["step"] for row in rows][-2:] == [4, 6]


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
        assert "train/contrastive_loss" in rows[-1] and rows[-1]["train/logit_scale"] == pytest.approx(10, rel=0.01)
    else:
        assert check in out  # the algorithm is listed as active


def test_zero_shot_during_training_and_evaluation_only(data, tmp_path):
    run_inprocess(
        substituted(
            "22.0", {"--train-data": data["csv"], "--imagenet-val": data["imagenet"], **log_flags(tmp_path, "zs")}
        )
    )
    assert metric_rows(run_folder(tmp_path, "zs"), "val/imagenet-zeroshot-val-top1")
    flags = substituted(
        "23.0", {"--imagenet-val": data["imagenet"], "--pretrained": data["tiny-vit"], **log_flags(tmp_path, "eval")}
    )
    run_inprocess(flags)
    folder = run_folder(tmp_path, "eval")
    rows = metric_rows(folder, "val/imagenet-zeroshot-val-top5")
    assert len(rows) == 1 and rows[0]["val/imagenet-zeroshot-val-top5"] == 1.0  # 3 classes: all in the top 5
    assert not list(folder.glob("checkpoints/*.pt"))  # nothing trained


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
    assert sorted(p.name for p in (folder / "checkpoints").glob("*.pt")) == ["ep1-ba2.pt", "epoch_latest.pt"]
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
    "Remote sync": {"callbacks.remote_sync.remote"},  # OpenCLIP's date-based run name against the YAML's run.name
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
