"""LoRA (``algorithms.lora``), its exports, and WiSE-FT: the adapted model starts equal to the base, the merged export
equals the adapted model in OpenCLIP, the adapters alone rebuild it, a LoRA run resumes exactly, and WiSE-FT at alpha 0
and 1 gives its two ends, in export and in evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cadenza.algorithms.lora import LoRA, apply_lora
from cadenza.engine import ConfigError, Event
from cadenza.engine.logger import Logger
from cadenza.engine.state import State
from cadenza.models import create_model
from cadenza.models.convert import cadenza_to_openclip
from cadenza.models.lora import load_lora_adapter
from cadenza.train.cli import main as composer
from cadenza.train.trainer import Trainer
from cadenza.train.wise_ft_sweep import parse_alphas

from .conftest import TINY
from .test_export import assert_same_embeddings

open_clip = pytest.importorskip("open_clip")
LORA = "algorithms.lora={rank: 4, alpha: 8, dropout: 0.1}"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a loaded 2-core machine
    yield
    torch.set_num_threads(threads)


def embeddings(model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, model.image_size, model.image_size, generator=generator)
    tokens = torch.randint(1, 1000, (3, model.context_length), generator=generator)
    tokens[:, -1] = model.vocab_size - 1
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_lora_starts_at_the_base_model_and_trains_only_its_adapters():
    torch.manual_seed(0)
    base = create_model("tiny-vit").eval()
    adapted = create_model("tiny-vit")
    adapted.load_state_dict(base.state_dict())
    counts = apply_lora(adapted, rank=4, alpha=8, dropout=0.1)
    for mode in ("eval", "train"):  # B is zero: dropout on the adapters' input changes nothing either
        getattr(adapted, mode)()
        for got, expected in zip(embeddings(adapted), embeddings(base), strict=True):
            assert torch.equal(got, expected)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    # by hand: rank 4 x (in + out) per layer; image: qkv 64->192, proj 64->64, fc1 64->256, fc2 256->64 in each of 2
    # blocks; text: out_proj 64->64, c_fc 64->256, c_proj 256->64 in each of 2 blocks
    assert counts["trainable"] == 4 * (2 * (256 + 128 + 320 + 320) + 2 * (128 + 320 + 320)) == 14336
    assert counts["layers"] == {"image": 8, "text": 6}


def test_lora_on_a_minimal_state_and_its_errors():
    model = create_model("tiny-vit")
    algorithm = LoRA(rank=2, target=["image"], modules=["qkv"])
    state = State(model=model)
    assert algorithm.match(Event.INIT, state) and not algorithm.match(Event.FIT_START, state)
    algorithm.apply(Event.INIT, state, Logger([]))
    assert {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad} == {
        "visual.trunk.blocks.0.attn.qkv",
        "visual.trunk.blocks.1.attn.qkv",
    }
    with pytest.raises(ConfigError, match="'atn.qkv' names no layer of the image tower. Did you mean 'attn.qkv'") as e:
        LoRA(target=["image"], modules=["atn.qkv"]).apply(Event.INIT, State(model=create_model("tiny-vit")), Logger([]))
    assert e.value.key == "algorithms.lora.modules"
    with pytest.raises(
        ConfigError, match="'attn.qkv' names no layer of the text tower. Valid: attn.out_proj, mlp.c_fc"
    ):
        LoRA(target=["text"], modules=["attn.qkv"]).apply(Event.INIT, State(model=create_model("tiny-vit")), Logger([]))
    for bad in ({"rank": 0}, {"target": ["vision"]}, {"dropout": 1.0}, {"modules": []}):
        with pytest.raises(ValueError):
            LoRA(**bad)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A pretrained tiny-vit (an OpenCLIP file) fine-tuned 2 steps with LoRA: (base file, trainer, checkpoint)."""
    root = tmp_path_factory.mktemp("lora")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    base = create_model("tiny-vit")
    torch.save(cadenza_to_openclip(base.state_dict(), base), root / "base.pt")
    from cadenza.train.config import load_config

    cfg = load_config(
        TINY,
        [f"run.logs={root}", "run.name=lora", "run.duration=2ba", "checkpoint.save_interval=2ba", "data.val=null"]
        + [f"model.pretrained={root / 'base.pt'}", LORA, "optim.lr=0.05", "optim.warmup=0ba", "optim.weight_decay=0"],
    )
    trainer = Trainer(cfg)
    trainer.fit()
    torch.set_num_threads(threads)
    return root / "base.pt", trainer, trainer.run_dir / "checkpoints" / "ep0-ba2.pt"


