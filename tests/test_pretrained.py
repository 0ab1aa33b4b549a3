"""``model.pretrained``: OpenCLIP files in every layout, Cadenza checkpoints, s3:// URIs (moto's real server),
OpenCLIP tags (Hub cache, offline and unreachable), position-embedding resizing against OpenCLIP's own, and errors.

OpenCLIP checkpoints are made by ``open_clip`` itself (``open_clip.CLIP`` of the tiny architectures' configs)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from cadenza.engine.errors import ConfigError
from cadenza.models import create_model, get_tokenizer, list_pretrained_tags
from cadenza.models import pretrained as pretrained_module
from cadenza.models.convert import OPENCLIP_NAMES, openclip_model_config

from .s3 import free_port

open_clip = pytest.importorskip("open_clip")

CAPTIONS = ["a diagram", "a dog on a beach"]


def openclip_twin(name: str, **overrides) -> torch.nn.Module:
    """An open_clip model of Cadenza architecture ``name``, with open_clip's random initialisation."""
    with torch.device("meta"):
        config = openclip_model_config(create_model(name, **overrides))
    torch.manual_seed(1)
    return open_clip.CLIP(**config).eval()


def embeddings(model, image_size: int, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    images = torch.randn(2, 3, image_size, image_size)
    tokens = get_tokenizer(context_length=context_length)(CAPTIONS)
    with torch.no_grad():
        return model.eval().encode_image(images), model.encode_text(tokens)


def assert_same_embeddings(reference, model) -> None:
    expected = embeddings(reference, model.image_size, model.context_length)
    actual = embeddings(model, model.image_size, model.context_length)
    for mine, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def reference():
    return openclip_twin("tiny-vit")


@pytest.mark.parametrize("layout", ["training.pt", "bare.pt", "module.pt", "pytorch_model.bin", "model.safetensors"])
def test_openclip_file_layouts(reference, layout, tmp_path):
    state = reference.state_dict()
    path = tmp_path / layout
    if layout == "training.pt":  # what open_clip_train saves (DDP keys included)
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif layout == "module.pt":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif layout.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    assert_same_embeddings(reference, create_model("tiny-vit", pretrained=str(path)))


@pytest.mark.parametrize("name", ["tiny-rn", "tiny-convnext"])
def test_openclip_files_of_other_towers(name, tmp_path):
    reference = openclip_twin(name)
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    assert_same_embeddings(reference, create_model(name, pretrained=str(tmp_path / "model.pt")))


def test_openclip_coca_file(tmp_path):
    """An open_clip_train CoCa checkpoint (DDP keys) loads into tiny-coca: the same features and captioning logits;
    a Cadenza CoCa's own state dict loads back as it is."""
    with torch.device("meta"):
        config = openclip_model_config(create_model("tiny-coca"))
    config.pop("custom_text")
    torch.manual_seed(1)
    reference = open_clip.CoCa(**config).eval()
    with torch.no_grad():
        reference.text_decoder.text_projection.normal_(std=0.05)  # open_clip leaves it uninitialised
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "coca.pt")
    model = create_model("tiny-coca", pretrained=str(tmp_path / "coca.pt")).eval()
    images, tokens = torch.randn(2, 3, 32, 32), get_tokenizer(context_length=model.context_length)(CAPTIONS)
    with torch.no_grad():
        expected, actual = reference(images, tokens), model(images, tokens)
        for key in ("image_features", "text_features", "logits"):
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5)
        torch.save(model.state_dict(), tmp_path / "cadenza.pt")
        again = create_model("tiny-coca", pretrained=str(tmp_path / "cadenza.pt")).eval()
        torch.testing.assert_close(again(images, tokens)["logits"], actual["logits"])


def test_cadenza_checkpoint_through_the_yaml_key(tiny, tmp_path):
    """A Cadenza training checkpoint as ``model.pretrained`` of a new run: the new run starts from its weights."""
    from cadenza.train.trainer import Trainer

    trained = Trainer(tiny("run.duration=2ba", "checkpoint.save_interval=2ba", "data.val=null", "run.name=first")).fit()
    checkpoint = tmp_path / "logs" / "first" / "checkpoints" / "ep0-ba2.pt"
    second = Trainer(tiny("run.name=second", f"model.pretrained={checkpoint}", "data.val=null"))
    for key, value in trained.model.state_dict().items():
        assert torch.equal(second.state.model.state_dict()[key], value), key


def test_positions_resize_like_open_clip(reference, tmp_path):
    """A 32 px / 32-token checkpoint in a 48 px / 24-token model: the same interpolation as OpenCLIP's loader."""
    path = tmp_path / "model.pt"
    torch.save(reference.state_dict(), path)
    model = create_model("tiny-vit", pretrained=str(path), vision={"image_size": 48}, text={"context_length": 24})
    assert model.visual.trunk.pos_embed.shape[1] == 6 * 6 + 1
    resized = openclip_twin("tiny-vit", vision={"image_size": 48}, text={"context_length": 24})
    open_clip.load_checkpoint(resized, str(path))  # open_clip's resize_pos_embed and resize_text_pos_embed
    assert_same_embeddings(resized, model)


def test_attention_pool_positions_resize(tmp_path):
    reference = openclip_twin("tiny-rn")
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    model = create_model("tiny-rn", pretrained=str(tmp_path / "model.pt"), vision={"image_size": 96})
    assert model.visual.trunk.head.pos_embed.shape == (3 * 3 + 1, 256)
    image, _ = embeddings(model, 96, model.context_length)
    assert torch.isfinite(image).all()


