"""Every architecture gives OpenCLIP 3.3.0's embeddings, in both directions of weight conversion.

For each architecture an ``open_clip`` model with random weights is converted and loaded into the Cadenza model
(``encode_image`` / ``encode_text`` must agree to 1e-4 relative, fp32, a batch of 2); then the Cadenza model is
exported and loaded into that ``open_clip`` model (whose weights were scrambled first, so the load has to put every
tensor back) with no missing or unexpected keys, and must agree again. The architecture's sizes must equal
OpenCLIP's own model config. Each model is built once; the Cadenza one on the meta device, since every tensor comes
from the conversion.

CoCa (``tiny-coca`` and ``coca_ViT-B-32``, one batch of 2) is checked the same way, plus the decoder's captioning logits
of ``forward`` and, on the tiny one, greedy captions equal to OpenCLIP's ``generate(generation_type="top_k", top_k=1)``.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from cadenza.models import create_model, get_tokenizer
from cadenza.models.convert import (
    OPENCLIP_NAMES,
    cadenza_to_openclip,
    image_tower_kind,
    openclip_model_config,
    openclip_to_cadenza,
)

open_clip = pytest.importorskip("open_clip")
from open_clip.coca_model import MultimodalCfg  # noqa: E402
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402

TINY = ("tiny-vit", "tiny-rn", "tiny-convnext")
COCA = ("tiny-coca", "coca_ViT-B-32")
CLIP_NAMES = sorted(OPENCLIP_NAMES - set(COCA))
CAPTIONS = ["a photo of a cat", "an émoji 🐈 &amp; a much longer caption, with punctuation: 3 dogs!"]
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _quiet_open_clip():
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns on every randomly initialised model
    yield
    logging.getLogger().setLevel(logging.WARNING)


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return ((expected - actual).abs().max() / expected.abs().max()).item()


def build_cadenza(name: str) -> nn.Module:
    with torch.device("meta"):
        return create_model(name).eval()


def build_openclip(name: str, cadenza_meta: nn.Module) -> nn.Module:
    """OpenCLIP's model by name; the tiny architectures (not OpenCLIP names) from the config we translate."""
    if name in OPENCLIP_NAMES:
        return open_clip.create_model(name, pretrained=None).eval()
    config = openclip_model_config(cadenza_meta)
    if config.pop("custom_text", False):  # open_clip.create_model's switch to CoCa / CustomTextCLIP
        return open_clip.CoCa(**config).eval()
    return open_clip.CLIP(**config).eval()


def test_every_openclip_name_is_an_architecture():
    assert OPENCLIP_NAMES <= set(open_clip.list_models())
    from cadenza.models import list_models

    assert OPENCLIP_NAMES | set(TINY) | set(COCA) <= set(list_models())


def sample_images(size: int) -> torch.Tensor:
    """Noise and a smooth colour ramp: two images a working tower must tell apart."""
    ramp = torch.linspace(-2, 2, size)
    smooth = torch.stack(
        [ramp[None, :].expand(size, size), ramp[:, None].expand(size, size), -ramp[None, :].expand(size, size)]
    )
    return torch.stack([torch.randn(3, size, size), smooth])  # (2, 3, S, S)


@torch.no_grad()
def randomize_(model: nn.Module, images: torch.Tensor) -> None:
    """Random values in every tensor (OpenCLIP initialises biases, norms and each ResNet block's last BN weight to
    constants; matrices are random already), and BatchNorm statistics measured on ``images`` so that a random
    ResNet's features still depend on its input."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.ndim <= 1 and "running_" not in name:
            tensor.add_(torch.randn_like(tensor) * 0.02)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if norms:
        visual = model.visual  # OpenCLIP's ModifiedResNet: measure the statistics through its trunk
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
            norm.reset_running_stats()
            norm.momentum = None  # a plain average over the batch
        visual.train()
        visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
        visual.eval()


@torch.no_grad()
def scramble_(model: nn.Module) -> None:
    """Change every tensor, so that only a complete load can restore the model's outputs."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.mul_(1.5)


