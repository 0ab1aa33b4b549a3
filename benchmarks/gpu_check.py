"""Everything worth knowing about Cadenza on a GPU, in one command and a few minutes.

    python benchmarks/gpu_check.py                                   # on a GPU: ViT-B-16, every part, ~8 minutes
    python benchmarks/gpu_check.py --wheels gpu_wheels               # a bare GPU machine: install what is missing
    python benchmarks/gpu_check.py --device cpu --model tiny-vit --out /tmp/check   # the same script on a CPU
    python benchmarks/gpu_check.py --only profile,resume             # some parts

Parts, each in its own process with its own time limit (a failure or a hang leaves the other parts' numbers):

- ``user_yaml``: ``composer yamls/vitb16.yaml`` as written (fp16 ``amp``, grad checkpointing, local loss), pointed at
  synthetic data, and the same in ``amp_bf16``: samples/s, MFU and peak memory.
- ``side_by_side``: OpenCLIP's trainer and Cadenza, equal settings, eager and compiled, and the short-caption row
  (``train_throughput.py --gpu``'s configs, one round).
- ``profile``: Cadenza's training step under ``callbacks.profiler`` and OpenCLIP's model + loss + optimizer step under
  ``torch.profiler``: GPU-busy share of the wall time, kernels and host syncs per step, the top 15 kernels; host syncs
  per steady-state step counted by ``HostSyncCounter`` (and ``torch.cuda.set_sync_debug_mode`` on a GPU).
- ``ddp``: one process in a NCCL group (gloo on a CPU), the model in DDP, Cadenza's local + gather-with-grad CLIP
  loss: its loss and gradients against the unwrapped model, and samples/s.
- ``fsdp``: FSDP2 (``fully_shard``, amp_bf16 mixed precision) on one device against the unsharded model.
- ``resume``: N + N steps with a checkpoint and resume in between against 2N straight, under
  ``torch.use_deterministic_algorithms`` (warn-only): bit-identical weights, or the largest difference.
- ``streaming``: a local MDS folder written by ``composer convert``'s code, read through the streaming loader with
  pinned memory: samples/s and the share of the step spent waiting for data.

Results: ``<out>/gpu_check.md`` (one table, then the top kernels) and ``gpu_check.json`` (everything), with the
machine and device named. ``--quick`` (the test's mode on a CPU) runs every part in one process with a few steps and
leaves compilation out.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: what gpu_check imports beyond torch: module → pip distribution (a bare GPU machine lacks most of them)
NEEDED = {
    "omegaconf": "omegaconf",
    "antlr4": "antlr4-python3-runtime",
    "yaml": "pyyaml",
    "numpy": "numpy",
    "PIL": "pillow",
    "torchvision": "torchvision",
    "timm": "timm",
    "huggingface_hub": "huggingface_hub",
    "safetensors": "safetensors",
    "streaming": "mosaicml-streaming",
    "xxhash": "xxhash",  # streaming's hashes and compressions, imported with it
    "zstd": "zstd",
    "brotli": "Brotli",
    "snappy": "python-snappy",
    "cramjam": "cramjam",
    "catalogue": "catalogue",
    "webdataset": "webdataset",
    "braceexpand": "braceexpand",
    "ftfy": "ftfy",
    "wcwidth": "wcwidth",
    "regex": "regex",
    "boto3": "boto3",
    "botocore": "botocore",
    "s3transfer": "s3transfer",
    "jmespath": "jmespath",
    "dateutil": "python-dateutil",
    "six": "six",
    "urllib3": "urllib3",
    "filelock": "filelock",
    "tqdm": "tqdm",
    "open_clip": "open_clip_torch",
    "pandas": "pandas",  # open_clip_train's data module imports it
}
PART_LIMITS = {  # seconds on a GPU; a CPU run shares --budget instead
    "user_yaml": 120,
    "side_by_side": 300,
    "profile": 100,
    "ddp": 60,
    "fsdp": 60,
    "resume": 90,
    "streaming": 75,
}
COLUMNS = ["part", "what", "samples_per_second", "mfu", "peak_gib", "result", "seconds"]


@dataclass
class Settings:
    device: str  # cuda | cpu
    model: str
    quick: bool
    work: str  # a scratch folder for run folders, traces and data

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def batch(self) -> int:  # the side-by-side, profile, ddp and fsdp batch (train_throughput's GPU configs: 256)
        return 256 if self.cuda else 16

    @property
    def steps(self) -> int:
        return 40 if self.cuda else (4 if self.quick else 10)

    @property
    def workers(self) -> int:
        return 8 if self.cuda else (0 if self.quick else 1)


# -- the parts ------------------------------------------------------------------------------------------
def part_user_yaml(s: Settings) -> list[dict]:
    """``composer yamls/vitb16.yaml`` as written (its batch of 128, amp, grad checkpointing, local loss) on synthetic
    data, and in amp_bf16."""
    from cadenza.train.config import load_config
    from cadenza.train.trainer import train

    rows = []
    batch = 128 if s.cuda else 8
    steps, log = (s.steps, 10) if s.cuda else (s.steps, 2)
    for precision in ("amp", "amp_bf16"):
        if s.quick and precision != "amp":
            rows.append(
                {"what": f"composer yamls/vitb16.yaml in {precision}", "result": "skipped: --quick runs it once"}
            )
            continue
        logs = Path(s.work) / f"user_yaml_{precision}"
        overrides = [
            f"data.train={{type: synthetic, num_samples: {batch * steps}}}",  # the section replaced, path and all
            f"run.duration={steps}ba",
            f"run.log_interval={log}ba",
            f"run.logs={logs}",
            f"run.device={s.device}",
            f"run.precision={precision}",
            "checkpoint.resume=null",  # a fresh folder: 'latest' would find nothing anyway
            "+callbacks.memory_monitor={}",
            *([] if s.cuda else [f"model.name={s.model}", f"data.batch_size={batch}", f"data.workers={s.workers}"]),
        ]
        started = time.perf_counter()
        train(load_config(ROOT / "yamls" / "vitb16.yaml", overrides))
        rows_ = _metrics(logs / "vitb16")
        rate, mfu = _steady(rows_, "train/samples_per_second"), _steady(rows_, "train/mfu")
        peak = max(r.get("memory/peak_gib", r.get("memory/peak_rss_gib", 0.0)) for r in rows_)
        what = "as written (amp)" if precision == "amp" else "in amp_bf16"
        rows.append(
            {
                "what": f"composer yamls/vitb16.yaml {what}" + ("" if s.cuda else f", {s.model} batch {batch}"),
                "samples_per_second": rate,
                "mfu": mfu,
                "peak_gib": peak,
                "result": f"{steps} steps, batch {batch}" + ("" if s.cuda else " (peak: process RSS)"),
                "seconds": time.perf_counter() - started,
            }
        )
    return rows


def part_side_by_side(s: Settings) -> list[dict]:
    """OpenCLIP's trainer against Cadenza with train_throughput.py's configs (one round each)."""
    from benchmarks.train_throughput import COMPILE, GPU_CONFIGS, Config, measure

    if s.cuda and s.model == "ViT-B-16":
        configs = GPU_CONFIGS
    else:
        configs = [
            Config(f"{s.model} amp_bf16", s.model, s.batch, "amp_bf16", s.steps, 2, s.workers),
            Config(f"{s.model} amp_bf16 + compile", s.model, s.batch, "amp_bf16", s.steps + 4, 6, s.workers, **COMPILE),
            Config(
                f"{s.model} amp_bf16, captions of 1-14 ids", s.model, s.batch, "amp_bf16", s.steps, 2, s.workers
            )._replace(caption_ids=14),
        ]
    rows = []
    for config in configs:
        if s.quick and config is not configs[0]:
            rows.append({"what": config.label, "result": "skipped: --quick runs the first config only (no compiling)"})
            continue
        started = time.perf_counter()
        row = measure(config, s.device, rounds=1)
        rows.append(
            {
                "what": f"{config.label}: Cadenza (OpenCLIP {row['openclip_sps']:.4g}/s, MFU {row['openclip_mfu']:.2g})",
                "samples_per_second": row["cadenza_sps"],
                "mfu": row["cadenza_mfu"],
                "result": f"{row['ratio']:.2f}x OpenCLIP",
                "seconds": time.perf_counter() - started,
                "details": row,
            }
        )
    return rows


def part_profile(s: Settings) -> list[dict]:
    """Cadenza's step under callbacks.profiler, then OpenCLIP's model + loss + optimizer step under torch.profiler."""
    from benchmarks.common import speed_run_overrides
    from cadenza.train.config import load_config
    from cadenza.train.trainer import Trainer

    wait, active, counted = (8, 3, 3) if s.cuda else (1, 2, 2)
    steps = wait + 2 + active + counted + 1  # the last step is a logging window
    logs = Path(s.work) / "profile"
    overrides = [
        *speed_run_overrides(s.model, s.batch, "amp_bf16", steps, s.workers, str(logs)),
        f"run.device={s.device}",
        f"run.log_interval={steps}ba",  # no logging window before the last step: the steady state is profiled
        f"+callbacks.profiler={{wait: {wait}, warmup: 2, active: {active}}}",
        "run.peak_tflops=1",  # no MFU here: the peak need not be measured
    ]
    sync_steps = SyncsPerStep(first=wait + 2 + active + 1, count=counted, cuda=s.cuda)
    started = time.perf_counter()
    trainer = Trainer(load_config(ROOT / "yamls" / "tiny.yaml", overrides), callbacks=[sync_steps])
    trainer.fit()
    (cadenza,) = json.loads((trainer.run_dir / "profiler" / "summary_rank0.json").read_text())
    rows = [_profile_row(f"Cadenza's training step ({s.model}, amp_bf16, batch {s.batch})", cadenza, sync_steps)]
    rows[0]["seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    openclip, oc_syncs = profile_openclip_step(s, wait, active, counted)
    rows.append(_profile_row(f"OpenCLIP's model + loss + AdamW step ({s.model})", openclip, oc_syncs))
    rows[1]["seconds"] = time.perf_counter() - started
    return rows


def profile_openclip_step(s: Settings, wait: int, active: int, counted: int) -> tuple[dict, SyncsPerStep]:
    """OpenCLIP's model, its ClipLoss and torch's AdamW (what its trainer builds), profiled like Cadenza's step."""
    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    from cadenza.engine.profiling import trace_summary

    device = torch.device(s.device)
    if s.model not in open_clip.list_models():
        from cadenza.models import create_model
        from cadenza.models.convert import openclip_model_config

        with torch.device("meta"):
            config = openclip_model_config(create_model(s.model))
        path = Path(s.work) / f"{s.model}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(str(path))
    model = open_clip.create_model(s.model, device=device, output_dict=True)  # as open_clip_train builds it
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    context = open_clip.get_tokenizer(s.model).context_length
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # open_clip_train's: torch's default (foreach) AdamW
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(s.batch, 3, size, size, device=device, generator=generator)
    texts = torch.randint(0, 49408, (s.batch, context), device=device, generator=generator)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    trace = Path(s.work) / "openclip_step.pt.trace.json"
    schedule = torch.profiler.schedule(wait=wait, warmup=2, active=active, repeat=1)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if s.cuda else [])
    with torch.profiler.profile(
        activities=activities, schedule=schedule, on_trace_ready=lambda p: p.export_chrome_trace(str(trace))
    ) as profiler:
        for _ in range(wait + 2 + active):
            step()
            profiler.step()
    syncs = SyncsPerStep(first=0, count=counted, cuda=s.cuda)
    for index in range(counted):
        with syncs.measuring(index):
            step()
    return trace_summary(json.loads(trace.read_text())), syncs


