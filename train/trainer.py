"""The trainer: builds every component from the config, then runs the loop, firing events.

No feature lives here as an ``if config.x`` branch: techniques are algorithms, observers are callbacks.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cadenza.datasets.context import LoaderContext
from cadenza.datasets.transforms import image_transform
from cadenza.engine import dist
from cadenza.engine.callbacks import RetrievalEvaluator, TrainMetrics
from cadenza.engine.checkpoint import CheckpointSaver, find_latest, load_checkpoint, resolve_resume, stored_config
from cadenza.engine.engine import Engine, check_algorithms
from cadenza.engine.errors import CheckpointError, ConfigError, TrainingError
from cadenza.engine.event import Event
from cadenza.engine.finite import NonFiniteError, NonFiniteGuard
from cadenza.engine.fsdp import gathered_for_evaluation, load_sharded, shard_model
from cadenza.engine.loader import Loader
from cadenza.engine.logger import Logger
from cadenza.engine.object_store import ObjectStoreError, get_object_store, is_remote
from cadenza.engine.optim import build_optimizer, build_scheduler, describe_param_groups, resolve_param_groups
from cadenza.engine.precision import autocast_context, weights_dtype
from cadenza.engine.registry import ALGORITHMS, CALLBACKS, DATASETS, LOGGERS, LOSSES, MODELS
from cadenza.engine.state import State
from cadenza.engine.text_log import setup_logging
from cadenza.engine.time import Time
from cadenza.models.clip import layer_decay_scales
from cadenza.models.lora import is_lora_state_dict
from cadenza.models.losses import apply_logit_bias_choice, gradient_shrinks_with_processes, model_init_overrides
from cadenza.models.tokenizer import get_tokenizer
from cadenza.train.config import listed, loss_arguments, to_yaml
from cadenza.train.eval_suite import build_suite
from cadenza.train.eval_tasks import load_tasks
from cadenza.train.openclip_checkpoint import is_openclip_checkpoint, resume_openclip
from cadenza.train.run_folder import RunFolderLock, claim_checkpoints
from cadenza.train.zero_shot import build_zero_shot, load_templates

log = logging.getLogger("cadenza")

#: output keys that are scalars shared by the batch, not per-sample features (never cached or concatenated)
SHARED_OUTPUTS = ("logit_scale", "logit_bias")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str, info: dist.DistInfo) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("run.device", "cuda was asked for but no GPU is visible; use run.device=cpu.")
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def default_run_name(cfg: DictConfig) -> str:
    """OpenCLIP's naming: date, model, lr, batch size, workers, precision."""
    stamp = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    model = cfg.model.name.replace("/", "-")
    return f"{stamp}-model_{model}-lr_{cfg.optim.lr}-b_{cfg.data.batch_size}-j_{cfg.data.workers}-p_{cfg.run.precision}"


