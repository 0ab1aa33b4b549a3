"""Every example in the README runs: Python blocks execute, the YAML reference equals the schema's
defaults, and every `composer` command line loads a valid config."""

from __future__ import annotations

import re
import shlex

import pytest
from omegaconf import OmegaConf

from cadenza.train.config import CadenzaConfig, build_config, load_config

from .conftest import ROOT

README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("code", blocks("python"))
def test_python_examples_run(code):
    exec(compile(code, "README.md", "exec"), {})


def test_yaml_reference_lists_every_key_with_its_default():
    reference = next(b for b in blocks("yaml") if b.startswith("run:") and "\ndist:" in b)
    assert OmegaConf.to_container(OmegaConf.create(reference)) == OmegaConf.to_container(
        OmegaConf.structured(CadenzaConfig)
    )


def test_yaml_snippets_are_valid_configs():
    base = {"data": {"train": {"type": "synthetic", "num_samples": 8}}}
    for block in blocks("yaml"):
        if "\ndist:" in block:
            continue  # the full reference, checked against the schema above
        if re.search(r"^tasks:", block, flags=re.M):
            continue  # an evaluation suite, not a config: tests/test_eval_suite.py runs it
        build_config(OmegaConf.merge(base, OmegaConf.create(block)))


def test_composer_command_lines_load(tmp_path):
    from cadenza.train.cli import SUBCOMMANDS
    from cadenza.train.launch import split_launcher_args

    lines = [line.split("#")[0].strip() for b in blocks("bash") for line in b.splitlines()]
    lines = [line.removeprefix("srun --ntasks-per-node 8 ") for line in lines]
    commands = [shlex.split(line) for line in lines if line.startswith("composer ")]
    assert commands
    for command in commands:
        if command[1] in SUBCOMMANDS:
            continue  # subcommands are run by their own tests
        _, (config, *overrides) = split_launcher_args(command[1:])
        if config in SUBCOMMANDS:
            continue  # composer -n N <subcommand> ...
        load_config(ROOT / config, overrides)
