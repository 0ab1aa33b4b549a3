"""The loader contract (``cadenza.engine.loader.Loader``): every registered dataset type builds, from its YAML
arguments and a ``LoaderContext`` alone, an object with the protocol's members, whose ``state_dict`` survives a
checkpoint's ``torch.save`` / ``torch.load(weights_only=True)`` and resumes exactly in a freshly built loader."""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pytest
import torch
from typing_extensions import get_protocol_members

from cadenza.datasets.context import LoaderContext
from cadenza.datasets.transforms import image_transform
from cadenza.engine.loader import Loader
from cadenza.engine.registry import DATASETS
from cadenza.models.tokenizer import get_tokenizer
from cadenza.train.config import DATASET_RUNTIME_ARGS

from .data_helpers import caption_of, image_bytes, write_csv, write_shards

SAMPLES, BATCH, IMAGE_SIZE, CONTEXT_LENGTH = 8, 2, 32, 32  # tiny-vit's input sizes


@runtime_checkable
class CheckedLoader(Loader, Protocol):
    """``Loader`` for ``isinstance`` (the kernel's protocol stays a plain one)."""


def write_mds(folder: Path) -> str:
    from streaming import MDSWriter

    with MDSWriter(out=str(folder), columns={"jpg": "jpeg", "txt": "str"}, size_limit=1 << 12) as writer:
        for index in range(SAMPLES):
            writer.write({"jpg": image_bytes(index), "txt": caption_of(index)})
    return str(folder)


#: a tiny source of SAMPLES samples for every registered dataset type: tmp_path → its YAML arguments
SOURCES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "synthetic": lambda tmp: {"num_samples": SAMPLES},
    "csv": lambda tmp: {"path": str(write_csv(tmp / "csv", SAMPLES))},
    "webdataset": lambda tmp: {"path": write_shards(tmp / "tar", shards=2, per_shard=SAMPLES // 2)},
    "streaming": lambda tmp: {"remote": write_mds(tmp / "mds")},
}


def context(tmp_path: Path, **options: Any) -> LoaderContext:
    return LoaderContext(
        train=True,
        batch_size=BATCH,
        seed=3,
        image_size=IMAGE_SIZE,
        context_length=CONTEXT_LENGTH,
        transform=image_transform(IMAGE_SIZE, True),
        tokenizer=get_tokenizer("tiny-vit", context_length=CONTEXT_LENGTH),
        cache_dir=str(tmp_path / "cache"),
        **options,
    )


def build(kind: str, args: dict[str, Any], tmp_path: Path) -> Loader:
    return DATASETS.build(kind, args, "data.train", context=context(tmp_path))


def test_every_dataset_type_has_a_source():
    assert sorted(SOURCES) == DATASETS.names()


def test_the_protocol_is_the_contract_the_trainer_uses():
    members = {"batches_per_epoch", "skipped", "set_epoch", "__iter__", "state_dict", "load_state_dict", "close"}
    assert get_protocol_members(Loader) == members
    assert DATASET_RUNTIME_ARGS == ("context",)


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_close_stops_persistent_workers_and_the_next_epoch_starts_new_ones(kind, tmp_path):
    import multiprocessing

    options = {"workers": 1, "persistent_workers": True}
    loader = DATASETS.build(kind, SOURCES[kind](tmp_path), "data.train", context=context(tmp_path, **options))
    before = set(multiprocessing.active_children())
    first = [tokens for _, tokens in loader]
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 1  # persistent: alive between epochs
    loader.close()
    assert not any(worker.is_alive() for worker in workers)
    loader.set_epoch(0)
    again = [tokens for _, tokens in loader]
    assert len(again) == len(first) == SAMPLES // BATCH and all(map(torch.equal, again, first))
    loader.close()
    assert set(multiprocessing.active_children()) <= before
    loader.close()  # closing a closed loader does nothing


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_builders_take_their_yaml_arguments_and_the_context(kind):
    """The runtime facts reach a builder once, in ``context``; its other arguments are what YAML may set."""
    parameters = inspect.signature(DATASETS.get(kind, "data.train.type")).parameters
    assert "context" in parameters
    assert not {"image_size", "context_length", "vocab_size", "seed"} & set(parameters)


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_every_dataset_type_builds_a_loader_that_resumes_exactly(kind, tmp_path):
    args = SOURCES[kind](tmp_path)
    loader = build(kind, args, tmp_path)
    assert isinstance(loader, CheckedLoader)
    for name in ("set_epoch", "state_dict", "load_state_dict", "__iter__"):  # the protocol's parameters, by name
        assert inspect.signature(getattr(loader, name)).parameters.keys() == (
            inspect.signature(getattr(Loader, name)).parameters.keys() - {"self"}
        ), name
    assert loader.batches_per_epoch == SAMPLES // BATCH
    assert loader.skipped == 0

    # a full epoch after set_epoch, in full batches of the model's input sizes
    loader.set_epoch(1)
    epoch = list(loader)
    assert len(epoch) == loader.batches_per_epoch
    for images, tokens in epoch:
        assert images.shape == (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE) and images.is_floating_point()
        assert tokens.shape == (BATCH, CONTEXT_LENGTH) and tokens.dtype == torch.long

    # checkpoint after the first batch of epoch 2, then resume in a loader built anew from the same arguments
    loader.set_epoch(2)
    batches = iter(loader)
    next(batches)
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    rest = list(batches)
    assert len(rest) == loader.batches_per_epoch - 1
    buffer.seek(0)
    resumed = build(kind, args, tmp_path / "resumed")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    again = list(resumed)
    assert len(again) == len(rest)
    for (images, tokens), (images_again, tokens_again) in zip(rest, again, strict=True):
        assert torch.equal(tokens, tokens_again)
        assert torch.equal(images, images_again)
