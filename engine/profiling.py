"""Looking inside a step: a ``torch.profiler`` callback, a memory monitor, and a counter of host syncs.

``callbacks.profiler`` traces a few training steps (``torch.profiler.schedule``'s ``wait``, ``warmup``, ``active``,
``repeat``) into ``<run folder>/profiler/rank<r>.step<N>.pt.trace.json``: Chrome / Perfetto trace JSON, which
``chrome://tracing``, https://ui.perfetto.dev and TensorBoard's profiler plugin (``torch-tb-profiler``) read. After
each traced cycle it logs torch's table of the top ops and appends a summary to ``profiler/summary.json``
(``trace_summary``: wall time per step, and on a GPU the fraction of it the GPU was busy, kernels and host syncs per
step, and the top kernels).

``callbacks.memory_monitor`` logs ``memory/allocated_gib``, ``memory/reserved_gib`` and ``memory/peak_gib`` (the
highest allocation within the window) on CUDA, and the process's ``memory/rss_gib`` and ``memory/peak_rss_gib``
everywhere, at every logging window.

``HostSyncCounter`` counts the operations that make the host wait for the device (tests and ``gpu_check`` use it).
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cadenza.engine.algorithm import Callback
from cadenza.engine.registry import CALLBACKS

if TYPE_CHECKING:
    from cadenza.engine.logger import Logger
    from cadenza.engine.state import State

log = logging.getLogger("cadenza")

GIB = 2**30
#: trace categories of device work (what the device is busy with)
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


@CALLBACKS.register("profiler")
class Profiler(Callback):
    """Trace training steps with ``torch.profiler``; see the module docstring.

    Args:
        run_dir: the run folder (given by the trainer); traces go to ``<run_dir>/profiler``.
        wait: steps skipped at the start of each cycle (the first steps compile and warm caches).
        warmup: steps traced and thrown away (the profiler's own start-up).
        active: steps traced and kept.
        repeat: cycles of wait + warmup + active; 0 repeats until training ends.
        record_shapes: record each op's input shapes.
        profile_memory: record allocations.
        with_stack: record Python stacks (large traces).
        top: rows of the logged table and of the summary's top ops.
    """

    def __init__(
        self,
        run_dir: Path,
        wait: int = 5,
        warmup: int = 2,
        active: int = 3,
        repeat: int = 1,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
        top: int = 15,
    ) -> None:
        if min(wait, warmup, repeat) < 0 or active < 1 or top < 1:
            raise ValueError("wait, warmup and repeat must be 0 or more, active and top at least 1")
        self.folder = Path(run_dir) / "profiler"
        self.wait, self.warmup, self.active, self.repeat = wait, warmup, active, repeat
        self.record_shapes, self.profile_memory, self.with_stack, self.top = (
            record_shapes,
            profile_memory,
            with_stack,
            top,
        )
        self._profiler: torch.profiler.profile | None = None
        self._rank = 0
        self.traces: list[Path] = []

    def fit_start(self, state: State, logger: Logger) -> None:
        self._rank, self._device = state.dist.rank, state.device
        self._first_step = state.timestamp.batch
        activities = [torch.profiler.ProfilerActivity.CPU]
        if state.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(
                wait=self.wait, warmup=self.warmup, active=self.active, repeat=self.repeat
            ),
            on_trace_ready=self._trace_ready,
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
        )
        self._profiler.start()
        self._state = state

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._profiler is not None:
            self._profiler.step()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._stop()
        if not self.traces:
            log.warning(
                "callbacks.profiler: training ran %d steps, fewer than wait + warmup + active = %d: nothing was traced",
                state.timestamp.batch - self._first_step,
                self.wait + self.warmup + self.active,
            )

    def close(self, state: State, logger: Logger) -> None:
        self._stop()

    def _stop(self) -> None:
        profiler, self._profiler = self._profiler, None
        if profiler is not None:
            profiler.stop()

    def _trace_ready(self, profiler: torch.profiler.profile) -> None:
        step = self._state.timestamp.batch
        path = self.folder / f"rank{self._rank}.step{step}.pt.trace.json"
        profiler.export_chrome_trace(str(path))
        self.traces.append(path)
        summary = {"trace": path.name, "step": step, **trace_summary(json.loads(path.read_text()), self.top)}
        summaries = self.folder / f"summary_rank{self._rank}.json"
        previous = json.loads(summaries.read_text()) if summaries.is_file() else []
        summaries.write_text(json.dumps([*previous, summary], indent=1))
        sort = "self_cuda_time_total" if self._device.type == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=self.top)
        log.info(
            "profiler: %d steps to step %d traced in %s: %.1f ms per step%s\n%s",
            summary["steps"],
            step,
            path,
            summary["step_ms"],
            _device_line(summary),
            table,
        )


def _device_line(summary: dict[str, Any]) -> str:
    if summary["device_busy"] is None:
        return ""
    return (
        f", device busy {summary['device_busy']:.0%} of it, {summary['kernels_per_step']:.0f} kernels and "
        f"{summary['syncs_per_step']:.1f} host syncs per step"
    )


def trace_summary(trace: dict[str, Any], top: int = 15) -> dict[str, Any]:
    """What one traced cycle says about a step, from its Chrome trace (``export_chrome_trace``'s JSON).

    Returns ``steps`` (traced ``ProfilerStep#`` spans), ``step_ms`` (their mean wall time), ``device_busy`` (the
    fraction of those spans with a kernel, copy or memset running; ``None`` without device work), ``kernels_per_step``,
    ``syncs_per_step`` (``cuda*Synchronize`` calls, the host waiting for the device) and ``top``: the kernels (or, on
    a CPU, the ops by self time) with the most time per step, ``[{name, ms_per_step, calls_per_step, share}]``.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = sorted(
        ((e["ts"], e["ts"] + e["dur"]) for e in events if str(e.get("name", "")).startswith("ProfilerStep#")),
    )
    wall = sum(end - start for start, end in steps)
    count = max(len(steps), 1)
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    syncs = [e for e in events if e.get("cat") == "cuda_runtime" and "Synchronize" in str(e.get("name"))]
    if device:
        busy = _covered(sorted((e["ts"], e["ts"] + e["dur"]) for e in device), steps)
        kernels = [e for e in device if e.get("cat") == "kernel"]
        ranked = _rank([(e["name"], e["dur"]) for e in kernels], count, top)
        device_busy = busy / wall if wall else None
        kernels_per_step, syncs_per_step = len(kernels) / count, len(syncs) / count
    else:
        ranked = _rank(_self_times([e for e in events if e.get("cat") == "cpu_op"]), count, top)
        device_busy = kernels_per_step = syncs_per_step = None
    return {
        "steps": len(steps),
        "step_ms": wall / count / 1e3,
        "device_busy": device_busy,
        "kernels_per_step": kernels_per_step,
        "syncs_per_step": syncs_per_step,
        "top": ranked,
    }


def _rank(timed: list[tuple[str, float]], steps: int, top: int) -> list[dict[str, Any]]:
    """Group ``(name, microseconds)`` by name; the ``top`` largest per step."""
    total: dict[str, float] = defaultdict(float)
    calls: Counter = Counter()
    for name, duration in timed:
        total[name] += duration
        calls[name] += 1
    whole = sum(total.values()) or 1.0
    ranked = sorted(total, key=total.__getitem__, reverse=True)[:top]
    return [
        {
            "name": name,
            "ms_per_step": total[name] / steps / 1e3,
            "calls_per_step": calls[name] / steps,
            "share": total[name] / whole,
        }
        for name in ranked
    ]


def _self_times(ops: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Each op's own time (its duration less its children's), per thread, from nested trace spans."""
    by_thread: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for op in ops:
        by_thread[(op.get("pid"), op.get("tid"))].append(op)
    result = []
    for thread_ops in by_thread.values():
        thread_ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list[Any]] = []  # [end, name, self time]
        for op in thread_ops:
            while stack and stack[-1][0] <= op["ts"]:
                end, name, own = stack.pop()
                result.append((name, own))
            if stack:
                stack[-1][2] -= op["dur"]
            stack.append([op["ts"] + op["dur"], op["name"], float(op["dur"])])
        result += [(name, own) for _, name, own in stack]
    return result


def _covered(intervals: list[tuple[float, float]], windows: list[tuple[float, float]]) -> float:
    """Time within ``windows`` covered by the union of ``intervals`` (both sorted by start)."""
    merged: list[list[float]] = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return sum(max(0.0, min(e, we) - max(s, ws)) for ws, we in windows for s, e in merged)


@CALLBACKS.register("memory_monitor")
class MemoryMonitor(Callback):
    """Memory at every logging window; see the module docstring.

    Args:
        log_every: steps per logging window (given by the trainer: ``run.log_interval``).
    """

    def __init__(self, log_every: int) -> None:
        self.log_every = max(log_every, 1)

    def fit_start(self, state: State, logger: Logger) -> None:
        if state.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(state.device)

    def batch_end(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch % self.log_every and not state.is_done:
            return
        metrics = memory_metrics(state.device)
        if state.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(state.device)  # the next window's peak is its own
        logger.log_metrics(metrics, state.timestamp.batch)
        log.info(
            "Memory at step %d: %s",
            state.timestamp.batch,
            "  ".join(f"{k.removeprefix('memory/')}: {v:.2f}" for k, v in metrics.items()),
        )


def memory_metrics(device: torch.device) -> dict[str, float]:
    """The device allocator's counters (CUDA; host-side, no sync) and the process's resident memory, in GiB."""
    metrics = {}
    if device.type == "cuda":
        metrics["memory/allocated_gib"] = torch.cuda.memory_allocated(device) / GIB
        metrics["memory/reserved_gib"] = torch.cuda.memory_reserved(device) / GIB
        metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = peak if sys.platform == "darwin" else peak * 1024
    rss = _rss_bytes(peak)
    metrics["memory/rss_gib"] = rss / GIB
    metrics["memory/peak_rss_gib"] = max(peak, rss) / GIB  # the kernel updates its high-water mark lazily
    return metrics


def _rss_bytes(fallback: int) -> int:
    try:  # Linux: resident pages, second field of /proc/self/statm
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return fallback


#: operations after which the host holds a value computed on the device (``item``, ``bool(t)``, ``int(t)``,
#: ``float(t)`` all end in ``_local_scalar_dense``), or whose output size depends on the data
_SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero")
#: tensor methods that hand device data to Python (on a CPU they are the same calls, so CPU tests see them too)
_HOST_METHODS = ("tolist", "numpy", "cpu")


class HostSyncCounter(TorchDispatchMode):
    """Counts the calls that make the host wait for the device: ``with HostSyncCounter() as syncs: ...; syncs.count``
    (``syncs.calls`` names them). On a CPU (``device="cpu"``, the default) nothing waits, but the same calls are
    counted on every tensor, so a CPU test finds the syncs a GPU run would have (and also host-side ones, such as the
    step counters of torch's unfused AdamW). With ``device="cuda"`` only calls on device tensors count.

    Example:
        >>> import torch
        >>> with HostSyncCounter() as syncs:
        ...     x = torch.ones(3) * 2
        ...     value = x.sum().item()
        ...     flag = bool(x.max() > 1)
        >>> syncs.count, dict(syncs.calls)
        (2, {'_local_scalar_dense': 2})
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.every_tensor = torch.device(device).type == "cpu"
        self.calls: Counter = Counter()
        self._originals: dict[str, Any] = {}
        self._in_method = 0  # inside a counted tolist/numpy/cpu: its own copy is not counted again

    @property
    def count(self) -> int:
        return sum(self.calls.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in _SYNCING_OPS and (self.every_tensor or _on_device(args)):
            self.calls[name] += 1
        elif name in ("_to_copy", "copy_") and not self._in_method and _device_to_host(func, args, kwargs or {}):
            self.calls["copy to host"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostSyncCounter:
        for method in _HOST_METHODS:
            original = getattr(torch.Tensor, method)
            self._originals[method] = original
            setattr(torch.Tensor, method, self._counting(method, original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for method, original in self._originals.items():
                setattr(torch.Tensor, method, original)
            self._originals.clear()

    def _counting(self, method: str, original: Any) -> Any:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.every_tensor or tensor.device.type != "cpu":
                self.calls[method] += 1
            self._in_method += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._in_method -= 1

        return counted


def _on_device(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)


def _device_to_host(func: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
    """A copy from a non-CPU device into host memory (``.to("cpu")``, ``copy_`` into a CPU tensor)."""
    if func.__name__.startswith("_to_copy"):
        source, target = args[0], kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and source.device.type != "cpu"
    target, source = args[0], args[1]
    return target.device.type == "cpu" and isinstance(source, torch.Tensor) and source.device.type != "cpu"


__all__ = ["HostSyncCounter", "MemoryMonitor", "Profiler", "memory_metrics", "trace_summary"]