def test_merged_export_equals_the_adapted_model_in_open_clip(lora_run, tmp_path):
    base, trainer, checkpoint = lora_run
    model = trainer.state.model.eval()
    out = tmp_path / "merged"
    assert composer(["export", str(checkpoint), "--format", "openclip", str(out)]) == 0
    weights = load_file(str(out / "open_clip_model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in weights)  # plain weights, adapters folded in
    assert_same_embeddings(model, open_clip.create_model(f"local-dir:{out}"))
    assert not torch.equal(embeddings(model)[0], embeddings(create_model("tiny-vit", pretrained=str(base)))[0])


def test_adapter_only_export_rebuilds_the_adapted_model_on_its_base(lora_run, tmp_path):
    base, trainer, checkpoint = lora_run
    out = tmp_path / "adapter"
    assert composer(["export", str(checkpoint), "--format", "lora", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "cadenza_base.json",
    ]
    adapters = load_file(str(out / "adapter_model.safetensors"))
    assert len(adapters) == 28 and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    assert json.loads((out / "cadenza_base.json").read_text())["pretrained"] == str(base)
    rebuilt = create_model("tiny-vit", pretrained=str(base))
    load_lora_adapter(rebuilt, out)
    for got, expected in zip(embeddings(rebuilt.eval()), embeddings(trainer.state.model.eval()), strict=True):
        assert torch.equal(got, expected)


def test_wise_ft_export_at_0_and_1_is_the_base_and_the_fine_tuned_model(lora_run, tmp_path):
    base, _, checkpoint = lora_run
    for alpha in ("0", "0.5", "1"):
        assert (
            composer(["export", str(checkpoint), "--format", "openclip", "--wise-ft", alpha, str(tmp_path / alpha)])
            == 0
        )
    assert composer(["export", str(checkpoint), "--format", "openclip", str(tmp_path / "plain")]) == 0
    ends = {
        name: load_file(str(tmp_path / name / "open_clip_model.safetensors")) for name in ("0", "0.5", "1", "plain")
    }
    zero_shot = torch.load(base, weights_only=True)
    for key, value in zero_shot.items():
        assert torch.equal(ends["0"][key], value), key
        assert torch.equal(ends["1"][key], ends["plain"][key]), key
        torch.testing.assert_close(ends["0.5"][key], (value + ends["plain"][key]) / 2, rtol=1e-6, atol=1e-7)
    assert composer(["export", str(checkpoint), "--format", "openclip", "--wise-ft", "1.5", str(tmp_path / "x")]) == 2


def zero_shot_folder(root):
    for name, color in {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}.items():
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((12, 12, 3), color, np.uint8)).save(root / name / f"{i}.png")
    return root


def printed_metrics(text: str) -> dict[str, float]:
    return {line.split(": ")[0]: float(line.split(": ")[1]) for line in text.splitlines() if ": " in line}


def test_wise_ft_evaluation_prints_each_alpha_and_its_ends_are_the_two_models(lora_run, tmp_path, capsys):
    base, _, checkpoint = lora_run
    common = [
        str(TINY),
        f"run.logs={tmp_path}",
        "data.val.num_samples=32",
        f"eval.zero_shot.path={zero_shot_folder(tmp_path / 'colors')}",
        "eval.zero_shot.templates=['a {} square']",
        f"model.pretrained={base}",
    ]
    assert composer(["eval", *common, "run.name=base"]) == 0
    zero_shot = printed_metrics(capsys.readouterr().out)
    assert composer(["eval", *common, "run.name=tuned", LORA, f"checkpoint.resume={checkpoint}"]) == 0
    tuned = printed_metrics(capsys.readouterr().out)
    assert composer(["eval", *common, "run.name=plain", f"checkpoint.resume={checkpoint}"]) == 2  # LoRA left out
    error = capsys.readouterr().err
    assert "holds LoRA adapters and this run has none: add the run's algorithms.lora='{rank: 4, alpha: 8" in error
    sweep = ["eval", *common, "run.name=sweep", f"checkpoint.resume={checkpoint}", "--wise-ft", "0,0.5,1"]
    assert composer(sweep) == 0
    header, *rows = capsys.readouterr().out.splitlines()[1:]
    names = header.split()
    table = {float(row.split()[0]): dict(zip(names[1:], map(float, row.split()[1:]), strict=True)) for row in rows}
    assert sorted(table) == [0.0, 0.5, 1.0] and "val/imagenet-zeroshot-val-top1" in names
    for name, value in table[0.0].items():
        assert value == pytest.approx(zero_shot[name], abs=1e-4), name  # printed to 4 places
    for name, value in table[1.0].items():  # merged weights against base + adapters: float rounding apart
        assert value == pytest.approx(tuned[name], abs=2e-4), name
    assert table[0.0]["val/clip_val_loss"] != table[1.0]["val/clip_val_loss"]
    assert composer([*sweep[:-1], "0,2"]) == 2 and "--wise-ft" in capsys.readouterr().err
    assert parse_alphas("0, 0.25,1") == [0.0, 0.25, 1.0]


def test_a_lora_run_resumes_exactly(tiny):
    common = ("data.val=null", "run.duration=4ba", "checkpoint.save_interval=2ba", LORA, "optim.name=nadamw")
    straight = Trainer(tiny(*common, "run.name=straight"))
    expected = straight.fit().model.state_dict()
    checkpoint = straight.run_dir / "checkpoints" / "ep0-ba2.pt"
    resumed = Trainer(tiny(*common, "run.name=resumed", f"checkpoint.resume={checkpoint}")).fit()
    got = resumed.model.state_dict()
    assert any(".lora_B." in k for k in got) and got.keys() == expected.keys()
    for name, value in got.items():
        assert torch.equal(value, expected[name]), name
    assert "lora: rank 4, alpha 8 on 8 image, 6 text layers: 14,336 of" in (straight.run_dir / "out.log").read_text()