class SyncsPerStep:
    """Host syncs of ``count`` training steps from step ``first`` on (a trainer callback, or ``measuring`` around any
    step): ``HostSyncCounter``'s count, and on a GPU the warnings of ``torch.cuda.set_sync_debug_mode``."""

    def __init__(self, first: int, count: int, cuda: bool) -> None:
        self.first, self.count, self.cuda = first, count, cuda
        self.counted: list[int] = []
        self.cuda_warnings: list[int] = []
        self.names: dict[str, int] = {}
        self._active: contextlib.ExitStack | None = None

    def run_event(self, event, state, logger) -> None:  # a trainer callback by shape (Callback's three methods)
        step = state.timestamp.batch + 1
        if event.value == "after_dataloader" and self.first <= step < self.first + self.count:
            self._start()
        elif event.value == "batch_end" and self._active is not None:
            self._stop()

    def close(self, state, logger) -> None:
        if self._active is not None:
            self._stop()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @contextlib.contextmanager
    def measuring(self, index: int):
        self._start()
        try:
            yield
        finally:
            self._stop()

    def _start(self) -> None:
        import torch

        from cadenza.engine.profiling import HostSyncCounter

        stack = contextlib.ExitStack()
        self._counter = stack.enter_context(HostSyncCounter("cuda" if self.cuda else "cpu"))
        self._warned = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, "default")
        self._active = stack

    def _stop(self) -> None:
        stack, self._active = self._active, None
        stack.close()
        self.counted.append(self._counter.count)
        for name, calls in self._counter.calls.items():
            self.names[name] = self.names.get(name, 0) + calls
        self.cuda_warnings.append(sum("synchronizing" in str(w.message) for w in self._warned))

    @property
    def per_step(self) -> float | None:
        return statistics.mean(self.counted) if self.counted else None


