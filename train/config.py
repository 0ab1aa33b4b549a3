"""The typed configuration: YAML + ``key=value`` overrides → validated sections, or a ``ConfigError``.

Every default lives in the dataclasses below and nowhere else. Validation happens in ``load_config``
before any work starts: unknown keys (with the closest valid key suggested), wrong types, bad time
strings, unknown registry names and impossible combinations all raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cadenza import algorithms, datasets, models  # noqa: F401 - their modules fill the tables below
from cadenza.datasets.transforms import check_augment
from cadenza.engine import callbacks, logger_destinations, profiling, remote_sync  # noqa: F401 - so do these
from cadenza.engine.errors import ConfigError, suggest
from cadenza.engine.object_store import check_storage, is_remote
from cadenza.engine.optim import check_optimizer
from cadenza.engine.registry import ALGORITHMS, CALLBACKS, DATASETS, LOGGERS, LOSSES, MODELS
from cadenza.engine.time import Time, TimeUnit
from cadenza.models.clip import TOWERS
from cadenza.models.factory import get_model_config, list_models
from cadenza.models.losses import LOGIT_BIAS_CHOICES, LOSS_MODEL_TYPES, check_logit_bias
from cadenza.train.eval_tasks import parse_tasks

PRECISIONS = ("fp32", "amp", "amp_bf16", "bf16", "fp16")
SCHEDULERS = ("cosine", "const", "const-cooldown")
DEVICES = ("auto", "cpu", "cuda")
FSDP_STATE_DICTS = ("full", "sharded")


@dataclass
class RunConfig:
    name: str | None = None  # run folder name; a date-model-lr string when unset
    seed: int = 0
    logs: str = "./logs"  # runs live in <logs>/<name>/
    duration: str = "1ep"  # ep | ba (optimizer steps) | sp
    precision: str = "fp32"  # fp32 | amp (fp16 + GradScaler) | amp_bf16 | bf16 | fp16 (weights cast)
    device: str = "auto"  # auto picks cuda when available
    log_interval: str = "10ba"  # how often metrics are computed and written
    peak_tflops: float | None = None  # per device, for train/mfu; default: measured with a large matmul


@dataclass
class ModelConfig:
    name: str = "tiny-vit"  # an OpenCLIP architecture name (see README)
    pretrained: str | None = None  # local file, s3:// URI or OpenCLIP tag (e.g. laion2b_s34b_b79k)
    overrides: dict[str, Any] = field(default_factory=dict)  # architecture fields to change
    trim_text_padding: bool | None = None  # run the text tower up to the batch's longest caption; default: where exact
    logit_bias: str | None = None  # train | freeze | drop; default: train with loss.name=siglip, drop otherwise


@dataclass
class LossConfig:
    name: str = "clip"  # clip | siglip | coca | distill
    local_loss: bool = False  # logits of local rows against all columns: O(B*N) memory
    gather_with_grad: bool = False  # gather features with gradients (exact with local_loss)
    clip_loss_weight: float | None = None  # coca: weight of the contrastive loss; unset: 1.0 (OpenCLIP's)
    caption_loss_weight: float | None = None  # coca: weight of the captioning loss; unset: 2.0 (OpenCLIP's)


@dataclass
class AugmentConfig:
    """OpenCLIP's aug-cfg keys, applied to training images."""

    scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop area range
    ratio: list[float] | None = None  # aspect-ratio range; default (3/4, 4/3)
    color_jitter: Any = None  # a number, or [brightness, contrast, saturation, hue]
    color_jitter_prob: float | None = None
    gray_scale_prob: float | None = None
    re_prob: float | None = None  # random erasing (use_timm only)
    re_count: int | None = None
    use_timm: bool = False  # timm's create_transform


