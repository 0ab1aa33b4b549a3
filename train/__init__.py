"""The composition root: the config schema and loading, the ``Trainer`` that builds everything from a config and
runs the loop, zero-shot evaluation, and the ``composer`` command with its subcommands.

It imports the kernel (``cadenza.engine``), the models, the datasets and the algorithms; nothing imports it.

Example:
    >>> from cadenza.train import build_config
    >>> cfg = build_config({"data": {"train": {"type": "synthetic", "num_samples": 8}}, "run": {"duration": "2ba"}})
    >>> cfg.run.duration, cfg.model.name
    ('2ba', 'tiny-vit')
"""

from cadenza.train.config import build_config, load_config
from cadenza.train.trainer import Trainer, train

__all__ = ["Trainer", "build_config", "load_config", "train"]
