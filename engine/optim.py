"""The optimizer and its parameter groups, and OpenCLIP's learning-rate schedules as ``LambdaLR`` factors.

Parameter groups start from OpenCLIP's weight-decay rule (two groups: exempt and decayed). ``optim.param_groups``
adds ordered rules that match parameter names by glob (``match``) or regular expression (``regex``) and set
``lr_scale``, ``weight_decay`` or ``frozen``; a per-parameter learning-rate scale (layer-wise decay, computed above
the kernel from the model's layer order) multiplies in. ``optim.name`` picks the optimizer: ``adamw`` is torch's
AdamW (fused on CPU and CUDA), ``muon`` is Cadenza's Muon (``cadenza.engine.muon``: timm's Newton-Schulz batched
by shape, fused AdamW for the rest), any other name is one of timm's (``timm.optim.list_optimizers()``: lamb,
lion, adafactor, nadamw, sgd, ...), built by ``timm.optim.create_optimizer_v2`` on the same groups.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cadenza.engine.errors import ConfigError, suggest

log = logging.getLogger("cadenza")

#: arguments of every optimizer that have their own ``optim`` key (or come from the groups)
OWN_KEYS = {
    "params": None,
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "betas": "optim.betas",
    "eps": "optim.eps",
}
#: the settings a rule of ``optim.param_groups`` may make, besides its pattern (``match`` or ``regex``)
RULE_SETTINGS = ("lr_scale", "weight_decay", "frozen")


def excluded_from_weight_decay(name: str, param: torch.Tensor) -> bool:
    """OpenCLIP 3.3.0's rule: no decay for gains, biases and the temperature.

    A parameter is exempt when it has fewer than 2 dims or its name contains ``bn``, ``ln``, ``bias`` or
    ``logit_scale``. Token and positional embeddings are decayed (as in 3.3.0). A ViT's class token is exempt: OpenCLIP
    holds it as a 1-dim ``class_embedding``, timm as a ``(1, 1, D)`` ``cls_token``.
    """
    return (
        param.ndim < 2
        or "bn" in name
        or "ln" in name
        or "bias" in name
        or "logit_scale" in name
        or name.endswith("cls_token")
    )


def renumbered_state(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``saved`` (an ``optimizer.state_dict()``) numbered as ``optimizer`` numbers ``model``'s parameters.

    Checkpoints written before the class token left the decayed group (timm's ``cls_token``, OpenCLIP's 1-dim
    ``class_embedding``) number the parameters by the earlier rule: their state is renumbered, so they resume; from
    there the class token is not decayed. A state numbered as ``optimizer`` already is returned as it is.
    """
    sizes = [len(group["params"]) for group in saved.get("param_groups", [])]
    if sizes == [len(group["params"]) for group in optimizer.param_groups]:
        return saved
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    before = [p for n, p in named if _exempt_before(n, p)], [p for n, p in named if not _exempt_before(n, p)]
    if sizes != [len(group) for group in before]:
        return saved  # not the earlier rule either: the optimizer's own check says what is wrong
    position = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    new = {old: position[id(p)] for old, p in enumerate(before[0] + before[1])}
    groups = [
        {**group, "params": [position[id(p)] for p in current["params"]]}
        for group, current in zip(saved["param_groups"], optimizer.param_groups, strict=True)
    ]
    return {"state": {new[k]: v for k, v in saved["state"].items()}, "param_groups": groups}


