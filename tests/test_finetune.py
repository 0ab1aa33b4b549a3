"""Fine-tuning controls: parameter-group rules and layer-wise LR decay (checked by hand), timm's optimizers (each
resumes exactly from a checkpoint), the errors that name their key, SigLIP's logit bias, the digits variants."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cadenza.datasets.digits import to_png
from cadenza.engine import Callback, ConfigError
from cadenza.engine.checkpoint import load_checkpoint, save_atomic
from cadenza.engine.optim import build_optimizer, build_scheduler, resolve_param_groups
from cadenza.engine.state import State
from cadenza.models import create_model
from cadenza.models.clip import layer_decay_scales
from cadenza.models.convert import cadenza_to_openclip
from cadenza.models.losses import ClipLoss, apply_logit_bias_choice, model_init_overrides
from cadenza.train.config import OptimConfig
from cadenza.train.trainer import Trainer

from .optimizer_settings import OPTIMIZER_SETTINGS


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a loaded 2-core machine: one thread is several times faster than two that contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def optim(**settings) -> OmegaConf:
    """The ``optim`` section with the schema's defaults and ``settings``."""
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), {"lr": 1e-3, "weight_decay": 0.1, **settings})


def groups_by_name(groups) -> dict[str, tuple[float, float]]:
    return {name: (group.lr_scale, group.weight_decay) for group in groups for name in group.names}


# -- parameter groups -------------------------------------------------------------------------------
def test_rules_freeze_scale_and_decay_by_hand():
    model = create_model("tiny-vit")
    rules = [
        {"match": "text.token_embedding.*", "frozen": True},
        {"regex": r"^visual\.trunk\.blocks\.1\.", "lr_scale": 0.5},
        {"match": "visual.trunk.blocks.*", "lr_scale": 0.1, "weight_decay": 0.0},  # block 0 only: 1 is taken above
        {"match": "logit_scale", "lr_scale": 10.0, "weight_decay": 0.05},
    ]
    groups = resolve_param_groups(optim(param_groups=rules), model)
    got = groups_by_name(groups)
    assert not model.text.token_embedding.weight.requires_grad and "text.token_embedding.weight" not in got
    # the first matching rule wins; a rule's weight decay replaces OpenCLIP's rule, an unset one keeps it
    assert got["visual.trunk.blocks.1.attn.qkv.weight"] == (0.5, 0.1)
    assert got["visual.trunk.blocks.1.attn.qkv.bias"] == (0.5, 0.0)
    assert got["visual.trunk.blocks.0.attn.qkv.weight"] == (0.1, 0.0)
    assert got["logit_scale"] == (10.0, 0.05)
    assert got["visual.proj.weight"] == (1.0, 0.1) and got["text.ln_final.bias"] == (1.0, 0.0)
    assert len(got) == sum(p.requires_grad for p in model.parameters())
    optimizer = build_optimizer(optim(param_groups=rules), model, groups)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(model.logit_scale)] == pytest.approx(1e-2)
    assert lrs[id(model.visual.trunk.blocks[0].attn.qkv.weight)] == pytest.approx(1e-4)


def test_layer_decay_follows_the_towers_block_order():
    model = create_model("tiny-vit")  # image: stem, block 0, block 1 + final norm, projection; text likewise
    scales = {name: scale for name, (_, scale) in layer_decay_scales(model, {"image": 0.5, "text": 0.8}).items()}
    assert scales["visual.trunk.patch_embed.proj.weight"] == scales["visual.trunk.cls_token"] == 0.5**3
    assert scales["visual.trunk.blocks.0.mlp.fc1.weight"] == 0.5**2
    assert scales["visual.trunk.blocks.1.mlp.fc1.weight"] == scales["visual.trunk.norm.weight"] == 0.5
    assert scales["visual.proj.weight"] == 1.0
    assert scales["text.token_embedding.weight"] == scales["text.positional_embedding"] == pytest.approx(0.8**3)
    assert scales["text.transformer.resblocks.0.attn.in_proj_weight"] == pytest.approx(0.8**2)
    assert scales["text.transformer.resblocks.1.mlp.c_fc.weight"] == scales["text.ln_final.weight"] == 0.8
    assert scales["text.text_projection"] == 1.0 and "logit_scale" not in scales
    # a rule's lr_scale multiplies the layer's
    rules = [{"match": "visual.trunk.blocks.0.*", "lr_scale": 2.0}]
    got = groups_by_name(
        resolve_param_groups(optim(param_groups=rules), model, layer_decay_scales(model, {"image": 0.5}))
    )
    assert got["visual.trunk.blocks.0.mlp.fc1.weight"] == (0.5, 0.1) and got["logit_scale"] == (1.0, 0.0)


