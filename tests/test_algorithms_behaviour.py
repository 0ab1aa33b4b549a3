"""Each algorithm: its pure function against a hand-computed expectation, the class on a minimal State
(no trainer), and its effect on real training."""

from __future__ import annotations

import pytest
import torch

from cadenza.algorithms.distillation import Distillation
from cadenza.algorithms.ema import EMA, copy_weights, decay_from_half_life, update_ema
from cadenza.algorithms.grad_checkpointing import GradCheckpointing, apply_grad_checkpointing
from cadenza.algorithms.lock_image import LockImage, image_tower_groups, lock_image_tower
from cadenza.algorithms.lock_text import LockText, lock_text_tower, text_tower_groups
from cadenza.algorithms.patch_dropout import PatchDropout, apply_patch_dropout
from cadenza.algorithms.torch_compile import TorchCompile
from cadenza.engine import Callback, ConfigError, Event
from cadenza.engine.logger import Logger
from cadenza.engine.state import State
from cadenza.models import create_model
from cadenza.models.losses import ClipLoss
from cadenza.train.trainer import Trainer

NO_EVAL = ("data.val=null", "optim.grad_clip_norm=null", "run.duration=3ba", "optim.warmup=0ba")


def tiny_batch(model, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, model.image_size, model.image_size, generator=gen)
    tokens = torch.randint(1, 1000, (n, model.context_length), generator=gen)
    tokens[:, -1] = model.vocab_size - 1
    return images, tokens


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# -- patch_dropout ----------------------------------------------------------------------------------
class TokenCounter:
    def __init__(self, model):
        self.counts = []
        model.visual.trunk.blocks[0].register_forward_pre_hook(lambda m, args: self.counts.append(args[0].shape[1]))


def test_patch_dropout_drops_tokens_in_training_only():
    model = create_model("tiny-vit")  # 32 px / patch 8: 16 patches + class token
    counter = TokenCounter(model)
    apply_patch_dropout(model, 0.5)
    images, tokens = tiny_batch(model)
    model.train()
    model(images, tokens)
    model.eval()
    model(images, tokens)
    assert counter.counts == [1 + 8, 1 + 16]  # keep_prob 0.5 of 16 patches, class token kept


def test_patch_dropout_on_a_minimal_state_and_on_a_resnet():
    model = create_model("tiny-vit")
    algorithm = PatchDropout(prob=0.25)
    assert algorithm.match(Event.INIT, State(model=model)) and not algorithm.match(
        Event.BATCH_START, State(model=model)
    )
    algorithm.apply(Event.INIT, State(model=model), Logger([]))
    assert model.visual.trunk.patch_drop.prob == 0.25
    with pytest.raises(ConfigError, match="'algorithms.patch_dropout'.*no patch tokens"):
        PatchDropout(0.5).apply(Event.INIT, State(model=create_model("tiny-rn")), Logger([]))
    with pytest.raises(ValueError):
        PatchDropout(1.0)


def test_patch_dropout_on_a_resnet_fails_when_the_trainer_is_built(tiny):
    with pytest.raises(ConfigError, match="algorithms.patch_dropout"):
        Trainer(tiny("model.name=tiny-rn", "algorithms.patch_dropout={prob: 0.5}"))


# -- lock_image / lock_text -------------------------------------------------------------------------
def test_image_groups_and_lock_by_hand():
    model = create_model("tiny-vit")
    groups = image_tower_groups(model.visual)
    # stem (+ norm_pre), block 0, block 1 (+ final norm), projection
    assert len(groups) == 4
    assert "trunk.cls_token" in groups[0] and "trunk.norm.weight" in groups[2] and groups[3] == ["proj.weight"]
    lock_image_tower(model, unlocked_groups=2)
    assert {n for n in trainable(model) if n.startswith("visual.")} == {f"visual.{n}" for n in groups[2] + groups[3]}
    assert all(
        n.startswith("visual.") is False for n in trainable(model) - {f"visual.{n}" for n in groups[2] + groups[3]}
    )
    everything = create_model("tiny-vit")
    lock_image_tower(everything, unlocked_groups=5)  # more groups than the tower has: all train, as in OpenCLIP
    assert all(p.requires_grad for p in everything.parameters())


