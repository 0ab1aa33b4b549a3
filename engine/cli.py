"""The ``composer`` (alias ``cadenza``) command.

composer CONFIG.yaml [key=value ...]            train in this process
composer -n N [torchrun flags] CONFIG.yaml ...  train on N processes (torch.distributed.run)
composer <subcommand> ...                       convert, export, ...
"""

from __future__ import annotations

import argparse
import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from cadenza.engine.errors import CadenzaError, ConfigError

log = logging.getLogger("cadenza")

USAGE = """composer [-n N] [torchrun flags] CONFIG.yaml [key=value ...]

Train a CLIP model from a YAML config. Overrides use dotted keys, e.g.
  composer yamls/tiny.yaml run.duration=8ba optim.lr=1e-4
  composer -n 8 yamls/vitb16.yaml                       # 8 processes on this node
  composer -n 8 --nnodes 2 --node-rank 0 --master-addr host0 --master-port 29500 CONFIG
"""


#: ``composer <name> ...`` runs ``<module>.main(argv)``; each returns an exit status
SUBCOMMANDS: dict[str, str] = {
    "convert": "cadenza.datasets.convert",
    "export": "cadenza.models.export",
    "eval": "cadenza.engine.evaluate",
    "report": "cadenza.engine.report",
    "openclip": "cadenza.engine.openclip",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        from cadenza.engine.launch import launch, split_launcher_args

        return launch(*split_launcher_args(argv))
    return train_main(argv)


@record
def train_main(argv: list[str]) -> int:
    """Train in this process (also what every worker of a multi-process launch runs)."""
    parser = argparse.ArgumentParser(prog="composer", usage=USAGE)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    try:
        from cadenza.engine.config import load_config
        from cadenza.engine.trainer import train

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
