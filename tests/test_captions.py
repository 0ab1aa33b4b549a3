"""Several captions per sample: in CSV columns, WebDataset members or ``.json`` keys, and MDS columns; one drawn per
training step from (seed, epoch, sample), exactly again after a resume; every caption scored in validation
(COCO-style retrieval); ``composer convert --captions`` carries them into MDS.

Sample ``i`` has the caption ``"sample i"`` in its first field and ``"sample 100+i"`` / ``"sample 200+i"`` in a list
in its second (none for every third sample), so the token ids say which sample and which caption a batch holds.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from cadenza.datasets.context import LoaderContext
from cadenza.datasets.samples import CAPTION_SALT, CaptionRule, SampleError, sample_seed
from cadenza.datasets.transforms import image_transform
from cadenza.engine.callbacks import retrieval_metrics
from cadenza.engine.errors import ConfigError
from cadenza.engine.registry import DATASETS
from cadenza.models.tokenizer import get_tokenizer
from cadenza.train.trainer import Trainer

from .data_helpers import add_member, ids_of, image_bytes

SAMPLES, BATCH, IMAGE_SIZE, CONTEXT_LENGTH = 12, 4, 32, 32
WEIGHTS = {"first": 0.5, "syn": 0.5}


def synthetic_captions(index: int) -> list[str]:
    return [] if index % 3 == 0 else [f"sample {100 + index}", f"sample {200 + index}"]


def every_caption(index: int) -> set[int]:
    return {index} | {int(c.split()[1]) for c in synthetic_captions(index)}


# -- the three sources ----------------------------------------------------------------------------------------
def write_csv(folder: Path) -> dict:
    folder.mkdir(parents=True)
    lines = ["filepath\tfirst\tsyn"]
    for index in range(SAMPLES):
        (folder / f"{index}.jpg").write_bytes(image_bytes(index))
        lines.append(f"{index}.jpg\tsample {index}\t{json.dumps(synthetic_captions(index))}")
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    return {"path": str(folder / "data.csv"), "captions": WEIGHTS}


def write_tars(folder: Path) -> dict:
    """Two shards; the first caption a ``.first`` member, the others a key of the ``.json`` member."""
    folder.mkdir(parents=True)
    half = SAMPLES // 2
    for shard in range(2):
        with tarfile.open(folder / f"{shard}.tar", "w") as archive:
            for index in range(shard * half, (shard + 1) * half):
                add_member(archive, f"{index:04d}.jpg", image_bytes(index))
                add_member(archive, f"{index:04d}.first", f"sample {index}".encode())
                add_member(archive, f"{index:04d}.json", json.dumps({"syn": synthetic_captions(index)}).encode())
    (folder / "sizes.json").write_text(json.dumps({"0.tar": half, "1.tar": half}))
    return {"path": f"{folder}/{{0..1}}.tar", "captions": WEIGHTS}


def write_mds(folder: Path) -> dict:
    """A ``str`` column and a ``json`` column."""
    from streaming import MDSWriter

    with MDSWriter(out=str(folder), columns={"jpg": "jpeg", "first": "str", "syn": "json"}, size_limit=1 << 12) as w:
        for index in range(SAMPLES):
            w.write({"jpg": image_bytes(index), "first": f"sample {index}", "syn": synthetic_captions(index)})
    return {"remote": str(folder), "captions": WEIGHTS}


SOURCES = {"csv": write_csv, "webdataset": write_tars, "streaming": write_mds}


def build(kind: str, args: dict, tmp_path: Path, train: bool = True):
    context = LoaderContext(
        train=train,
        batch_size=BATCH,
        seed=5,
        image_size=IMAGE_SIZE,
        context_length=CONTEXT_LENGTH,
        transform=image_transform(IMAGE_SIZE, train),
        tokenizer=get_tokenizer("tiny-vit", context_length=CONTEXT_LENGTH),
        cache_dir=str(tmp_path / "cache"),
    )
    return DATASETS.build(kind, args, "data.train" if train else "data.val", context=context)


def validation_rows(kind: str, args: dict, tmp_path: Path) -> list[tuple[int, set[int]]]:
    """``(first caption, every caption)`` of each validation sample, read back from the batches."""
    rows = []
    for images, tokens, extras in build(kind, args, tmp_path, train=False):
        assert extras["captions"].shape[:2] == (len(images), 3)  # the batch's most captions: 3
        for first, every in zip(ids_of(tokens), extras["captions"], strict=True):
            present = every[every[:, 0] != 0]
            assert torch.equal(present[0], tokens[len(rows) % BATCH])  # the first of every caption is the token row
            rows.append((first, set(ids_of(present))))
    return rows


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_captions_are_drawn_per_step_and_resume_exactly_in_every_format(kind, tmp_path):
    args = SOURCES[kind](tmp_path / "data")
    loader = build(kind, args, tmp_path)
    drawn: dict[int, list[int]] = {}  # sample -> its caption in epoch 0, 1
    for epoch in range(2):
        loader.set_epoch(epoch)
        for _, tokens in loader:
            for caption in ids_of(tokens):
                drawn.setdefault(caption % 100, []).append(caption)
    assert sorted(drawn) == list(range(SAMPLES)) and all(len(c) == 2 for c in drawn.values())
    for index, captions in drawn.items():
        assert set(captions) <= every_caption(index)
        if not synthetic_captions(index):
            assert captions == [index] * 2  # only the first field has captions: it is drawn whatever its weight
    assert any(len(set(c)) > 1 for c in drawn.values())  # steps of different epochs see different captions
    assert sum(c >= 100 for captions in drawn.values() for c in captions) >= 4  # the synthetic field is drawn

    # the same draw in a loader built anew, and after a checkpoint mid-epoch
    loader.set_epoch(1)
    batches = iter(loader)
    first = next(batches)[1]
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    rest = [tokens for _, tokens in batches]
    buffer.seek(0)
    resumed = build(kind, args, tmp_path / "resumed")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    again = [tokens for _, tokens in resumed]
    assert len(again) == len(rest) and all(torch.equal(a, b) for a, b in zip(rest, again, strict=True))
    fresh = build(kind, args, tmp_path / "fresh")
    fresh.set_epoch(1)
    assert torch.equal(next(iter(fresh))[1], first)

    # validation: every caption of every image, once
    rows = validation_rows(kind, args, tmp_path)
    assert sorted(first for first, _ in rows) == list(range(SAMPLES))
    assert all(every == every_caption(first) for first, every in rows)


def test_caption_rule_draws_by_weight_and_names_bad_settings():
    fields = [["a"], ["b", "c"], []]
    weighted = CaptionRule({"x": 1, "y": 3, "z": 5}, "txt")
    draws = [weighted.draw(fields, sample_seed(0, 0, i, CAPTION_SALT)) for i in range(4000)]
    assert {d for d in draws} == {(0, 0), (1, 0), (1, 1)}  # the empty field's weight goes to the others
    assert abs(sum(d[0] == 1 for d in draws) / 4000 - 0.75) < 0.03
    uniform = CaptionRule(["x", "y", "z"], "txt")  # every caption alike, whatever its field
    uniform_draws = [uniform.draw(fields, sample_seed(1, 2, i, CAPTION_SALT)) for i in range(3000)]
    assert all(abs(uniform_draws.count(target) / 3000 - 1 / 3) < 0.03 for target in ((0, 0), (1, 0), (1, 1)))
    with pytest.raises(SampleError, match="weight above 0"):
        CaptionRule({"x": 0, "y": 1}, "txt").read({"x": "a", "y": "[]"}.get)
    with pytest.raises(SampleError, match="no caption"):
        CaptionRule(["x"], "txt").read({"x": " "}.get)
    for bad in ({"x": -1}, {"x": 0}, [], ["x", "x"], {"x": "half"}, 3):
        with pytest.raises(ValueError, match="captions"):
            CaptionRule(bad, "txt")


def test_a_bad_captions_setting_is_a_config_error_of_the_section(tmp_path):
    args = write_csv(tmp_path / "data")
    with pytest.raises(ConfigError, match="non-negative") as error:
        build("csv", {**args, "captions": {"first": -1}}, tmp_path)
    assert error.value.key == "data.train"
    with pytest.raises(ConfigError, match="no column 'nope'"):
        build("csv", {**args, "captions": ["first", "nope"]}, tmp_path)
    with pytest.raises(ConfigError, match="either captions"):
        build("streaming", {**write_mds(tmp_path / "mds"), "caption_key": "first"}, tmp_path)


def test_retrieval_counts_any_caption_of_an_image(tmp_path):
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    texts = torch.nn.functional.normalize(images + 0.8 * torch.randn(6, 8), dim=1)
    # one caption each: the mapping changes nothing (OpenCLIP's metrics)
    assert retrieval_metrics(images, texts) == retrieval_metrics(images, texts, text_image=torch.arange(6))
    # by hand: ranks of each image's best caption, and of each caption's image
    extra = torch.nn.functional.normalize(images[:3] + 0.8 * torch.randn(3, 8), dim=1)
    captions, owner = torch.cat([texts, extra]), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2])
    scores = images @ captions.T
    best = [max(scores[i, j] for j in range(9) if owner[j] == i) for i in range(6)]
    image_ranks = [int((scores[i] > best[i]).sum()) for i in range(6)]
    caption_ranks = [int((scores[:, j] > scores[owner[j], j]).sum()) for j in range(9)]
    metrics = retrieval_metrics(images, captions, chunk_size=4, text_image=owner)
    for k in (1, 5):
        assert metrics[f"val/image_to_text_R@{k}"] == pytest.approx(sum(r < k for r in image_ranks) / 6)
        assert metrics[f"val/text_to_image_R@{k}"] == pytest.approx(sum(r < k for r in caption_ranks) / 9)
    assert metrics["val/image_to_text_mean_rank"] == pytest.approx(sum(image_ranks) / 6 + 1)
    with pytest.raises(ValueError, match="every image needs"):
        retrieval_metrics(images, captions, text_image=torch.tensor([0, 1, 2, 3, 4, 4, 0, 1, 2]))


def test_validation_scores_every_caption(tiny, tmp_path):
    """``data.val`` with several captions: the trainer's metrics are ``retrieval_metrics`` over every caption."""
    args = write_csv(tmp_path / "data")
    cfg = tiny(
        "data.train=null",
        f"data.val={{type: csv, path: '{args['path']}', captions: [first, syn], num_samples: null}}",
        "data.batch_size=5",
    )
    trainer = Trainer(cfg)
    metrics = trainer.fit().eval_metrics
    model = trainer.state.model.eval()
    loader = build("csv", {"path": args["path"], "captions": ["first", "syn"]}, tmp_path, train=False)
    images, texts, owner = [], [], []
    with torch.no_grad():
        for batch_images, _, extras in loader:
            seen = sum(len(i) for i in images)
            for row, every in enumerate(extras["captions"]):
                present = every[every[:, 0] != 0]
                texts.append(model.encode_text(present, normalize=True))
                owner += [seen + row] * len(present)
            images.append(model.encode_image(batch_images, normalize=True))
    expected = retrieval_metrics(torch.cat(images), torch.cat(texts), text_image=torch.tensor(owner))
    assert metrics["val/num_samples"] == SAMPLES
    assert metrics["val/num_captions"] == sum(len(every_caption(i)) for i in range(SAMPLES))
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-5), name


def test_convert_carries_every_caption_field(tmp_path):
    """CSV columns and WebDataset members / .json keys become json columns that read back as the same captions."""
    from streaming import StreamingDataset

    from cadenza.datasets.convert import main as convert_main

    csv = write_csv(tmp_path / "csv")
    tars = write_tars(tmp_path / "tars")
    for name, kind, source in (("from-csv", "csv", csv["path"]), ("from-tar", "webdataset", tars["path"])):
        out = tmp_path / name
        assert (
            convert_main(["--from", kind, source, "--to", str(out), "--captions", "first", "syn", "--no-progress"]) == 0
        )
        columns = json.loads((out / "cadenza-convert.json").read_text())["columns"]
        assert columns == {"jpg": "jpeg", "first": "json", "syn": "json"}
        dataset = StreamingDataset(local=str(out), batch_size=1)
        read = {int(s["first"][0].split()[1]): s["syn"] for s in (dataset[i] for i in range(len(dataset)))}
        assert read == {i: synthetic_captions(i) for i in range(SAMPLES)}  # what the captions rule reads (tested above)