def _exempt_before(name: str, param: torch.Tensor) -> bool:
    """The weight-decay exemption before the class token was exempt (checkpoints written then)."""
    return excluded_from_weight_decay(name, param) and not name.endswith("cls_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed and exempt. Frozen parameters are left out, as OpenCLIP does."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = [p for n, p in named if excluded_from_weight_decay(n, p)]
    decayed = [p for n, p in named if not excluded_from_weight_decay(n, p)]
    return [{"params": exempt, "weight_decay": 0.0}, {"params": decayed, "weight_decay": weight_decay}]


# -- rules and groups ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamRule:
    """One entry of ``optim.param_groups``: a name pattern and what it sets.

    ``match`` is a glob over the whole parameter name (``visual.trunk.blocks.*``), ``regex`` a regular expression
    searched in it (``^text\\.transformer\\.resblocks\\.[01]\\.``). Unset settings leave the parameter's own.
    """

    index: int
    pattern: str
    regex: bool = False
    lr_scale: float | None = None
    weight_decay: float | None = None
    frozen: bool = False

    @property
    def key(self) -> str:
        return f"optim.param_groups.{self.index}"

    @property
    def label(self) -> str:
        return f"rule {self.index} ({'regex' if self.regex else 'match'} {self.pattern!r})"

    def matches(self, name: str) -> bool:
        if self.regex:
            return re.search(self.pattern, name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


def parse_rules(rules: Sequence[Any] | None) -> list[ParamRule]:
    """``optim.param_groups`` as rules, each checked (a ``ConfigError`` names the rule and its key)."""
    parsed = []
    for index, rule in enumerate(rules or ()):
        key = f"optim.param_groups.{index}"
        rule = OmegaConf.to_container(rule) if isinstance(rule, DictConfig) else rule
        if not isinstance(rule, Mapping):
            raise ConfigError(key, f"expected a mapping such as {{match: 'visual.*', lr_scale: 0.1}}, got {rule!r}.")
        for name in rule:
            if name not in ("match", "regex", *RULE_SETTINGS):
                raise ConfigError(
                    f"{key}.{name}", f"unknown key.{suggest(str(name), ('match', 'regex', *RULE_SETTINGS))}"
                )
        if ("match" in rule) == ("regex" in rule):
            raise ConfigError(key, "give exactly one of 'match' (a glob over the name) or 'regex' (searched in it).")
        pattern = rule.get("match", rule.get("regex"))
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(key, f"the pattern must be a non-empty string, got {pattern!r}.")
        if "regex" in rule:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigError(f"{key}.regex", f"{pattern!r} is not a regular expression: {error}.") from None
        settings = {k: rule[k] for k in RULE_SETTINGS if k in rule and rule[k] is not None}
        if not settings:
            raise ConfigError(key, "sets nothing: give lr_scale, weight_decay or frozen.")
        for name in ("lr_scale", "weight_decay"):
            value = settings.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ConfigError(f"{key}.{name}", f"expected a number, got {value!r}.")
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"{key}.{name}", f"must be a finite number, 0 or more, got {value}.")
        if settings.get("lr_scale") == 0:
            raise ConfigError(f"{key}.lr_scale", "0 trains nothing: write frozen: true to freeze these parameters.")
        frozen = settings.get("frozen", False)
        if not isinstance(frozen, bool):
            raise ConfigError(f"{key}.frozen", f"expected true or false, got {frozen!r}.")
        if frozen and len(settings) > 1:
            raise ConfigError(key, "a frozen parameter is not optimized: lr_scale and weight_decay have no meaning.")
        parsed.append(
            ParamRule(
                index,
                pattern,
                regex="regex" in rule,
                lr_scale=None if settings.get("lr_scale") is None else float(settings["lr_scale"]),
                weight_decay=None if settings.get("weight_decay") is None else float(settings["weight_decay"]),
                frozen=frozen,
            )
        )
    return parsed


@dataclass
class ParamGroup:
    """Parameters (by name) that share a learning-rate scale and a weight decay."""

    label: str
    lr_scale: float
    weight_decay: float
    names: list[str] = field(default_factory=list)
    numel: int = 0


def resolve_param_groups(
    cfg: DictConfig, model: nn.Module, layer_scales: Mapping[str, tuple[str, float]] | None = None
) -> list[ParamGroup]:
    """The optimizer's groups for ``model`` from ``optim`` (``weight_decay``, ``param_groups``), and layer scales.

    Freezes the parameters of ``frozen`` rules (so run it before DDP wraps the model). Each parameter takes the
    first rule that matches its name; its weight decay is the rule's, else OpenCLIP's rule (0 for exempt ones); its
    learning rate ``optim.lr`` x its layer scale x the rule's ``lr_scale``. Parameters frozen before (tower locking,
    LoRA) stay out. Without rules or layer scales the groups are OpenCLIP's two, exempt first.

    Args:
        cfg: the ``optim`` section.
        model: the unwrapped model.
        layer_scales: parameter name -> (a label such as ``image layer 3/13``, its learning-rate factor).

    Raises:
        ConfigError: a rule matches no parameter, or only parameters an earlier rule took.
    """
    rules = parse_rules(cfg.get("param_groups"))
    layer_scales = layer_scales or {}
    if not rules and not layer_scales:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [ParamGroup("no weight decay", 1.0, 0.0), ParamGroup("weight decay", 1.0, cfg.weight_decay)]
        for name, param in named:
            group = groups[0] if excluded_from_weight_decay(name, param) else groups[1]
            group.names.append(name)
            group.numel += param.numel()
        return groups

    groups: dict[tuple[str, float, float], ParamGroup] = {}
    matched: dict[int, int] = {rule.index: 0 for rule in rules}
    claimed: dict[int, int] = {rule.index: 0 for rule in rules}
    frozen: dict[int, int] = {}
    for name, param in model.named_parameters():
        hits = [rule for rule in rules if rule.matches(name)]
        for rule in hits:
            matched[rule.index] += 1
        rule = hits[0] if hits else None
        if rule is not None:
            claimed[rule.index] += 1
            if rule.frozen:
                param.requires_grad_(False)
                frozen[rule.index] = frozen.get(rule.index, 0) + param.numel()
                continue
        if not param.requires_grad:
            continue
        layer_label, scale = layer_scales.get(name, ("", 1.0))
        decay = 0.0 if excluded_from_weight_decay(name, param) else cfg.weight_decay
        if rule is not None and rule.lr_scale is not None:
            scale *= rule.lr_scale
        if rule is not None and rule.weight_decay is not None:
            decay = rule.weight_decay
        label = " + ".join(filter(None, [layer_label, rule.label if rule is not None else ""])) or "the rest"
        group = groups.setdefault((label, scale, decay), ParamGroup(label, scale, decay))
        group.names.append(name)
        group.numel += param.numel()
    names = [n for n, _ in model.named_parameters()]
    for rule in rules:
        if matched[rule.index] == 0:
            close = difflib.get_close_matches(rule.pattern, names, n=3, cutoff=0.0)
            raise ConfigError(
                rule.key,
                f"{rule.pattern!r} matches no parameter of the model ({'re.search' if rule.regex else 'a glob over'} "
                f"the full name). Names look like {close}; a glob needs '*' to match a prefix (e.g. 'visual.*').",
            )
        if claimed[rule.index] == 0:
            raise ConfigError(
                rule.key,
                f"every parameter {rule.pattern!r} matches is taken by an earlier rule (the first matching rule "
                "wins); move this rule up or narrow the earlier one.",
            )
    for index, numel in frozen.items():
        log.info("optim.param_groups.%d froze %s values (%s)", index, f"{numel:,}", rules[index].pattern)
    return list(groups.values())


def describe_param_groups(groups: Sequence[ParamGroup], lr: float) -> list[str]:
    """One line per group: its label, size, learning rate and weight decay (logged at the start of a run)."""

    def natural(group: ParamGroup) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", group.label)] + [
            group.weight_decay
        ]

    lines = []
    for group in sorted(groups, key=natural):
        lines.append(
            f"{group.label}: {len(group.names)} tensors ({group.numel:,} values), lr {lr * group.lr_scale:.3g}"
            f"{f' (x{group.lr_scale:.3g})' if group.lr_scale != 1 else ''}, weight decay {group.weight_decay:g}"
        )
    return lines