def test_s3_uri_downloads_once_into_the_cache(reference, s3_bucket, moto_server, tmp_path, monkeypatch):
    monkeypatch.setenv("CADENZA_CACHE", str(tmp_path / "cache"))
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "model.pt")
    moto_server.client().upload_file(str(tmp_path / "model.pt"), s3_bucket, "weights/model.pt")
    uri = f"s3://{s3_bucket}/weights/model.pt"
    assert_same_embeddings(reference, create_model("tiny-vit", pretrained=uri))
    cached = tmp_path / "cache" / "s3" / s3_bucket / "weights" / "model.pt"
    assert cached.read_bytes() == (tmp_path / "model.pt").read_bytes()

    from cadenza.engine import object_store

    def no_download(*args, **kwargs):
        raise AssertionError("a cached file of the same size is not downloaded again")

    monkeypatch.setattr(object_store.S3Store, "download", no_download)
    assert_same_embeddings(reference, create_model("tiny-vit", pretrained=uri))


def test_s3_uri_that_does_not_exist(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("CADENZA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="does not exist") as error:
        create_model("tiny-vit", pretrained=f"s3://{s3_bucket}/missing.pt")
    assert error.value.key == "model.pretrained"


# -- OpenCLIP tags --------------------------------------------------------------------------------------------------
def test_tag_table_matches_open_clip():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.pretrained import get_pretrained_cfg

    for name in OPENCLIP_NAMES:
        assert list_pretrained_tags(name) == open_clip.list_pretrained_tags_by_model(name), name
        for tag, entry in pretrained_module.pretrained_tags()[name].items():
            theirs = get_pretrained_cfg(name, tag)
            assert entry["hf_hub"] == theirs["hf_hub"].rstrip("/"), (name, tag)
            assert entry.get("quick_gelu", False) == theirs.get("quick_gelu", False), (name, tag)
            assert tuple(entry.get("mean", OPENAI_DATASET_MEAN)) == tuple(theirs.get("mean", OPENAI_DATASET_MEAN))
            assert tuple(entry.get("std", OPENAI_DATASET_STD)) == tuple(theirs.get("std", OPENAI_DATASET_STD))


def test_offline_tag_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.monotonic()
    with pytest.raises(ConfigError, match="pass its path") as error:
        create_model("ViT-L-14", pretrained="laion2b_s32b_b82k")
    assert time.monotonic() - started < 2  # before the 428M-parameter model is built
    assert error.value.key == "model.pretrained"
    assert "huggingface.co/laion/CLIP-ViT-L-14-laion2B-s32B-b82K" in str(error.value)


def test_unreachable_hub_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach the Hugging Face Hub.*pass its path"):
        create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert time.monotonic() - started < 2


def test_tag_from_the_hub_cache_offline(reference, monkeypatch, tmp_path, caplog):
    """A tag already in the Hub cache (downloaded earlier, by Cadenza or open_clip) loads offline, with the tag's
    image normalization; a QuickGELU tag on a GELU architecture warns. The table gets a test entry for tiny-vit."""
    repo, commit = "cadenza-test/tiny-vit", "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "hub" / "models--cadenza-test--tiny-vit"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    torch.save(reference.state_dict(), folder / "snapshots" / commit / "open_clip_pytorch_model.bin")
    table = {"tiny-vit": {"testtag": {"hf_hub": repo, "quick_gelu": True, "mean": [0.5] * 3, "std": [0.25] * 3}}}
    monkeypatch.setattr(pretrained_module, "pretrained_tags", lambda: table)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with caplog.at_level(logging.WARNING):
        model = create_model("tiny-vit", pretrained="testtag")
    assert_same_embeddings(reference, model)
    assert (model.image_mean, model.image_std) == ((0.5,) * 3, (0.25,) * 3)
    assert "model.name=tiny-vit-quickgelu" in caplog.text
    # a distillation teacher's warning names the teacher's key, and its load errors the teacher's weights key
    from cadenza.algorithms.distillation import build_teacher

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_teacher("tiny-vit", "testtag", torch.device("cpu"), torch.float32)
    assert "use algorithms.distillation.teacher=tiny-vit-quickgelu" in caplog.text
    with pytest.raises(ConfigError) as info:
        build_teacher("tiny-vit", "testtagg", torch.device("cpu"), torch.float32)
    assert info.value.key == "algorithms.distillation.pretrained" and "Did you mean 'testtag'" in str(info.value)


def test_unknown_tag_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'laion2b_s34b_b79k'"):
        create_model("ViT-B-32", pretrained="laion2b_s34b_b97k")


# -- errors ---------------------------------------------------------------------------------------------------------
def test_weights_of_another_architecture(reference, tmp_path):
    torch.save(reference.state_dict(), tmp_path / "vit.pt")
    with pytest.raises(ConfigError, match="does not fit this architecture") as error:
        create_model("tiny-vit", pretrained=str(tmp_path / "vit.pt"), embed_dim=16)
    assert "model.name" in str(error.value)


def test_unreadable_and_foreign_files(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        create_model("tiny-vit", pretrained=str(tmp_path / "garbage.pt"))
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match="neither OpenCLIP nor Cadenza"):
        create_model("tiny-vit", pretrained=str(tmp_path / "foreign.pt"))
    with pytest.raises(ConfigError, match="is a folder"):
        create_model("tiny-vit", pretrained=str(tmp_path))


def test_pickles_are_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "executed",))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="cannot read"):
        create_model("tiny-vit", pretrained=str(tmp_path / "evil.pt"))
    assert not (tmp_path / "executed").exists()
