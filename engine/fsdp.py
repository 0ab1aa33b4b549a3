"""FSDP2: shard the model over the processes with ``torch.distributed.fsdp.fully_shard`` (``dist.fsdp: true``).

Each transformer block of every tower is its own FSDP unit (its parameters are gathered just before it
runs and freed after), then the root module takes what is left (embeddings, projections, the
temperature). Parameters become ``DTensor`` shards; the module keeps its class, its names and its
methods, so checkpoints keep OpenCLIP's keys.

Checkpoints hold full (unsharded) tensors by default, gathered to rank 0 on the CPU: the same file a
run without FSDP writes, loadable on any number of processes with or without FSDP. The optimizer
state is converted to ``torch.optim.Optimizer.state_dict``'s own layout (states keyed by position)
for the same reason. ``dist.fsdp_state_dict: sharded`` writes model and optimizer with
``torch.distributed.checkpoint`` instead: every rank writes its own shards, nothing is gathered.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: containers whose children are FSDP units: transformer blocks (timm ``blocks``, the text tower's
#: ``resblocks``, a multimodal decoder's ``cross_attn``), CNN stages (timm ``stages``, whose ``blocks`` win
#: where they exist, as in ConvNeXt) and torchvision-style ResNet residual blocks (``layer1``...)
BLOCK_CONTAINERS = re.compile(r"^(blocks|resblocks|cross_attn|stages|layer\d+)$")

#: ``run.precision`` → the dtype FSDP gathers parameters in (gradients are reduced in fp32)
GATHER_DTYPES = {"amp_bf16": torch.bfloat16, "amp": torch.float16}


def fsdp_blocks(model: nn.Module) -> list[str]:
    """Names of the modules that become FSDP units, innermost first-level blocks of every tower.

    A block is a child of an ``nn.ModuleList`` / ``nn.Sequential`` named as in ``BLOCK_CONTAINERS``;
    a block that contains other blocks (a ConvNeXt stage) is left to its inner ones.
    """
    modules = dict(model.named_modules())
    found = []
    for name in modules:
        parent = name.rpartition(".")[0]
        container = parent.rpartition(".")[2]
        if parent and BLOCK_CONTAINERS.match(container) and isinstance(modules[parent], (nn.ModuleList, nn.Sequential)):
            found.append(name)
    return [name for name in found if not any(other.startswith(name + ".") for other in found)]


def mixed_precision_policy(precision: str):
    """FSDP's ``MixedPrecisionPolicy`` for ``run.precision``: autocast precisions gather parameters in their
    low-precision dtype and reduce gradients in fp32; fp32 and cast weights (bf16, fp16) keep their dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = GATHER_DTYPES.get(precision)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)


