"""``composer eval``: evaluate a model without training.

    composer eval CONFIG [key=value ...]
    composer eval --tasks SUITE MODEL_OR_CHECKPOINT [key=value ...]
    composer eval CONFIG checkpoint.resume=CHECKPOINT [key=value ...] --wise-ft ALPHAS [--base PRETRAINED]

With a CONFIG, the model comes from ``model.pretrained`` or from a checkpoint (``checkpoint.resume=PATH``);
``data.val`` (retrieval metrics, validation loss), ``eval.zero_shot`` and ``eval.tasks`` run once, as OpenCLIP does
with ``--imagenet-val`` and no ``--train-data``. ``data.train`` is ignored.

With ``--tasks SUITE`` (a suite file such as ``yamls/eval/imagenet.yaml``), every task of the suite is scored on
MODEL_OR_CHECKPOINT: a Cadenza checkpoint (its stored config gives the architecture, the loss and the loader
settings) or an architecture name (``ViT-B-32``, with ``model.pretrained=TAG_OR_FILE`` for weights). The results
table is printed and written to ``<run.logs>/<run.name>/results/`` as markdown and JSON. ``eval.data_root=DIR``
moves the suite's data; ``composer -n N eval ...`` splits the work over N processes.

``--wise-ft 0,0.25,0.5,0.75,1 [--base PRETRAINED]`` evaluates WiSE-FT's interpolations between the checkpoint and
its zero-shot weights instead: the config's ``eval.tasks``, ``eval.zero_shot`` and ``data.val`` once per alpha
(``train/wise_ft_sweep.py``).
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cadenza.engine import dist
from cadenza.engine.errors import CadenzaError, ConfigError, suggest
from cadenza.engine.registry import MODELS
from cadenza.train import wise_ft_sweep
from cadenza.train.config import load_config
from cadenza.train.eval_suite import SuiteEvaluator, logged_metrics
from cadenza.train.trainer import Trainer

TARGET = "MODEL_OR_CHECKPOINT"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(__doc__.strip() + "\n")
        return 0 if argv else 2
    if any(arg == "--wise-ft" or arg.startswith("--wise-ft=") for arg in argv):
        return wise_ft_sweep.main(argv)
    try:
        if argv[0] == "--tasks" or argv[0].startswith("--tasks="):
            cfg = suite_config(*_suite_arguments(argv))
        else:
            config, *overrides = argv
            cfg = load_config(config, [*overrides, "data.train=null"])
        trainer = Trainer(cfg)
        metrics = trainer.fit().eval_metrics
    except ConfigError as error:
        sys.stderr.write(f"composer eval: configuration error: {error}\n")
        return 2
    except CadenzaError as error:
        sys.stderr.write(f"composer eval: {error}\n")
        return 1
    if dist.get_rank() != 0:
        return 0
    suite = next((c for c in trainer.state.callbacks if isinstance(c, SuiteEvaluator)), None)
    if suite is not None and suite.results is not None:
        sys.stdout.write(suite.markdown)
        if suite.written is not None:
            sys.stdout.write(f"\nresults: {suite.written}.md, {suite.written}.json\n")
        metrics = {k: v for k, v in metrics.items() if k not in logged_metrics(suite.results)}
    for name, value in sorted(metrics.items()):
        sys.stdout.write(f"{name}: {value:.6g}\n")
    return 0


def _suite_arguments(argv: list[str]) -> tuple[str, str, list[str]]:
    flag, _, suite = argv[0].partition("=")
    rest = argv[1:]
    if not suite:
        if not rest:
            raise ConfigError("--tasks", "needs a suite file: composer eval --tasks yamls/eval/<suite>.yaml MODEL.")
        suite, rest = rest[0], rest[1:]
    if not rest or "=" in rest[0]:
        raise ConfigError(TARGET, f"missing: composer eval --tasks {suite} {TARGET} [key=value ...].")
    return suite, rest[0], rest[1:]


def suite_config(suite: str, target: str, overrides: list[str]) -> DictConfig:
    """The config that scores ``target`` (a Cadenza checkpoint or an architecture name) on the suite ``suite``."""
    base: dict[str, Any] = {"eval": {"tasks": suite}, "data": {"train": None}, "run": {}}
    path = Path(target)
    if path.is_file():
        base.update(_checkpoint_settings(path, base))
    elif target in MODELS.names():
        base["model"] = {"name": target}
    else:
        raise ConfigError(
            TARGET,
            f"'{target}' is neither a file nor an architecture name.{suggest(target, MODELS.names())} A checkpoint "
            "from OpenCLIP is an architecture with weights: ViT-B-32 model.pretrained=FILE.",
        )
    stamp = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    base["run"]["name"] = f"eval-{Path(suite).stem}-{path.stem if path.is_file() else target}-{stamp}"
    return load_config(None, overrides, base=base)


def _checkpoint_settings(path: Path, base: dict[str, Any]) -> dict[str, Any]:
    """Model, loss, precision and loader settings of a Cadenza checkpoint's stored config, and resuming from it."""
    import torch

    from cadenza.engine.checkpoint import stored_config

    if path.suffix in (".yaml", ".yml"):
        raise ConfigError(TARGET, f"'{path}' is a config: run composer eval {path} eval.tasks=SUITE instead.")
    try:  # memory-mapped: only the stored config is read here; the trainer verifies and loads the weights
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ConfigError(TARGET, f"'{path}' cannot be read as a checkpoint ({error}).") from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        raise ConfigError(
            TARGET,
            f"'{path}' is not a Cadenza checkpoint (it stores no config). For OpenCLIP weights give the architecture "
            f"and the file: composer eval --tasks SUITE ViT-B-32 model.pretrained={path}.",
        )
    stored = stored_config(checkpoint, path)
    model = {**stored.get("model", {}), "pretrained": None}  # the weights come from the checkpoint
    data = {k: v for k, v in stored.get("data", {}).items() if k in ("batch_size", "workers")}
    return {
        "model": model,
        "loss": stored.get("loss", {}),
        "run": {**base["run"], **{k: v for k, v in stored.get("run", {}).items() if k == "precision"}},
        "data": {**base["data"], **data},
        "checkpoint": {"resume": str(path)},
    }
