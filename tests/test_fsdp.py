"""FSDP2 (``dist.fsdp: true``): 2 CPU processes with gloo under torch.distributed.run, against 1 process and DDP."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from cadenza.algorithms.lora import apply_lora
from cadenza.engine.errors import CadenzaError, ConfigError
from cadenza.engine.fsdp import fsdp_blocks, mixed_precision_policy
from cadenza.models import create_model
from cadenza.models.export import export_openclip
from cadenza.train.config import load_config

from .algorithm_settings import ALGORITHM_SETTINGS
from .conftest import ROOT, TINY
from .eval_data import suite_over_processes
from .test_distributed import COMMON, torchrun
from .test_zero_shot import image_folder

FSDP = "dist.fsdp=true"
#: FSDP and one process differ by float reduction order only (1e-8 in gradients); 6 AdamW steps amplify it
TOLERANCE = 1e-4
CLIP = ("loss.name=clip", "loss.local_loss=true", "loss.gather_with_grad=true")


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_fsdp_equals_one_process_with_twice_the_batch_and_ddp(tmp_path, loss):
    """Loss, global gradient norm and (clipped) gradients of the first step: FSDP 2 x 8 = DDP 2 x 8 = 1 x 16.

    SigLIP adds a second 0-dim parameter (``logit_bias``), replicated like the temperature; its DDP run is
    left to test_distributed."""
    clip = (*(CLIP if loss == "clip" else ("loss.name=siglip",)), "algorithms.gradient_clipping.norm=0.5")
    runs = ("fsdp", "ddp", "one") if loss == "clip" else ("fsdp", "one")
    for name in runs:
        nproc, *setup = {"fsdp": (2, FSDP, "data.batch_size=8"), "ddp": (2, "data.batch_size=8")}.get(
            name, (1, "data.batch_size=16")
        )
        torchrun(nproc, "grads", tmp_path / name, *COMMON, *clip, *setup)
    fsdp, *others = (torch.load(tmp_path / n / "grads.pt", weights_only=True) for n in runs)
    assert others[-1]["grad_norm"] > 1.0  # clipping acts: a wrong (per-shard) norm would scale the gradients wrongly
    for other in others:
        torch.testing.assert_close(fsdp["loss_mean"], other["loss_mean"], rtol=0, atol=1e-5)
        torch.testing.assert_close(fsdp["grad_norm"], other["grad_norm"], rtol=1e-5, atol=0)
        assert fsdp["grads"].keys() == other["grads"].keys()
        for name, grad in other["grads"].items():
            torch.testing.assert_close(fsdp["grads"][name], grad, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_fsdp_updates_equal_one_process(tmp_path):
    """Weights after 2 clipped AdamW steps and their EMA: FSDP 2 x 8 = 1 x 16, with grad checkpointing (applied
    before sharding) and a partly frozen image tower (FSDP units holding frozen and trainable parameters)."""
    steps = ("run.duration=2ba", "algorithms.gradient_clipping.norm=0.5", "algorithms.ema.decay=0.5")
    steps += ("algorithms.grad_checkpointing={}", "algorithms.lock_image.unlocked_groups=2")
    torchrun(2, "fit", tmp_path / "fsdp", *COMMON, *CLIP, *steps, FSDP, "data.batch_size=8")
    torchrun(1, "fit", tmp_path / "one", *COMMON, *CLIP, *steps, "data.batch_size=16")
    fsdp, one = (torch.load(tmp_path / n / "fit.pt", weights_only=True) for n in ("fsdp", "one"))
    assert fsdp["weights"].keys() == one["weights"].keys() == fsdp["ema"].keys()
    for key in ("weights", "ema"):
        for name, value in one[key].items():
            torch.testing.assert_close(fsdp[key][name], value, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("first", "second"), [("fsdp", "plain"), ("plain", "fsdp")])
def test_full_checkpoint_moves_between_fsdp_and_one_process(tmp_path, first, second):
    """A 2-process FSDP run's checkpoint at step 3 of 6 continues in 1 process without FSDP (same global batch),
    and the other way round, to the weights, optimizer state and EMA of the uninterrupted run."""
    common = (*COMMON, *CLIP, "run.name=job", "optim.warmup=2ba", "run.duration=6ba", "algorithms.ema.decay=0.9")
    setups = {"fsdp": (2, FSDP, "data.batch_size=8"), "plain": (1, "data.batch_size=16")}
    nproc, *setup = setups[first]
    torchrun(nproc, "fit", tmp_path / "a", *common, *setup, "checkpoint.save_interval=3ba", f"run.logs={tmp_path}/a")
    path = tmp_path / "a" / "job" / "checkpoints" / "ep0-ba3.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert list(checkpoint["state_dict"]) == list(create_model("tiny-vit").state_dict())  # OpenCLIP's keys, full
    assert isinstance(next(iter(checkpoint["optimizer"]["state"])), int)  # torch.optim's own layout
    nproc, *setup = setups[second]
    torchrun(nproc, "fit", tmp_path / "b", *common, *setup, f"checkpoint.resume={path}", f"run.logs={tmp_path}/b")
    resumed, uninterrupted = (torch.load(tmp_path / n / "fit.pt", weights_only=True) for n in ("b", "a"))
    assert_same_training(resumed, uninterrupted, steps=6)
    for name, value in uninterrupted["ema"].items():
        torch.testing.assert_close(resumed["ema"][name], value, rtol=TOLERANCE, atol=TOLERANCE)


def test_sharded_checkpoint_resumes_with_and_without_fsdp(tmp_path):
    """dist.fsdp_state_dict=sharded: every rank writes its shards; 2 FSDP processes and 1 plain process resume."""
    common = (*COMMON, *CLIP, "run.name=job", "optim.warmup=2ba", "run.duration=6ba")
    sharded = (*common, FSDP, "dist.fsdp_state_dict=sharded", "data.batch_size=8")
    torchrun(2, "fit", tmp_path / "a", *sharded, "checkpoint.save_interval=3ba", f"run.logs={tmp_path}/a")
    path = tmp_path / "a" / "job" / "checkpoints" / "ep0-ba3.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["state_dict"] is None and checkpoint["sharded"] == "ep0-ba3.dcp"
    assert (path.parent / "ep0-ba3.dcp" / ".metadata").is_file()
    with pytest.raises(CadenzaError, match="sharded FSDP checkpoint"):
        export_openclip(path, tmp_path / "out.pt")
    resume = (f"checkpoint.resume={path}", "checkpoint.save_interval=1ba", "checkpoint.keep=1")
    torchrun(2, "fit", tmp_path / "b", *sharded, *resume, f"run.logs={tmp_path}/b")
    assert [p.name for p in (tmp_path / "b" / "job" / "checkpoints").glob("*.dcp")] == ["ep0-ba6.dcp"]  # keep=1
    torchrun(1, "fit", tmp_path / "c", *common, "data.batch_size=16", *resume, f"run.logs={tmp_path}/c")
    uninterrupted = torch.load(tmp_path / "a" / "fit.pt", weights_only=True)
    for resumed in (torch.load(tmp_path / n / "fit.pt", weights_only=True) for n in ("b", "c")):
        assert_same_training(resumed, uninterrupted, steps=6)
    # To export: resume it for 0 steps (run.duration = its step); the run saves it again, full.
    torchrun(
        1, "fit", tmp_path / "d", *COMMON, "run.name=job", "run.duration=3ba", *resume[:1], f"run.logs={tmp_path}/d"
    )
    export_openclip(tmp_path / "d" / "job" / "checkpoints" / "ep0-ba3.pt", tmp_path / "out.pt")
    assert (tmp_path / "out.pt").is_file()


def test_fsdp_evaluation_of_uneven_shards_equals_one_process(tmp_path):
    """Validation (49 samples), zero-shot (9 images) and a suite split unevenly over 2 ranks, which then run different
    numbers of forward passes; after 2 steps with EMA (evaluated on the average) the metrics equal 1 process's."""
    folder = image_folder(tmp_path / "images")
    common = (*CLIP, "data.val.num_samples=49", "data.train.num_samples=64", "run.duration=2ba", "optim.warmup=0ba")
    common += ("algorithms.ema.decay=0.5", f"eval.zero_shot.path={folder}", "eval.zero_shot.templates=simple")
    common += (f"eval.tasks={suite_over_processes(tmp_path / 'suite')}",)  # an evaluation suite, uneven too
    torchrun(2, "fit", tmp_path / "two", *common, FSDP, "data.batch_size=4", f"run.logs={tmp_path}/two")
    torchrun(1, "fit", tmp_path / "one", *common, "data.batch_size=8", f"run.logs={tmp_path}/one")
    metrics = []
    for name in ("two", "one"):
        rows = [json.loads(line) for line in (tmp_path / name / "tiny" / "metrics.jsonl").read_text().splitlines()]
        metrics.append({k: v for row in rows for k, v in row.items() if k.startswith("val/")})
    assert metrics[0]["val/num_samples"] == 49 and "val/imagenet-zeroshot-val-top1" in metrics[0]
    assert "val/suite-average" in metrics[0]
    assert metrics[0].keys() == metrics[1].keys()
    for key, value in metrics[1].items():
        if key == "val/clip_val_loss":  # OpenCLIP's mean of in-batch losses: batches of 4 here, 8 there
            continue
        assert metrics[0][key] == pytest.approx(value, rel=1e-4), key


