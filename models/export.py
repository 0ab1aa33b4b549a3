"""``composer export CHECKPOINT --format openclip OUT``: a Cadenza checkpoint as OpenCLIP weights.

The architecture comes from the checkpoint's stored config (``model.name`` and ``model.overrides``). ``OUT`` is

- a file (``.pt`` / ``.pth`` / ``.bin``: a ``torch.save``d state dict; ``.safetensors``): load it with
  ``open_clip.create_model("ViT-B-32", pretrained=OUT)``;
- anything else is a folder, written as a Hugging Face Hub repository is laid out (``open_clip_config.json`` and
  ``open_clip_model.safetensors``): ``open_clip.create_model("local-dir:OUT")`` loads it, also for architectures
  OpenCLIP has no name for (``tiny-vit``, or a known one changed by ``model.overrides``), and so does
  ``composer openclip --model local-dir:OUT`` (the config's ``cadenza`` entry names the architecture).

Example:
    composer export logs/my-run/checkpoints/epoch_latest.pt --format openclip vitb32.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

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
from cadenza.models.openclip_folder import CADENZA_KEY, folder_entry
from cadenza.models.pretrained import tag_normalization

log = logging.getLogger("cadenza")

FORMATS = ("openclip",)
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def export_openclip(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``checkpoint``'s model as OpenCLIP weights to ``out`` (a file or a folder; see the module doc).

    Returns:
        The file or folder written.
    """
    name, overrides, pretrained, state_dict = read_checkpoint(checkpoint)
    with torch.device("meta"):  # no initialisation: every tensor comes from the checkpoint
        model = create_model(name, **overrides)
    normalization = tag_normalization(name, pretrained)  # a run from e.g. laion2b_s32b_b82k keeps its mean/std
    if normalization is not None:
        model.image_mean, model.image_std = normalization
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise CadenzaError(f"checkpoint '{checkpoint}' does not fit its own model.name={name}: {error}") from error
    weights = {k: v.contiguous() for k, v in cadenza_to_openclip(model.state_dict(), model).items()}
    out = Path(out)
    if out.suffix in FILE_SUFFIXES:
        _write_weights(weights, out)
        if name not in OPENCLIP_NAMES or overrides:
            log.warning(
                "%s%s is not an OpenCLIP architecture: OpenCLIP needs its config too. Export to a folder "
                "(composer export %s --format openclip DIR) and load it with open_clip.create_model('local-dir:DIR')",
                name,
                " with model.overrides" if overrides else "",
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


def read_checkpoint(path: str | Path) -> tuple[str, dict[str, Any], str | None, StateDict]:
    """A Cadenza checkpoint's architecture name, ``model.overrides``, ``model.pretrained`` and model weights."""
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
    model = stored_config(checkpoint, path).get("model") or {}
    name, overrides, pretrained = model.get("name"), model.get("overrides") or {}, model.get("pretrained")
    state_dict = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    return name, overrides, pretrained, state_dict


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
    parser.add_argument("--format", choices=FORMATS, required=True, help="openclip: open_clip_torch weights")
    parser.add_argument("out", help="a .pt / .bin / .safetensors file, or a folder (with open_clip_config.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export_openclip(args.checkpoint, args.out)
    except ConfigError as error:
        sys.stderr.write(f"composer export: configuration error: {error}\n")
        return 2
    except (CadenzaError, ValueError) as error:
        sys.stderr.write(f"composer export: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