def _profile_row(what: str, summary: dict, syncs: SyncsPerStep) -> dict:
    counted = f"{syncs.per_step:.1f} host syncs per steady step" if syncs.per_step is not None else "no steps counted"
    if syncs.names:
        counted += f" ({', '.join(f'{k}: {v}' for k, v in syncs.names.items())})"
    if syncs.cuda:
        counted += f", {statistics.mean(syncs.cuda_warnings or [0]):.1f} by CUDA's sync debug mode"
    if summary["device_busy"] is None:
        device = "no GPU: device-busy share and kernels need CUDA"
    else:
        device = (
            f"GPU busy {summary['device_busy']:.1%} of the wall time, {summary['kernels_per_step']:.0f} kernels and "
            f"{summary['syncs_per_step']:.1f} cudaStreamSynchronize-like calls per step"
        )
    return {
        "what": what,
        "result": f"{summary['step_ms']:.1f} ms per step; {device}; {counted}",
        "details": {"summary": summary, "syncs_per_step": syncs.counted, "sync_calls": syncs.names},
    }


def part_ddp(s: Settings) -> list[dict]:
    """One process in a process group (NCCL on a GPU), the model in DDP, the local + gather-with-grad CLIP loss."""
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if s.cuda else "gloo"
    with _process_group(backend):
        model, reference, batch, loss_fn = _model_pair(s)
        ddp = DistributedDataParallel(model, device_ids=[0] if s.cuda else None)
        loss, grads = _loss_and_grads(ddp, loss_fn, batch, s)
        ref_loss, ref_grads = _loss_and_grads(reference, loss_fn, batch, s)
        rate = _timed_steps(ddp, loss_fn, batch, s)
    difference = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads, strict=True))
    same = "equal" if loss == ref_loss else f"{loss:.6g} against {ref_loss:.6g}"
    note = "" if s.cuda else "; NCCL needs CUDA: gloo on this CPU"
    return [
        {
            "what": f"DDP over {backend}, 1 process ({s.model}, amp_bf16, batch {s.batch}, local + gather-with-grad loss)",
            "samples_per_second": rate,
            "result": f"loss {same}, gradients within {difference:.2g} of the unwrapped model's{note}",
        }
    ]


