"""``composer eval CONFIG [key=value ...] --wise-ft ALPHAS [--base PRETRAINED]``: WiSE-FT over a list of alphas.

Evaluates WiSE-FT's interpolations between the checkpoint's weights (``checkpoint.resume=PATH``; a LoRA run's adapters
folded in) and its zero-shot weights (``--base``, a ``model.pretrained`` value; default: the run's own
``model.pretrained``), one evaluation of the config's (``eval.zero_shot``, ``data.val``) per alpha, and prints a table
of the metrics per alpha (see :mod:`cadenza.models.wise_ft`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from omegaconf import OmegaConf

from cadenza.engine.errors import CadenzaError, ConfigError
from cadenza.engine.object_store import is_remote
from cadenza.models.export import base_weights, read_checkpoint, trained_model
from cadenza.models.wise_ft import check_alpha, interpolate_weights
from cadenza.train.config import build_config, load_config
from cadenza.train.trainer import Trainer


def parse_alphas(text: str) -> list[float]:
    """``"0,0.5,1"`` → ``[0.0, 0.5, 1.0]`` (each in [0, 1]), else a ``ConfigError`` naming ``--wise-ft``."""
    try:
        alphas = [check_alpha(float(part)) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ConfigError(
            "--wise-ft", f"expected numbers in [0, 1] separated by commas, e.g. 0,0.5,1 ({error})."
        ) from None
    if not alphas:
        raise ConfigError("--wise-ft", "give at least one alpha, e.g. 0,0.5,1.")
    return alphas


def wise_ft_sweep(config: str, overrides: list[str], alphas: list[float], base: str | None) -> list[dict[str, Any]]:
    """One evaluation per alpha of ``(1 - alpha) * base + alpha * checkpoint.resume``'s weights.

    The evaluation is the config's (``eval.zero_shot``, ``data.val``) on a model built from it; its algorithms (training
    techniques, LoRA included: the weights come merged) are left out.

    Returns:
        ``[{"alpha": a, **metrics}, ...]`` in the order of ``alphas``.
    """
    cfg = load_config(config, [*overrides, "data.train=null"])
    checkpoint = cfg.checkpoint.resume
    if checkpoint is None or checkpoint == "latest" or is_remote(checkpoint):
        raise ConfigError(
            "checkpoint.resume", "--wise-ft needs the fine-tuned checkpoint as a local file: checkpoint.resume=PATH."
        )
    trained = read_checkpoint(checkpoint)
    fine_tuned = trained_model(trained, checkpoint).state_dict()
    zero_shot = base_weights(trained, base, checkpoint)
    plain = OmegaConf.to_container(cfg)
    plain["checkpoint"]["resume"] = None
    plain["algorithms"] = {}
    trainer = Trainer(build_config(plain))
    rows = []
    try:
        model = trainer.state.model
        for alpha in alphas:
            model.load_state_dict(interpolate_weights(zero_shot, fine_tuned, alpha))
            rows.append({"alpha": alpha, **trainer.evaluate()})
    finally:
        try:
            trainer.engine.close()
        finally:
            trainer.release()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The sweep as a text table: one row per alpha, one column per metric."""
    names = sorted({key for row in rows for key in row if key != "alpha"})
    lines = ["  ".join(["alpha", *names])]
    for row in rows:
        values = [f"{row['alpha']:<5g}"] + [f"{row[n]:<{len(n)}.4f}" if n in row else "-" for n in names]
        lines.append("  ".join(values).rstrip())
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``composer eval`` with ``--wise-ft``: the sweep, its table on stdout; exit 2 for a config error, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="composer eval", add_help=False)
    parser.add_argument("--wise-ft", dest="wise_ft", required=True)
    parser.add_argument("--base")
    flags, rest = parser.parse_known_args(argv)
    if not rest:
        sys.stderr.write("composer eval: give a config file, e.g. composer eval yamls/tiny.yaml ... --wise-ft 0,1\n")
        return 2
    config, *overrides = rest
    try:
        rows = wise_ft_sweep(config, overrides, parse_alphas(flags.wise_ft), flags.base)
    except ConfigError as error:
        sys.stderr.write(f"composer eval: configuration error: {error}\n")
        return 2
    except CadenzaError as error:
        sys.stderr.write(f"composer eval: {error}\n")
        return 1
    sys.stdout.write("WiSE-FT (alpha 0: the zero-shot weights, 1: the fine-tuned ones)\n" + format_table(rows))
    return 0