def test_lock_image_freezes_batchnorm_statistics():
    model = create_model("tiny-rn")
    LockImage(unlocked_groups=0, freeze_bn_stats=True).apply(Event.INIT, State(model=model), Logger([]))
    assert not any(n.startswith("visual.") for n in trainable(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.visual.modules())  # now FrozenBatchNorm2d
    before = copy_weights(model.visual)
    model.train()
    model(*tiny_batch(model))
    after = copy_weights(model.visual)
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats did not move


def test_text_groups_and_lock_by_hand():
    model = create_model("tiny-vit")  # 2 text layers: [embeddings], [block 0], [block 1, ln_final], [projection]
    assert len(text_tower_groups(model.text)) == 4
    lock_text_tower(model, unlocked_layers=1)
    assert {n for n in trainable(model) if n.startswith("text.")} == {"text.text_projection"}
    model = create_model("tiny-vit")
    LockText(unlocked_layers=0, freeze_layer_norm=False).apply(Event.INIT, State(model=model), Logger([]))
    text_trainable = {n for n in trainable(model) if n.startswith("text.")}
    assert text_trainable and all(".ln_" in n or "ln_final" in n for n in text_trainable)


@pytest.mark.parametrize(
    ("algorithm", "frozen_prefix"),
    [("lock_image={unlocked_groups: 1}", "visual.trunk."), ("lock_text={unlocked_layers: 1}", "text.transformer.")],
)
def test_locked_parameters_stay_bit_identical(tiny, algorithm, frozen_prefix):
    trainer = Trainer(tiny(*NO_EVAL, f"algorithms.{algorithm}"))
    before = copy_weights(trainer.state.model)
    after = copy_weights(trainer.fit().model)
    frozen = [k for k in before if k.startswith(frozen_prefix)]
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert frozen and not set(frozen) & set(changed)
    assert "logit_scale" in changed and any(
        k.startswith("visual.proj") or k.startswith("text.text_projection") for k in changed
    )


# -- grad_checkpointing ----------------------------------------------------------------------------
def test_grad_checkpointing_gives_equal_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_model("tiny-vit")
        if checkpointing:
            GradCheckpointing().apply(Event.INIT, State(model=model), Logger([]))
            assert model.text.transformer.grad_checkpointing and model.visual.trunk.grad_checkpointing
        loss = ClipLoss()(**model(*tiny_batch(model)))["contrastive_loss"]
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    apply_grad_checkpointing(model, False)
    assert not model.text.transformer.grad_checkpointing


# -- ema --------------------------------------------------------------------------------------------
def test_ema_formula_by_hand():
    assert decay_from_half_life(1) == 0.5 and decay_from_half_life(2) == pytest.approx(2**-0.5)
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = copy_weights(model)
    with torch.no_grad():
        model.weight.fill_(3.0)
    update_ema(ema, model, 0.75)
    assert ema["weight"].item() == pytest.approx(0.75 * 1 + 0.25 * 3)


def test_ema_copies_frozen_parameters_where_the_average_is_read():
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.fill_(1.0)
    model[1].weight.requires_grad_(False)
    state = State(model=model)
    algorithm = EMA(decay=0.5)
    algorithm.apply(Event.FIT_START, state, Logger([]))
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].weight.fill_(7.0)  # changed outside the optimizer
    algorithm.apply(Event.AFTER_OPTIMIZER_STEP, state, Logger([]))
    assert algorithm.ema["0.weight"].item() == 2.0  # averaged
    assert algorithm.ema["1.weight"].item() == 1.0  # skipped by the step
    assert algorithm.state_dict()["ema"]["1.weight"].item() == 7.0  # its value where the average is read
    with torch.no_grad():
        model[1].weight.fill_(9.0)
    algorithm.apply(Event.EVAL_START, state, Logger([]))
    assert model[0].weight.item() == 2.0 and model[1].weight.item() == 9.0
    algorithm.apply(Event.EVAL_END, state, Logger([]))
    assert model[0].weight.item() == 3.0


def test_ema_follows_the_formula_during_training(tiny):
    class Weights(Callback):
        def __init__(self):
            self.history = []

        def batch_end(self, state, logger):
            self.history.append(copy_weights(state.model))

    watch = Weights()
    trainer = Trainer(tiny(*NO_EVAL, "run.duration=4ba", "algorithms.ema={decay: 0.8, start: 2ba}"), callbacks=[watch])
    initial = copy_weights(trainer.state.model)
    trainer.fit()
    ema = next(a for a in trainer.state.algorithms if a.name == "ema").ema
    expected = {}
    for name in initial:
        value = watch.history[1][name]  # steps 1-2: before start, the average is the weights
        for step in (2, 3):
            value = 0.8 * value + 0.2 * watch.history[step][name]
        expected[name] = value
    for name in ("logit_scale", "visual.proj.weight", "text.text_projection"):
        torch.testing.assert_close(ema[name], expected[name], rtol=1e-6, atol=1e-7)


def test_ema_evaluates_with_averaged_weights_and_restores_training_weights():
    model = torch.nn.Linear(1, 1, bias=False)
    state = State(model=model)
    algorithm = EMA(decay=0.5)
    algorithm.apply(Event.FIT_START, state, Logger([]))
    with torch.no_grad():
        model.weight.fill_(5.0)
    training = model.weight.item()
    algorithm.ema["weight"].fill_(-1.0)
    assert algorithm.match(Event.EVAL_START, state)
    algorithm.apply(Event.EVAL_START, state, Logger([]))
    assert model.weight.item() == -1.0
    algorithm.apply(Event.EVAL_END, state, Logger([]))
    assert model.weight.item() == training
    restored = EMA(decay=0.5)
    restored.load_state_dict(algorithm.state_dict())
    assert torch.equal(restored.ema["weight"], algorithm.ema["weight"])
    with pytest.raises(ValueError, match="exactly one"):
        EMA(half_life="10ba", decay=0.9)


