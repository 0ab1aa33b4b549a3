"""``composer export CHECKPOINT --format openclip OUT``: a Cadenza checkpoint as OpenCLIP weights.

The architecture comes from the checkpoint's stored config (``model.name`` and ``model.overrides``). ``OUT`` is

- a file (``.pt`` / ``.pth`` / ``.bin``: a ``torch.save``d state dict; ``.safetensors``): load it with
  ``open_clip.create_model("ViT-B-32", pretrained=OUT)``;
- anything else is a folder, written as a Hugging Face Hub repository is laid out (``open_clip_config.json`` and
  ``open_clip_model.safetensors``): ``open_clip.create_model("local-dir:OUT")`` loads it, also for architectures
  OpenCLIP has no name for (``tiny-vit``, or a known one changed by ``model.overrides``), and so does
  ``composer openclip --model local-dir:OUT`` (the config's ``cadenza`` entry names the architecture).

A LoRA run's adapters are folded into the weights (``--format lora`` writes them alone, unmerged, in peft's
format); ``--wise-ft ALPHA`` writes WiSE-FT's interpolation between the fine-tuned weights and ``--base``.

Example:
    composer export logs/my-run/checkpoints/epoch_latest.pt --format openclip vitb32.pt
    composer export logs/my-run/checkpoints/epoch_latest.pt --format openclip --wise-ft 0.5 vitb32-wise.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cadenza.engine.checkpoint import load_checkpoint, stored_config
from cadenza.engine.errors import CadenzaError, ConfigError
from cadenza.models.convert import (
    OPENCLIP_NAMES,
    StateDict,
    cadenza_to_openclip,
    openclip_model_config,
    openclip_preprocess_config,
)
from cadenza.models.factory import create_model
from cadenza.models.lora import add_lora, save_lora_adapter
from cadenza.models.losses import model_init_overrides
from cadenza.models.openclip_folder import CADENZA_KEY, folder_entry
from cadenza.models.pretrained import tag_normalization
from cadenza.models.wise_ft import check_alpha, interpolate_weights

log = logging.getLogger("cadenza")

FORMATS = ("openclip", "lora")
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def export_openclip(
    checkpoint: str | Path, out: str | Path, wise_ft: float | None = None, base: str | None = None
) -> Path:
    """Write ``checkpoint``'s model as OpenCLIP weights to ``out`` (a file or a folder; see the module doc).

    A LoRA run's adapters are folded into the weights first. With ``wise_ft`` the weights written are WiSE-FT's
    ``(1 - wise_ft) * base + wise_ft * fine-tuned`` (see :mod:`cadenza.models.wise_ft`), ``base`` defaulting to the
    run's own ``model.pretrained``.

    Returns:
        The file or folder written.
    """
    trained = read_checkpoint(checkpoint)
    model = trained_model(trained, str(checkpoint))
    if wise_ft is not None:
        base_state = base_weights(trained, base, str(checkpoint))
        model.load_state_dict(interpolate_weights(base_state, model.state_dict(), wise_ft), assign=True)
        log.info("WiSE-FT: %g x the fine-tuned weights + %g x %s", wise_ft, 1 - wise_ft, base or trained.pretrained)
    name, overrides = trained.name, trained.overrides
    weights = {k: v.contiguous() for k, v in cadenza_to_openclip(model.state_dict(), model).items()}
    out = Path(out)
    if out.suffix in FILE_SUFFIXES:
        _write_weights(weights, out)
        if name not in OPENCLIP_NAMES or overrides or model.logit_bias is not None:
            log.warning(
                "%s%s is not an OpenCLIP architecture: OpenCLIP needs its config too. Export to a folder "
                "(composer export %s --format openclip DIR) and load it with open_clip.create_model('local-dir:DIR')",
                name,
                " with model.overrides" if overrides else " with a logit bias" if model.logit_bias is not None else "",
                checkpoint,
            )
        else:
            log.info("wrote %s: open_clip.create_model(%r, pretrained=%r)", out, name, str(out))
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": openclip_model_config(model),
        "preprocess_cfg": openclip_preprocess_config(model),
        **{CADENZA_KEY: folder_entry(name, overrides)},  # what composer openclip --model local-dir:OUT builds
    }
    _write_weights(weights, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    log.info("wrote %s: open_clip.create_model('local-dir:%s')", out, out)
    return out


def export_lora(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a LoRA run's adapters alone, unmerged, in peft's format (``adapter_model.safetensors``,
    ``adapter_config.json``) plus ``cadenza_base.json`` naming the base model they apply to.

    ``cadenza.models.lora.load_lora_adapter(create_model(name, pretrained=...), OUT)`` puts them back on the base.
    """
    trained = read_checkpoint(checkpoint)
    if trained.lora is None:
        raise CadenzaError(f"'{checkpoint}' was not trained with algorithms.lora: it has no adapters to export")
    with torch.device("meta"):
        model = create_model(trained.name, **trained.model_overrides)
    tuner = add_lora(model, **trained.lora)
    _load(model, trained.state_dict, str(checkpoint), trained.name)
    base = {"model": trained.name, "overrides": trained.overrides, "pretrained": trained.pretrained}
    base["init_overrides"] = trained.init_overrides
    out = save_lora_adapter(tuner, out, base)
    log.info("wrote %s: the LoRA adapters alone (peft's format), for %s from %s", out, trained.name, trained.pretrained)
    return out