def test_rules_that_match_nothing_are_errors_naming_them():
    model = create_model("tiny-vit")
    with pytest.raises(ConfigError, match=r"optim\.param_groups\.1.*matches no parameter"):
        resolve_param_groups(
            optim(param_groups=[{"match": "visual.*", "lr_scale": 0.5}, {"match": "vision.*", "frozen": True}]), model
        )
    with pytest.raises(ConfigError, match=r"optim\.param_groups\.1.*taken by an earlier rule"):
        resolve_param_groups(
            optim(param_groups=[{"match": "*", "lr_scale": 0.5}, {"regex": "^text", "frozen": True}]), model
        )


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["optim.name=lamm"], "optim.name", "Did you mean 'lamb'"),
        (["optim.name=adahessian"], "optim.name", "second-order"),
        (["optim.name=sgd", "optim.args={momentun: 0.9}"], "optim.args.momentun", "Did you mean 'momentum'"),
        (["optim.args={lr: 0.1}"], "optim.args.lr", "set optim.lr"),
        (["optim.name=sgd", "optim.betas=[0.8, 0.9]"], "optim.betas", "takes no betas"),
        (["optim.name=lion", "optim.fused=true"], "optim.fused", "only applies to optim.name=adamw"),
        (["optim.name=adan"], "optim.betas", "takes 3 numbers"),
        (["optim.layer_decay={imag: 0.7}"], "optim.layer_decay.imag", "Did you mean 'image'"),
        (["optim.layer_decay={text: 1.5}"], "optim.layer_decay.text", "in (0, 1]"),
        (["optim.param_groups=[{match: a, regex: b, frozen: true}]"], "optim.param_groups.0", "exactly one of"),
        (["optim.param_groups=[{regex: '(', frozen: true}]"], "optim.param_groups.0.regex", "not a regular expression"),
        (["optim.param_groups=[{match: a, lr_scale: 0}]"], "optim.param_groups.0.lr_scale", "frozen: true"),
        (["optim.param_groups=[{match: a, frozen: true, lr_scale: 2}]"], "optim.param_groups.0", "no meaning"),
        (["optim.param_groups=[{match: a, lr_scal: 2}]"], "optim.param_groups.0.lr_scal", "Did you mean 'lr_scale'"),
        (["model.logit_bias=train"], "model.logit_bias", "zero gradient"),
        (["loss.name=siglip", "model.logit_bias=drop"], "model.logit_bias", "needs it"),
    ],
)
def test_config_errors_name_the_key(tiny, overrides, key, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        tiny(*overrides)
    assert caught.value.key == key


# -- optimizers -------------------------------------------------------------------------------------
def tiny_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.randint(1, 1000, (4, 32), generator=generator)


def build_run(name: str) -> State:
    """tiny-vit (a 1000-token vocabulary), the optimizer of the table's setting, a cosine schedule over 4 steps."""
    torch.manual_seed(0)
    model = create_model("tiny-vit", text={"vocab_size": 1000})
    cfg = optim(name=name, **OPTIMIZER_SETTINGS[name], layer_decay={"image": 0.8})
    optimizer = build_optimizer(cfg, model, resolve_param_groups(cfg, model, layer_decay_scales(model, {"image": 0.8})))
    return State(model=model, optimizer=optimizer, scheduler=build_scheduler(cfg, optimizer, warmup=1, total=4))


def train_steps(state: State, start: int, stop: int) -> None:
    loss = ClipLoss()
    for step in range(start, stop):
        loss(**state.model(*tiny_batch(step)))["contrastive_loss"].backward()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZER_SETTINGS))
def test_every_optimizer_resumes_exactly(name, tmp_path):
    """2 steps, a checkpoint file (State.state_dict, written and read as the trainer does), 2 more steps in a fresh
    model and optimizer: the weights equal 4 steps in one go, bit for bit."""
    straight = build_run(name)
    train_steps(straight, 0, 4)
    first = build_run(name)
    train_steps(first, 0, 2)
    save_atomic(first.state_dict(), tmp_path / "ep0-ba2.pt")
    resumed = build_run(name)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ep0-ba2.pt"))
    assert type(resumed.optimizer).__name__ == type(straight.optimizer).__name__
    train_steps(resumed, 2, 4)
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    assert not torch.equal(expected["visual.proj.weight"], build_run(name).model.state_dict()["visual.proj.weight"])
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, different[:3]