# -- optimizers ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerSpec:
    """What ``optim.name`` names: the class, and which of the shared keys (betas, eps) it takes."""

    name: str
    cls: type
    betas: int  # how many betas it takes (0: none)
    eps: bool
    own: tuple[str, ...]  # further arguments with their own optim key (adamw: fused)


def optimizer_names() -> list[str]:
    """Every value ``optim.name`` takes: ``adamw`` (torch's, fused) and timm's optimizers."""
    from timm.optim import list_optimizers

    return sorted({"adamw", *list_optimizers()})


def optimizer_spec(name: str, key: str = "optim.name") -> OptimizerSpec:
    """The class behind ``optim.name`` (a ``ConfigError`` for an unknown name or a missing library)."""
    if name == "adamw":
        return OptimizerSpec("adamw", torch.optim.AdamW, betas=2, eps=True, own=("fused",))
    if name == "muon":
        from cadenza.engine.muon import Muon

        try:  # the pieces it takes from timm
            from timm.optim.muon import (  # noqa: F401
                _COEFFICIENTS,
                _is_suitable_for_muon,
                get_lr_scale,
                resolve_ns_coefficients,
                zeropower_via_newtonschulz,
            )
        except ImportError as error:
            raise ConfigError(key, f"optim.name=muon needs a newer timm ({error}): pip install -U timm.") from None
        return OptimizerSpec("muon", Muon, betas=2, eps=True, own=())
    from timm.optim import get_optimizer_class, get_optimizer_info

    names = optimizer_names()
    if name not in names:
        raise ConfigError(key, f"unknown optimizer '{name}'.{suggest(name, names)} (timm.optim.list_optimizers())")
    info = get_optimizer_info(name)
    if info.second_order:
        raise ConfigError(
            key,
            f"'{name}' is a second-order optimizer: it needs backward(create_graph=True), which training does not do.",
        )
    try:
        cls = get_optimizer_class(info, bind_defaults=False)
    except (ImportError, AssertionError, RuntimeError) as error:
        raise ConfigError(key, f"optimizer '{name}' cannot be built here: {error or type(error).__name__}.") from None
    return OptimizerSpec(name, cls, betas=info.num_betas if info.has_betas else 0, eps=info.has_eps, own=())


