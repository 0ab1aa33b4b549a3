"""Pretrained weights for ``model.pretrained``: local files, ``s3://`` URIs and OpenCLIP tags.

``model.pretrained`` takes

- a local file: an OpenCLIP checkpoint (a training ``.pt`` with ``state_dict``, or a bare state dict, with or
  without DDP's ``module.`` prefix; ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``) or a Cadenza checkpoint;
- an ``s3://bucket/key`` URI: downloaded once with boto3 into ``$CADENZA_CACHE/s3/`` (default
  ``~/.cache/cadenza``), honouring ``S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL`` for S3-compatible servers;
- an OpenCLIP tag of the architecture (``laion2b_s34b_b79k`` for ``ViT-B-32``; see ``pretrained_tags.yaml``),
  fetched from its Hugging Face Hub repository into the Hub's cache. Offline (``HF_HUB_OFFLINE=1`` or no
  connection) a tag that is not already cached fails at once, saying to pass a local file instead.

OpenCLIP weights are renamed by ``cadenza.models.convert``; position embeddings are interpolated when the image
size or the context length differ (as OpenCLIP's ``resize_pos_embed`` / ``resize_text_pos_embed`` do). Files are
read with ``torch.load(..., weights_only=True)`` or safetensors: loading never runs code from a pickle.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from timm.layers import resample_abs_pos_embed
from torch import nn

from cadenza.engine.errors import ConfigError, suggest
from cadenza.engine.object_store import ObjectStoreError, S3Store, check_storage, is_remote, split_s3_uri
from cadenza.models.convert import StateDict, is_openclip_state_dict, openclip_to_cadenza
from cadenza.models.text import QuickGELU

log = logging.getLogger(__name__)

KEY = "model.pretrained"
TAGS_FILE = Path(__file__).parent / "pretrained_tags.yaml"
#: file names an OpenCLIP Hub repository holds its weights under, in the order OpenCLIP tries them
HF_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: position embeddings that follow the input size: (key, number of prefix tokens before the 2-D grid)
_GRID_POS_EMBEDS = (("visual.trunk.pos_embed", 1), ("visual.trunk.head.pos_embed", 1))
_TEXT_POS_EMBED = "text.positional_embedding"
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def load_pretrained(model: nn.Module, source: str, name: str | None = None, name_key: str = "model.name") -> None:
    """Load weights from ``source`` (a file, an ``s3://`` URI or an OpenCLIP tag of architecture ``name``).

    ``name_key`` is the config key that chose ``name`` (a distillation teacher's is not ``model.name``); warnings
    about the architecture name it.

    Raises:
        ConfigError: for ``model.pretrained``, saying what is wrong and what to pass instead.
    """
    load_resolved(model, resolve_pretrained(source, name), source, name, name_key)


def load_resolved(
    model: nn.Module,
    resolved: tuple[Path, dict[str, Any] | None],
    source: str,
    name: str | None = None,
    name_key: str = "model.name",
) -> None:
    """Load what ``resolve_pretrained(source, name)`` found (``create_model`` resolves before it builds)."""
    path, tag = resolved
    state_dict = read_state_dict(path)
    if is_openclip_state_dict(state_dict):
        state_dict = openclip_to_cadenza(state_dict, model)
    elif "text.token_embedding.weight" not in state_dict:
        raise ConfigError(
            KEY,
            f"'{source}' holds neither OpenCLIP nor Cadenza CLIP weights (its first keys: {list(state_dict)[:4]}).",
        )
    state_dict = resize_pos_embeds(state_dict, model)
    _load_into(model, state_dict, source)
    if tag is not None:
        _apply_tag(model, tag, source, name, name_key)
    log.info("loaded pretrained weights from %s", source if path == Path(source) else f"{source} ({path})")


def resolve_pretrained(source: str, name: str | None) -> tuple[Path, dict[str, Any] | None]:
    """A local file for ``source``, and the tag's entry when ``source`` is an OpenCLIP tag."""
    check_storage(source, KEY)
    if is_remote(source):
        return download_s3(source), None
    path = Path(source).expanduser()
    if path.is_file():
        return path, None
    tags = pretrained_tags().get(name or "", {})
    if source in tags:
        return download_hf(tags[source]["hf_hub"], source, name), tags[source]
    if path.exists():
        raise ConfigError(KEY, f"'{source}' is a folder; pass the checkpoint file inside it.")
    known = f" Tags of {name}: {', '.join(tags)}." if tags else f" {name} has no OpenCLIP tags." if name else ""
    hint = suggest(source, tags) if tags else ""
    raise ConfigError(
        KEY,
        f"'{source}' is not a file, an s3:// URI or an OpenCLIP tag of this architecture.{hint}{known}",
    )


@cache
def pretrained_tags() -> dict[str, dict[str, dict[str, Any]]]:
    """``{architecture: {tag: {hf_hub, quick_gelu?, mean?, std?}}}`` from ``pretrained_tags.yaml``."""
    return OmegaConf.to_container(OmegaConf.load(TAGS_FILE))


def tag_normalization(name: str | None, tag: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The image mean and std of OpenCLIP tag ``tag`` of ``name`` when they are not the architecture's."""
    entry = pretrained_tags().get(name or "", {}).get(tag or "")
    if entry is None or "mean" not in entry:
        return None
    return tuple(entry["mean"]), tuple(entry["std"])


def list_pretrained_tags(name: str) -> list[str]:
    """OpenCLIP tags that load into architecture ``name``."""
    return list(pretrained_tags().get(name, {}))


def read_state_dict(path: Path) -> StateDict:
    """The model weights in a checkpoint file (``state_dict`` of a training checkpoint, or the file itself)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        hint = ""
        if "TorchScript" in str(error) or "constants.pkl" in str(error):
            hint = " It is a TorchScript archive (OpenAI's original release): use the 'openai' tag instead."
        raise ConfigError(KEY, f"cannot read '{path}': {error}.{hint}") from error
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not state_dict:
        raise ConfigError(KEY, f"'{path}' holds no state dict (a dict of tensors, or a checkpoint with 'state_dict').")
    return {_strip_prefixes(key): value for key, value in state_dict.items()}


def resize_pos_embeds(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Interpolate position embeddings to ``model``'s image grid and context length (OpenCLIP's rules)."""
    own = model.state_dict()
    state_dict = dict(state_dict)
    for key, prefix_tokens in _GRID_POS_EMBEDS:
        if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
            state_dict[key] = _resize_grid(state_dict[key], own[key].shape, prefix_tokens, key)
    if _TEXT_POS_EMBED in state_dict and state_dict[_TEXT_POS_EMBED].shape != own[_TEXT_POS_EMBED].shape:
        old, new = state_dict[_TEXT_POS_EMBED], own[_TEXT_POS_EMBED]
        if old.shape[1] != new.shape[1]:
            raise ConfigError(KEY, f"text width {old.shape[1]} does not match the architecture's {new.shape[1]}.")
        log.info("resizing the text position embedding from %d to %d tokens", old.shape[0], new.shape[0])
        resized = F.interpolate(old.T[None], size=new.shape[0], mode="linear", align_corners=False)  # (1, W, L)
        state_dict[_TEXT_POS_EMBED] = resized[0].T.contiguous()
    return state_dict


def _resize_grid(old: torch.Tensor, shape: torch.Size, prefix_tokens: int, key: str) -> torch.Tensor:
    squeeze = old.ndim == 2  # the attention pool keeps (N, C); a ViT keeps (1, N, C)
    old = old[None] if squeeze else old
    new_len = shape[-2] - prefix_tokens
    old_grid, new_grid = _square(old.shape[1] - prefix_tokens, key), _square(new_len, key)
    log.info("resizing %s from a %dx%d to a %dx%d grid", key, old_grid, old_grid, new_grid, new_grid)
    resized = resample_abs_pos_embed(
        old, [new_grid, new_grid], [old_grid, old_grid], num_prefix_tokens=prefix_tokens, interpolation="bicubic"
    )  # bicubic with antialiasing, as OpenCLIP's resize_pos_embed
    return resized[0] if squeeze else resized


def _square(length: int, key: str) -> int:
    side = round(length**0.5)
    if side * side != length:
        raise ConfigError(KEY, f"{key} has {length} grid positions, not a square grid; it cannot be resized.")
    return side


def _strip_prefixes(key: str) -> str:
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    return key


def _load_into(model: nn.Module, state_dict: StateDict, source: str) -> None:
    own = model.state_dict()
    if "logit_bias" in state_dict and "logit_bias" not in own:
        log.info("ignoring logit_bias of %s: this model has none (loss.name=clip)", source)
        state_dict.pop("logit_bias")
    if "logit_bias" in own and "logit_bias" not in state_dict and "logit_scale" in state_dict:
        # OpenCLIP's rule (open_clip#712): a CLIP checkpoint fine-tuned with a SigLIP loss starts from bias 0, not
        # from the -10 of a SigLIP trained from scratch
        log.info("%s has no logit_bias (CLIP weights): it starts at 0, as in OpenCLIP", source)
        state_dict["logit_bias"] = torch.zeros_like(own["logit_bias"])
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise ConfigError(
            KEY,
            f"'{source}' does not fit this architecture: {len(mismatched)} tensors differ in shape "
            f"(checkpoint vs model, e.g. {mismatched[:3]}). Pick the model.name it was trained as.",
        )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ConfigError(
            KEY,
            f"'{source}' does not fit this architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Pick the model.name it was trained as.",
        )


def _apply_tag(model: nn.Module, tag: dict[str, Any], source: str, name: str | None, name_key: str) -> None:
    """Use the tag's image normalization; warn when its activation differs from the architecture's."""
    normalization = tag_normalization(name, source)
    if normalization is not None:
        model.image_mean, model.image_std = normalization
    model_quick_gelu = any(isinstance(m, QuickGELU) for m in model.modules())
    if tag.get("quick_gelu", False) != model_quick_gelu:
        other = f"{name}-quickgelu" if tag.get("quick_gelu") else (name or "").removesuffix("-quickgelu")
        log.warning(
            "%s was trained with%s QuickGELU but %s uses %s: embeddings will be off; use %s=%s",
            source,
            "" if tag.get("quick_gelu") else "out",
            name,
            "QuickGELU" if model_quick_gelu else "GELU",
            name_key,
            other,
        )


# -- downloads ------------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """Cadenza's download cache: ``$CADENZA_CACHE``, else ``~/.cache/cadenza``."""
    return Path(os.environ.get("CADENZA_CACHE") or Path.home() / ".cache" / "cadenza").expanduser()


def download_s3(uri: str) -> Path:
    """Download ``s3://bucket/key`` into the cache (once: a cached file of the same size is reused)."""
    try:
        bucket, key = split_s3_uri(uri)
    except ValueError as error:
        raise ConfigError(KEY, f"{error}; write s3://bucket/path/to/checkpoint.pt.") from error
    target = cache_root() / "s3" / bucket / key
    try:
        store = S3Store(f"s3://{bucket}")  # the endpoint comes from S3_ENDPOINT_URL / AWS_ENDPOINT_URL
        size = store.list(key).get(key)
        if size is None:
            raise ConfigError(KEY, f"'{uri}' does not exist. Check the bucket and key (aws s3 ls {uri}).")
        if target.is_file() and target.stat().st_size == size:
            log.info("using cached %s for %s", target, uri)
            return target
        log.info("downloading %s (%.1f MB) to %s", uri, size / 1e6, target)
        store.download(key, target)  # to a temporary name, then renamed
    except ObjectStoreError as error:
        raise ConfigError(
            KEY, f"cannot download '{uri}' ({error}). Check the credentials and S3_ENDPOINT_URL, or pass a local file."
        ) from error
    return target


def download_hf(repo: str, tag: str, name: str | None) -> Path:
    """A tag's weights from the Hugging Face Hub (from its cache when present; offline, only from the cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cache_dir = _hf_cache_dir()
    for filename in HF_FILENAMES:  # already downloaded (by Cadenza or by open_clip) under either name?
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=True))
        except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError):
            continue
    fix = (
        f"Download open_clip_pytorch_model.bin from https://huggingface.co/{repo} on a machine that is online and "
        f"pass its path: model.pretrained=/path/to/open_clip_pytorch_model.bin"
    )
    if _hf_offline():
        raise ConfigError(KEY, f"'{tag}' ({name}) is not in the Hugging Face cache and HF_HUB_OFFLINE is set. {fix}")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    _check_reachable(endpoint, tag, fix)  # huggingface_hub retries a lost connection for ~30 s; fail at once
    errors = []
    for filename in HF_FILENAMES:
        try:
            log.info("downloading %s of %s (%s) from the Hugging Face Hub", filename, repo, tag)
            return Path(hf_hub_download(repo, filename, cache_dir=cache_dir, endpoint=endpoint, etag_timeout=10))
        except LocalEntryNotFoundError as error:  # the connection failed on the way
            raise ConfigError(KEY, f"cannot download '{tag}' from {repo} ({error}). {fix}") from error
        except EntryNotFoundError as error:
            errors.append(str(error).splitlines()[0])
        except Exception as error:  # noqa: BLE001 - a gated repo, a proxy, a rate limit: all mean the same here
            raise ConfigError(
                KEY, f"cannot download '{tag}' from {repo} ({type(error).__name__}: {error}). {fix}"
            ) from error
    raise ConfigError(KEY, f"{repo} holds none of {HF_FILENAMES} ({'; '.join(errors)}). {fix}")


def _check_reachable(endpoint: str, tag: str, fix: str) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=5).close()
    except urllib.error.HTTPError:
        return  # the server answered
    except (OSError, ValueError) as error:
        raise ConfigError(
            KEY, f"cannot reach the Hugging Face Hub at {endpoint} for '{tag}' ({error}). {fix}"
        ) from error


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hf_cache_dir() -> str:
    """The Hub cache as ``huggingface_hub`` computes it, read at call time (tests and users may set it late)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")
