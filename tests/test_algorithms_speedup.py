"""The speed-up algorithms of the time-to-accuracy benchmark: progressive_resizing, clipa, text_token_reduction.

Pure functions against hand-computed expectations, each class on a minimal ``State`` without a trainer, and one
exact resume (the random masks and crops come back with the checkpointed generator). The generic train /
checkpoint / resume / rebuild test runs them through ``tests/algorithm_settings.py``.
"""

from __future__ import annotations

import sys

import pytest
import torch

from cadenza.algorithms.clipa import CLIPA
from cadenza.algorithms.progressive_resizing import ProgressiveResizing, resize_images
from cadenza.algorithms.text_token_reduction import (
    SyntaxPriorities,
    TextTokenReduction,
    keep_indices,
    reduce_tokens,
)
from cadenza.engine import Event
from cadenza.engine.errors import ConfigError
from cadenza.engine.logger import Logger
from cadenza.engine.state import State
from cadenza.models import create_model, get_tokenizer
from cadenza.train.trainer import Trainer

SOT, EOT = 49406, 49407


def captions(*rows: list[int], width: int = 12) -> torch.Tensor:
    """Token rows: start, content, end, zero padding."""
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row) + 2] = torch.tensor([SOT, *row, EOT])
    return out


def a_batch(batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.rand(batch_size, 3, 32, 32), captions(*[list(range(1, 11))] * batch_size))]


def minimal_state(max_batches: int = 10) -> State:
    state = State(model=create_model("tiny-vit"))
    state.max_batches = max_batches
    state.batch = a_batch()
    return state


# -- pure functions ---------------------------------------------------------------------------------------------------
def test_resize_images_by_hand():
    flat = torch.full((2, 3, 32, 32), 0.25)
    assert torch.allclose(resize_images(flat, 16), torch.full((2, 3, 16, 16), 0.25))
    ramp = torch.arange(32.0).expand(1, 1, 32, 32)  # column index
    crop = resize_images(ramp, 8, mode="crop")
    left = int(crop[0, 0, 0, 0])
    assert crop.shape == (1, 1, 8, 8) and torch.equal(crop[0, 0, 0], torch.arange(left, left + 8.0))
    assert resize_images(flat, 32) is flat


def test_reduce_tokens_keeps_start_end_and_order():
    tokens = captions([11, 12, 13, 14, 15, 16], [21, 22])
    torch.manual_seed(0)
    reduced = reduce_tokens(tokens, 5, "random")  # 3 content tokens of 6; the short caption is unchanged
    assert reduced.shape == (2, 5)
    assert reduced[0, 0] == SOT and reduced[0, 4] == EOT
    kept = reduced[0, 1:4].tolist()
    assert kept == sorted(kept) and set(kept) <= {11, 12, 13, 14, 15, 16}
    assert reduced[1].tolist() == [SOT, 21, 22, EOT, 0]
    block = reduce_tokens(tokens, 5, "block")[0, 1:4].tolist()
    assert block == list(range(block[0], block[0] + 3))  # consecutive
    # the text tower pools the end token: it must stay the row's largest id
    assert torch.equal(reduced.argmax(dim=1), torch.tensor([4, 3]))


def test_syntax_masking_keeps_nouns_then_adjectives():
    assert keep_indices(6, 3, "syntax", priorities=[3, 1, 0, 3, 2, 0]) == [1, 2, 5]
    tokenizer = get_tokenizer("tiny-vit")
    ids = tokenizer.encode("a small handwritten digit seven")
    tags = {"a": "DT", "small": "JJ", "handwritten": "VBN", "digit": "NN", "seven": "CD"}
    priorities = SyntaxPriorities(tokenizer.decode, tagger=lambda words: [tags[w] for w in words])
    tokens = captions(ids)
    reduced = reduce_tokens(tokens, 4, "syntax", priorities=priorities)  # 2 content tokens: the noun, the adjective
    assert tokenizer.decode(reduced[0, 1:3]).split() == ["small", "digit"]


