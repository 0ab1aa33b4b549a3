"""``model.trim_text_padding``: the text tower runs up to the batch's longest caption, with the same embeddings,
gradients and training, and MFU counts the FLOPs really spent."""

from __future__ import annotations

import json

import pytest
import torch

from cadenza.engine.callbacks import Callback
from cadenza.engine.errors import ConfigError
from cadenza.models import create_model, get_tokenizer
from cadenza.models.text import trim_padding


def short_captions(batch: int, width: int, longest: int, seed: int = 0) -> torch.Tensor:
    """``[SOT, ids..., EOT, 0...]`` rows with 1 to ``longest`` ids; one row has exactly ``longest``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, width, dtype=torch.long)
    for row in range(batch):
        length = longest if row == 0 else int(torch.randint(1, longest + 1, (1,), generator=generator))
        tokens[row, 0] = 49406
        tokens[row, 1 : length + 1] = torch.randint(1, 49406, (length,), generator=generator)
        tokens[row, length + 1] = 49407
    return tokens[torch.randperm(batch, generator=generator)]


def test_trim_padding_keeps_every_token_and_rounds_up_to_16():
    tokens = short_captions(8, 77, longest=10)  # SOT + 10 ids + EOT: 12 columns used
    trimmed = trim_padding(tokens)
    assert trimmed.shape == (8, 16)
    assert torch.equal(torch.nn.functional.pad(trimmed, (0, 61)), tokens)  # only padding was cut
    assert trim_padding(short_captions(8, 77, longest=15)).shape == (8, 32)  # 17 used
    full = short_captions(8, 77, longest=75)
    assert trim_padding(full) is full  # nothing to cut: the same tensor, no copy
    assert trim_padding(short_captions(8, 77, longest=70)).shape == (8, 77)  # 80 would pass the width
    assert trim_padding(torch.zeros(3, 77, dtype=torch.long)).shape == (3, 16)
    assert trim_padding(torch.full((2, 20), 5), pad_id=5).shape == (2, 16)  # the tokenizer's pad id, not 0


@pytest.mark.parametrize("name", ["tiny-vit", "ViT-B-32"])
def test_trimmed_captions_give_the_same_embeddings_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name)
    assert model.trims_text_padding
    tokens = short_captions(6, model.context_length, longest=9)
    trimmed = model.trim_text_padding(tokens)
    assert trimmed.shape[1] == 16 < model.context_length

    def text_gradients(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        features = model.encode_text(batch, normalize=True)
        (features * torch.linspace(-1, 1, features.shape[-1])).sum().backward()
        return features.detach(), {n: p.grad.clone() for n, p in model.text.named_parameters() if p.grad is not None}

    full_features, full_grads = text_gradients(tokens)
    cut_features, cut_grads = text_gradients(trimmed)
    torch.testing.assert_close(cut_features, full_features, rtol=1e-5, atol=1e-6)
    assert full_grads.keys() == cut_grads.keys()
    for key, grad in full_grads.items():
        # Sums over the batch and positions cancel: an entry near zero keeps the rounding of the tensor's large ones,
        # which differs with the matmul's shape (77 or 16 positions) and the CPU's kernels (AVX2 or AVX-512). So the
        # tolerance is relative to the tensor's scale; a wrong position or token would be off by that scale itself.
        scale = float(grad.abs().max())
        torch.testing.assert_close(cut_grads[key], grad, rtol=1e-4, atol=1e-6 * scale, msg=key)
    # the positions never reached get no gradient either way
    assert not full_grads["positional_embedding"][16:].any()


def test_real_tokenized_captions_are_cut():
    model = create_model("tiny-vit")
    tokens = get_tokenizer("tiny-vit", context_length=model.context_length)(["a photo of a cat", "a dog"])
    assert model.trim_text_padding(tokens).shape == (2, 16)
    torch.testing.assert_close(model.encode_text(model.trim_text_padding(tokens)), model.encode_text(tokens))


def test_coca_needs_every_position():
    model = create_model("tiny-coca")
    assert not model.trims_text_padding
    tokens = short_captions(2, model.context_length, longest=3)
    assert model.trim_text_padding(tokens) is tokens


class RecordWidths(Callback):
    def __init__(self) -> None:
        self.widths: list[int] = []

    def after_dataloader(self, state, logger) -> None:
        self.widths += [tokens.shape[1] for _, tokens in state.batch]


def short_run(tiny, *overrides: str):
    from cadenza.train.trainer import Trainer

    recorder = RecordWidths()
    trainer = Trainer(
        tiny(
            "data.val=null",
            "run.duration=4ba",
            "run.log_interval=2ba",
            "run.peak_tflops=0.5",
            "data.train.max_caption_length=6",
            *overrides,
        ),
        callbacks=[recorder],
    )
    trainer.fit()
    return trainer, recorder.widths


def test_training_cuts_captions_and_lands_on_the_same_weights(tiny):
    cut, widths = short_run(tiny, "run.name=cut")
    assert cut.trim_text and widths == [16] * 4  # tiny-vit's context is 32
    full, full_widths = short_run(tiny, "run.name=full", "model.trim_text_padding=false")
    assert not full.trim_text and full_widths == [32] * 4
    cut_weights, full_weights = cut.state.model.state_dict(), full.state.model.state_dict()
    assert cut_weights.keys() == full_weights.keys()
    for name, weight in cut_weights.items():  # Adam scales float noise in tiny gradients: 1e-5 of a 1e-3 lr
        torch.testing.assert_close(weight, full_weights[name], rtol=1e-4, atol=1e-5, msg=name)
    assert "text tower: captions cut after the batch's longest" in (cut.run_dir / "out.log").read_text()


def test_mfu_counts_the_flops_of_the_cut_captions(tiny):
    from cadenza.engine.mfu import flops_per_sample

    trainer, _ = short_run(tiny)
    model = create_model("tiny-vit")
    cut, full = flops_per_sample(model, text_length=16), flops_per_sample(model)
    assert cut < 0.8 * full
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "train/mfu" in row]
    assert len(rows) == 2
    for row in rows:
        assert row["train/mfu"] == pytest.approx(cut * row["train/samples_per_second"] / 0.5e12, rel=1e-5)


def test_flops_by_text_length_match_a_count_at_every_length():
    from cadenza.engine.mfu import FlopsByTextLength, flops_per_sample

    model = create_model("tiny-vit")
    by_length = FlopsByTextLength(model)
    for length in (1, 5, 16, 23, model.context_length):
        assert by_length(length) == pytest.approx(flops_per_sample(model, text_length=length), rel=1e-9)
    model.text.requires_grad_(False)  # a locked text tower: forward FLOPs only
    locked = FlopsByTextLength(model)
    assert locked(16) == pytest.approx(flops_per_sample(model, text_length=16), rel=1e-9)
    assert locked(16) < by_length(16)


def test_asking_to_cut_coca_captions_is_a_config_error(tiny):
    from cadenza.train.trainer import Trainer

    with pytest.raises(ConfigError, match="model.trim_text_padding.*CoCa"):
        Trainer(tiny("model.name=tiny-coca", "loss.name=coca", "model.trim_text_padding=true", "data.val=null"))


def test_a_caption_length_the_context_cannot_hold_is_a_config_error(tiny):
    from cadenza.train.trainer import Trainer

    with pytest.raises(ConfigError, match="max_caption_length must be from 1 to 30"):
        Trainer(tiny("data.train.max_caption_length=31", "data.val=null"))


def test_a_teacher_that_needs_every_position_gets_its_padding_back():
    from cadenza.algorithms.distillation import teacher_outputs

    teacher = create_model("tiny-coca").eval()
    tokens = short_captions(2, teacher.context_length, longest=3)
    torch.manual_seed(0)
    images = torch.randn(2, 3, teacher.image_size, teacher.image_size)
    full = teacher_outputs(teacher, images, tokens)
    cut = teacher_outputs(teacher, images, tokens[:, :16])
    assert full.keys() == cut.keys()
    for key in full:
        torch.testing.assert_close(cut[key], full[key])