def test_composer_n_2_fsdp_trains_with_every_algorithm(tmp_path):
    """End to end: composer -n 2 on the tiny config with FSDP, bf16 autocast (weights gathered in bf16) and every
    algorithm of the central table at once."""
    algorithms = []
    for name, args in ALGORITHM_SETTINGS.items():
        algorithms += [f"algorithms.{name}.{k}={v}" for k, v in args.items()] or [f"algorithms.{name}={{}}"]
    command = [sys.executable, "-m", "cadenza.train.cli", "-n", "2", str(TINY), f"run.logs={tmp_path}", FSDP]
    command += ["run.duration=4ba", "run.log_interval=2ba", "eval.interval=4ba", "optim.grad_clip_norm=null"]
    command += ["run.precision=amp_bf16"]
    result = subprocess.run(command + algorithms, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP: 4 blocks and the root sharded over 2 processes" in result.stderr + result.stdout
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert any("val/image_to_text_R@1" in r for r in rows)
    checkpoint = torch.load(tmp_path / "tiny" / "checkpoints" / "ep0-ba4.pt", weights_only=True)
    expected = create_model("tiny-vit")
    apply_lora(expected, **ALGORITHM_SETTINGS["lora"])  # LoRA's layers: base_layer and the adapters
    assert list(checkpoint["state_dict"]) == list(expected.state_dict())
    assert {v.dtype for v in checkpoint["state_dict"].values() if v.is_floating_point()} == {torch.float32}


def assert_same_training(resumed: dict, reference: dict, steps: int) -> None:
    """Step, learning rate, weights and AdamW state of a resumed run against the uninterrupted one."""
    assert resumed["batch"] == reference["batch"] == steps
    assert resumed["lr"] == pytest.approx(reference["lr"], rel=1e-9)
    for name, value in reference["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, rtol=TOLERANCE, atol=TOLERANCE)
    states, expected = resumed["optimizer"]["state"], reference["optimizer"]["state"]
    assert states.keys() == expected.keys()
    for index, state in expected.items():
        assert states[index]["step"] == state["step"] == steps
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(states[index][moment], state[moment], rtol=TOLERANCE, atol=TOLERANCE)


# -- without processes: configuration and the wrapping plan ------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ((FSDP, "dist.static_graph=true"), "dist.static_graph"),
        ((FSDP, "dist.find_unused_parameters=true"), "dist.find_unused_parameters"),
        ((FSDP, "run.precision=amp"), "run.precision"),
        (("dist.fsdp_state_dict=sharded",), "dist.fsdp_state_dict"),
        ((FSDP, "dist.fsdp_state_dict=shards"), "dist.fsdp_state_dict"),
        ((FSDP, "dist.fsdp_state_dict=sharded", "checkpoint.save_folder=s3://bucket/run"), "dist.fsdp_state_dict"),
    ],
)
def test_impossible_fsdp_settings_fail_at_config_time(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        load_config(TINY, overrides)
    assert "dist.fsdp" in str(error.value)  # names both keys


def test_fsdp_settings_load():
    cfg = load_config(TINY, (FSDP, "dist.fsdp_state_dict=sharded", "run.precision=amp_bf16"))
    assert OmegaConf.to_container(cfg.dist)["fsdp"] is True


@pytest.mark.parametrize(
    ("name", "blocks"),
    [
        (
            "tiny-vit",
            ["visual.trunk.blocks.0", "visual.trunk.blocks.1"] + [f"text.transformer.resblocks.{i}" for i in (0, 1)],
        ),
        (
            "ViT-B-32",
            [f"visual.trunk.blocks.{i}" for i in range(12)] + [f"text.transformer.resblocks.{i}" for i in range(12)],
        ),
        ("RN50", [f"visual.trunk.stages.{s}" for s in range(4)]),  # timm's ByobNet: a unit per stage
        (
            "convnext_base",
            [f"visual.trunk.stages.{s}.blocks.{i}" for s, n in enumerate((3, 3, 27, 3)) for i in range(n)],
        ),
    ],
)
def test_fsdp_units_are_the_blocks_of_both_towers(name, blocks):
    with torch.device("meta"):  # the plan only reads module names: no weights are made
        model = create_model(name)
    text_blocks = [n for n in fsdp_blocks(model) if n.startswith("text.")]
    assert [n for n in fsdp_blocks(model) if n.startswith("visual.")] == [b for b in blocks if b.startswith("visual.")]
    assert text_blocks == [f"text.transformer.resblocks.{i}" for i in range(len(model.text.transformer.resblocks))]


def test_mixed_precision_follows_run_precision():
    assert mixed_precision_policy("amp_bf16").param_dtype == torch.bfloat16
    assert mixed_precision_policy("amp_bf16").reduce_dtype == torch.float32
    for precision in ("fp32", "bf16", "fp16"):  # fp32 stays fp32; cast weights keep their own dtype
        assert mixed_precision_policy(precision).param_dtype is None