def check_optimizer(cfg: DictConfig, defaults: Mapping[str, Any]) -> None:
    """``optim.name``, ``optim.args``, ``betas``, ``eps`` and ``fused`` fit the chosen optimizer; the rules parse.

    ``defaults`` holds the schema's ``betas`` and ``eps``: an optimizer without them takes no other value (a
    setting that would be ignored is an error). ``null`` leaves either to the optimizer's own default.
    """
    spec = optimizer_spec(cfg.name)
    betas = None if cfg.betas is None else list(cfg.betas)
    if spec.betas:
        if betas is not None and (len(betas) != spec.betas or not all(0 <= b < 1 for b in betas)):
            raise ConfigError("optim.betas", f"{spec.name} takes {spec.betas} numbers in [0, 1), got {betas}.")
    elif betas not in (None, list(defaults["betas"])):
        raise ConfigError("optim.betas", f"{spec.name} takes no betas; remove the setting.")
    if not spec.eps and cfg.eps not in (None, defaults["eps"]):
        raise ConfigError("optim.eps", f"{spec.name} takes no eps; remove the setting.")
    if "fused" not in spec.own and cfg.get("fused") is not None:
        raise ConfigError("optim.fused", f"only applies to optim.name=adamw (got {spec.name}); remove it.")
    accepted = [
        p
        for p, v in inspect.signature(spec.cls).parameters.items()
        if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD) and p not in spec.own
    ]
    for arg in OmegaConf.to_container(cfg.args) if cfg.get("args") else {}:
        if arg in OWN_KEYS or arg in spec.own:
            own = f"optim.{arg}" if arg in spec.own else OWN_KEYS[arg]
            raise ConfigError(f"optim.args.{arg}", f"has its own key: set {own}." if own else "is not an argument.")
        if arg not in accepted:
            choices = [a for a in accepted if a not in OWN_KEYS]
            raise ConfigError(
                f"optim.args.{arg}", f"optimizer '{spec.name}' has no argument '{arg}'.{suggest(arg, choices)}"
            )
    parse_rules(cfg.get("param_groups"))