# -- distillation ----------------------------------------------------------------------------------
def test_distillation_loss_matches_openclip():
    import importlib.util
    from pathlib import Path

    import open_clip

    spec = importlib.util.spec_from_file_location("oc_loss", Path(open_clip.__file__).parent / "loss.py")
    oc_loss = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oc_loss)

    student, teacher = create_model("tiny-vit"), create_model("tiny-vit")
    batch = tiny_batch(student, n=6)
    state = State(model=student, loss_fn=ClipLoss())
    algorithm = Distillation(teacher="tiny-vit", weight=1.0)
    algorithm.apply(Event.INIT, state, Logger([]))
    algorithm._teacher.load_state_dict(teacher.state_dict())
    state.micro_batch = batch
    state.outputs = student(*batch)
    algorithm.apply(Event.AFTER_FORWARD, state, Logger([]))
    ours = state.loss_fn(**state.outputs)
    with torch.no_grad():
        t = teacher(*batch)
    s = student(*batch)
    theirs = oc_loss.DistillClipLoss()(
        s["image_features"],
        s["text_features"],
        s["logit_scale"],
        t["image_features"],
        t["text_features"],
        t["logit_scale"],
        output_dict=True,
    )
    for key in ("contrastive_loss", "distill_loss"):
        assert ours[key].item() == pytest.approx(theirs[key].item(), rel=1e-6)
    assert not any(p.requires_grad for p in algorithm._teacher.parameters()) and not algorithm._teacher.training


def test_distillation_trains_and_rejects_accumulation(tiny):
    import json

    trainer = Trainer(
        tiny(*NO_EVAL, "run.log_interval=1ba", "algorithms.distillation={teacher: tiny-vit, weight: 2.0}")
    )
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("train/distill_loss" in r for r in rows)
    assert rows[0]["train/loss"] == pytest.approx(
        rows[0]["train/contrastive_loss"] + rows[0]["train/distill_loss"], rel=1e-5
    )
    with pytest.raises(ConfigError, match="accum_freq"):
        Trainer(
            tiny(
                *NO_EVAL,
                "run.name=accum",
                "optim.accum_freq=2",
                "data.batch_size=8",
                "algorithms.distillation={teacher: tiny-vit}",
            )
        )
    with pytest.raises(ConfigError, match="algorithms.distillation"):
        Trainer(tiny(*NO_EVAL, "run.name=siglip", "loss.name=siglip", "algorithms.distillation={teacher: tiny-vit}"))


def test_the_teacher_sees_smaller_images_at_its_own_resolution():
    """progressive_resizing and clipa shrink the batch before the teacher runs: the teacher gets the student's view
    resized to its input size (a ViT without a resampled grid would reject it), the same as resizing by hand."""
    import torch.nn.functional as F

    from cadenza.algorithms.distillation import teacher_outputs

    teacher = create_model("tiny-vit").eval()
    images, tokens = tiny_batch(teacher)
    small = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    up = F.interpolate(small, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    assert teacher.image_size == 32
    got, expected = teacher_outputs(teacher, small, tokens), teacher_outputs(teacher, up, tokens)
    for key in got:
        torch.testing.assert_close(got[key], expected[key])
    assert not torch.allclose(
        got["dist_image_features"], teacher_outputs(teacher, images, tokens)["dist_image_features"]
    )


def test_distillation_rejects_a_non_clip_loss_when_checked_not_at_init():
    """The loss is built before the algorithms are checked, so the combination fails before any teacher is built."""
    from cadenza.models.losses import ClipLoss, SigLipLoss

    algorithm = Distillation(teacher="no-such-teacher")  # never built: the check comes first
    with pytest.raises(ConfigError, match="loss.name=siglip cannot be combined"):
        algorithm.check_compatible([], State(model=torch.nn.Linear(1, 1), loss_fn=SigLipLoss()))
    algorithm.check_compatible([], State(model=torch.nn.Linear(1, 1), loss_fn=ClipLoss()))


# -- torch_compile ---------------------------------------------------------------------------------
def test_torch_compile_matches_eager():
    model = create_model("tiny-vit")
    batch = tiny_batch(model)
    state = State(model=model)
    algorithm = TorchCompile(backend="inductor")
    assert algorithm.match(Event.FIT_START, state) and not algorithm.match(Event.INIT, state)
    algorithm.apply(Event.FIT_START, state, Logger([]))
    assert state.wrapped_model is not model
    eager = model(*batch)
    compiled = state.wrapped_model(*batch)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        TorchCompile(mode="fastest")