def part_fsdp(s: Settings) -> list[dict]:
    """FSDP2 on one device (amp_bf16: weights gathered in bf16, gradients reduced in fp32) against no sharding."""
    from cadenza.engine.fsdp import shard_model

    backend = "nccl" if s.cuda else "gloo"
    with _process_group(backend):
        model, reference, batch, loss_fn = _model_pair(s)
        blocks = shard_model(model, "amp_bf16")
        loss, grads = _loss_and_grads(model, loss_fn, batch, s)
        ref_loss, ref_grads = _loss_and_grads(reference, loss_fn, batch, s)
        full = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]  # gathered while the group lives
        rate = _timed_steps(model, loss_fn, batch, s)
    relative = max(((g - r).norm() / r.norm().clamp_min(1e-12)).item() for g, r in zip(full, ref_grads, strict=True))
    note = "" if s.cuda else "; NCCL needs CUDA: gloo on this CPU"
    return [
        {
            "what": f"FSDP2 on one device, {len(blocks)} blocks + root ({s.model}, amp_bf16, batch {s.batch})",
            "samples_per_second": rate,
            "result": f"loss {loss:.5g} against {ref_loss:.5g} unsharded, gradients within {relative:.2g} (relative, "
            f"bf16 weights gathered){note}",
        }
    ]