@dataclass
class DataConfig:
    train: dict[str, Any] | None = None  # {type: synthetic|..., <that dataset's arguments>}
    val: dict[str, Any] | None = None
    batch_size: int = 64  # per process and per micro-batch
    workers: int = 4  # DataLoader worker processes per training process
    pin_memory: bool = True  # only takes effect on CUDA
    persistent_workers: bool = True
    prefetch_factor: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (torch's, fused) or a timm optimizer: lamb, lion, adafactor, nadamw, sgd, ...
    args: dict[str, Any] = field(default_factory=dict)  # the optimizer's other arguments, e.g. {momentum: 0.9}
    lr: float = 5.0e-4
    betas: list[float] | None = field(default_factory=lambda: [0.9, 0.98])  # null: the optimizer's own default
    eps: float | None = 1.0e-6  # null: the optimizer's own default
    weight_decay: float = 0.2
    warmup: str = "10000ba"  # linear warmup from 0; counts in the run's optimizer steps
    scheduler: str = "cosine"  # cosine | const | const-cooldown
    cooldown: str | None = None  # const-cooldown: length of the final decay
    cooldown_power: float = 1.0  # 1 = linear cooldown
    cooldown_end_lr: float = 0.0
    grad_clip_norm: float | None = None  # shorthand for algorithms.gradient_clipping.norm
    fused: bool | None = None  # AdamW's single-kernel update; default: on CPU and CUDA, else foreach
    accum_freq: int = 1  # micro-batches per optimizer step (features cached, OpenCLIP's way)
    param_groups: list[Any] = field(
        default_factory=list
    )  # ordered rules: {match | regex, lr_scale, weight_decay, frozen}
    layer_decay: dict[str, float] = field(
        default_factory=dict
    )  # layer-wise LR decay per tower: {image: 0.75, text: 0.8}


@dataclass
class CheckpointConfig:
    save_folder: str | None = None  # a local folder or s3://bucket/prefix; default <run folder>/checkpoints
    save_interval: str = "1ep"  # ep | ba | sp | wall-clock (s, m, h)
    keep: int = -1  # numbered checkpoints kept (newest first); -1 keeps all
    save_latest: bool = True  # also keep epoch_latest.pt, the newest checkpoint
    resume: str | None = (
        None  # a path, s3:// URI, or 'latest' (newest locally, then in save_folder; fresh start if none)
    )
    upload_timeout: float = 600.0  # seconds to wait at exit for pending uploads to an s3:// save_folder
    overwrite: bool = False  # a run from scratch deletes the checkpoints another run left in its folder (else: exit 2)
    openclip_names: bool = False  # also name epoch-end checkpoints epoch_K.pt (a hard link), as open_clip_train


@dataclass
class ZeroShotConfig:
    """Zero-shot classification on an image folder (``train/zero_shot.py``); off while ``path`` is unset."""

    path: str | None = None  # <path>/<class>/<image>, classes in sorted folder order
    classnames: Any = None  # a list, a file (one per line) or 'imagenet', in folder order; default see README
    templates: Any = None  # 'openai' (80, the default), 'simple' (7), a file, or a list of prompts with '{}'
    name: str = "imagenet"  # metric prefix: val/<name>-zeroshot-val-top1 / -top5


@dataclass
class EvalConfig:
    interval: str = "1ep"  # evaluate data.val, zero_shot and tasks this often (and at the end)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    tasks: Any = None  # an evaluation suite: a file (yamls/eval/*.yaml) or a mapping of tasks (train/eval_tasks.py)
    data_root: str | None = None  # where the tasks' relative paths start; default: the suite's root


@dataclass
class DistConfig:
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False  # DDP: needed only when some trainable parameters get no gradient
    static_graph: bool = False  # DDP: the graph is the same every step (helps with grad checkpointing)
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (FSDP2) instead of DDP
    fsdp_state_dict: str = "full"  # fsdp checkpoints: full (one file, any world size, with or without fsdp) | sharded


@dataclass
class CadenzaConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    algorithms: dict[str, Any] = field(default_factory=dict)
    loggers: dict[str, Any] = field(default_factory=lambda: {"console": {}, "jsonl": {}})
    callbacks: dict[str, Any] = field(default_factory=dict)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# -- loading -----------------------------------------------------------------------------------------
def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), base: dict[str, Any] | None = None
) -> DictConfig:
    """Read a YAML file (or start from ``base``), apply ``key=value`` overrides, and validate. Raises ``ConfigError``."""
    user = OmegaConf.create(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config", f"file '{path}' does not exist.")
        try:
            user = OmegaConf.load(path)
        except Exception as error:  # noqa: BLE001 - any YAML syntax error becomes a ConfigError
            raise ConfigError("config", f"cannot read '{path}': {error}") from error
        if not isinstance(user, DictConfig):
            raise ConfigError(
                "config",
                f"'{path}' holds a {type(user).__name__.removesuffix('Config').lower()} at its top level; a config is "
                "a mapping of sections (run:, model:, data:, ...). See yamls/tiny.yaml.",
            )
    for item in overrides:
        user = apply_override(user, item)
    return build_config(user)


def apply_override(user: DictConfig, item: str) -> DictConfig:
    """One command-line override, as Hydra writes them: ``key=value`` sets a value (``+key=value`` and
    ``++key=value`` mean the same here); a mapping written whole (``data.train='{type: synthetic, num_samples: 8}'``)
    replaces what the key held instead of merging into it; ``~key`` removes the key, as if the YAML never set it."""
    if item.startswith("~"):
        if "=" in item:
            key = item[1:].split("=", 1)[0]
            raise ConfigError(key, f"'~' removes a key and takes no value: write ~{key} (not {item!r}).")
        _remove_key(user, item[1:], item)
        return user
    if "=" not in item:
        raise ConfigError(
            item, "command-line overrides are written key=value (or ~key to remove one), e.g. optim.lr=1e-4."
        )
    key, value = item.lstrip("+").split("=", 1)  # Hydra's "+key=value" / "++key=value" mean the same here
    try:
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
        if isinstance(OmegaConf.select(parsed, key), DictConfig):  # a whole mapping: it replaces, never merges
            OmegaConf.update(user, key, OmegaConf.select(parsed, key), merge=False)
            return user
        return OmegaConf.merge(user, parsed)
    except Exception as error:  # noqa: BLE001 - a value YAML cannot read, or one that does not fit the key
        problem = " ".join(str(error).split())
        raise ConfigError(
            key, f"cannot use the override {item!r} ({problem}). Quote lists and mappings whole: '{key}=[1, 2]'."
        ) from None


def _remove_key(user: DictConfig, key: str, item: str) -> None:
    """Hydra's ``~key``: the key leaves the user's config (the YAML plus earlier overrides); schema defaults stay."""
    *parents, last = key.split(".")
    node: Any = user
    for part in parents:
        node = node._get_node(part) if isinstance(node, DictConfig) and part in node else None
    if not isinstance(node, DictConfig) or last not in node:
        siblings = list(node.keys()) if isinstance(node, DictConfig) else []
        raise ConfigError(
            key,
            f"{item!r} removes a key the YAML or an earlier override sets, and nothing sets it.{suggest(last, siblings)} "
            "(A default entry such as loggers.console is switched off with loggers.console=null.)",
        )
    del node[last]


def build_config(user: DictConfig | dict[str, Any]) -> DictConfig:
    """Validate a user config (a mapping) against the schema and return the resolved, typed config."""
    if not isinstance(user, DictConfig):
        user = OmegaConf.create(user)
    _apply_shorthands(user)
    _check_keys(user, CadenzaConfig, "")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(CadenzaConfig), user)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "config"
        raise ConfigError(str(key), _short_omegaconf_message(error)) from error
    _drop_disabled(cfg)
    _check_values(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def _apply_shorthands(user: DictConfig) -> None:
    """``optim.grad_clip_norm`` is OpenCLIP's flag; it becomes the ``gradient_clipping`` algorithm."""
    norm = OmegaConf.select(user, "optim.grad_clip_norm")
    if norm is None:
        return
    if OmegaConf.select(user, "algorithms.gradient_clipping") is not None:
        raise ConfigError(
            "optim.grad_clip_norm",
            "set either optim.grad_clip_norm or algorithms.gradient_clipping, not both.",
        )
    OmegaConf.update(user, "algorithms.gradient_clipping", {"norm": norm}, force_add=True)
    OmegaConf.update(user, "optim.grad_clip_norm", None)  # one place holds the setting in the resolved config


def _check_keys(node: Any, schema: type, prefix: str) -> None:
    if not isinstance(node, DictConfig):
        if node is not None:
            raise ConfigError(prefix.rstrip(".") or "config", f"expected a mapping of keys, got {node!r}.")
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}", f"unknown key.{suggest(str(key), fields)}")
        sub = fields[key].type
        nested = _dataclass_of(sub)
        if nested is not None:
            _check_keys(node._get_node(key), nested, f"{prefix}{key}.")
        elif str(sub).startswith("dict") and not isinstance(node._get_node(key), DictConfig | None):
            if node[key] is not None:
                raise ConfigError(
                    f"{prefix}{key}",
                    f"expected a mapping of names to their arguments, got {node[key]!r}; write e.g. "
                    f"{key}: {{ema: {{}}}} (or {prefix}{key}.ema={{}} on the command line).",
                )


