"""The architectures as data: every one builds from YAML and trains.

The tiny architecture of each tower family (ViT, ResNet, ConvNeXt, CoCa) trains 2 steps with the Trainer on synthetic
data. The OpenCLIP-sized ones take one forward/backward step on a synthetic batch of 2 (2 Trainer steps of ViT-L-14
take minutes on 2 CPU cores); their embeddings are checked against open_clip in test_model_parity.py. The
``-quickgelu`` variants differ from their GELU twins only in the activation (parity-tested), so they are not stepped;
nor is ``coca_ViT-B-32``, built like ``tiny-coca`` (every tensor of which trains here) and parity-tested in full.
"""

from __future__ import annotations

import pytest
import torch

from cadenza.datasets.context import LoaderContext
from cadenza.engine.errors import ConfigError
from cadenza.engine.registry import DATASETS, MODELS
from cadenza.models import create_model, get_model_config, list_models
from cadenza.models.convert import OPENCLIP_NAMES, image_tower_kind
from cadenza.models.losses import build_loss
from cadenza.train.trainer import Trainer

TINY = {"tiny-vit": "vit", "tiny-rn": "resnet", "tiny-convnext": "timm", "tiny-coca": "vit_attn_pool"}
#: the loss each model type trains with here
LOSS = {"clip": "clip", "coca": "coca"}


def test_every_architecture_is_listed_and_complete():
    assert set(list_models()) == OPENCLIP_NAMES | set(TINY)
    for name in list_models():
        arch = get_model_config(name)
        coca = arch["model_type"] == "coca"
        assert coca == ("coca" in name)
        assert len(arch["image_mean"]) == len(arch["image_std"]) == 3
        # CoCa's text tower adds its class token after the caption: 76 + 1 positions, as OpenCLIP's
        assert arch["text"]["context_length"] + coca == (77 if name in OPENCLIP_NAMES else 32)


def test_custom_architecture_from_overrides():
    model = create_model(
        "tiny-vit", embed_dim=16, vision={"image_size": 48, "timm_kwargs": {"depth": 1}}, text={"layers": 1}
    )
    assert model.visual.trunk.patch_embed.grid_size == (6, 6)  # img_size follows vision.image_size
    assert len(model.visual.trunk.blocks) == 1 and len(model.text.transformer.resblocks) == 1
    with torch.no_grad():
        assert model.encode_image(torch.randn(2, 3, 48, 48)).shape == (2, 16)


def test_architecture_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.overrides.embed_dimm.*Did you mean 'embed_dim'"):
        create_model("tiny-vit", embed_dimm=16)
    with pytest.raises(ConfigError, match="model.overrides.model_type.*unknown model_type 'clipp'.*'clip'"):
        create_model("tiny-vit", model_type="clipp")
    with pytest.raises(ConfigError, match="model.name.*Did you mean 'ViT-B-32'"):
        create_model("ViT-B-23")
    with pytest.raises(ConfigError, match="model.overrides"):
        create_model("tiny-vit", vision={"proj": "mlp"})


@pytest.mark.parametrize("name", TINY)
def test_tiny_architecture_trains_two_steps_from_yaml(name, tiny):
    loss = LOSS[get_model_config(name)["model_type"]]
    overrides = ("data.batch_size=4", "run.duration=2ba", "data.val=null", "optim.warmup=1ba")
    cfg = tiny(f"model.name={name}", f"loss.name={loss}", *overrides)
    trainer = Trainer(cfg)
    assert image_tower_kind(trainer.state.model.visual) == TINY[name]
    before = {k: v.clone() for k, v in trainer.state.model.state_dict().items()}
    state = trainer.fit()
    assert state.timestamp.batch == 2 and torch.isfinite(state.loss)
    changed = [
        k for k, v in state.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])
    ]
    assert "visual.trunk.pos_embed" in changed or any(k.startswith("visual.trunk.stem") for k in changed)
    assert "text.token_embedding.weight" in changed and "logit_scale" in changed
    if loss == "coca":  # every tensor trains: the pooler, the class token, the decoder (as coca_ViT-B-32's would)
        assert set(changed) == {k for k, v in before.items() if v.is_floating_point()}
        assert set(state.loss_dict) == {"contrastive_loss", "caption_loss"}


@pytest.mark.parametrize("name", sorted(n for n in OPENCLIP_NAMES if not n.endswith("-quickgelu") and "coca" not in n))
def test_openclip_architecture_forward_backward(name, tiny):
    """One step's forward and backward of the model ``model.name=<name>`` builds, on a synthetic batch of 2: every
    parameter gets a finite gradient from the loss it trains with."""
    loss = LOSS[get_model_config(name)["model_type"]]
    cfg = tiny(f"model.name={name}", f"loss.name={loss}", "data.batch_size=2")
    torch.manual_seed(0)
    model = MODELS.build(cfg.model.name, {"pretrained": None, "overrides": {}}, "model")
    context = LoaderContext(train=False, batch_size=2, **_sizes(model))
    data = DATASETS.build("synthetic", {"num_samples": 2}, "data.train", context=context)
    images, tokens = next(iter(data))
    losses = build_loss(loss)(**model(images, tokens))
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


def _sizes(model) -> dict[str, int]:
    return {"image_size": model.image_size, "context_length": model.context_length, "vocab_size": model.vocab_size}