class Trainer:
    """Builds model, algorithms, data, optimizer, loss and callbacks from ``cfg``; ``fit()`` trains.

    Args:
        cfg: a validated config from ``load_config``.
        callbacks: extra callback objects (tests and notebooks use this to observe a run).
    """

    def __init__(self, cfg: DictConfig, callbacks: list | None = None) -> None:
        self.cfg = cfg
        # What the config names and no model needs: the loss, the algorithms, the zero-shot prompts. Building them is
        # their validation (load_config checks only their argument names), done once, before any work: their errors
        # name the key before a process group, a run folder or a model exists.
        loss_fn = LOSSES.build(cfg.loss.name, loss_arguments(cfg.loss), "loss")
        algorithms = [ALGORITHMS.build(n, a, f"algorithms.{n}") for n, a in cfg.algorithms.items()]
        self.templates = load_templates(listed(cfg.eval.zero_shot.templates))
        self.tasks = load_tasks(cfg.eval.tasks, cfg.eval.data_root)  # scans their data: a bad task stops here

        # Process and device next: everything after may allocate on the device.
        info = dist.dist_info_from_env()
        device = resolve_device(cfg.run.device, info)
        dist.init_process_group(info, cfg.dist.backend, device)
        self.run_name = cfg.run.name or dist.all_gather_object(default_run_name(cfg))[0]  # rank 0's date, on all
        self.run_dir = Path(cfg.run.logs) / self.run_name
        # The run folder is this run's while it lives (rank 0 holds its lock); everything after releases it on failure.
        self._lock = RunFolderLock(self.run_dir) if info.is_main else None
        try:
            self._build(info, device, loss_fn, algorithms, callbacks)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Stop the loaders' worker processes and let go of the run folder (``fit`` does at its end; a trainer that
        never fits may call it). Persistent workers would otherwise live, idle, until the trainer is collected."""
        state = getattr(self, "state", None)
        try:
            for loader in (state.train_loader, state.eval_loader) if state is not None else ():
                if loader is not None:
                    loader.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _build(
        self, info: dist.DistInfo, device: torch.device, loss_fn: nn.Module, algorithms: list, callbacks: list | None
    ) -> None:
        cfg = self.cfg
        setup_logging(self.run_dir, info.rank)
        self.lineage: str | None = uuid.uuid4().hex  # a resumed run carries on its checkpoint's (see load)
        if info.is_main:
            self._probe_storage()
            if cfg.checkpoint.resume is None and cfg.data.train is not None:
                claim_checkpoints(self.checkpoint_folder, self.checkpoint_remote, cfg.checkpoint.overwrite)

        # The model, seeded identically on every rank, before anything that holds its parameters.
        seed_everything(cfg.run.seed)
        overrides = {
            **model_init_overrides(cfg.loss.name, cfg.model.logit_bias),
            **OmegaConf.to_container(cfg.model.overrides),
        }
        model = MODELS.build(cfg.model.name, {"pretrained": cfg.model.pretrained, "overrides": overrides}, "model")
        apply_logit_bias_choice(model, cfg.loss.name, cfg.model.logit_bias)  # trained, frozen or dropped
        model = model.to(device=device, dtype=weights_dtype(cfg.run.precision))
        self.trim_text = trims_text_padding(cfg, model)
        seed_everything(cfg.run.seed + info.rank)

        # Data: built from the model's input sizes, carrying what the algorithms read. Durations follow from its length.
        extras = frozenset(name for algorithm in algorithms for name in algorithm.batch_extras)
        train_loader = self._build_loader(cfg.data.train, "data.train", model, info, train=True, extras=extras)
        eval_loader = self._build_loader(cfg.data.val, "data.val", model, info, train=False)
        state = State(model=model, config=cfg, device=device, precision=cfg.run.precision, dist=info)
        state.train_loader, state.eval_loader = train_loader, eval_loader
        state.accum_freq = cfg.optim.accum_freq
        state.samples_per_batch = cfg.data.batch_size * cfg.optim.accum_freq * info.world_size
        self.evaluates = eval_loader is not None or cfg.eval.zero_shot.path is not None or bool(self.tasks)
        self.eval_every = 0  # steps between evaluations (time strings are parsed here, not in the loop)
        if train_loader is not None:
            self._set_durations(state)

        # The algorithms, checked against each other, the loss and the data before anything runs.
        state.loss_fn, state.algorithms = loss_fn, algorithms
        check_algorithms(state.algorithms, state)

        # Callbacks: metrics and checkpoints first (loggers see their output), loggers, then user callbacks.
        destinations = [LOGGERS.build(n, a, f"loggers.{n}", run_dir=self.run_dir) for n, a in cfg.loggers.items()]
        self.logger = Logger(destinations, is_main=info.is_main)
        state.callbacks = self._builtin_callbacks(state) + destinations
        state.callbacks += [self._build_callback(n, a) for n, a in cfg.callbacks.items()]
        state.callbacks += list(callbacks or [])
        self.engine = Engine(state, self.logger)
        self.state = state

        # INIT: algorithms change the model; optim.param_groups' rules freeze what they freeze (before DDP sees which
        # parameters train); then wrap it and let the optimizer collect what is trainable, by name.
        self.engine.run_event(Event.INIT)
        groups = self._param_groups(state.model) if train_loader is not None else None
        state.wrapped_model = self._wrap_model(state.model, info, device)
        if train_loader is not None:
            state.optimizer = build_optimizer(cfg.optim, state.model, groups)
            state.scheduler = build_scheduler(
                cfg.optim, state.optimizer, self.warmup_batches, state.max_batches, self.cooldown_batches
            )
            state.scaler = torch.amp.GradScaler(device.type) if cfg.run.precision == "amp" else None
            # fp16 / bf16 weights: gradients can overflow with a finite loss (amp's scaler checks its own)
            state.guard = NonFiniteGuard(device, check_gradients=cfg.run.precision in ("fp16", "bf16"))
        self._log_setup(state)
        self._resume()
        self._write_config(info)  # only once everything is built: a config that fails leaves the folder's as it was

    # -- building -----------------------------------------------------------------------------------
    def _write_config(self, info: dist.DistInfo) -> None:
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))

    def _build_loader(
        self,
        section: DictConfig | None,
        key: str,
        model: nn.Module,
        info: dist.DistInfo,
        train: bool,
        extras: frozenset[str] = frozenset(),
    ) -> Loader | None:
        """``section``'s loader, from its YAML arguments and ``context`` (the runtime facts: input sizes, seed, ...)."""
        if section is None:
            return None
        data = self.cfg.data
        augment = OmegaConf.to_container(data.augment)
        context = LoaderContext(
            train=train,
            batch_size=data.batch_size,
            dist=info,
            seed=self.cfg.run.seed,
            image_size=model.image_size,
            context_length=model.context_length,
            vocab_size=model.vocab_size,
            transform=image_transform(model.image_size, train, model.image_mean, model.image_std, **augment),
            tokenizer=get_tokenizer(self.cfg.model.name, context_length=model.context_length),
            workers=data.workers,
            pin_memory=data.pin_memory and torch.cuda.is_available(),
            persistent_workers=data.persistent_workers,
            prefetch_factor=data.prefetch_factor,
            cache_dir=str(self.run_dir / "data-cache"),
            augment=augment,
            extras=extras,
        )
        args = {k: v for k, v in OmegaConf.to_container(section).items() if k != "type"}
        return DATASETS.build(section.type, args, key, context=context)

    def _set_durations(self, state: State) -> None:
        cfg = self.cfg
        state.batches_per_epoch = state.train_loader.batches_per_epoch // cfg.optim.accum_freq
        if state.batches_per_epoch == 0:
            raise ConfigError(
                "optim.accum_freq",
                f"one epoch has {state.train_loader.batches_per_epoch} micro-batches, fewer than accum_freq={cfg.optim.accum_freq}.",
            )
        convert = (state.batches_per_epoch, state.samples_per_batch)
        state.max_batches = Time.parse(cfg.run.duration, "run.duration").to_batches(*convert)
        if self.evaluates:
            self.eval_every = Time.parse(cfg.eval.interval, "eval.interval").to_batches(*convert, state.max_batches)
        self.warmup_batches = Time.parse(cfg.optim.warmup, "optim.warmup").to_batches(*convert, state.max_batches)
        self.cooldown_batches = 0
        if cfg.optim.cooldown is not None:
            self.cooldown_batches = Time.parse(cfg.optim.cooldown, "optim.cooldown").to_batches(
                *convert, state.max_batches
            )
            if self.cooldown_batches > state.max_batches - self.warmup_batches:
                raise ConfigError(
                    "optim.cooldown",
                    f"{self.cooldown_batches} steps do not fit after {self.warmup_batches} warmup steps "
                    f"in a run of {state.max_batches} steps.",
                )
        if self.warmup_batches >= state.max_batches:
            log.warning(
                "optim.warmup (%d steps) is not shorter than run.duration (%d steps): the learning rate never "
                "reaches optim.lr. Set e.g. optim.warmup=0.1dur.",
                self.warmup_batches,
                state.max_batches,
            )

    def _param_groups(self, model: nn.Module) -> list:
        """The optimizer's parameter groups (``optim.param_groups``, ``optim.layer_decay``), logged."""
        optim = self.cfg.optim
        scales = layer_decay_scales(model, optim.layer_decay) if optim.layer_decay else None
        groups = resolve_param_groups(optim, model, scales)
        log.info("optimizer %s, %d parameter groups:", optim.name, len(groups))
        for line in describe_param_groups(groups, optim.lr):
            log.info("  %s", line)
        return groups

    def _wrap_model(self, model: nn.Module, info: dist.DistInfo, device: torch.device) -> nn.Module:
        """DDP, or FSDP2 sharding in place (``dist.fsdp``); one process needs neither."""
        if info.world_size == 1:
            if self.cfg.dist.fsdp:
                log.info("dist.fsdp: one process, nothing to shard; the model runs unwrapped")
            return model
        if self.cfg.dist.fsdp:
            blocks = shard_model(model, self.cfg.run.precision)
            log.info("FSDP: %d blocks and the root sharded over %d processes", len(blocks), info.world_size)
            return model
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=device_ids,
            find_unused_parameters=self.cfg.dist.find_unused_parameters,
            static_graph=self.cfg.dist.static_graph,
        )

    def _builtin_callbacks(self, state: State) -> list:
        cfg = self.cfg
        callbacks: list = []
        if state.train_loader is not None:
            self.log_every = Time.parse(cfg.run.log_interval, "run.log_interval").to_batches(
                state.batches_per_epoch, state.samples_per_batch, state.max_batches
            )
            callbacks.append(TrainMetrics(self.log_every, cfg.run.peak_tflops))
            callbacks.append(
                CheckpointSaver(
                    self.checkpoint_folder,
                    cfg.checkpoint.save_interval,
                    cfg.checkpoint.keep,
                    cfg.checkpoint.save_latest,
                    self.run_name,
                    to_yaml(cfg),
                    remote=self.checkpoint_remote,
                    upload_timeout=cfg.checkpoint.upload_timeout,
                    sharded=cfg.dist.fsdp and cfg.dist.fsdp_state_dict == "sharded",
                    lineage=self.lineage,
                    openclip_names=cfg.checkpoint.openclip_names,
                )
            )
        if state.eval_loader is not None:
            callbacks.append(RetrievalEvaluator())
        zero_shot = build_zero_shot(
            cfg.eval.zero_shot,
            self.templates,
            state.model,
            cfg.model.name,
            cfg.data.batch_size,
            cfg.data.workers,
            self.trim_text,
        )
        if zero_shot is not None:
            callbacks.append(zero_shot)
        suite = build_suite(
            self.tasks, state.model, cfg.model.name, cfg.data.batch_size, cfg.data.workers, self.run_dir, self.trim_text
        )
        if suite is not None:
            callbacks.append(suite)
        return callbacks

    def _build_callback(self, name: str, args: DictConfig):
        accepted = inspect.signature(CALLBACKS.get(name, f"callbacks.{name}")).parameters
        given = {"run_dir": self.run_dir, "log_every": self.log_every}
        runtime = {key: value for key, value in given.items() if key in accepted}
        return CALLBACKS.build(name, OmegaConf.to_container(args), f"callbacks.{name}", **runtime)

    def _log_setup(self, state: State) -> None:
        params = sum(p.numel() for p in state.model.parameters())
        trainable = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
        log.info("run folder: %s", self.run_dir)
        log.info(
            "model %s: %.2fM parameters (%.2fM trainable) on %s",
            self.cfg.model.name,
            params / 1e6,
            trainable / 1e6,
            state.device,
        )
        log.info("algorithms: %s", ", ".join(map(repr, state.algorithms)) or "none")
        log.info("text tower: %s", "captions cut after the batch's longest" if self.trim_text else "full context")
        if state.train_loader is not None:
            log.info(
                "training %d steps (%d per epoch) of %d samples (%d processes x %d x accum %d); warmup %d steps",
                state.max_batches,
                state.batches_per_epoch,
                state.samples_per_batch,
                state.dist.world_size,
                self.cfg.data.batch_size,
                state.accum_freq,
                self.warmup_batches,
            )
        self.logger.log_hyperparameters(OmegaConf.to_container(self.cfg))

    def _probe_storage(self) -> None:
        """A checkpoint bucket that is missing or refuses the credentials stops the run before the model is built,
        not at the first upload (hours in) or the last."""
        if self.checkpoint_remote is None:
            return
        try:
            get_object_store(self.checkpoint_remote).probe()
        except ObjectStoreError as error:
            raise ConfigError(
                "checkpoint.save_folder",
                f"cannot write to {self.checkpoint_remote} ({error}). Check the bucket name, the credentials and "
                "S3_ENDPOINT_URL, or save to a local folder.",
            ) from None

    @property
    def checkpoint_remote(self) -> str | None:
        """The object store checkpoints are uploaded to (``checkpoint.save_folder: s3://...``)."""
        folder = self.cfg.checkpoint.save_folder
        return folder if is_remote(folder) else None

    @property
    def checkpoint_folder(self) -> Path:
        """Where checkpoints are written locally (the staging folder when uploading)."""
        folder = self.cfg.checkpoint.save_folder
        return Path(folder) if folder and not is_remote(folder) else self.run_dir / "checkpoints"

    def _resume(self) -> None:
        resume = self.cfg.checkpoint.resume
        if resume is None:
            return
        path = resolve_resume(resume, self.checkpoint_folder, self.checkpoint_remote)
        if path is None:
            where = " or ".join(filter(None, [str(self.checkpoint_folder), self.checkpoint_remote]))
            log.info("checkpoint.resume=latest: no checkpoint in %s, starting from scratch", where)
            return
        self.load(path)

    def load(self, path: str | Path) -> None:
        """Restore every piece of training state from a checkpoint file."""
        self.engine.run_event(Event.BEFORE_LOAD)
        checkpoint = load_checkpoint(path)
        if is_openclip_checkpoint(checkpoint):  # open_clip_train's epoch_K.pt: weights, optimizer and epoch
            resume_openclip(self.state, checkpoint, path)
            self.engine.run_event(Event.AFTER_LOAD)
            return
        if not isinstance(checkpoint, dict) or "timestamp" not in checkpoint:
            raise ConfigError(
                "checkpoint.resume",
                f"'{path}' is not a training checkpoint (Cadenza's, or open_clip_train's epoch_K.pt): to start from its "
                "weights, pass it as model.pretrained (--pretrained).",
            )
        self._check_fits(checkpoint, path)
        self.lineage = checkpoint.get("lineage")  # checkpoints from before lineages have none; carried on as such
        for callback in self.state.callbacks:
            if isinstance(callback, CheckpointSaver):
                callback.lineage = self.lineage
        self.state.load_state_dict(checkpoint)
        if checkpoint.get("sharded") is not None:  # dist.fsdp_state_dict=sharded: weights and optimizer apart
            load_sharded(self.state.model, self.state.optimizer, Path(path).parent / checkpoint["sharded"])
        self.engine.run_event(Event.AFTER_LOAD)
        ts = self.state.timestamp
        log.info("resumed from %s at epoch %d, step %d (%d samples)", path, ts.epoch, ts.batch, ts.sample)
        self._say_what_changed(checkpoint, path)

    def _say_what_changed(self, checkpoint: dict, path: str | Path) -> None:
        """A resume with another batch size or number of processes works, and changes what a step is: say how."""
        ts, state = self.state.timestamp, self.state
        rng = checkpoint.get("rng")
        saved_processes = len(rng) if isinstance(rng, list) else None  # one RNG state per rank
        if saved_processes not in (None, state.dist.world_size) and gradient_shrinks_with_processes(state.loss_fn):
            log.warning(
                "saved on %d processes, resumed on %d: without loss.gather_with_grad each process's gradient is "
                "1 / processes of the global one (OpenCLIP's rule), so the optimizer's moments carried over are %gx "
                "the scale of this run's gradients and its first steps differ from an uninterrupted run's. Set "
                "loss.gather_with_grad=true (and loss.local_loss=true) for gradients that do not depend on the number "
                "of processes.",
                saved_processes,
                state.dist.world_size,
                state.dist.world_size / saved_processes,
            )
        if ts.batch == 0 or ts.sample % ts.batch:
            return
        before, now = ts.sample // ts.batch, state.samples_per_batch
        if before == now:
            return
        try:
            saved = stored_config(checkpoint, path)
            batch, accum = saved["data"]["batch_size"], saved["optim"]["accum_freq"]
            setup = f" (data.batch_size={batch}, optim.accum_freq={accum}, {before // (batch * accum)} processes)"
        except (CheckpointError, KeyError, TypeError, ZeroDivisionError):
            setup = ""
        log.warning(
            "resumed with %d samples per step, saved with %d%s: from here a step is %d samples (data.batch_size=%d x "
            "%d processes x optim.accum_freq=%d). The learning-rate schedule counts steps and continues at step %d "
            "of %d; durations in samples (sp) and epochs are converted with the new step size.",
            now,
            before,
            setup,
            now,
            self.cfg.data.batch_size,
            state.dist.world_size,
            self.cfg.optim.accum_freq,
            ts.batch,
            state.max_batches,
        )

    def _check_fits(self, checkpoint: dict, path: str | Path) -> None:
        """A checkpoint of another architecture is a config error naming both, not a page of missing keys."""
        weights, own = checkpoint.get("state_dict"), self.state.model.state_dict()
        if weights is None:
            return
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        reshaped = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
        if not (missing or unexpected or reshaped):
            return
        try:
            saved = stored_config(checkpoint, path)
        except CheckpointError:
            saved = {}
        saved_as = (
            f"model.name={saved['model'].get('name')}" if isinstance(saved.get("model"), dict) else "another model"
        )
        if is_lora_state_dict(weights) and not is_lora_state_dict(own):
            lora = (saved.get("algorithms") or {}).get("lora")
            flow = "{" + ", ".join(f"{key}: {value}" for key, value in lora.items()) + "}" if lora else ""
            setting = f"algorithms.lora='{flow}'" if flow else "algorithms.lora"
            raise ConfigError(
                "checkpoint.resume",
                f"'{path}' holds LoRA adapters and this run has none: add the run's {setting}, or fold them into "
                "plain weights with composer export (the result loads as model.pretrained).",
            )
        if is_lora_state_dict(own) and not is_lora_state_dict(weights):
            raise ConfigError(
                "checkpoint.resume",
                f"'{path}' has no LoRA adapters and this run adds them (algorithms.lora): to fine-tune its weights with "
                "LoRA, pass it as model.pretrained instead.",
            )
        raise ConfigError(
            "checkpoint.resume",
            f"'{path}' was saved by {saved_as} and does not fit this run's model.name={self.cfg.model.name} "
            f"({len(missing)} missing, {len(unexpected)} unexpected and {len(reshaped)} reshaped tensors, e.g. "
            f"{(missing + unexpected + reshaped)[:3]}). Resume it with the model and model.overrides it was saved "
            "with, or start this run without checkpoint.resume.",
        )

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> State:
        """Train until ``run.duration`` (or, with no training data, evaluate once)."""
        state = self.state
        try:
            if state.train_loader is None:
                self.evaluate()
                return state
            self.engine.run_event(Event.FIT_START)
            while not state.is_done:
                self._train_epoch()
            if self.evaluates and not self._evaluated_at_last_step:
                self.evaluate()
            self.engine.run_event(Event.FIT_END)
        except NonFiniteError as error:  # found at a logging window or before a save: say where training stands
            raise TrainingError(self._non_finite_message(error)) from None
        finally:
            try:
                self.engine.close()
            finally:
                self.release()
        return state

    _evaluated_at_last_step = False
    log_every = 1  # steps per logging window (set from run.log_interval when training)

    def _train_epoch(self) -> None:
        state, ts = self.state, self.state.timestamp
        self.engine.run_event(Event.EPOCH_START)
        micro_batches = iter(state.train_loader)
        while ts.batch_in_epoch < state.batches_per_epoch and not state.is_done:
            self.engine.run_event(Event.BEFORE_DATALOADER)
            loaded = [self._to_device(next(micro_batches)) for _ in range(state.accum_freq)]
            state.batch, state.batch_extras = [b[:2] for b in loaded], [b[2] for b in loaded]
            self.engine.run_event(Event.AFTER_DATALOADER)
            self._train_batch()
            self._evaluated_at_last_step = False
            if self._eval_due():
                self.evaluate()
        if ts.batch_in_epoch == state.batches_per_epoch:
            ts.after_epoch()
            state.train_loader.set_epoch(ts.epoch)
            self.engine.run_event(Event.EPOCH_END)
            self.engine.run_event(Event.EPOCH_CHECKPOINT)

    def _to_device(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(images, tokens, extras)`` on the device; ``extras`` is empty when the loader yields none."""
        images, tokens, *extras = batch
        if self.trim_text:  # on the CPU, before the copy: no device sync
            tokens = self.state.model.trim_text_padding(tokens)
        dtype, device = weights_dtype(self.state.precision), self.state.device
        extras = {k: v.to(device, non_blocking=True) for k, v in (extras[0] if extras else {}).items()}
        return images.to(device, dtype=dtype, non_blocking=True), tokens.to(device, non_blocking=True), extras

    def _train_batch(self) -> None:
        state = self.state
        state.wrapped_model.train()
        state.step_metrics = {}
        self.engine.run_event(Event.BATCH_START)
        cache = self._cache_features(state.batch) if state.accum_freq > 1 else None
        for index, micro_batch in enumerate(state.batch):
            state.extras = state.batch_extras[index]
            self._forward_backward(micro_batch, cache, index)
        self._optimizer_step()
        state.timestamp.after_batch(state.samples_per_batch)
        if state.timestamp.batch % self.log_every == 0 or state.is_done:
            state.guard.check()  # the one sync of a logging window (the metrics synchronize here too)
        self.engine.run_event(Event.BATCH_END)
        self.engine.run_event(Event.BATCH_CHECKPOINT)

    def _forward(self, micro_batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = self.state
        state.micro_batch = micro_batch
        self.engine.run_event(Event.BEFORE_FORWARD)
        with autocast_context(state.precision, state.device):
            state.outputs = state.wrapped_model(*state.micro_batch)
        self.engine.run_event(Event.AFTER_FORWARD)
        return state.outputs

    @torch.no_grad()
    def _cache_features(self, batch: list) -> list[dict[str, torch.Tensor]]:
        """OpenCLIP's accumulation: features of every micro-batch, without gradients."""
        cached = []
        for micro_batch, extras in zip(batch, self.state.batch_extras, strict=True):
            self.state.extras = extras
            cached.append({k: v for k, v in self._forward(micro_batch).items() if k not in SHARED_OUTPUTS})
        return cached

    def _forward_backward(self, micro_batch, cache: list[dict[str, torch.Tensor]] | None, index: int) -> None:
        state = self.state
        outputs = self._forward(micro_batch)
        if cache is not None:
            # This micro-batch's fresh features (with gradients) among the others' cached ones:
            # the loss sees the whole accumulated batch, the gradient flows through this part only.
            outputs = dict(outputs)
            for key in cache[0]:
                outputs[key] = torch.cat([outputs[key] if i == index else c[key] for i, c in enumerate(cache)])
            if index < len(cache) - 1:
                # Shared scalars get the full batch's gradient from every micro-batch's loss; count it once
                # (OpenCLIP counts it accum_freq times, which scales the temperature's gradient).
                outputs.update({k: outputs[k].detach() for k in SHARED_OUTPUTS if k in outputs})
            state.outputs = outputs
        self.engine.run_event(Event.BEFORE_LOSS)
        with autocast_context(state.precision, state.device):
            state.loss_dict = state.loss_fn(**state.outputs)
        state.loss = sum(state.loss_dict.values())
        self.engine.run_event(Event.AFTER_LOSS)
        state.guard.watch_loss(state.loss, state.timestamp.batch + 1)  # on the device: no sync
        self.engine.run_event(Event.BEFORE_BACKWARD)
        loss = state.scaler.scale(state.loss) if state.scaler is not None else state.loss
        loss.backward()
        self.engine.run_event(Event.AFTER_BACKWARD)

    def _non_finite_message(self, error: NonFiniteError) -> str:
        ts = self.state.timestamp
        latest = find_latest(self.checkpoint_folder)
        where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
        skipped = "" if error.what == "weights" else ": that step's update and every later one were skipped"
        return (
            f"{error} and training stopped after step {ts.batch} (epoch {ts.epoch}), at the first check{skipped}; "
            f"nothing was saved after it, and {where}. Lower optim.lr, set optim.grad_clip_norm, or use "
            "run.precision=amp_bf16."
        )

    def _optimizer_step(self) -> None:
        state = self.state
        if state.scaler is not None:
            state.scaler.unscale_(state.optimizer)  # algorithms see true gradients (clipping)
        self.engine.run_event(Event.BEFORE_OPTIMIZER_STEP)
        # skipped on the device once a loss (or, with fp16 / bf16 weights, a gradient) was not finite
        state.guard.step(state.optimizer, state.timestamp.batch + 1, state.loss, state.scaler)
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        state.model.clamp_logit_scale()
        self.engine.run_event(Event.AFTER_OPTIMIZER_STEP)

    # -- evaluation ---------------------------------------------------------------------------------
    def _eval_due(self) -> bool:
        return self.eval_every > 0 and self.state.timestamp.batch % self.eval_every == 0

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Run the model over ``data.val`` once (if set), firing the eval events; evaluators compute metrics."""
        state = self.state
        if state.guard is not None:  # training stops at a non-finite loss, before evaluating what follows it
            state.guard.check(weights=state.model.parameters())
        state.wrapped_model.eval()
        state.eval_metrics = {}
        with gathered_for_evaluation(state.model):  # FSDP: ranks may run different numbers of batches
            self.engine.run_event(Event.EVAL_START)
            if state.eval_loader is not None:
                state.eval_loader.set_epoch(0)
            for batch in state.eval_loader if state.eval_loader is not None else ():
                images, tokens, state.extras = self._to_device(batch)
                state.micro_batch = (images, tokens)
                self.engine.run_event(Event.EVAL_BATCH_START)
                with autocast_context(state.precision, state.device):
                    state.outputs = state.model(*state.micro_batch)
                self.engine.run_event(Event.EVAL_BATCH_END)
            self.engine.run_event(Event.EVAL_END)
        state.wrapped_model.train()
        self._evaluated_at_last_step = True
        return dict(state.eval_metrics)


def trims_text_padding(cfg: DictConfig, model: nn.Module) -> bool:
    """``model.trim_text_padding``: unset, on where it leaves the model's function unchanged; true where it cannot
    is a config error (not a setting silently ignored)."""
    setting = cfg.model.get("trim_text_padding")
    able = bool(getattr(model, "trims_text_padding", False))
    if setting and not able:
        raise ConfigError(
            "model.trim_text_padding",
            f"model.name={cfg.model.name} reads every token position (CoCa pools a class token placed after the whole "
            "context), so cutting captions would change its output; remove the setting or set it to false.",
        )
    return able if setting is None else bool(setting)


def train(cfg: DictConfig) -> State:
    """Build a trainer from ``cfg`` and fit it."""
    started = time.perf_counter()
    state = Trainer(cfg).fit()
    log.info("done in %.1fs", time.perf_counter() - started)
    return state


__all__ = ["Trainer", "train"]