def _dataclass_of(annotation: Any) -> type | None:
    if isinstance(annotation, str):
        annotation = globals().get(annotation.split(" |")[0])
    return annotation if inspect.isclass(annotation) and dataclasses.is_dataclass(annotation) else None


def _short_omegaconf_message(error: OmegaConfBaseException) -> str:
    message = str(error).split("\n")[0]
    return f"{message}. Check the value's type against the README's YAML reference."


def _drop_disabled(cfg: DictConfig) -> None:
    """``loggers.console: null`` (or ``false``) switches a default entry off."""
    for section in ("algorithms", "loggers", "callbacks"):
        mapping = cfg[section]
        for name in [k for k, v in mapping.items() if v is None or v is False]:
            del mapping[name]
        for name, value in mapping.items():
            if value is True:
                mapping[name] = {}
            elif not isinstance(value, DictConfig):
                raise ConfigError(f"{section}.{name}", f"expected a mapping of arguments (or {{}}), got {value!r}.")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"'{value}' is not one of {', '.join(choices)}.{suggest(value, choices)}")


def _check_values(cfg: DictConfig) -> None:
    _check_choice("run.precision", cfg.run.precision, PRECISIONS)
    _check_choice("run.device", cfg.run.device, DEVICES)
    _check_choice("optim.scheduler", cfg.optim.scheduler, SCHEDULERS)
    duration = Time.parse(cfg.run.duration, "run.duration")
    if duration.unit == TimeUnit.DURATION:
        raise ConfigError("run.duration", "cannot be a fraction of itself; use ep, ba or sp.")
    if duration.value <= 0:
        raise ConfigError("run.duration", "must be greater than zero.")
    log_interval = Time.parse(cfg.run.log_interval, "run.log_interval")
    if log_interval.value <= 0:
        raise ConfigError("run.log_interval", "must be greater than zero, e.g. '10ba'.")
    Time.parse(cfg.optim.warmup, "optim.warmup")
    if Time.parse(cfg.checkpoint.save_interval, "checkpoint.save_interval", allow_wall_clock=True).value <= 0:
        raise ConfigError("checkpoint.save_interval", "must be greater than zero, e.g. '1ep', '2000ba' or '30m'.")
    Time.parse(cfg.eval.interval, "eval.interval")
    if cfg.optim.scheduler == "const-cooldown":
        if cfg.optim.cooldown is None:
            raise ConfigError("optim.cooldown", "optim.scheduler=const-cooldown needs a cooldown length, e.g. '1ep'.")
        Time.parse(cfg.optim.cooldown, "optim.cooldown")
    elif cfg.optim.cooldown is not None:
        raise ConfigError(
            "optim.cooldown", f"only used by optim.scheduler=const-cooldown (got '{cfg.optim.scheduler}')."
        )
    _check_finite(OmegaConf.to_container(cfg), "")
    if cfg.optim.lr < 0:
        raise ConfigError("optim.lr", "must not be negative.")
    _check_optim(cfg.optim)
    for key in ("optim.accum_freq", "data.batch_size"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(key, "must be at least 1.")
    if cfg.data.workers < 0:
        raise ConfigError("data.workers", "must be 0 (load in the main process) or more.")
    if cfg.checkpoint.keep == 0 or cfg.checkpoint.keep < -1:
        raise ConfigError("checkpoint.keep", "keep at least 1 checkpoint, or -1 to keep all.")
    _check_run_name(cfg.run.name)
    check_storage(cfg.checkpoint.save_folder, "checkpoint.save_folder")
    check_storage(cfg.checkpoint.resume, "checkpoint.resume")
    resume = cfg.checkpoint.resume
    if resume not in (None, "latest") and not is_remote(resume) and not Path(resume).exists():
        hint = suggest(resume, ["latest"])
        if hint.startswith(" Did you mean"):  # a typo of 'latest', not a path that is missing
            raise ConfigError("checkpoint.resume", f"'{resume}' is not a checkpoint file.{hint}")
    if cfg.checkpoint.overwrite and resume is not None:
        raise ConfigError(
            "checkpoint.overwrite",
            "deletes the checkpoints in the run's folder, and checkpoint.resume continues from them: set one of them.",
        )
    if cfg.checkpoint.resume == "latest" and cfg.run.name is None:
        raise ConfigError(
            "checkpoint.resume", "'latest' needs a fixed run.name, so that a restarted job finds its own run folder."
        )
    _check_dist(cfg)
    MODELS.get(cfg.model.name, "model.name")
    _resolve_loss(cfg)
    if cfg.model.logit_bias is not None:
        _check_choice("model.logit_bias", cfg.model.logit_bias, LOGIT_BIAS_CHOICES)
    check_logit_bias(cfg.loss.name, cfg.model.logit_bias)
    for split in ("train", "val"):
        dataset = cfg.data[split]
        if dataset is None:
            continue
        if "type" not in dataset:
            raise ConfigError(f"data.{split}.type", f"missing. Choose one of {', '.join(DATASETS.names())}.")
        args = {k: v for k, v in dataset.items() if k != "type"}
        try:
            DATASETS.check_args(dataset.type, args, f"data.{split}", runtime=DATASET_RUNTIME_ARGS)
        except ConfigError as error:
            if error.key.removeprefix(f"data.{split}.") not in args:
                raise
            raise ConfigError(  # e.g. data.train.type=synthetic over a YAML's webdataset path
                error.key,
                f"{str(error).split(': ', 1)[1]} To change a dataset's type from the command line, replace the "
                f"section whole (data.{split}='{{type: {dataset.type}, ...}}') or remove the key (~{error.key}).",
            ) from None
    try:
        check_augment(**OmegaConf.to_container(cfg.data.augment))
    except (TypeError, ValueError) as error:
        raise ConfigError("data.augment", str(error)) from error
    if cfg.data.train is None and cfg.data.val is None and cfg.eval.zero_shot.path is None and cfg.eval.tasks is None:
        raise ConfigError(
            "data.train",
            "nothing to do: set data.train (to train), or data.val, eval.zero_shot.path or eval.tasks (to evaluate).",
        )
    _check_tasks(cfg)
    templates = cfg.eval.zero_shot.templates
    if templates is not None:
        if not isinstance(templates, str) and not OmegaConf.is_list(templates):
            raise ConfigError("eval.zero_shot.templates", f"expected a set name, a file or a list, got {templates!r}.")
    for section, registry, runtime in (
        ("algorithms", ALGORITHMS, ()),
        ("loggers", LOGGERS, LOGGER_RUNTIME_ARGS),
        ("callbacks", CALLBACKS, CALLBACK_RUNTIME_ARGS),
    ):
        for name, args in cfg[section].items():
            registry.check_args(name, OmegaConf.to_container(args), f"{section}.{name}", runtime=runtime)


def _check_tasks(cfg: DictConfig) -> None:
    """``eval.tasks``: the definitions (their data is checked when the trainer starts, before the model)."""
    tasks = cfg.eval.tasks
    if tasks is None and cfg.eval.data_root is not None:
        raise ConfigError("eval.data_root", "only applies to eval.tasks, which is unset; set it or remove data_root.")
    if tasks is not None and not isinstance(tasks, str) and not OmegaConf.is_dict(tasks):
        raise ConfigError("eval.tasks", f"expected a suite file or a mapping of task names to tasks, got {tasks!r}.")
    names = [spec.name for spec in parse_tasks(tasks, cfg.eval.data_root)]
    if cfg.eval.zero_shot.path is not None and cfg.eval.zero_shot.name in names:
        raise ConfigError(
            f"eval.tasks.{cfg.eval.zero_shot.name}",
            "has the name of eval.zero_shot, whose metrics it would overwrite; rename one of them.",
        )


def _check_optim(optim: DictConfig) -> None:
    """The optimizer and its arguments (by key, against its signature), the parameter rules, the layer decays."""
    defaults = {
        f.name: f.default_factory() if callable(f.default_factory) else f.default
        for f in dataclasses.fields(OptimConfig)
    }
    check_optimizer(optim, defaults)
    for tower, decay in optim.layer_decay.items():
        if tower not in TOWERS:
            raise ConfigError(f"optim.layer_decay.{tower}", f"not a tower.{suggest(str(tower), TOWERS)}")
        if not 0 < decay <= 1:
            raise ConfigError(f"optim.layer_decay.{tower}", f"a factor per layer in (0, 1], e.g. 0.75; got {decay}.")


def _check_finite(node: dict[str, Any], prefix: str) -> None:
    """No number in a config is NaN, and none of the optimizer's is infinite (``optim.lr=nan`` would train nothing)."""
    for key, value in node.items():
        if isinstance(value, dict):
            _check_finite(value, f"{prefix}{key}.")
        elif isinstance(value, float) and (math.isnan(value) or (prefix == "optim." and math.isinf(value))):
            raise ConfigError(f"{prefix}{key}", f"must be a finite number, got {value}.")


def _check_run_name(name: str | None) -> None:
    """A run lives in ``<run.logs>/<run.name>``: the name is one folder, so no run writes outside ``run.logs``."""
    if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
        raise ConfigError(
            "run.name",
            f"'{name}' is not one folder name: runs live in run.logs/<run.name>, so the name may not contain '/' "
            "or be '.' or '..'. Choose e.g. run.name=my-run, and put the parent folder in run.logs.",
        )


def _check_dist(cfg: DictConfig) -> None:
    """FSDP replaces DDP: DDP's options, fp16 loss scaling and object-store uploads of sharded checkpoints are out."""
    _check_choice("dist.fsdp_state_dict", cfg.dist.fsdp_state_dict, FSDP_STATE_DICTS)
    if not cfg.dist.fsdp:
        if cfg.dist.fsdp_state_dict != "full":
            raise ConfigError("dist.fsdp_state_dict", "only applies with dist.fsdp=true; remove it or set dist.fsdp.")
        return
    for key in ("find_unused_parameters", "static_graph"):
        if cfg.dist[key]:
            raise ConfigError(f"dist.{key}", "is a DDP option and dist.fsdp=true replaces DDP; remove one of them.")
    if cfg.optim.name == "muon":
        raise ConfigError(
            "optim.name",
            "muon orthogonalises whole weight matrices, and with dist.fsdp=true each process holds shards of them. "
            "Use DDP (dist.fsdp=false) with muon, or another optimizer with FSDP.",
        )
    if cfg.run.precision == "amp":
        raise ConfigError(
            "run.precision",
            "amp (fp16 with a GradScaler) cannot be combined with dist.fsdp=true: the scaler cannot check sharded and "
            "replicated gradients together. Use run.precision=amp_bf16 (no scaler needed) or bf16.",
        )
    if cfg.dist.fsdp_state_dict == "sharded" and is_remote(cfg.checkpoint.save_folder):
        raise ConfigError(
            "dist.fsdp_state_dict",
            f"sharded checkpoints are folders written by every rank and cannot be uploaded to "
            f"checkpoint.save_folder={cfg.checkpoint.save_folder}; use dist.fsdp_state_dict=full or a shared file system.",
        )


def _resolve_loss(cfg: DictConfig) -> None:
    """``loss.name`` exists and fits the model; keys the loss does not take stay unset; unset ones it takes get its
    default (so the resolved config shows them)."""
    name = cfg.loss.name
    accepted = inspect.signature(LOSSES.get(name, "loss.name")).parameters
    for schema_field in dataclasses.fields(LossConfig):
        key, value = schema_field.name, cfg.loss[schema_field.name]
        if key == "name":
            continue
        if key not in accepted:
            if value != schema_field.default:
                raise ConfigError(f"loss.{key}", f"has no meaning for loss.name={name}; remove it.")
        elif value is None:
            cfg.loss[key] = accepted[key].default
        elif isinstance(value, float) and value < 0:
            raise ConfigError(f"loss.{key}", f"must not be negative, got {value}.")
    if cfg.model.name not in list_models():
        return  # a model registered by code, not an architecture file
    model_type = get_model_config(cfg.model.name, OmegaConf.to_container(cfg.model.overrides)).get("model_type", "clip")
    if LOSS_MODEL_TYPES[name] == model_type:
        return
    if model_type == "coca":
        raise ConfigError(
            "loss.name",
            f"model.name={cfg.model.name} is a CoCa model: train it with loss.name=coca (its text decoder learns only "
            "from the captioning loss; loss.clip_loss_weight and loss.caption_loss_weight set the mix).",
        )
    raise ConfigError(
        "loss.name",
        f"loss.name={name} trains {LOSS_MODEL_TYPES[name]} models, and model.name={cfg.model.name} is a {model_type} "
        f"model. CoCa architectures: {', '.join(n for n in list_models() if 'coca' in n)}.",
    )


def listed(value: Any) -> Any:
    """A config list as a Python list; anything else as it is."""
    return list(value) if OmegaConf.is_list(value) else value


def loss_arguments(loss: DictConfig) -> dict[str, Any]:
    """The constructor arguments of ``loss.name`` in a validated ``loss`` section (the keys it takes)."""
    accepted = inspect.signature(LOSSES.get(loss.name, "loss.name")).parameters
    return {key: value for key, value in OmegaConf.to_container(loss).items() if key in accepted}


#: arguments a dataset builder gets from the trainer, never from YAML
DATASET_RUNTIME_ARGS = ("context",)  # a LoaderContext: batch size, processes, seed, the model's input sizes, ...
#: arguments a logger or callback gets from the trainer (the run folder; steps per logging window)
LOGGER_RUNTIME_ARGS = ("run_dir",)
CALLBACK_RUNTIME_ARGS = ("run_dir", "log_every")