def part_resume(s: Settings) -> list[dict]:
    """2N straight steps against N, a checkpoint, a resume and N more, deterministic algorithms on (warn-only)."""
    import torch

    from benchmarks.common import speed_run_overrides
    from cadenza.train.config import load_config
    from cadenza.train.trainer import Trainer

    torch.use_deterministic_algorithms(True, warn_only=True)
    half, batch = (4, 64) if s.cuda else (1 if s.quick else 2, 8)
    logs = Path(s.work) / "resume"
    common = [*speed_run_overrides(s.model, batch, "amp_bf16", 2 * half, s.workers, str(logs))]
    common += [f"run.device={s.device}", f"checkpoint.save_interval={half}ba", f"run.log_interval={half}ba"]
    common += ["run.peak_tflops=1"]  # no MFU here: the peak need not be measured
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = Trainer(load_config(ROOT / "yamls" / "tiny.yaml", [*common, "run.name=straight"]))
        straight = first.fit()  # saved at step N on its way
        checkpoint = first.checkpoint_folder / f"ep0-ba{half}.pt"
        resumed = Trainer(
            load_config(ROOT / "yamls" / "tiny.yaml", [*common, "run.name=resumed", f"checkpoint.resume={checkpoint}"])
        ).fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    identical = all(torch.equal(a[k], b[k]) for k in a)
    largest = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    nondeterministic = sorted(
        {str(w.message).split(" does not have a deterministic")[0] for w in caught if "deterministic" in str(w.message)}
    )
    result = "bit-identical weights" if identical else f"weights differ by at most {largest:.3g}"
    if nondeterministic:
        result += f"; kernels without a deterministic version: {', '.join(nondeterministic)[:300]}"
    return [
        {
            "what": f"checkpoint at step {half} + exact resume against {2 * half} straight steps "
            f"({s.model}, amp_bf16, batch {batch})",
            "result": result,
            "seconds": time.perf_counter() - started,
        }
    ]


def part_streaming(s: Settings) -> list[dict]:
    """A local MDS folder (written with composer convert's code) through the streaming loader, pinned memory on."""
    from benchmarks.common import speed_run_overrides
    from cadenza.datasets.convert import Item, convert
    from cadenza.train.config import load_config
    from cadenza.train.trainer import Trainer

    samples = s.batch * (8 if s.cuda else 2)
    mds = Path(s.work) / "mds"
    started = time.perf_counter()
    convert(_jpeg_items(samples, Item), str(mds), {"jpg": "jpeg", "txt": "str"}, progress=False, threads=8)
    written = time.perf_counter() - started
    steps, log = (30, 5) if s.cuda else (s.steps, 2)
    logs = Path(s.work) / "streaming"
    overrides = [
        *speed_run_overrides(s.model, s.batch, "amp_bf16", steps, s.workers, str(logs)),
        f"run.device={s.device}",
        "run.peak_tflops=1",  # no MFU here: the peak need not be measured
        f"run.log_interval={log}ba",
        f"data.train={{type: streaming, remote: '{mds}', local: '{logs / 'cache'}'}}",
        "data.pin_memory=true",
    ]
    trainer = Trainer(load_config(ROOT / "yamls" / "tiny.yaml", overrides))
    trainer.fit()
    rows = _metrics(trainer.run_dir)
    waiting = _steady(rows, "train/data_time") / _steady(rows, "train/batch_time")
    pinned = "pinned memory" if s.cuda else "pinned memory needs CUDA: not pinned on this CPU"
    return [
        {
            "what": f"streaming from a local MDS folder ({samples} JPEGs, {s.workers} workers, {pinned})",
            "samples_per_second": _steady(rows, "train/samples_per_second"),
            "result": f"{waiting:.0%} of the step waiting for data; MDS written in {written:.0f}s",
            "seconds": time.perf_counter() - started,
        }
    ]


PARTS: dict[str, Callable[[Settings], list[dict]]] = {
    "user_yaml": part_user_yaml,
    "side_by_side": part_side_by_side,
    "profile": part_profile,
    "ddp": part_ddp,
    "fsdp": part_fsdp,
    "resume": part_resume,
    "streaming": part_streaming,
}


# -- helpers of the parts -------------------------------------------------------------------------------
def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steady(rows: list[dict], key: str) -> float:
    """The median of ``key`` over the logging windows after the first (which holds start-up and warm-up)."""
    values = [r[key] for r in rows if key in r]
    return statistics.median(values[1:] or values)


