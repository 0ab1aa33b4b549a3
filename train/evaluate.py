"""``composer eval CONFIG [key=value ...]``: evaluate a model without training.

The model comes from ``model.pretrained`` or from a checkpoint (``checkpoint.resume=PATH``);
``data.val`` (retrieval metrics, validation loss) and ``eval.zero_shot`` run once, as OpenCLIP does
with ``--imagenet-val`` and no ``--train-data``. ``data.train`` is ignored.

``--wise-ft 0,0.25,0.5,0.75,1 [--base PRETRAINED]`` evaluates WiSE-FT's interpolations between the checkpoint and
its zero-shot weights instead, one evaluation per alpha (``train/wise_ft_sweep.py``).
"""

from __future__ import annotations

import sys

from cadenza.engine.errors import CadenzaError, ConfigError
from cadenza.train import wise_ft_sweep
from cadenza.train.config import load_config
from cadenza.train.trainer import Trainer


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(__doc__.strip() + "\n")
        return 0 if argv else 2
    if any(arg == "--wise-ft" or arg.startswith("--wise-ft=") for arg in argv):
        return wise_ft_sweep.main(argv)
    config, *overrides = argv
    try:
        cfg = load_config(config, [*overrides, "data.train=null"])
        metrics = Trainer(cfg).fit().eval_metrics
    except ConfigError as error:
        sys.stderr.write(f"composer eval: configuration error: {error}\n")
        return 2
    except CadenzaError as error:
        sys.stderr.write(f"composer eval: {error}\n")
        return 1
    for name, value in sorted(metrics.items()):
        sys.stdout.write(f"{name}: {value:.6g}\n")
    return 0
