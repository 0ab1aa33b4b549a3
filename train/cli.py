"""The ``composer`` (alias ``cadenza``) command.

composer CONFIG.yaml [key=value ...]            train in this process
composer -n N [torchrun flags] CONFIG.yaml ...  train on N processes (torch.distributed.run)
composer <subcommand> ...                       convert, export, ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from torch.distributed.elastic.multiprocessing.errors import record

from cadenza.datasets import convert
from cadenza.engine import dist
from cadenza.engine.errors import CadenzaError, ConfigError
from cadenza.models import export
from cadenza.train import evaluate, openclip, report
from cadenza.train.config import load_config
from cadenza.train.launch import launch, split_launcher_args
from cadenza.train.trainer import train

log = logging.getLogger("cadenza")

USAGE = """composer [-n N] [torchrun flags] CONFIG.yaml [key=value ...]

Train a CLIP model from a YAML config. Overrides use dotted keys, e.g.
  composer yamls/tiny.yaml run.duration=8ba optim.lr=1e-4
  composer -n 8 yamls/vitb16.yaml                       # 8 processes on this node
  composer -n 8 --nnodes 2 --node-rank 0 --master-addr host0 --master-port 29500 CONFIG
"""


#: the module every process of ``composer -n N`` runs: this one
WORKER = "cadenza.train.cli"

#: ``composer <name> ...`` runs ``main(argv)`` of the subcommand's module; each returns an exit status
SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "convert": convert.main,
    "export": export.main,
    "eval": evaluate.main,
    "report": report.main,
    "openclip": openclip.main,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        return launch(*split_launcher_args(argv), worker=WORKER)
    return train_main(argv)


@record
def train_main(argv: list[str]) -> int:
    """Train in this process (also what every worker of a multi-process launch runs)."""
    parser = argparse.ArgumentParser(prog="composer", usage=USAGE)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    if dist.launched_by_an_agent():
        dist.stop_with_launcher()
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except ConfigError as error:
        sys.stderr.write(f"composer: configuration error: {error}\n")
        return 2
    except CadenzaError as error:
        log.error("%s", error)
        sys.stderr.write(f"composer: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