@dataclass
class TrainedRun:
    """What a Cadenza checkpoint says about its model: the architecture, how it was built, and its weights."""

    name: str
    overrides: dict[str, Any]  # model.overrides
    pretrained: str | None  # model.pretrained: what the run started from
    init_overrides: dict[str, Any]  # the fields its loss and model.logit_bias add (SigLIP's scale and bias)
    lora: dict[str, Any] | None  # algorithms.lora's arguments, if it trained adapters
    state_dict: StateDict

    @property
    def model_overrides(self) -> dict[str, Any]:
        return {**self.init_overrides, **self.overrides}


def read_checkpoint(path: str | Path) -> TrainedRun:
    """A Cadenza checkpoint's model: architecture name, ``model.overrides``, ``model.pretrained``, the fields its
    loss adds, its LoRA settings and its weights (as stored: adapters unmerged)."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint:
        raise CadenzaError(
            f"'{path}' is not a Cadenza training checkpoint (it needs 'state_dict' and the stored 'config'); "
            "an OpenCLIP checkpoint needs no export"
        )
    if checkpoint.get("sharded") is not None:
        raise CadenzaError(
            f"'{path}' is a sharded FSDP checkpoint (dist.fsdp_state_dict=sharded): its weights are in "
            f"{checkpoint['sharded']}/. Export reads full checkpoints: resume it with run.duration set to its step "
            "and dist.fsdp_state_dict=full (the default); that run saves it again, full, and exports."
        )
    config = stored_config(checkpoint, path)
    model = config.get("model") or {}
    loss = (config.get("loss") or {}).get("name", "clip")
    lora = (config.get("algorithms") or {}).get("lora")
    return TrainedRun(
        name=model.get("name"),
        overrides=model.get("overrides") or {},
        pretrained=model.get("pretrained"),
        init_overrides=model_init_overrides(loss, model.get("logit_bias")),
        lora=dict(lora) if isinstance(lora, dict) else ({} if lora is True else None),
        state_dict={k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()},
    )


def trained_model(trained: TrainedRun, source: str) -> nn.Module:
    """The run's model with its weights (no initialisation: every tensor comes from the checkpoint), LoRA adapters
    folded in (peft's ``merge_and_unload``): plain weights under the architecture's own names."""
    with torch.device("meta"):
        model = create_model(trained.name, **trained.model_overrides)
    normalization = tag_normalization(trained.name, trained.pretrained)  # e.g. laion2b_s32b_b82k keeps its mean/std
    if normalization is not None:
        model.image_mean, model.image_std = normalization
    tuner = add_lora(model, **trained.lora) if trained.lora is not None else None
    _load(model, trained.state_dict, source, trained.name)
    if tuner is not None:
        tuner.merge_and_unload()
    return model


def base_weights(trained: TrainedRun, base: str | None, source: str) -> StateDict:
    """The weights WiSE-FT interpolates towards: ``base`` (a ``model.pretrained`` value), by default the run's own
    ``model.pretrained``, in the run's architecture."""
    base = base or trained.pretrained
    if base is None:
        raise ConfigError(
            "--base",
            f"'{source}' was trained from scratch (no model.pretrained): give the zero-shot weights with --base",
        )
    return create_model(trained.name, pretrained=base, **trained.model_overrides).state_dict()


def _load(model: nn.Module, state_dict: StateDict, source: str, name: str) -> None:
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise CadenzaError(f"checkpoint '{source}' does not fit its own model.name={name}: {error}") from error


def _write_weights(weights: StateDict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(tmp))
    else:
        torch.save(weights, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="composer export",
        description="Write a Cadenza checkpoint's model in another library's format.",
    )
    parser.add_argument("checkpoint", help="a Cadenza checkpoint (ep*-ba*.pt, epoch_latest.pt)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        required=True,
        help="openclip: open_clip_torch weights (LoRA adapters folded in); lora: a LoRA run's adapters alone (peft)",
    )
    parser.add_argument(
        "--wise-ft",
        type=float,
        metavar="ALPHA",
        help="WiSE-FT: write (1 - ALPHA) x the base weights + ALPHA x the fine-tuned ones (0: the base, 1: the run)",
    )
    parser.add_argument(
        "--base",
        metavar="PRETRAINED",
        help="WiSE-FT's zero-shot weights (a model.pretrained value); default: the run's",
    )
    parser.add_argument("out", help="a .pt / .bin / .safetensors file, or a folder (with open_clip_config.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.format == "lora":
            if args.wise_ft is not None or args.base is not None:
                raise ConfigError("--wise-ft", "interpolates whole weights: export them with --format openclip.")
            export_lora(args.checkpoint, args.out)
        else:
            if args.base is not None and args.wise_ft is None:
                raise ConfigError("--base", "is WiSE-FT's zero-shot model: give --wise-ft ALPHA too.")
            if args.wise_ft is not None:
                try:
                    check_alpha(args.wise_ft)
                except ValueError as error:
                    raise ConfigError("--wise-ft", str(error)) from None
            export_openclip(args.checkpoint, args.out, args.wise_ft, args.base)
    except ConfigError as error:
        sys.stderr.write(f"composer export: configuration error: {error}\n")
        return 2
    except (CadenzaError, ValueError) as error:
        sys.stderr.write(f"composer export: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