def build_optimizer(
    cfg: DictConfig, model: nn.Module, groups: Sequence[ParamGroup] | None = None
) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` over ``groups`` (default: :func:`resolve_param_groups` of ``model``).

    ``adamw`` is torch's AdamW; ``fused`` (default: on CPU and CUDA) is its single-kernel update: the same update in
    one pass over each parameter instead of a dozen ``foreach`` passes. On a 2-core EPYC a step took 37-50 ms
    instead of 135-260 ms for ViT-S-32's 63M parameters, and 3.5 instead of 11 ms for tiny-vit (a sixth of the
    quickstart's step). Other names are timm's, built by ``timm.optim.create_optimizer_v2`` with ``optim.lr``,
    ``weight_decay``, ``betas`` and ``eps`` where the optimizer takes them, and ``optim.args``.
    """
    groups = resolve_param_groups(cfg, model) if groups is None else groups
    params = dict(model.named_parameters())
    torch_groups = [
        {
            "params": [params[name] for name in group.names],
            "weight_decay": group.weight_decay,
            "lr": cfg.lr * group.lr_scale,
            "lr_scale": group.lr_scale,
        }
        for group in groups
    ]
    args = OmegaConf.to_container(cfg.args) if cfg.get("args") else {}
    spec = optimizer_spec(cfg.get("name") or "adamw")
    shared: dict[str, Any] = {}  # null: the optimizer's own default
    if spec.betas and cfg.betas is not None:
        shared["betas"] = tuple(cfg.betas)
    if spec.eps and cfg.eps is not None:
        shared["eps"] = cfg.eps
    if spec.name == "adamw":
        trainable = [p for group in torch_groups for p in group["params"]]
        fused = cfg.get("fused")
        if fused is None:
            fused = bool(trainable) and all(
                p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable
            )
        return torch.optim.AdamW(
            torch_groups,
            lr=cfg.lr,
            **shared,
            fused=fused or None,
            foreach=None if fused else True,
            **args,
        )
    if spec.name == "muon":  # named: the embedding tables are stepped by AdamW (see cadenza.engine.muon)
        names = {id(p): n for n, p in params.items()}
        named_groups = [{**g, "params": [(names[id(p)], p) for p in g["params"]]} for g in torch_groups if g["params"]]
        return spec.cls(named_groups, lr=cfg.lr, **shared, **args)
    from timm.optim import create_optimizer_v2

    torch_groups = [group for group in torch_groups if group["params"]]  # some of timm's reject empty groups
    return create_optimizer_v2(torch_groups, opt=spec.name, lr=cfg.lr, weight_decay=cfg.weight_decay, **shared, **args)


def group_lr(group: Mapping[str, Any]) -> float:
    """The base learning rate a group's ``lr`` is scaled from (``train/lr``)."""
    return group["lr"] / group.get("lr_scale", 1.0)


# -- schedules ----------------------------------------------------------------------------------------
def lr_factor(
    scheduler: str, warmup: int, total: int, cooldown: int = 0, cooldown_power: float = 1.0, end_factor: float = 0.0
) -> Callable[[int], float]:
    """The factor on the base LR at step ``s`` (0-based), as OpenCLIP's ``scheduler.py`` computes it.

    Warmup: ``(s + 1) / warmup``. ``cosine``: ``0.5 (1 + cos(pi e / es))`` with ``e = s - warmup``,
    ``es = total - warmup``. ``const``: 1. ``const-cooldown``: 1 until ``total - cooldown``, then
    ``(1 - e / es) ** power`` from 1 down to ``end_factor`` (``cooldown_end_lr / lr``).
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        if scheduler == "const":
            return 1.0
        start = total - cooldown
        if step < start:
            return 1.0
        decay = max(1 - (step - start) / max(cooldown, 1), 0.0) ** cooldown_power
        return decay * (1 - end_factor) + end_factor

    return factor


def build_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, warmup: int, total: int, cooldown: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """``optim.scheduler`` over ``total`` steps, ``warmup`` and ``cooldown`` already in steps."""
    end_factor = cfg.cooldown_end_lr / cfg.lr if cfg.lr else 0.0
    factor = lr_factor(cfg.scheduler, warmup, total, cooldown, cfg.cooldown_power, end_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
