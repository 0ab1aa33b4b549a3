"""Process-group helpers. World size 1 works without an initialized process group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """Read rank, world size and local rank from ``torch.distributed.run`` or SLURM variables."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return DistInfo(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_process_group(info: DistInfo, backend: str, device: torch.device) -> None:
    """Join the process group when there is more than one process (no-op otherwise)."""
    if info.world_size == 1 or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over processes (returns it unchanged at world size 1)."""
    if get_world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / get_world_size()


def all_reduce_sum(value: int, device: torch.device) -> int:
    """Sum an integer over processes (returns it unchanged at world size 1)."""
    if get_world_size() == 1:
        return value
    total = torch.tensor(value, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def all_gather_object(value: object) -> list:
    """Every process's ``value``, in rank order (``[value]`` at world size 1)."""
    if get_world_size() == 1:
        return [value]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()