@pytest.mark.parametrize("name", CLIP_NAMES + list(TINY))
@torch.no_grad()
def test_openclip_parity(name):
    torch.manual_seed(0)
    cadenza = build_cadenza(name)
    reference = build_openclip(name, cadenza)
    size = cadenza.image_size
    images = sample_images(size)
    tokens = get_tokenizer(name, context_length=cadenza.context_length)(CAPTIONS)
    randomize_(reference, images)

    # The architecture is OpenCLIP's: the config we would export equals OpenCLIP's own.
    if name in OPENCLIP_NAMES:
        ours, theirs = openclip_model_config(cadenza), open_clip.get_model_config(name)
        assert CLIPVisionCfg(**ours["vision_cfg"]) == CLIPVisionCfg(**theirs["vision_cfg"])
        assert CLIPTextCfg(**ours["text_cfg"]) == CLIPTextCfg(**theirs["text_cfg"])
        assert (ours["embed_dim"], ours["quick_gelu"]) == (theirs["embed_dim"], theirs.get("quick_gelu", False))

    # OpenCLIP -> Cadenza: every tensor is assigned (strict), and the embeddings agree.
    converted = openclip_to_cadenza(reference.state_dict(), cadenza)
    cadenza.load_state_dict({k: v.clone() for k, v in converted.items()}, strict=True, assign=True)
    expected_image, expected_text = reference.encode_image(images), reference.encode_text(tokens)
    image, text = cadenza.encode_image(images), cadenza.encode_text(tokens)
    assert relative_error(expected_image[0], expected_image[1]) > 1e-2, "the images should give different features"
    assert relative_error(expected_image, image) <= TOLERANCE, image_tower_kind(cadenza.visual)
    assert relative_error(expected_text, text) <= TOLERANCE
    assert torch.equal(reference.logit_scale, cadenza.logit_scale)

    # Cadenza -> OpenCLIP: into the scrambled OpenCLIP model, every key matched, the same embeddings.
    scramble_(reference)
    assert relative_error(reference.encode_text(tokens), text) > 1e-2, "scrambling should change the model"
    result = reference.load_state_dict(cadenza_to_openclip(cadenza.state_dict(), cadenza), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert relative_error(image, reference.encode_image(images)) <= TOLERANCE
    assert relative_error(text, reference.encode_text(tokens)) <= TOLERANCE


@pytest.mark.parametrize("name", COCA)
@torch.no_grad()
def test_coca_openclip_parity(name, monkeypatch):
    torch.manual_seed(0)
    cadenza = build_cadenza(name)
    reference = build_openclip(name, cadenza)
    images = sample_images(cadenza.image_size)
    tokens = get_tokenizer(name, context_length=cadenza.context_length)(CAPTIONS)
    assert tokens.shape[1] == 76 if name == "coca_ViT-B-32" else 31
    randomize_(reference, images)
    reference.text_decoder.text_projection.normal_(std=0.05)  # OpenCLIP leaves it uninitialised (torch.empty)

    if name in OPENCLIP_NAMES:
        ours, theirs = openclip_model_config(cadenza), open_clip.get_model_config(name)
        assert CLIPVisionCfg(**ours["vision_cfg"]) == CLIPVisionCfg(**theirs["vision_cfg"])
        assert CLIPTextCfg(**ours["text_cfg"]) == CLIPTextCfg(**theirs["text_cfg"])
        assert MultimodalCfg(**ours["multimodal_cfg"]) == MultimodalCfg(**theirs["multimodal_cfg"])
        assert (ours["embed_dim"], ours["quick_gelu"]) == (theirs["embed_dim"], theirs.get("quick_gelu", False))

    # OpenCLIP -> Cadenza: embeddings, and the decoder's logits against the same labels.
    converted = openclip_to_cadenza(reference.state_dict(), cadenza)
    cadenza.load_state_dict({k: v.clone() for k, v in converted.items()}, strict=True, assign=True)
    expected, out = reference(images, tokens), cadenza(images, tokens)
    image, text = cadenza.encode_image(images), cadenza.encode_text(tokens)
    assert relative_error(reference.encode_image(images, normalize=False), image) <= TOLERANCE
    assert relative_error(reference.encode_text(tokens, normalize=False), text) <= TOLERANCE
    assert out["logits"].shape == (2, tokens.shape[1] - 1, 49408)
    for key in ("image_features", "text_features", "logits"):
        assert relative_error(expected[key], out[key]) <= TOLERANCE, key
    assert torch.equal(expected["labels"], out["labels"]) and torch.equal(expected["logit_scale"], out["logit_scale"])

    if name == "tiny-coca":  # greedy captions, token for token
        _enable_open_clip_generate(monkeypatch)
        assert torch.equal(reference.generate(images, generation_type="top_k", top_k=1), cadenza.generate(images))

    # Cadenza -> OpenCLIP: into the scrambled OpenCLIP model, every key matched, the same outputs.
    scramble_(reference)
    result = reference.load_state_dict(cadenza_to_openclip(cadenza.state_dict(), cadenza), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    back = reference(images, tokens)
    for key in ("image_features", "text_features", "logits"):
        assert relative_error(out[key], back[key]) <= TOLERANCE, key


def _enable_open_clip_generate(monkeypatch) -> None:
    """open_clip 3.3.0 disables ``generate`` when transformers lacks ``BeamSearchScorer`` (removed in 4.57), although
    greedy top-k decoding does not use it; give it the warper it needs."""
    from open_clip import coca_model
    from transformers import TopKLogitsWarper

    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", TopKLogitsWarper)


def test_openclip_initialisation_draws_like_openclips_vision_transformer():
    """A ViT tower starts as OpenCLIP's (the default, ``vision: {init: openclip}``): every image-tower tensor has the
    spread OpenCLIP's own initialisation gives it (timm's is std 0.02 everywhere), checked tensor by tensor through the
    weight conversion; ``init: timm`` keeps timm's."""
    torch.manual_seed(0)
    ours = create_model("tiny-vit")
    theirs = open_clip.CLIP(**openclip_model_config(ours)).state_dict()
    converted = cadenza_to_openclip(ours.state_dict(), ours)
    for key, value in theirs.items():
        if key.startswith("visual.") and value.numel() > 64:  # sample std of large tensors only
            assert converted[key].std().item() == pytest.approx(value.std().item(), rel=0.15), key
    qkv = "visual.trunk.blocks.0.attn.qkv.weight"
    torch.manual_seed(0)
    assert torch.equal(create_model("tiny-vit", vision={"init": "openclip"}).state_dict()[qkv], ours.state_dict()[qkv])
    timm_init = create_model("tiny-vit", vision={"init": "timm"}).state_dict()[qkv]
    assert timm_init.std().item() == pytest.approx(0.02, rel=0.1)
    create_model("tiny-rn")  # other towers keep timm's without being asked
    with pytest.raises(ValueError, match="not a ViT"):
        create_model("tiny-rn", vision={"init": "openclip"})
    with pytest.raises(ValueError, match="init must be one of"):
        create_model("tiny-vit", vision={"init": "xavier"})