@contextlib.contextmanager
def _process_group(backend: str):
    import torch.distributed as dist

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model_pair(s: Settings):
    """The model (twice, equal weights), a batch of random images and tokens, and Cadenza's CLIP loss with local loss
    and gathering with gradients (what the DDP and FSDP recipes use)."""
    import copy

    import torch

    from cadenza.engine.registry import LOSSES
    from cadenza.models import create_model
    from cadenza.train import config  # noqa: F401 - fills the registries

    torch.manual_seed(0)
    device = torch.device(s.device)
    model = create_model(s.model).to(device)
    reference = copy.deepcopy(model)
    generator = torch.Generator(device).manual_seed(1)
    images = torch.randn(s.batch, 3, model.image_size, model.image_size, device=device, generator=generator)
    tokens = torch.randint(1, model.vocab_size, (s.batch, model.context_length), device=device, generator=generator)
    loss_fn = LOSSES.build("clip", {"local_loss": True, "gather_with_grad": True}, "loss")
    return model, reference, (images, tokens), loss_fn


def _loss_and_grads(model, loss_fn, batch, s: Settings):
    import torch

    with torch.autocast(s.device, dtype=torch.bfloat16):
        loss = sum(loss_fn(**model(*batch)).values())
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _timed_steps(model, loss_fn, batch, s: Settings) -> float:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    steps = 10 if s.cuda else 2
    for index in range(steps + 2):  # 2 warm-up steps
        if index == 2:
            _synchronize(s)
            started = time.perf_counter()
        with torch.autocast(s.device, dtype=torch.bfloat16):
            loss = sum(loss_fn(**model(*batch)).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _synchronize(s)
    return steps * s.batch / (time.perf_counter() - started)


def _synchronize(s: Settings) -> None:
    import torch

    if s.cuda:
        torch.cuda.synchronize()


def _jpeg_items(count: int, item: type):
    """Smooth random images (small JPEGs, like photos) with captions, as ``composer convert`` items."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        small.resize((256, 256), Image.BILINEAR).save(buffer, format="JPEG", quality=85)
        yield item(name=str(index), image=buffer.getvalue(), caption=f"a smooth picture, number {index}")


# -- the worker (runs parts) and the parent (runs workers, writes the table) -------------------------------
class PartTimeout(Exception):
    pass


def worker(settings: Settings, parts: list[str], deadline: float) -> None:
    """Run ``parts`` in this process, each under its limit (its own on a GPU, and never past ``deadline``, a
    ``time.time()``); print one ``PART {json}`` line per part."""
    sys.path.insert(0, str(ROOT))

    def expire(signum, frame):
        raise PartTimeout

    signal.signal(signal.SIGALRM, expire)
    for name in parts:
        started, cpu = time.perf_counter(), _cpu_seconds()
        limit = min(PART_LIMITS[name] if settings.cuda else math.inf, deadline - time.time())
        if limit < 10:
            record = {"part": name, "status": "skipped", "reason": "out of time (--budget)", "seconds": 0.0}
            print("PART " + json.dumps({**record, "rows": []}), flush=True)  # noqa: T201
            continue
        signal.alarm(int(limit))
        try:
            rows, status, reason = PARTS[name](settings), "ok", ""
        except PartTimeout:
            rows, status, reason = [], "timeout", f"over its limit of {limit:.0f}s"
        except Exception as error:  # noqa: BLE001 - one part's failure is its row; the others go on
            rows, status, reason = [], "failed", f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"
        finally:
            signal.alarm(0)
        record = {"part": name, "status": status, "reason": reason, "seconds": time.perf_counter() - started}
        record["cpu_seconds"] = _cpu_seconds() - cpu  # this process and its children: what a loaded machine shares
        print("PART " + json.dumps({**record, "rows": rows}, default=float), flush=True)  # noqa: T201


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_workers(settings: Settings, parts: list[str], budget: float) -> list[dict]:
    """Each part in its own process (all in one with ``--quick``); a part's limit is its own or what is left."""
    deadline = time.time() + budget
    groups = [parts] if settings.quick else [[p] for p in parts]
    results: list[dict] = []
    for group in groups:
        env = dict(os.environ)
        if "resume" in group and settings.cuda:
            env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS's deterministic mode
        command = [sys.executable, __file__, "--worker", json.dumps(asdict(settings)), str(deadline), *group]
        limit = min(sum(PART_LIMITS[p] for p in group) if settings.cuda else math.inf, deadline - time.time())
        print(f"gpu_check: {', '.join(group)} (limit {max(limit, 0):.0f}s)", flush=True)  # noqa: T201
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=max(limit, 0) + 30)
            output, code = done.stdout, done.returncode
            log = done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            output = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
            code, log = -1, output
        reported = [json.loads(line[5:]) for line in output.splitlines() if line.startswith("PART ")]
        results += reported
        for part in group[len(reported) :]:  # the worker died or hung: the rest of its group gets the reason
            tail = " ".join(log.strip().splitlines()[-3:])[-400:]
            results.append({"part": part, "status": "failed", "reason": f"worker exit {code}: {tail}"})
        for result in reported:
            print(  # noqa: T201
                f"  {result['part']}: {result['status']} in {result.get('seconds', 0):.0f}s "
                f"({result.get('cpu_seconds', 0):.0f}s of CPU) {result['reason']}"
            )
    return results


