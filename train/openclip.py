"""``composer openclip [flags]``: OpenCLIP's trainer flags (open_clip_train 3.3.0) run on Cadenza.

    composer openclip --train-data data.csv --model ViT-B-32 --batch-size 64 --epochs 10
    composer openclip --train-data data.csv --model ViT-B-32 --print-config > run.yaml   # the YAML they become
    composer openclip --train-data data.csv --model ViT-B-32 -- run.duration=100ba       # plus Cadenza overrides
    torchrun --nproc_per_node 4 -m cadenza.train.openclip --train-data ... --model ViT-B-32
    composer -n 4 openclip --train-data ... --model ViT-B-32

Every flag of ``open_clip_train/params.py`` is accepted with its name, type and default, and translated into
the config a YAML file would give (``translate``), which is validated and trained like any other. ``FLAGS``
below is the translation table (rendered into the README by ``flag_table``). A flag Cadenza has no
equivalent for is an error when it is set to anything other than its default (or a value that means what
Cadenza does anyway); all such flags are listed in one error, before any work. Nothing is silently ignored.

Where OpenCLIP's default differs from Cadenza's (precision ``amp``, 32 epochs, ``RN50``, logging every 100
steps, no ``epoch_latest.pt``, ...) the translation writes OpenCLIP's value explicitly, so a flag left out
means what it means in OpenCLIP.
"""

from __future__ import annotations

import argparse
import ast
import codecs
import inspect
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record

from cadenza.engine import dist
from cadenza.engine.errors import CadenzaError, ConfigError
from cadenza.engine.optim import optimizer_spec
from cadenza.models.factory import get_model_config, list_models
from cadenza.models.openclip_folder import is_folder_name, resolve_folder_name
from cadenza.train.config import apply_override, build_config
from cadenza.train.trainer import train

log = logging.getLogger("cadenza")

OPENCLIP_VERSION = "3.3.0"


