"""``composer export CHECKPOINT --format openclip OUT`` end to end: train, export, load in open_clip, compare."""

from __future__ import annotations

import json

import pytest
import torch

from cadenza.models import create_model, get_tokenizer
from cadenza.train.cli import main as composer
from cadenza.train.config import load_config, to_yaml
from cadenza.train.trainer import Trainer

from .conftest import TINY

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny-vit trained 2 steps by the Trainer: (its model, its checkpoint)."""
    logs = tmp_path_factory.mktemp("logs")
    cfg = load_config(
        TINY,
        [f"run.logs={logs}", "run.name=export", "run.duration=2ba", "checkpoint.save_interval=2ba", "data.val=null"],
    )
    state = Trainer(cfg).fit()
    return state.model.eval(), logs / "export" / "checkpoints" / "ep0-ba2.pt"


@torch.no_grad()
def assert_same_embeddings(cadenza_model, openclip_model) -> None:
    torch.manual_seed(0)
    size = cadenza_model.image_size
    images = torch.randn(2, 3, size, size)
    tokens = get_tokenizer(context_length=cadenza_model.context_length)(["a diagram", "a dog"])
    openclip_model.eval()
    torch.testing.assert_close(
        openclip_model.encode_image(images), cadenza_model.encode_image(images), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        openclip_model.encode_text(tokens), cadenza_model.encode_text(tokens), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(openclip_model.logit_scale, cadenza_model.logit_scale)


def test_export_to_a_folder_loads_in_open_clip(trained, tmp_path):
    model, checkpoint = trained
    out = tmp_path / "tiny-vit-openclip"
    assert composer(["export", str(checkpoint), "--format", "openclip", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["mean"] == list(model.image_mean)
    assert_same_embeddings(model, open_clip.create_model(f"local-dir:{out}"))  # strict: no missing/unexpected keys


def test_export_to_a_file_loads_by_name(trained, tmp_path):
    """``open_clip.create_model(name, pretrained=OUT)``: tiny-vit becomes a name once its config is registered."""
    model, checkpoint = trained
    assert composer(["export", str(checkpoint), "--format", "openclip", str(tmp_path / "folder")]) == 0
    model_cfg = json.loads((tmp_path / "folder" / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "tiny-vit.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp_path / "tiny-vit.json")
    for out in (tmp_path / "tiny.pt", tmp_path / "tiny.safetensors"):
        assert composer(["export", str(checkpoint), "--format", "openclip", str(out)]) == 0
        assert_same_embeddings(model, open_clip.create_model("tiny-vit", pretrained=str(out)))


def test_export_of_an_openclip_architecture(tmp_path):
    """A checkpoint of an OpenCLIP architecture (RN50: BatchNorm statistics and an attention pool) loads into
    ``open_clip.create_model("RN50", pretrained=OUT)``; the checkpoint holds what the Trainer stores."""
    torch.manual_seed(0)
    model = create_model("RN50").eval()
    cfg = load_config(TINY, ["model.name=RN50"])
    torch.save({"state_dict": model.state_dict(), "config": to_yaml(cfg)}, tmp_path / "rn50.pt")
    out = tmp_path / "rn50-openclip.bin"
    assert composer(["export", str(tmp_path / "rn50.pt"), "--format", "openclip", str(out)]) == 0
    (tmp_path / "rn50.pt").unlink()  # 400 MB each: pytest keeps the last runs' folders
    assert_same_embeddings(model, open_clip.create_model("RN50", pretrained=str(out)))
    out.unlink()


def test_export_errors(tmp_path, capsys):
    assert composer(["export", str(tmp_path / "missing.pt"), "--format", "openclip", str(tmp_path / "o.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    assert composer(["export", str(tmp_path / "foreign.pt"), "--format", "openclip", str(tmp_path / "o.pt")]) == 1
    assert "not a Cadenza training checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        composer(["export", str(tmp_path / "foreign.pt"), "--format", "onnx", str(tmp_path / "o.pt")])


def test_export_keeps_the_normalization_of_the_pretrained_tag(trained, tmp_path, monkeypatch):
    """A run started from a tag with its own mean/std (ViT-L-14 laion2b_s32b_b82k: 0.5) exports that mean/std."""
    from cadenza.models import pretrained

    monkeypatch.setattr(
        pretrained, "pretrained_tags", lambda: {"tiny-vit": {"halves": {"mean": [0.5] * 3, "std": [0.5] * 3}}}
    )
    model, _ = trained
    cfg = load_config(TINY, ["model.pretrained=halves"])
    torch.save({"state_dict": model.state_dict(), "config": to_yaml(cfg)}, tmp_path / "run.pt")
    assert composer(["export", str(tmp_path / "run.pt"), "--format", "openclip", str(tmp_path / "out")]) == 0
    preprocess = json.loads((tmp_path / "out" / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert preprocess["mean"] == preprocess["std"] == [0.5] * 3


@torch.no_grad()
def assert_same_coca_outputs(cadenza_model, openclip_model) -> None:
    """Normalized embeddings and the decoder's captioning logits (OpenCLIP's CoCa normalizes by default)."""
    torch.manual_seed(0)
    size = cadenza_model.image_size
    images = torch.randn(2, 3, size, size)
    tokens = get_tokenizer(context_length=cadenza_model.context_length)(["a diagram", "a dog on a red sofa"])
    expected, actual = openclip_model.eval()(images, tokens), cadenza_model.eval()(images, tokens)
    for key in ("image_features", "text_features", "logits", "logit_scale"):
        torch.testing.assert_close(expected[key], actual[key], rtol=1e-4, atol=1e-5, msg=key)


def test_export_of_a_trained_coca(tmp_path):
    """tiny-coca trained 2 steps with loss.name=coca, exported to a folder: OpenCLIP builds a CoCa from its config."""
    cfg = load_config(
        TINY,
        [f"run.logs={tmp_path}", "run.name=coca", "model.name=tiny-coca", "loss.name=coca", "run.duration=2ba"]
        + ["checkpoint.save_interval=2ba", "data.val=null"],
    )
    model = Trainer(cfg).fit().model
    out = tmp_path / "tiny-coca-openclip"
    assert composer(["export", str(tmp_path / "coca/checkpoints/ep0-ba2.pt"), "--format", "openclip", str(out)]) == 0
    loaded = open_clip.create_model(f"local-dir:{out}")
    assert type(loaded).__name__ == "CoCa"
    assert_same_coca_outputs(model, loaded)


def test_export_of_coca_vit_b_32_loads_by_name(tmp_path):
    """``open_clip.create_model("coca_ViT-B-32", pretrained=OUT)`` loads the export strictly (no missing or
    unexpected keys) and gives the same outputs."""
    torch.manual_seed(0)
    model = create_model("coca_ViT-B-32").eval()
    cfg = load_config(TINY, ["model.name=coca_ViT-B-32", "loss.name=coca"])
    torch.save({"state_dict": model.state_dict(), "config": to_yaml(cfg)}, tmp_path / "coca.pt")
    out = tmp_path / "coca-openclip.safetensors"
    assert composer(["export", str(tmp_path / "coca.pt"), "--format", "openclip", str(out)]) == 0
    (tmp_path / "coca.pt").unlink()  # 1 GB each: pytest keeps the last runs' folders
    loaded = open_clip.create_model("coca_ViT-B-32", pretrained=str(out))
    out.unlink()
    assert_same_coca_outputs(model, loaded)


def test_export_reads_the_stored_config_as_data(trained, tmp_path, capsys, monkeypatch):
    """A stored config is never resolved (no secret from the environment) and never constructs Python objects."""
    from cadenza.engine.checkpoint import load_checkpoint

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-never-printed")
    checkpoint = load_checkpoint(trained[1])
    assert "name: tiny-vit" in checkpoint["config"]
    checkpoint["config"] = checkpoint["config"].replace("name: tiny-vit", "name: ${oc.env:AWS_SECRET_ACCESS_KEY}", 1)
    torch.save(checkpoint, tmp_path / "interpolating.pt")
    assert composer(["export", str(tmp_path / "interpolating.pt"), "--format", "openclip", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert "s3cr3t" not in captured.out + captured.err and "oc.env:AWS_SECRET_ACCESS_KEY" in captured.err

    marker = tmp_path / "constructed"
    checkpoint["config"] = (
        f"model: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]"
    )
    torch.save(checkpoint, tmp_path / "tagged.pt")
    assert composer(["export", str(tmp_path / "tagged.pt"), "--format", "openclip", str(tmp_path / "o")]) == 1
    assert "not plain YAML data" in capsys.readouterr().err
    assert not marker.exists()