def test_syntax_masking_without_nltk_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # ``import nltk`` fails, whether or not it is installed here
    with pytest.raises(ValueError, match="pip install nltk"):
        TextTokenReduction(length=8, mode="syntax")


# -- the classes on a minimal state ----------------------------------------------------------------------------------
def test_progressive_resizing_follows_the_schedule_on_a_minimal_state():
    state, algorithm = (
        minimal_state(),
        ProgressiveResizing(initial_scale=0.5, delay_fraction=0.4, finetune_fraction=0.2),
    )
    algorithm.apply(Event.INIT, state, Logger([]))
    sizes = []
    for step in (0, 5, 9):  # before the ramp, on it (24 px, rounded down to 8-px patches: 16), in the last 20%
        state.timestamp.batch = step
        state.batch = a_batch()
        assert algorithm.match(Event.AFTER_DATALOADER, state) and not algorithm.match(Event.EVAL_START, state)
        algorithm.apply(Event.AFTER_DATALOADER, state, Logger([]))
        sizes.append(state.batch[0][0].shape[-1])
    assert sizes == [16, 16, 32]
    assert state.model(*a_batch()[0])["image_features"].shape == (4, 32)


def test_progressive_resizing_needs_a_vit():
    state = State(model=create_model("tiny-rn"))
    with pytest.raises(ConfigError, match="algorithms.progressive_resizing"):
        ProgressiveResizing().apply(Event.INIT, state, Logger([]))


def test_clipa_shortens_then_trains_at_full_size_on_a_minimal_state():
    state, algorithm = minimal_state(max_batches=10), CLIPA(image_scale=0.5, text_length=6, finetune_fraction=0.2)
    algorithm.apply(Event.INIT, state, Logger([]))
    state.timestamp.batch = 7  # step 8 of 10: still short
    assert algorithm.match(Event.AFTER_DATALOADER, state)
    algorithm.apply(Event.AFTER_DATALOADER, state, Logger([]))
    images, tokens = state.batch[0]
    assert images.shape[-1] == 16 and tokens.shape == (4, 6) and (tokens[:, -1] == EOT).all()
    features = state.model(images, tokens)  # the tower takes the short sequences
    assert features["image_features"].shape == features["text_features"].shape == (4, 32)
    state.timestamp.batch = 8  # the last 20%: full size, nothing to do
    assert not algorithm.match(Event.AFTER_DATALOADER, state)


def test_text_token_reduction_on_a_minimal_state():
    state = minimal_state()
    algorithm = TextTokenReduction(length=5, mode="block")
    assert algorithm.match(Event.AFTER_DATALOADER, state)
    algorithm.apply(Event.AFTER_DATALOADER, state, Logger([]))
    assert state.batch[0][1].shape == (4, 5) and state.batch[0][0].shape[-1] == 32  # images untouched


@pytest.mark.parametrize("kwargs", [{"image_scale": 0.0}, {"text_length": 2}, {"text_mask": "nouns"}])
def test_clipa_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        CLIPA(**kwargs)


# -- exact resume ----------------------------------------------------------------------------------------------------
def test_clipa_resumes_exactly(tiny):
    """4 steps straight, or resumed from the straight run's step-2 checkpoint: the same weights (random masks and
    low-resolution images at steps 0-2, full size at step 3)."""
    algorithm = "+algorithms.clipa={image_scale: 0.5, text_length: 4, finetune_fraction: 0.25}"
    common = [algorithm, "data.val=null", "run.duration=4ba", "checkpoint.save_interval=2ba", "checkpoint.keep=-1"]
    common += ["run.peak_tflops=1.0", "loggers.console=null"]  # no matmul peak measured, nothing printed
    full = Trainer(tiny(*common, "run.name=full"))
    expected = full.fit().model.state_dict()
    checkpoint = full.run_dir / "checkpoints" / "ep0-ba2.pt"
    actual = Trainer(tiny(*common, "run.name=resumed", f"checkpoint.resume={checkpoint}")).fit().model.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
