"""Process-group helpers. World size 1 works without an initialized process group."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("cadenza")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu-[03-05,09],cpu1`` → ``gpu-03``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def setup_slurm_env(env: dict[str, str] | None = None) -> None:
    """Under ``srun`` (one task per GPU), fill the variables ``torch.distributed.run`` would set.

    Rank, world size and local rank come from ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``;
    the master address from ``MASTER_ADDR`` or else the first host of ``SLURM_JOB_NODELIST`` (as
    OpenCLIP's SLURM scripts do); the port from ``MASTER_PORT`` or 29500. No-op outside SLURM or
    when a launcher already set ``WORLD_SIZE``.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    env["LOCAL_WORLD_SIZE"] = tasks_per_node or str(max(int(env["SLURM_NTASKS"]) // max(nodes, 1), 1))
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        env["MASTER_ADDR"] = first_host(nodelist) if nodelist else "127.0.0.1"
    env.setdefault("MASTER_PORT", "29500")


def dist_info_from_env() -> DistInfo:
    """Read rank, world size and local rank from ``torch.distributed.run`` or SLURM variables."""
    setup_slurm_env()
    env = os.environ
    if "WORLD_SIZE" in env:
        return DistInfo(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    return DistInfo()


def launched_by_an_agent(env: dict[str, str] | None = None) -> bool:
    """Whether a launcher process watches this one: ``torch.distributed.run``'s agent or SLURM's step daemon."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env or "SLURM_PROCID" in env


def stop_with_launcher(poll_seconds: float = 1.0) -> threading.Thread:
    """End this process within ``poll_seconds`` of its launcher's death, logging why.

    ``torch.distributed.run`` starts each rank in a session of its own, so when the launcher itself is SIGKILLed
    (the OOM killer, ``kill -9`` of ``composer -n 2``) nothing signals the ranks: they would train on as orphans,
    holding their GPUs. A daemon thread notices the parent process change (the orphan is handed to init or a
    subreaper) and exits; a checkpoint being written is left as the previous one (writes are atomic).
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            stopped.wait(poll_seconds)
        log.error("the launcher (process %d) is gone: this rank stops instead of training on as an orphan", parent)
        logging.shutdown()
        os._exit(1)

    stopped = threading.Event()  # never set: the thread lives as long as the process
    thread = threading.Thread(target=watch, name="cadenza-launcher-watchdog", daemon=True)
    thread.start()
    return thread


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
    # Left to the interpreter's teardown, a gloo group's threads are stopped while Python is half gone, which now and
    # then aborts the process at exit ("terminate called without an active exception", SIGABRT, after a finished
    # run): take the group down at interpreter exit, after whatever ran after fit, while Python is whole.
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    """Destroy the process group, and make sure its threads stop now.

    ``destroy_process_group`` unregisters the groups, but a gloo group's threads stop only when the group object
    goes away, and an FSDP model's device mesh holds it (``DeviceMesh._pg_registry``); the model lives until the
    interpreter's teardown (torch's caches of DTensor specs and redistribution plans refer to the mesh). Two
    processes of an FSDP run still had both ``pt_gloo_runloop`` threads and ``gloo_tcp_loop`` after
    ``destroy_process_group``, and none once the meshes let the group go.
    """
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    if "torch.distributed.device_mesh" in sys.modules:  # only an FSDP run (or other DTensor user) made a mesh
        gc.collect()
        _release_mesh_groups()
        gc.collect()  # the group goes, and with it its threads (joined here, by this thread)


def _release_mesh_groups() -> None:
    """Every live ``DeviceMesh`` lets go of its process groups (a mesh used after this finds none)."""
    from torch.distributed.device_mesh import DeviceMesh

    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()


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
