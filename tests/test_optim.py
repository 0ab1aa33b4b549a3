"""Scheduler values and weight-decay groups against OpenCLIP 3.3.0's own functions and rule."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from open_clip_train import scheduler as oc_scheduler

from cadenza.engine.optim import build_optimizer, build_scheduler, excluded_from_weight_decay, lr_factor, param_groups
from cadenza.models import create_model


def _optim_cfg(**kwargs):
    base = {
        "lr": 0.5,
        "betas": [0.9, 0.98],
        "eps": 1e-6,
        "weight_decay": 0.2,
        "scheduler": "cosine",
        "cooldown_power": 1.0,
        "cooldown_end_lr": 0.0,
    }
    return OmegaConf.create({**base, **kwargs})


def _openclip_lrs(fn, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    adjust = fn(opt)
    return [adjust(step) for step in range(steps)]


def _our_lrs(cfg, warmup: int, total: int, cooldown: int = 0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(cfg, opt, warmup, total, cooldown)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (3, 20), (10, 11)])
def test_cosine_matches_openclip(warmup, total):
    expected = _openclip_lrs(lambda o: oc_scheduler.cosine_lr(o, 0.5, warmup, total), total)
    assert _our_lrs(_optim_cfg(), warmup, total) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (4, 20)])
def test_const_matches_openclip(warmup, total):
    expected = _openclip_lrs(lambda o: oc_scheduler.const_lr(o, 0.5, warmup, total), total)
    assert _our_lrs(_optim_cfg(scheduler="const"), warmup, total) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("power", "end_lr"), [(1.0, 0.0), (2.0, 0.05)])
def test_const_cooldown_matches_openclip(power, end_lr):
    warmup, total, cooldown = 3, 30, 10
    expected = _openclip_lrs(
        lambda o: oc_scheduler.const_lr_cooldown(o, 0.5, warmup, total, cooldown, power, end_lr), total
    )
    cfg = _optim_cfg(scheduler="const-cooldown", cooldown_power=power, cooldown_end_lr=end_lr)
    assert _our_lrs(cfg, warmup, total, cooldown) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_cosine_formula_by_hand():
    factor = lr_factor("cosine", warmup=2, total=6)
    assert [factor(s) for s in range(2)] == [0.5, 1.0]
    assert factor(2) == 1.0
    assert factor(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 4)))


def _openclip_rule(name: str, p: torch.Tensor) -> bool:
    # open_clip_train/main.py (3.3.0): exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n ...
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50", "coca_ViT-B-32"])
def test_weight_decay_follows_openclip_on_its_own_parameters(name):
    """Each parameter is decayed as OpenCLIP decays its counterpart (its name and shape there: the ViT class token
    is 1-dim in OpenCLIP, (1, 1, D) in timm)."""
    import open_clip

    from cadenza.models.convert import cadenza_to_openclip

    with torch.device("meta"):
        ours, theirs = create_model(name), dict(open_clip.create_model(name, device="meta").named_parameters())
    for our_name, param in ours.named_parameters():
        their_name = next(iter(cadenza_to_openclip({our_name: param}, ours)))
        expected = _openclip_rule(their_name, theirs[their_name])
        assert excluded_from_weight_decay(our_name, param) == expected, (our_name, their_name)


def test_weight_decay_groups_follow_openclip():
    model = create_model("tiny-vit")
    model.visual.trunk.blocks[0].mlp.fc1.weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups(model, 0.2)
    exempt, decayed = ({id(p) for p in g["params"]} for g in groups)
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.2
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in exempt | decayed
            continue
        assert (id(p) in exempt) == excluded_from_weight_decay(name, p), name
        assert excluded_from_weight_decay(name, p) == (_openclip_rule(name, p) or name.endswith("cls_token"))
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "text.token_embedding.weight" in names and "text.positional_embedding" in names  # 3.3.0 decays them
    assert "logit_scale" not in names and not any(n.endswith("bias") for n in names)


def test_optimizer_settings():
    model = create_model("tiny-vit")
    opt = build_optimizer(_optim_cfg(lr=3e-4, betas=[0.8, 0.9], eps=1e-8), model)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["fused"]  # the single-kernel update on CPU too
    foreach = build_optimizer(_optim_cfg(lr=3e-4, betas=[0.8, 0.9], eps=1e-8, fused=False), model)
    assert not foreach.defaults["fused"] and foreach.defaults["foreach"]


def test_fused_adamw_takes_foreachs_steps():
    """The fused update is AdamW's update: ten steps on the same gradients land on the same weights (rounding apart)."""
    torch.manual_seed(0)
    models = [create_model("tiny-vit") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [
        build_optimizer(_optim_cfg(lr=1e-3, fused=fused), m) for fused, m in zip((True, False), models, strict=True)
    ]
    start = models[0].visual.trunk.patch_embed.proj.weight.detach().clone()
    for _ in range(10):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers, strict=True):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert (models[0].visual.trunk.patch_embed.proj.weight - start).abs().max() > 1e-3  # the steps did move the weights
