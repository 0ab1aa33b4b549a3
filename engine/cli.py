"""The ``composer`` (alias ``cadenza``) command.

composer CONFIG.yaml [key=value ...]     train (one process; see README for launchers)
"""

from __future__ import annotations

import argparse
import logging
import sys

from cadenza.engine.errors import CadenzaError, ConfigError

log = logging.getLogger("cadenza")

USAGE = """composer CONFIG.yaml [key=value ...]

Train a CLIP model from a YAML config. Overrides use dotted keys, e.g.
  composer yamls/tiny.yaml run.duration=8ba optim.lr=1e-4
"""


#: ``composer <name> ...`` runs ``<module>.main(argv)``; each returns an exit status
SUBCOMMANDS: dict[str, str] = {}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
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