class FlagError(CadenzaError, ValueError):
    """OpenCLIP flags that cannot be translated; the message lists every one of them with the reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(["these OpenCLIP flags cannot be run by Cadenza:", *(f"  {p}" for p in problems)]))


@dataclass(frozen=True)
class Flag:
    """One open_clip_train flag: its argparse definition (as in ``params.py``) and its Cadenza equivalent.

    Args:
        option: the flag, e.g. ``--train-data``.
        default: OpenCLIP's default.
        type: argparse's ``type`` (``None`` for switches).
        key: the YAML key(s) it becomes; ``None`` when Cadenza has no equivalent.
        how: how the value translates, or why there is no equivalent (README text).
        same: values that mean what Cadenza does anyway, accepted although ``key`` is ``None``.
        action: ``store_true`` for switches; ``kwargs`` for ``--aug-cfg``.
        nargs, choices: as in argparse.
    """

    option: str
    default: Any = None
    type: Any = str
    key: str | None = None
    how: str = ""
    same: tuple[Any, ...] = ()
    action: str | None = None
    nargs: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.option[2:].replace("-", "_")


def switch(option: str, key: str | None, how: str = "", same: tuple[Any, ...] = ()) -> Flag:
    """A ``store_true`` flag (default ``False``)."""
    return Flag(option, False, None, key, how, same, action="store_true")


DATASET_TYPES = ("webdataset", "csv", "synthetic", "auto")
PRECISION = {
    "amp": "amp",
    "amp_bf16": "amp_bf16",
    "amp_bfloat16": "amp_bf16",
    "bf16": "bf16",
    "fp16": "fp16",
    "pure_bf16": "bf16",
    "pure_fp16": "fp16",
    "fp32": "fp32",
}

#: every flag of open_clip_train 3.3.0's ``params.py``, in its order, with its Cadenza equivalent
FLAGS: tuple[Flag, ...] = (
    Flag("--train-data", None, str, "data.train.path", "`type` from `--dataset-type`; `::`-joined sources and brace expansion as in OpenCLIP; csv: `image_root: .` (relative image paths are read from the working directory, as OpenCLIP)"),
    Flag("--train-data-upsampling-factors", None, str, "data.train.upsampling_factors", "webdataset, with `--dataset-resampled`"),
    Flag("--val-data", None, str, "data.val.path", "`type` from `--dataset-type`; evaluated every `--val-frequency` epochs"),
    Flag("--train-num-samples", None, int, "data.train.num_samples", "samples per epoch (webdataset, synthetic); csv: only the first N rows (OpenCLIP ignores it for csv)"),
    Flag("--val-num-samples", None, int, "data.val.num_samples", "as `--train-num-samples`"),
    Flag("--dataset-type", "auto", str, "data.train.type, data.val.type", "`auto`: `csv` for `.csv`/`.tsv`, `webdataset` for `.tar`, as OpenCLIP; `synthetic` needs `--train-num-samples`", choices=DATASET_TYPES),
    switch("--dataset-resampled", "data.train.resampled", "webdataset only"),
    Flag("--csv-separator", "\t", str, "data.train.csv_separator, data.val.csv_separator", "csv only; escapes such as `\\t` are decoded (pandas, in OpenCLIP, reads them as a regex)"),
    Flag("--csv-img-key", "filepath", str, "data.train.csv_img_key, data.val.csv_img_key", "csv only"),
    Flag("--csv-caption-key", "title", str, "data.train.csv_caption_key, data.val.csv_caption_key", "csv only"),
    Flag("--imagenet-val", None, str, "eval.zero_shot.path", "with `eval.zero_shot.name: imagenet` and `classnames: imagenet`: scored against ImageNet's 1000 classes with OpenAI's 80 templates, as in OpenCLIP; WordNet-id folders (all 1000, or a subset) are labelled by their id"),
    Flag("--imagenet-v2", None, str, None, "`eval.zero_shot` holds one image folder (`--imagenet-val`)"),
    Flag("--cache-dir", None, str, None, "no key for it: set `HF_HOME` (OpenCLIP tags) or `CADENZA_CACHE` (s3:// weights) in the environment"),
    Flag("--logs", "./logs/", str, "run.logs", "`none` is an error: Cadenza always writes the run folder"),
    switch("--log-local", None, "every process already logs, to `<run folder>/out_rank<r>.log`", same=(True,)),
    Flag("--name", None, str, "run.name", "unset: a date-model-lr-batch-precision name"),
    Flag("--workers", 4, int, "data.workers", "per process"),
    Flag("--batch-size", 64, int, "data.batch_size", "per process"),
    Flag("--epochs", 32, int, "run.duration", "`N` → `Nep`"),
    Flag("--epochs-cooldown", None, int, "optim.cooldown", "`N` → `Nep`; only with `--lr-scheduler const-cooldown`"),
    Flag("--lr", None, float, "optim.lr", "unset: 5e-4 (OpenCLIP's default)"),
    Flag("--beta1", None, float, "optim.betas", "first of the pair; unset: 0.9"),
    Flag("--beta2", None, float, "optim.betas", "second of the pair; unset: 0.98 if the model name contains `vit`, else 0.999 (OpenCLIP's rule)"),
    Flag("--eps", None, float, "optim.eps", "unset: 1e-6 if the model name contains `vit`, else 1e-8 (OpenCLIP's rule)"),
    Flag("--wd", 0.2, float, "optim.weight_decay", "OpenCLIP 3.3.0's exemptions (biases, norms, logit scale)"),
    Flag("--momentum", None, float, "optim.args.momentum", "with a `timm/...` optimizer that takes it (OpenCLIP ignores it for the others: an error here)"),
    Flag("--warmup", 10000, int, "optim.warmup", "`N` steps → `Nba`"),
    Flag("--opt", "adamw", str, "optim.name", "`adamw`; `timm/<name>` → `<name>` (timm's), given `--beta1`/`--beta2` and `--eps` only where OpenCLIP gives them (else `null`: the optimizer's own)"),
    switch("--use-bn-sync", None, "no SyncBatchNorm conversion"),
    switch("--skip-scheduler", "optim.scheduler, optim.warmup", "`const` with `0ba` warmup: the LR stays at `--lr`"),
    Flag("--lr-scheduler", "cosine", str, "optim.scheduler", "cosine, const or const-cooldown"),
    Flag("--lr-cooldown-end", 0.0, float, "optim.cooldown_end_lr"),
    Flag("--lr-cooldown-power", 1.0, float, "optim.cooldown_power"),
    Flag("--save-frequency", 1, int, "checkpoint.save_interval", "`N` → `Nep`; 0: only at the end (as OpenCLIP); each is also named `epoch_K.pt`, as OpenCLIP names it (`checkpoint.openclip_names`)"),
    switch("--save-most-recent", "checkpoint.save_latest", "`epoch_latest.pt`; off unless set, as in OpenCLIP"),
    Flag("--zeroshot-frequency", 2, int, "eval.interval", "`N` → `Nep`; 0: no zero-shot. One interval serves zero-shot and `--val-data`: when both run, the two frequencies must agree (at their defaults, 1 wins)"),
    Flag("--val-frequency", 1, int, "eval.interval", "`N` → `Nep`; 0: `--val-data` is never evaluated, so it is left out"),
    Flag("--resume", None, str, "checkpoint.resume", "a Cadenza checkpoint (path or s3:// URI), an OpenCLIP one (`epoch_K.pt`: weights, optimizer and epoch, as OpenCLIP resumes), or `latest` (needs `--name`)"),
    Flag("--precision", "amp", str, "run.precision", "`amp_bfloat16` → `amp_bf16`, `pure_bf16` → `bf16`, `pure_fp16` → `fp16`. Cadenza's `bf16`/`fp16` cast every weight (OpenCLIP's keep LayerNorms in fp32)", choices=tuple(PRECISION)),
    Flag("--model", "RN50", str, "model.name", "`coca_*` models also select `loss.name: coca`; `ViT-B/32` is `ViT-B-32`; `local-dir:DIR` and `hf-hub:org/repo` (a folder with `open_clip_config.json`, as `composer export --format openclip DIR` writes) set `model.name`, `model.overrides` and `model.pretrained` from it"),
    Flag("--pretrained", "", str, "model.pretrained", "an OpenCLIP tag, a local file or an s3:// URI"),
    switch("--pretrained-image", None, "no ImageNet-pretrained image towers: start from a whole CLIP with `--pretrained`"),
    switch("--lock-image", "algorithms.lock_image"),
    Flag("--lock-image-unlocked-groups", 0, int, "algorithms.lock_image.unlocked_groups", "needs `--lock-image`"),
    switch("--lock-image-freeze-bn-stats", "algorithms.lock_image.freeze_bn_stats", "needs `--lock-image`"),
    Flag("--image-mean", None, float, "model.overrides.image_mean", nargs="+"),
    Flag("--image-std", None, float, "model.overrides.image_std", nargs="+"),
    Flag("--image-interpolation", None, str, None, "Cadenza resizes with bicubic interpolation", same=("bicubic",), choices=("bicubic", "bilinear", "random")),
    Flag("--image-resize-mode", None, str, None, "Cadenza's evaluation transform resizes the shortest side, then center-crops", same=("shortest",), choices=("shortest", "longest", "squash")),
    Flag("--aug-cfg", {}, None, "data.augment", "`key=value` pairs, values read as Python literals; repeated `--aug-cfg` flags merge (OpenCLIP keeps only the last); without `use_timm=True`, `ratio`, `re_prob`, `re_count` and a `color_jitter` without `color_jitter_prob` are ignored with OpenCLIP's warning", action="kwargs", nargs="*"),
    switch("--grad-checkpointing", "algorithms.grad_checkpointing"),
    switch("--local-loss", "loss.local_loss", "CLIP and CoCa losses (OpenCLIP's SigLIP ignores it: an error with `--siglip`)"),
    switch("--gather-with-grad", "loss.gather_with_grad", "as `--local-loss`"),
    Flag("--force-context-length", None, int, "model.overrides.text.context_length"),
    Flag("--force-image-size", None, int, "model.overrides.vision.image_size", "square sizes", nargs="+"),
    switch("--force-quick-gelu", "model.name, model.overrides", "`<model>-quickgelu`, the architecture with QuickGELU, where there is one; else `model.overrides.quick_gelu: true` (and QuickGELU in a ViT image tower's blocks, as OpenCLIP)"),
    Flag("--force-patch-dropout", None, float, "algorithms.patch_dropout.prob", "0: no patch dropout"),
    switch("--force-custom-text", None, "Cadenza has one CLIP class, its text tower already separate"),
    switch("--torchscript", None, "no TorchScript (see `--torchcompile`)"),
    switch("--torchcompile", "algorithms.torch_compile"),
    switch("--trace", None, "no `torch.jit.trace`"),
    Flag("--accum-freq", 1, int, "optim.accum_freq", "features cached, OpenCLIP's way"),
    Flag("--device", "cuda", str, "run.device", "`cuda` → `auto` (CPU when no GPU is visible, as OpenCLIP falls back); `cpu` → `cpu`"),
    Flag("--dist-url", None, str, None, "processes meet through the environment torchrun or SLURM sets", same=("env://",)),
    Flag("--dist-backend", None, str, "dist.backend", "`nccl` or `gloo`; unset: `auto`"),
    Flag("--report-to", "", str, "loggers.tensorboard, loggers.wandb", "a comma list of `tensorboard`, `wandb` (or `all`)"),
    Flag("--wandb-notes", "", str, "loggers.wandb.notes", "needs `--report-to wandb`"),
    Flag("--wandb-project-name", "open-clip", str, "loggers.wandb.project", "needs `--report-to wandb`"),
    switch("--debug", None, "no log-level key"),
    switch("--copy-codebase", None, "not needed: the resolved config is in the run folder and in every checkpoint"),
    switch("--horovod", None, "Cadenza distributes with torch.distributed (torchrun, `composer -n`, SLURM)"),
    switch("--ddp-static-graph", "dist.static_graph"),
    switch("--no-set-device-rank", None, "each process uses `cuda:<local rank>`"),
    Flag("--seed", 0, int, "run.seed"),
    Flag("--grad-clip-norm", None, float, "optim.grad_clip_norm", "the `gradient_clipping` algorithm"),
    switch("--lock-text", "algorithms.lock_text"),
    Flag("--lock-text-unlocked-layers", 0, int, "algorithms.lock_text.unlocked_layers", "needs `--lock-text`"),
    switch("--lock-text-freeze-layer-norm", "algorithms.lock_text.freeze_layer_norm", "needs `--lock-text`; unset, the frozen groups' LayerNorms keep training (OpenCLIP 3.3.0 asserts it is set)"),
    Flag("--log-every-n-steps", 100, int, "run.log_interval", "`N` → `Nba`"),
    Flag("--coca-caption-loss-weight", 2.0, float, "loss.caption_loss_weight", "`coca_*` models; others: an error unless 2.0 (OpenCLIP ignores it)"),
    Flag("--coca-contrastive-loss-weight", 1.0, float, "loss.clip_loss_weight", "`coca_*` models; others: an error unless 1.0 (OpenCLIP ignores it)"),
    Flag("--remote-sync", None, str, "callbacks.remote_sync.remote, callbacks.remote_sync.under_run", "`<remote>/<run name>`, as OpenCLIP (without `--name`, the run's date-model-lr-b-j-p name, rank 0's on every rank); not with `--resume latest`"),
    Flag("--remote-sync-frequency", 300, int, "callbacks.remote_sync.frequency", "seconds; needs `--remote-sync`"),
    Flag("--remote-sync-protocol", "s3", str, None, "Cadenza syncs with boto3 (S3 and compatible stores), not fsspec", same=("s3",), choices=("s3", "fsspec")),
    switch("--delete-previous-checkpoint", "checkpoint.keep", "`keep: 1`"),
    Flag("--distill-model", None, str, "algorithms.distillation.teacher", "with `--distill-pretrained`"),
    Flag("--distill-pretrained", None, str, "algorithms.distillation.pretrained", "with `--distill-model`"),
    Flag("--use-bnb-linear", None, str, None, "no bitsandbytes layers"),
    switch("--siglip", "loss.name", "`siglip`, with OpenCLIP's initial logit scale and bias"),
    Flag("--loss-dist-impl", None, str, None, "no key for it: SigLIP exchanges features `bidir`, OpenCLIP's default", same=("bidir",)),
)  # fmt: skip

BY_DEST = {flag.dest: flag for flag in FLAGS}


# -- parsing -------------------------------------------------------------------------------------------------
class MergeKwargs(argparse.Action):
    """``--aug-cfg k=v ...``: values read as Python literals (strings otherwise), merged over repeated flags."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        merged = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            key, sep, text = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string} expects key=value pairs, got {item!r}")
            try:
                merged[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                merged[key] = text  # a bare string, as OpenCLIP's ParseKwargs
        setattr(namespace, self.dest, merged)


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """OpenCLIP's parser, built from ``FLAGS``, plus ``--print-config``. ``defaults=False``: a flag left out is
    absent from the parsed namespace (``given_flags``)."""
    parser = argparse.ArgumentParser(
        prog="composer openclip",
        description=f"Train with open_clip_train {OPENCLIP_VERSION}'s flags on Cadenza. Cadenza overrides "
        "(key=value) may follow a '--'. See the README, 'Coming from OpenCLIP'.",
        argument_default=None if defaults else argparse.SUPPRESS,
    )

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    for flag in FLAGS:
        if flag.action == "store_true":
            parser.add_argument(flag.option, action="store_true", default=default(False))
        elif flag.action == "kwargs":
            parser.add_argument(flag.option, nargs="*", default=default({}), action=MergeKwargs, metavar="KEY=VALUE")
        else:
            parser.add_argument(
                flag.option, type=flag.type, default=default(flag.default), nargs=flag.nargs, choices=flag.choices
            )
    parser.add_argument("--print-config", action="store_true", help="print the equivalent YAML and exit")
    return parser


def given_flags(argv: list[str]) -> set[str]:
    """The OpenCLIP options ``argv`` sets (``--model``, ...), however they are spelt (``--model=x``, ``--mod x``)."""
    return {BY_DEST[dest].option for dest in vars(build_parser(defaults=False).parse_args(argv)) if dest in BY_DEST}


def parse_flags(argv: list[str]) -> argparse.Namespace:
    """Parse OpenCLIP flags (argparse exits with status 2 on a flag it does not know)."""
    return build_parser().parse_args(argv)


# -- translation ---------------------------------------------------------------------------------------------
def translate(args: argparse.Namespace) -> dict[str, Any]:
    """The Cadenza config (a plain dict, as YAML would give) meaning what ``args`` mean to open_clip_train.

    Raises:
        FlagError: listing every flag that has no equivalent or is meaningless in this combination.
    """
    problems = [
        f"{flag.option} {_shown(getattr(args, flag.dest))}: {flag.how}"
        for flag in FLAGS
        if flag.key is None and getattr(args, flag.dest) != flag.default and getattr(args, flag.dest) not in flag.same
    ]
    optim_defaults = default_optim_params(args.model)
    cfg: dict[str, Any] = {
        "run": _run(args, problems),
        "model": _model(args, problems),
        "loss": _loss(args, problems),
        "data": _data(args, problems),
        "optim": _optim(args, optim_defaults, problems),
        "algorithms": _algorithms(args, problems),
        "loggers": _loggers(args, problems),
        "callbacks": {},
        "checkpoint": _checkpoint(args, problems),
        "eval": {},
        "dist": _dist(args, problems),
    }
    _evaluation(args, cfg, problems)
    _remote_sync(args, cfg, problems)
    if problems:
        raise FlagError(problems)
    return {section: value for section, value in cfg.items() if value != {}}


def default_optim_params(model: str) -> dict[str, float]:
    """OpenCLIP's ``get_default_params``: AdamW settings from the CLIP paper, by model family."""
    if "vit" in model.lower():
        return {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}
    return {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1.0e-8}


def _run(args, problems: list[str]) -> dict[str, Any]:
    run: dict[str, Any] = {}
    if args.name is not None:
        run["name"] = args.name
    run["seed"] = args.seed
    if args.logs is None or args.logs.lower() == "none":
        problems.append(f"--logs {args.logs}: Cadenza always writes the run folder; give a folder")
    run["logs"] = args.logs
    run["duration"] = f"{args.epochs}ep"
    run["precision"] = PRECISION[args.precision]
    devices = {"cuda": "auto", "cpu": "cpu"}
    if args.device not in devices:
        problems.append(f"--device {args.device}: Cadenza runs on cuda (one device per process) or cpu")
    run["device"] = devices.get(args.device, "auto")
    run["log_interval"] = f"{args.log_every_n_steps}ba"
    return run


def _model(args, problems: list[str]) -> dict[str, Any]:
    name = args.model.replace("/", "-")  # OpenCLIP reads the old spelling ViT-B/32 as ViT-B-32
    pretrained = args.pretrained or None
    overrides: dict[str, Any] = {}
    if is_folder_name(args.model):  # local-dir:/path or hf-hub:org/repo: architecture and weights from the folder
        found = resolve_folder_name(args.model, "model.name")
        name, overrides, pretrained = found.name, dict(found.overrides), str(found.weights) if found.weights else None
        if args.pretrained:
            problems.append(
                f"--pretrained {args.pretrained}: OpenCLIP ignores it with --model {args.model} (the weights come "
                "from there); remove it"
            )
        overrides.update({k: v for k, v in (("image_mean", found.image_mean), ("image_std", found.image_std)) if v})
    if args.force_quick_gelu and not name.endswith("-quickgelu"):
        if f"{name}-quickgelu" in list_models():
            name = f"{name}-quickgelu"
        elif name in list_models():
            overrides = _merge(overrides, quick_gelu_overrides(name))
    model: dict[str, Any] = {"name": name, "pretrained": pretrained}
    for field in ("image_mean", "image_std"):  # one number per channel, or one for all three
        value = getattr(args, field)
        if value is not None:
            if len(value) not in (1, 3):
                problems.append(f"--{field.replace('_', '-')} {_shown(value)}: give 1 or 3 numbers")
            overrides[field] = list(value) * 3 if len(value) == 1 else list(value)
    if args.force_image_size is not None:
        sizes = set(args.force_image_size)
        if len(args.force_image_size) > 2 or len(sizes) != 1:
            problems.append(f"--force-image-size {_shown(args.force_image_size)}: Cadenza models take square images")
        overrides = _merge(overrides, {"vision": {"image_size": args.force_image_size[0]}})
    if args.force_context_length is not None:
        overrides = _merge(overrides, {"text": {"context_length": args.force_context_length}})
    if overrides:
        model["overrides"] = overrides
    return model


def quick_gelu_overrides(name: str) -> dict[str, Any]:
    """``--force-quick-gelu`` on an architecture without a ``-quickgelu`` twin: QuickGELU in the text tower and, for a
    ViT image tower, in its blocks (OpenCLIP's ``quick_gelu`` reaches its VisionTransformer, not ResNets or timm
    towers)."""
    overrides: dict[str, Any] = {"quick_gelu": True}
    if str(get_model_config(name)["vision"].get("timm_model", "")).startswith("vit_"):
        overrides["vision"] = {"timm_kwargs": {"act_layer": "quick_gelu"}}
    return overrides


def _merge(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in more.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _loss(args, problems: list[str]) -> dict[str, Any]:
    # OpenCLIP's create_loss: distillation, then CoCa (by model name), then SigLIP, else CLIP.
    is_coca = "coca" in args.model.lower()
    if args.siglip and (is_coca or args.distill_model is not None):
        other = "a CoCa model" if is_coca else "--distill-model"
        problems.append(f"--siglip: OpenCLIP ignores it with {other}; remove one of them")
    if args.siglip and (args.local_loss or args.gather_with_grad):
        problems.append("--local-loss / --gather-with-grad: OpenCLIP's SigLIP loss ignores them; remove them")
    name = "coca" if is_coca else "siglip" if args.siglip else "clip"
    loss: dict[str, Any] = {"name": name}
    if name != "siglip":
        loss.update(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad)
    weights = {"coca_contrastive_loss_weight": "clip_loss_weight", "coca_caption_loss_weight": "caption_loss_weight"}
    for dest, key in weights.items():
        if is_coca:
            loss[key] = getattr(args, dest)
        elif getattr(args, dest) != BY_DEST[dest].default:
            problems.append(f"{BY_DEST[dest].option}: only CoCa models have a captioning loss (OpenCLIP ignores it)")
    return loss


def dataset_type(path: str | None, requested: str, option: str, problems: list[str]) -> str:
    """``--dataset-type``, with ``auto`` resolved from the file extension as OpenCLIP's ``get_dataset_fn`` does."""
    if requested != "auto" or path is None:
        return requested
    extension = path.split(".")[-1]
    if extension in ("csv", "tsv"):
        return "csv"
    if extension == "tar":
        return "webdataset"
    problems.append(
        f"{option} {path}: --dataset-type auto cannot tell its type (extension '{extension}'); pass --dataset-type"
    )
    return "csv"


def _dataset(args, split: str, problems: list[str]) -> dict[str, Any]:
    path = getattr(args, f"{split}_data")
    option = f"--{split}-data"
    kind = dataset_type(path, args.dataset_type, option, problems)
    count = getattr(args, f"{split}_num_samples")
    if kind == "synthetic":
        count = count if count is not None else args.train_num_samples
        if count is None:
            problems.append("--dataset-type synthetic: needs --train-num-samples (the number of samples)")
        if path is not None:
            problems.append(f"{option}: has no meaning with --dataset-type synthetic (random images and captions)")
        return {"type": "synthetic", "num_samples": count}
    dataset: dict[str, Any] = {"type": kind, "path": path}
    if kind == "csv":
        dataset["image_root"] = "."  # OpenCLIP reads relative image paths from the working directory
        dataset["csv_separator"] = decode_separator(args.csv_separator)
        dataset["csv_img_key"] = args.csv_img_key
        dataset["csv_caption_key"] = args.csv_caption_key
    if count is not None:
        dataset["num_samples"] = count
    if split == "train" and kind == "webdataset":
        if args.dataset_resampled:
            dataset["resampled"] = True
        if args.train_data_upsampling_factors is not None:
            dataset["upsampling_factors"] = args.train_data_upsampling_factors
    return dataset


def decode_separator(text: str) -> str:
    """``\\t`` typed in a shell (a backslash and a ``t``) is a tab, as pandas' regex separator reads it."""
    return codecs.decode(text, "unicode_escape") if "\\" in text else text


def _data(args, problems: list[str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    trains = args.train_data is not None or args.dataset_type == "synthetic"
    if trains:
        data["train"] = _dataset(args, "train", problems)
    if args.val_data is not None and args.val_frequency > 0:
        data["val"] = _dataset(args, "val", problems)
    kinds = {data[split]["type"] for split in ("train", "val") if split in data}
    if args.train_num_samples is not None and "train" not in data and "synthetic" not in kinds:
        problems.append("--train-num-samples: there is no --train-data")
    if args.val_num_samples is not None and args.val_data is None:
        problems.append("--val-num-samples: there is no --val-data")
    if data.get("train", {}).get("type") != "webdataset":
        if args.dataset_resampled:
            problems.append("--dataset-resampled: only for webdataset training data")
        if args.train_data_upsampling_factors is not None:
            problems.append("--train-data-upsampling-factors: only for webdataset training data")
    elif args.train_data_upsampling_factors is not None and not args.dataset_resampled:
        problems.append("--train-data-upsampling-factors: needs --dataset-resampled (as in OpenCLIP)")
    if "csv" not in kinds:
        for flag in (BY_DEST["csv_separator"], BY_DEST["csv_img_key"], BY_DEST["csv_caption_key"]):
            if getattr(args, flag.dest) != flag.default:
                problems.append(f"{flag.option}: only for csv data (there is none)")
    data["batch_size"] = args.batch_size
    data["workers"] = args.workers
    if args.aug_cfg:
        data["augment"] = _augment(args.aug_cfg)
    return data


#: --aug-cfg keys OpenCLIP's own transform uses only with ``use_timm=True`` (without it: a warning, then ignored)
TIMM_ONLY_AUGMENT = ("ratio", "re_prob", "re_count")


def _augment(aug_cfg: dict[str, Any]) -> dict[str, Any]:
    """``--aug-cfg`` as ``data.augment``. Without ``use_timm``, OpenCLIP warns about the keys its transform does not
    use and ignores them (``ratio``, ``re_prob``, ``re_count``, ``color_jitter`` without ``color_jitter_prob``):
    so does this translation, with OpenCLIP's warning (a YAML's ``data.augment.ratio`` is applied)."""
    augment = {key: _as_list(value) for key, value in aug_cfg.items()}
    if augment.get("use_timm"):
        return augment
    unused = [key for key in TIMM_ONLY_AUGMENT if augment.get(key) is not None]
    if augment.get("color_jitter") is not None and not augment.get("color_jitter_prob"):
        unused.append("color_jitter")
    if unused:
        log.warning(
            "--aug-cfg: Unused augmentation cfg items, specify `use_timm` to use (%s); ignored, as OpenCLIP does",
            unused,
        )
    return {key: value for key, value in augment.items() if key not in unused}


def _optim(args, defaults: dict[str, float], problems: list[str]) -> dict[str, Any]:
    value = {name: defaults[name] if getattr(args, name) is None else getattr(args, name) for name in defaults}
    optim: dict[str, Any] = {
        "lr": value["lr"],
        "betas": [value["beta1"], value["beta2"]],
        "eps": value["eps"],
        "weight_decay": args.wd,
    }
    if args.skip_scheduler:
        for flag in (BY_DEST["warmup"], BY_DEST["lr_scheduler"], BY_DEST["epochs_cooldown"]):
            if getattr(args, flag.dest) != flag.default:
                problems.append(f"{flag.option}: OpenCLIP ignores it with --skip-scheduler; remove one of them")
        optim.update(scheduler="const", warmup="0ba")
    else:
        optim.update(scheduler=args.lr_scheduler, warmup=f"{args.warmup}ba")
        if args.epochs_cooldown is not None:
            optim["cooldown"] = f"{args.epochs_cooldown}ep"
    optim["cooldown_power"] = args.lr_cooldown_power
    optim["cooldown_end_lr"] = args.lr_cooldown_end
    if args.grad_clip_norm is not None:
        optim["grad_clip_norm"] = args.grad_clip_norm
    optim["accum_freq"] = args.accum_freq
    _optimizer(args, optim, problems)
    return optim


def _optimizer(args, optim: dict[str, Any], problems: list[str]) -> None:
    """``--opt``: AdamW, or ``timm/<name>`` as OpenCLIP builds it: ``create_optimizer_v2`` with betas and eps only when
    given (OpenCLIP's model-family defaults apply to AdamW alone), and ``--momentum`` for an optimizer that takes it."""
    opt = args.opt.lower()
    if opt == "adamw":
        if args.momentum is not None:
            problems.append(f"--momentum {args.momentum}: OpenCLIP uses it only for timm optimizers (--opt timm/...)")
        return
    if not opt.startswith("timm/"):
        problems.append(f"--opt {args.opt}: OpenCLIP takes adamw or timm/<name>")
        return
    name = opt.removeprefix("timm/")
    try:
        spec = optimizer_spec(name, "--opt")
    except ConfigError as error:
        problems.append(f"--opt {args.opt}: {str(error).split(': ', 1)[-1]}")
        return
    optim["name"] = name
    if (args.beta1 is None) != (args.beta2 is None):
        problems.append("--beta1 / --beta2: OpenCLIP needs both or neither with a timm optimizer")
    elif args.beta1 is not None and not spec.betas:
        problems.append(f"--beta1 / --beta2: {name} takes no betas (OpenCLIP drops them)")
    if args.eps is not None and not spec.eps:
        problems.append(f"--eps {args.eps}: {name} takes no eps (OpenCLIP drops it)")
    if args.beta1 is None:
        optim["betas"] = None  # the optimizer's own, as OpenCLIP passes none
    if args.eps is None:
        optim["eps"] = None
    if args.momentum is not None:
        if "momentum" in inspect.signature(spec.cls).parameters:
            optim["args"] = {"momentum": args.momentum}
        else:
            problems.append(f"--momentum {args.momentum}: {name} takes no momentum (OpenCLIP ignores it)")


def _algorithms(args, problems: list[str]) -> dict[str, Any]:
    algorithms: dict[str, Any] = {}
    # --lock-image / --lock-text and their two modifiers -> the algorithm's arguments
    for tower, arguments in (
        ("image", {"lock_image_unlocked_groups": "unlocked_groups", "lock_image_freeze_bn_stats": "freeze_bn_stats"}),
        ("text", {"lock_text_unlocked_layers": "unlocked_layers", "lock_text_freeze_layer_norm": "freeze_layer_norm"}),
    ):
        if getattr(args, f"lock_{tower}"):
            algorithms[f"lock_{tower}"] = {name: getattr(args, dest) for dest, name in arguments.items()}
            continue
        for dest in arguments:
            if getattr(args, dest) != BY_DEST[dest].default:
                problems.append(f"{BY_DEST[dest].option}: has no effect without --lock-{tower}")
    if args.grad_checkpointing:
        algorithms["grad_checkpointing"] = {}
    if args.force_patch_dropout:
        algorithms["patch_dropout"] = {"prob": args.force_patch_dropout}
    if args.torchcompile:
        algorithms["torch_compile"] = {}
    if (args.distill_model is None) != (args.distill_pretrained is None):
        given = "--distill-model" if args.distill_model is not None else "--distill-pretrained"
        problems.append(f"{given}: distillation needs both --distill-model and --distill-pretrained")
    elif args.distill_model is not None:
        if args.accum_freq > 1:
            problems.append("--distill-model: distillation needs --accum-freq 1 (as in OpenCLIP)")
        if "coca" in args.model.lower():
            problems.append("--distill-model: OpenCLIP does not distil CoCa models")
        algorithms["distillation"] = {
            "teacher": args.distill_model.replace("/", "-"),
            "pretrained": args.distill_pretrained,
        }
    return algorithms


def _loggers(args, problems: list[str]) -> dict[str, Any]:
    names = [name.strip() for name in args.report_to.split(",") if name.strip()]
    unknown = [name for name in names if name not in ("tensorboard", "wandb", "all")]
    if unknown:
        problems.append(f"--report-to {args.report_to}: {', '.join(unknown)} unknown; use tensorboard, wandb or all")
    loggers: dict[str, Any] = {}
    if "tensorboard" in names or "all" in names:
        loggers["tensorboard"] = {}
    if "wandb" in names or "all" in names:
        loggers["wandb"] = {"project": args.wandb_project_name, "notes": args.wandb_notes or None}
    else:
        for dest in ("wandb_project_name", "wandb_notes"):
            if getattr(args, dest) != BY_DEST[dest].default:
                problems.append(f"{BY_DEST[dest].option}: needs --report-to wandb")
    return loggers


def _checkpoint(args, problems: list[str]) -> dict[str, Any]:
    every = args.save_frequency if args.save_frequency > 0 else args.epochs  # 0: only the final save
    checkpoint: dict[str, Any] = {
        "save_interval": f"{every}ep",
        "keep": 1 if args.delete_previous_checkpoint else -1,
        "save_latest": args.save_most_recent,
        "openclip_names": True,  # epoch_K.pt, where scripts written for OpenCLIP look
    }
    if args.resume == "latest" and args.name is None:
        problems.append(
            "--resume latest: needs --name (without it OpenCLIP names the run by date and finds nothing to resume)"
        )
    if args.resume is not None:
        checkpoint["resume"] = args.resume
    return checkpoint


def _evaluation(args, cfg: dict[str, Any], problems: list[str]) -> None:
    """Zero-shot and validation share ``eval.interval`` (OpenCLIP evaluates after epochs and at the end)."""
    frequencies: dict[str, int] = {}
    if "val" in cfg["data"]:
        frequencies["val_frequency"] = args.val_frequency
    if args.imagenet_val is not None and args.zeroshot_frequency > 0:
        cfg["eval"]["zero_shot"] = {"path": args.imagenet_val, "name": "imagenet", "classnames": "imagenet"}
        frequencies["zeroshot_frequency"] = args.zeroshot_frequency
    if not frequencies:
        return
    every = min(frequencies.values())
    if len(set(frequencies.values())) > 1:
        changed = [dest for dest in frequencies if getattr(args, dest) != BY_DEST[dest].default]
        if changed:
            problems.append(
                f"{' / '.join(BY_DEST[d].option for d in frequencies)}: Cadenza evaluates --val-data and zero-shot at "
                f"one interval (eval.interval); give both the same frequency"
            )
        else:
            log.warning(
                "zero-shot and --val-data are both evaluated every %d epochs (eval.interval=%dep)", every, every
            )
    cfg["eval"]["interval"] = f"{every}ep"


def _remote_sync(args, cfg: dict[str, Any], problems: list[str]) -> None:
    if args.remote_sync is None:
        if args.remote_sync_frequency != BY_DEST["remote_sync_frequency"].default:
            problems.append("--remote-sync-frequency: needs --remote-sync")
        return
    if args.resume == "latest":
        problems.append(
            "--remote-sync with --resume latest: Cadenza resumes from the object store through "
            "checkpoint.save_folder: s3://... (see yamls/laion400m_vitb16.yaml), not from the sync mirror"
        )
    # <remote>/<run name>, as OpenCLIP: the name as the trainer settles it (without --name, rank 0's date on every
    # rank; a name set here would be each process's own date)
    remote = args.remote_sync.rstrip("/")
    cfg["callbacks"]["remote_sync"] = {"remote": remote, "frequency": args.remote_sync_frequency, "under_run": True}


def _dist(args, problems: list[str]) -> dict[str, Any]:
    backend = args.dist_backend or "auto"
    if backend not in ("auto", "nccl", "gloo"):
        problems.append(f"--dist-backend {backend}: Cadenza runs nccl (GPUs) or gloo (CPUs)")
    return {"backend": backend, "static_graph": args.ddp_static_graph}


def _as_list(value: Any) -> Any:
    """Tuples (Python literals) become lists, which YAML and OmegaConf hold."""
    if isinstance(value, (tuple, list)):
        return [_as_list(v) for v in value]
    return value


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


# -- config --------------------------------------------------------------------------------------------------
def flags_for_key(key: str) -> list[str]:
    """The OpenCLIP flags that set config key ``key`` (or a key inside or above it)."""
    found = []
    for flag in FLAGS:
        for target in (flag.key or "").split(", "):
            if target and (key.startswith(target) or target.startswith(key)):
                found.append(flag.option)
                break
    return found


def build(argv: list[str], overrides: list[str] = ()) -> tuple[argparse.Namespace, dict[str, Any], Any]:
    """Parse, translate and validate: ``(flags, the user config with overrides applied, the resolved config)``.

    Raises:
        FlagError: untranslatable flags.
        ConfigError: the translated config is invalid (the message also names the flags behind the key).
    """
    args = parse_flags(argv)
    user = translate(args)
    merged = OmegaConf.create(user)
    for item in overrides:  # composer's override syntax: key=value, a whole mapping replaces, ~key removes
        merged = apply_override(merged, item)
    try:
        cfg = build_config(merged.copy())
    except ConfigError as error:
        flags = flags_for_key(error.key)
        given = [flag for flag in flags if flag in given_flags(argv)]  # only the flags the user passed are named
        if given or flags:
            source = f"set by {', '.join(given)}" if given else f"OpenCLIP's default of {', '.join(flags)}"
            raise ConfigError(error.key, f"{str(error).split(': ', 1)[1]} ({source})") from error
        raise
    return args, OmegaConf.to_container(merged), cfg


def check_new_experiment(args: argparse.Namespace, cfg: Any) -> None:
    """OpenCLIP's rule for ``--name``: a run folder that already holds an ``out.log`` belongs to an earlier run, and a
    run that does not ``--resume`` is refused before any work (rank 0 looks, as in OpenCLIP)."""
    if args.name is None or args.resume is not None or not dist.dist_info_from_env().is_main:
        return
    folder = Path(cfg.run.logs) / cfg.run.name
    if (folder / "out.log").exists():
        raise ConfigError(
            "run.name",
            f"Experiment already exists: {folder} holds an earlier run (set by --name). Use --name to specify a new "
            "experiment, or --resume latest to continue that one.",
        )


def config_yaml(argv: list[str], user: dict[str, Any]) -> str:
    """The translated config as a YAML file that ``composer`` runs."""
    header = (
        f"# Translated by `composer openclip` from open_clip_train {OPENCLIP_VERSION} flags:\n"
        f"#   {shlex.join(argv)}\n# Run it with: composer THIS_FILE.yaml\n"
    )
    return header + OmegaConf.to_yaml(OmegaConf.create(user))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    return run(flags, overrides)


@record
def run(flags: list[str], overrides: list[str]) -> int:
    """Translate ``flags`` (+ Cadenza ``overrides``) and train, or print the YAML with ``--print-config``."""
    try:
        args, user, cfg = build(flags, overrides)
        if args.print_config:
            sys.stdout.write(config_yaml([f for f in flags if f != "--print-config"], user))
            return 0
        check_new_experiment(args, cfg)
        train(cfg)
    except (FlagError, ConfigError) as error:
        sys.stderr.write(f"composer openclip: configuration error: {error}\n")
        return 2
    except CadenzaError as error:
        log.error("%s", error)
        sys.stderr.write(f"composer openclip: {error}\n")
        return 1
    return 0


__all__ = ["FLAGS", "Flag", "FlagError", "build", "build_parser", "flag_table", "main", "translate"]


# -- README --------------------------------------------------------------------------------------------------
def flag_table() -> str:
    """The Markdown table of ``FLAGS`` that the README shows (a test keeps them equal)."""
    rows = ["| OpenCLIP flag | default | Cadenza | how |", "| --- | --- | --- | --- |"]
    for flag in FLAGS:
        if flag.action == "store_true":
            default = "off"
        elif flag.default is None:
            default = "unset"
        else:
            default = f"`{flag.default!r}`"
        key = " ".join(f"`{k}`" for k in flag.key.split(", ")) if flag.key else "— (an error unless at its default)"
        if flag.key is None and flag.same:
            key = "— (accepted)" if flag.action else f"— (accepted: {', '.join(f'`{v}`' for v in flag.same)})"
        rows.append(f"| `{flag.option}` | {default} | {key} | {flag.how} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