def missing_packages(parts: list[str]) -> list[str]:
    """pip names of what this run would import and cannot."""
    needed = dict(NEEDED)
    if not {"side_by_side", "profile"} & set(parts):
        needed = {m: d for m, d in needed.items() if d not in ("open_clip_torch", "pandas")}
    return sorted({dist for module, dist in needed.items() if importlib.util.find_spec(module) is None})


def use_wheels(folder: Path, parts: list[str]) -> dict[str, str]:
    """Make what ``parts`` import and this Python lacks importable from the wheels in ``folder``: installed (no
    index, no dependency resolution: the folder holds them) into ``<folder>/site-<python>``, which goes first on the
    path, so the machine's own environment is left as it is. Returns the environment the workers need."""
    site = folder / f"site-py{sys.version_info.major}{sys.version_info.minor}"
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    missing = missing_packages(parts)
    if missing:
        wheels = {p: _wheel_for(folder, p) for p in missing}
        absent = [p for p, w in wheels.items() if w is None]
        if absent:
            sys.exit(
                f"gpu_check: missing packages: {', '.join(absent)}, and {folder} has no wheel of them for this Python "
                f"({sys.version_info.major}.{sys.version_info.minor}). See README: gpu_check on a bare GPU machine."
            )
        command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site)]
        print("gpu_check: installing " + ", ".join(missing), flush=True)  # noqa: T201
        subprocess.run([*command, *map(str, wheels.values())], check=True)
        importlib.invalidate_caches()
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def _wheel_for(folder: Path, package: str) -> Path | None:
    stem = package.replace("-", "_").lower()
    found = [w for w in sorted(folder.glob("*.whl")) if w.name.lower().split("-")[0] == stem]
    tags = (f"-cp{sys.version_info.major}{sys.version_info.minor}-", "-abi3-", "-py3-none-", "-py2.py3-none-")
    fitting = [w for w in found if any(tag in w.name for tag in tags)]
    return (fitting or [None])[0]


def download_wheels(folder: Path, python_versions: list[str], extra: list[str]) -> None:
    """Fill ``folder`` with the wheels of ``NEEDED`` (less torchvision, numpy and pillow unless named in ``extra``: a
    GPU image with torch usually has them, and torchvision must match its torch), at this environment's versions,
    for Linux x86-64 and each of ``python_versions``."""
    from importlib.metadata import version

    coupled = {"torchvision", "numpy", "pillow"}
    names = sorted({d for d in NEEDED.values() if d not in coupled} | set(extra))
    pinned = [f"{name}=={version(name)}" for name in names]
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"]
    for python in python_versions:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(folder)]
        command += [f"--python-version={python}", *(f"--platform={p}" for p in platforms), *pinned]
        subprocess.run(command, check=True)
    size = sum(w.stat().st_size for w in folder.glob("*.whl")) / 2**20
    print(f"gpu_check: {len(list(folder.glob('*.whl')))} wheels, {size:.1f} MiB in {folder}")  # noqa: T201