def test_a_timm_optimizer_with_rules_and_layer_decay_resumes_exactly_in_the_trainer(tiny):
    """Trainer checkpoints: lion, LLRD on both towers and a frozen rule; 4 steps = 2 + resume to 4, bit for bit."""
    common = (
        "data.val=null",
        "optim.grad_clip_norm=null",
        "run.duration=4ba",
        "checkpoint.save_interval=2ba",
        "optim.name=lion",
        "optim.lr=1e-4",
        "optim.layer_decay={image: 0.7, text: 0.8}",
        "optim.param_groups=[{match: 'text.token_embedding.*', frozen: true}, {match: logit_scale, lr_scale: 3}]",
    )
    straight = Trainer(tiny(*common, "run.name=straight"))
    groups = straight.state.optimizer.param_groups
    assert type(straight.state.optimizer).__name__ == "Lion" and max(g["lr_scale"] for g in groups) == 3.0
    expected = straight.fit().model.state_dict()
    checkpoint = straight.run_dir / "checkpoints" / "ep0-ba2.pt"
    resumed = Trainer(tiny(*common, "run.name=resumed", f"checkpoint.resume={checkpoint}")).fit()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    log = (straight.run_dir / "out.log").read_text()
    assert "optimizer lion, " in log and "image layer 0/3: 3 tensors" in log and "optim.param_groups.0 froze" in log


# -- SigLIP's logit bias ----------------------------------------------------------------------------
class EveryTrainableGetsAGradient(Callback):
    """DDP's condition: a parameter that requires grad but gets none stops a distributed run (OpenCLIP #1076)."""

    def __init__(self):
        self.without: set[str] = set()

    def after_backward(self, state, logger):
        self.without |= {n for n, p in state.model.named_parameters() if p.requires_grad and p.grad is None}


def test_a_siglip_model_fine_tuned_with_the_clip_loss_keeps_its_bias_frozen(tiny, tmp_path):
    siglip = create_model("tiny-vit", init_logit_bias=-7.5)
    pretrained = tmp_path / "siglip.pt"
    torch.save(cadenza_to_openclip(siglip.state_dict(), siglip), pretrained)
    checks = EveryTrainableGetsAGradient()
    trainer = Trainer(
        tiny("data.val=null", "run.duration=2ba", f"model.pretrained={pretrained}", "model.logit_bias=freeze"),
        callbacks=[checks],
    )
    model = trainer.state.model
    assert not model.logit_bias.requires_grad
    assert all(p is not model.logit_bias for g in trainer.state.optimizer.param_groups for p in g["params"])
    trainer.fit()
    assert model.logit_bias.item() == -7.5 and not checks.without

    # the other choices, on the model alone: dropped (the CLIP loss's default), trained (SigLIP's)
    clip = create_model("tiny-vit", pretrained=str(pretrained), **model_init_overrides("clip", None))
    assert apply_logit_bias_choice(clip, "clip", None) == "drop" and clip.logit_bias is None
    given = create_model("tiny-vit", init_logit_bias=-10.0)  # a bias given by model.overrides, and the CLIP loss
    apply_logit_bias_choice(given, "clip", None)
    assert given.logit_bias is None and "logit_bias" not in given.state_dict()
    tuned = create_model("tiny-vit", pretrained=str(pretrained), **model_init_overrides("siglip", "train"))
    assert apply_logit_bias_choice(tuned, "siglip", None) == "train"
    assert tuned.logit_bias.requires_grad and tuned.logit_bias.item() == -7.5


# -- the digits' shifted variants -------------------------------------------------------------------
def test_digit_variants_invert_and_rotate_the_scan():
    from io import BytesIO

    from PIL import Image

    scan = np.zeros((8, 8))
    scan[1, 2:6] = 16  # a bar of ink near the top
    pixels = {v: np.asarray(Image.open(BytesIO(to_png(scan, 8, v)))) for v in ("original", "inverted", "rotated")}
    assert pixels["original"][1, 3] == 0 and pixels["original"][6, 3] == 255  # dark ink on white
    np.testing.assert_array_equal(pixels["inverted"], 255 - pixels["original"])
    np.testing.assert_array_equal(pixels["rotated"], np.rot90(pixels["original"], k=-1))


def test_the_digits_command_writes_a_variant_of_the_same_split(tmp_path):
    """``python -m cadenza.datasets.digits --out data/digits-inverted --variant inverted`` (the README's command)."""
    from io import BytesIO

    from PIL import Image
    from sklearn.datasets import load_digits

    from cadenza.datasets import digits

    assert digits.main(["--out", str(tmp_path / "inv"), "--variant", "inverted", "--captions", "1"]) == 0
    assert (tmp_path / "inv" / "mds" / "index.json").is_file()
    first = sorted((tmp_path / "inv" / "test" / "0").iterdir())[0]
    scan = load_digits().images[int(first.stem)]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(BytesIO(to_png(scan, 32, "inverted")))))