def shard_model(model: nn.Module, precision: str = "fp32", reshard_after_forward: bool = True) -> list[str]:
    """Apply ``fully_shard`` to every block of ``model`` then to ``model`` itself, in place, over all processes.

    Must run after everything that changes the model's modules (grad checkpointing, patch dropout,
    tower locking) and before the optimizer is built. ``encode_image`` / ``encode_text`` gather the
    root's parameters like ``forward`` does (zero-shot evaluation calls them directly).

    ``fully_shard`` cannot shard 0-dim parameters (the temperature ``logit_scale``, SigLIP's
    ``logit_bias``): they stay plain tensors, replicated, and their gradient is averaged over the
    processes as it is computed, as DDP would.

    Returns:
        the names of the blocks that became FSDP units.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = mixed_precision_policy(precision)
    blocks = fsdp_blocks(model)
    modules = dict(model.named_modules())
    scalars = {param for param in model.parameters() if param.ndim == 0}
    for name in blocks:
        fully_shard(
            modules[name],
            mesh=mesh,
            mp_policy=policy,
            reshard_after_forward=reshard_after_forward,
            ignored_params=scalars,
        )
    # The root's parameters are needed again at once by the backward pass: keep them gathered.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, ignored_params=scalars)
    for param in scalars:
        if param.requires_grad:
            param.register_hook(_average_over_processes)
    for method in ("encode_image", "encode_text"):
        if hasattr(model, method):
            _register_forward_method(model, method)
    return blocks


def _register_forward_method(model: nn.Module, name: str) -> None:
    """``register_fsdp_forward_method``, except when called from inside ``forward`` (``CLIP.forward`` calls
    ``encode_image``): there FSDP's hooks already ran, and running them again would end the root's forward
    early and free its gathered weights after every forward, so that evaluation could not keep them."""
    from torch.distributed.fsdp import register_fsdp_forward_method
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    plain = getattr(model, name)
    register_fsdp_forward_method(model, name)
    hooked = getattr(model, name)

    def method(*args: Any, **kwargs: Any) -> Any:
        inside_forward = model._get_fsdp_state()._training_state == TrainingState.FORWARD
        return (plain if inside_forward else hooked)(*args, **kwargs)

    setattr(model, name, method)


@contextmanager
def gathered_for_evaluation(model: nn.Module) -> Iterator[None]:
    """While evaluating a sharded model, each FSDP unit keeps its weights gathered after its first forward.

    A forward pass of a sharded model is a collective: every rank must run it. Validation shards and
    zero-shot images are not always split evenly, so ranks run different numbers of forward passes;
    once every rank ran one (in step), the others need no communication. Costs the full weights in
    memory during evaluation (no gradients or optimizer state). No-op for a model that is not sharded.
    """
    if not is_sharded(model):
        yield
        return
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)  # the blocks, as shard_model made them
        model.set_reshard_after_forward(False, recurse=False)  # the root's parameters stay gathered
        for module in model.modules():
            if is_sharded(module):
                module.reshard()


def _average_over_processes(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    torch.distributed.all_reduce(grad)  # gloo has no AVG
    return grad / torch.distributed.get_world_size()


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by ``shard_model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(value: Any) -> Any:
    """A ``DTensor`` gathered into a plain CPU tensor (a collective: every rank must call it); others unchanged."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def full_tensors(tree: Any) -> Any:
    """``full_tensor`` applied through nested dicts and lists, in a deterministic order."""
    if isinstance(tree, dict):
        return {key: full_tensors(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(full_tensors(value) for value in tree)
    return full_tensor(tree)


def shard_like(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors laid out as ``model.state_dict()``'s: a shard where the model has a ``DTensor`` of that name.

    Every rank holds the full tensors (a loaded checkpoint), so each takes its own shard without communicating.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    current = model.state_dict()
    laid_out = {}
    for name, value in tensors.items():
        target = current.get(name)
        if isinstance(target, DTensor) and not isinstance(value, DTensor):
            value = distribute_tensor(
                value.to(target.device, target.dtype), target.device_mesh, target.placements, src_data_rank=None
            )
        laid_out[name] = value
    return laid_out


# -- checkpoints: full state dicts in the layout of a run without FSDP ---------------------------------------
def _options(full: bool = True, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, strict=strict)


def model_state_dict(model: nn.Module, full: bool = True) -> dict[str, torch.Tensor]:
    """``model.state_dict()``; for a sharded model, gathered (``full``: on rank 0, CPU; other ranks get ``{}``)
    or its local shards (``full=False``)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full))


def load_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load full tensors (every rank holds them) into ``model``, sharding them when it is sharded."""
    if not is_sharded(model):
        model.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=strict))


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, full: bool = True) -> dict[str, Any]:
    """``optimizer.state_dict()``; for a sharded model, the gathered state converted to that same layout
    (rank 0 only; other ranks get ``{}``), or (``full=False``) the local shards keyed by parameter name."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options(full))
    return _by_position(state, model, optimizer) if full and state else state


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load ``optimizer.state_dict()``'s layout (full tensors, on every rank) into the optimizer of ``model``."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, _by_name(state, model, optimizer), options=_options())


def _names_by_position(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order ``Optimizer.state_dict`` numbers them (group by group)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _by_position(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Name-keyed (``get_optimizer_state_dict``) → position-keyed (``Optimizer.state_dict``)."""
    position = {name: index for index, name in enumerate(_names_by_position(model, optimizer))}
    return {
        "state": {position[name]: value for name, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [position[name] for name in group["params"]]} for group in state["param_groups"]
        ],
    }


def _by_name(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Position-keyed (``Optimizer.state_dict``) → name-keyed (``set_optimizer_state_dict``)."""
    names = _names_by_position(model, optimizer)
    saved = sum(len(group["params"]) for group in state["param_groups"])
    if saved != len(names):
        raise ValueError(
            f"the checkpoint's optimizer has {saved} parameters, this model's has {len(names)} trainable ones"
        )
    return {
        "state": {names[index]: value for index, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }


# -- sharded checkpoints (``dist.fsdp_state_dict: sharded``) ----------------------------------------------
def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, folder: str | Path) -> None:
    """Every rank writes its own shards of the weights and the optimizer state to ``folder`` (a shared file
    system), with ``torch.distributed.checkpoint``; nothing is gathered. Every rank must call it."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(folder))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, folder: str | Path) -> None:
    """Load what ``save_sharded`` wrote, on any number of processes (the shards are re-cut to this run's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"], options=_options(full=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_options(full=False))


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model, options=_options(full=False))}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=_options(full=False))
    return state