def ensure_cadenza_importable() -> dict[str, str]:
    """Without an installed Cadenza (a bare GPU machine), link this checkout's folders as the ``cadenza`` package in a
    scratch folder; returns the environment the workers need."""
    with contextlib.suppress(ModuleNotFoundError):
        if importlib.util.find_spec("cadenza.engine") is not None:
            return {}
    package = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "cadenza"
    package.mkdir()
    for name in ("engine", "train", "algorithms", "datasets", "models"):
        (package / name).symlink_to(ROOT / name)
    path = str(package.parent)
    sys.path.insert(0, path)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [path, str(ROOT), os.environ.get("PYTHONPATH")]))}


def write_tables(results: list[dict], settings: Settings, out: Path, budget: float) -> Path:
    from benchmarks.common import write_results

    rows, details = [], {}
    for result in results:
        if not result.get("rows"):
            rows.append({"part": result["part"], "result": f"{result['status']}: {result['reason']}"})
        for row in result.get("rows", []):
            details.setdefault(result["part"], []).append(row.pop("details", None))
            rows.append({"part": result["part"], **row})
    appendix = []
    profiled = [r for r in rows if r["part"] == "profile"]
    for row, detail in zip(profiled, details.get("profile", []), strict=False):
        if detail:
            summary = detail["summary"]
            kind = "kernels" if summary["device_busy"] is not None else "ops by self time (no GPU)"
            appendix += [f"Top {kind}, {row['what']}:", ""]
            appendix += ["| name | ms per step | calls per step | share |", "| --- | --- | --- | --- |"]
            appendix += [
                f"| `{op['name'][:90]}` | {op['ms_per_step']:.3g} | {op['calls_per_step']:.3g} | {op['share']:.1%} |"
                for op in summary["top"]
            ]
            appendix.append("")
    notes = (
        f"device {settings.device}, model {settings.model}{', --quick' if settings.quick else ''}, budget {budget:.0f}s; "
        "samples/s: median of the logging windows after the first (side by side: after the warm-up steps); "
        "MFU against a matmul peak measured in the run's precision; peak_gib: peak GPU memory allocated (CPU: RSS)"
    )
    for row in rows:
        row.setdefault("part", "")
        for column in COLUMNS:
            row.setdefault(column, "")
    return write_results("gpu_check", rows, COLUMNS, notes, out, details=details, appendix="\n".join(appendix))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Settings(**json.loads(sys.argv[2])), sys.argv[4:], float(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when there is one")
    parser.add_argument("--model", default=None, help="default: ViT-B-16 on a GPU, tiny-vit on a CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="a few steps, one process, no compilation (tests)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 520 GPU, 170 CPU)")
    parser.add_argument("--wheels", type=Path, default=None, help="install missing packages from this wheel folder")
    parser.add_argument("--download-wheels", type=Path, default=None, help="fill this folder with the wheels and stop")
    parser.add_argument(
        "--python-versions",
        default=f"{sys.version_info.major}.{sys.version_info.minor}",
        help="with --download-wheels: the GPU machine's Python version(s), comma-separated",
    )
    parser.add_argument("--also", default="", help="with --download-wheels: also these (numpy, pillow, torchvision)")
    args = parser.parse_args()
    if args.download_wheels is not None:
        versions = [v.strip() for v in args.python_versions.split(",") if v.strip()]
        download_wheels(args.download_wheels, versions, [a.strip() for a in args.also.split(",") if a.strip()])
        return 0
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if importlib.util.find_spec("torch") is None:
        sys.exit("gpu_check: torch is not installed; install the machine's PyTorch first")
    if args.wheels is not None:
        os.environ.update(use_wheels(args.wheels.resolve(), parts))
    missing = missing_packages(parts)
    if missing:
        sys.exit(
            f"gpu_check: missing packages: {', '.join(missing)}. Install them (pip install {' '.join(missing)}), or on "
            "a machine without internet pass --wheels DIR with a folder of their wheels (README: gpu_check on a bare "
            "GPU machine)."
        )
    os.environ.update(ensure_cadenza_importable())
    sys.path.insert(0, str(ROOT))
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda, but torch sees no GPU")
    model = args.model or ("ViT-B-16" if device == "cuda" else "tiny-vit")
    budget = args.budget or (520.0 if device == "cuda" else 170.0)
    with tempfile.TemporaryDirectory(prefix="gpu_check_work_") as work:
        settings = Settings(device=device, model=model, quick=args.quick, work=work)
        results = run_workers(settings, parts, budget)
    path = write_tables(results, settings, args.out, budget)
    print(path.read_text())  # noqa: T201
    return 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
