"""The ``csv`` format (and ``synthetic``, the other map-style one): exact resume with any worker count, OpenCLIP's
options, per-sample augmentation, and bad rows skipped and counted."""

from __future__ import annotations

import doctest
import functools
import multiprocessing
import os

import pytest
import torch

from cadenza.datasets import samples
from cadenza.datasets.context import LoaderContext
from cadenza.datasets.csv import CsvDataset
from cadenza.datasets.samples import SampleError, read_image_file, substitutes
from cadenza.datasets.transforms import image_transform
from cadenza.engine import ConfigError, DataError
from cadenza.models.tokenizer import get_tokenizer
from cadenza.train.trainer import Trainer

from .data_helpers import RecordIds, check_exact_resume, image_bytes, metric_rows, write_csv


def csv_args(path, *extra: str) -> tuple[str, ...]:
    return ("data.train.type=csv", f"+data.train.path={path}", "data.train.num_samples=null", *extra)


def context(**changes) -> LoaderContext:
    args = dict(
        train=True,
        batch_size=8,
        image_size=32,
        context_length=77,
        transform=image_transform(32, True),
        tokenizer=get_tokenizer("tiny-vit"),
    )
    return LoaderContext(**{**args, **changes})


def test_samples_doctests():
    assert doctest.testmod(samples).failed == 0


@pytest.mark.parametrize("workers", [(0, 0), (0, 2)], ids=["w0", "w0-then-w2"])
def test_csv_resume_sees_the_same_samples_and_weights(tiny, tmp_path, workers):
    path = write_csv(tmp_path / "data", 40)
    ids = check_exact_resume(tiny, (*csv_args(path), "data.batch_size=8"), steps=7, split=3, workers=workers).ids
    assert sorted(sum(ids[:5], [])) == list(range(40))  # epoch 0 (5 batches) shows every row once
    assert ids[5:7] != ids[0:2]  # epoch 1 has its own order


@pytest.mark.parametrize("workers", [(2, 0)], ids=["w2-then-w0"])
def test_synthetic_resume_with_workers(tiny, workers):
    check_exact_resume(tiny, ("data.train.num_samples=64", "data.batch_size=8"), steps=10, split=4, workers=workers)


def test_csv_options_match_openclip(tiny, tmp_path):
    """Comma separator, other column names, absolute paths, and the first num_samples rows only."""
    path = write_csv(tmp_path / "data", 24, separator=",", img_key="image", caption_key="caption", absolute=True)
    recorder = RecordIds()
    args = csv_args(path, "+data.train.csv_separator=','", "+data.train.csv_img_key=image")
    args += ("+data.train.csv_caption_key=caption", "data.train.num_samples=16")
    Trainer(tiny(*args, "data.val=null", "data.batch_size=8", "run.duration=2ba"), callbacks=[recorder]).fit()
    assert sorted(sum(recorder.ids, [])) == list(range(16))


def test_csv_configuration_errors_name_the_key(tiny, tmp_path):
    path = write_csv(tmp_path / "data", 8)
    with pytest.raises(ConfigError, match=r"data\.train.*no column 'caption' \(csv_caption_key\)"):
        Trainer(tiny(*csv_args(path, "+data.train.csv_caption_key=caption"), "data.val=null"))
    with pytest.raises(ConfigError, match=r"data\.train.*does not exist"):
        Trainer(tiny(*csv_args(tmp_path / "nope.csv"), "data.val=null"))
    with pytest.raises(ConfigError, match=r"data\.train\.csv_img_keys.*Did you mean 'csv_img_key'"):
        tiny(*csv_args(path, "+data.train.csv_img_keys=x"))


def test_augmentation_is_seeded_per_sample_and_epoch(tmp_path):
    """Sample i's crop depends on (seed, epoch, i) only, and the main process's RNG is left alone."""
    path = write_csv(tmp_path / "data", 8)
    transform = image_transform(32, True, scale=(0.2, 1.0))
    dataset = CsvDataset(str(path), context(transform=transform))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = dataset[(0, 3)].image, dataset[(0, 3)].image
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b)
    assert not torch.equal(a, dataset[(1, 3)].image)  # another epoch, another crop
    other_seed = CsvDataset(str(path), context(transform=transform, seed=1))
    assert not torch.equal(a, other_seed[(0, 3)].image)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_transforms_equal_openclips(train, mode, monkeypatch):
    """Cadenza's transforms give OpenCLIP's pixels (float32 rounding apart) for the same crop.

    Training crops are drawn from Python's ``random`` here and from torch's generator in torchvision (the same
    distribution: ``test_random_resized_crop_draws_torchvisions_distribution``), so torchvision is handed the
    crop that Cadenza drew.
    """
    import random

    import numpy as np
    from open_clip.transform import image_transform as openclip_transform
    from PIL import Image
    from torchvision import transforms as T

    from cadenza.datasets.transforms import RandomResizedCrop

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for size, photo in ((24, (30, 41)), (160, (200, 170))):  # small images normalize through NumPy, large through torch
        pixels = np.random.default_rng(0).integers(0, 256, (*photo, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(mode)
        ours, theirs = image_transform(size, train, mean, std), openclip_transform(size, train, mean, std)
        crops = set()
        for seed in range(3):
            random.seed(seed)
            crop = RandomResizedCrop(size, scale=(0.9, 1.0)).crop_params(*image.size)
            crops.add(crop)
            monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(lambda *_, crop=crop: crop))
            expected = theirs(image)
            random.seed(seed)
            actual = ours(image)
            assert actual.dtype == expected.dtype == torch.float32 and actual.shape == (3, size, size)
            assert actual.is_contiguous()
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
        assert len(crops) >= 2  # the seeds drew different crops: equal pixels show that both took the same one


@pytest.mark.parametrize(
    "size, scale, ratio",
    [
        ((32, 32), (0.9, 1.0), (3 / 4, 4 / 3)),  # the quickstart's: about 2 of 3 tries rejected
        ((41, 30), (0.9, 1.0), (3 / 4, 4 / 3)),
        ((300, 200), (0.08, 1.0), (3 / 4, 4 / 3)),  # timm's and ImageNet's scale
        ((60, 90), (0.3, 0.8), (0.5, 1.0)),  # a one-sided ratio: a swapped width and height would show
        ((100, 5), (0.9, 1.0), (3 / 4, 4 / 3)),  # no crop of scale 0.9-1 fits: torchvision's central fallback
    ],
)
def test_random_resized_crop_draws_torchvisions_distribution(size, scale, ratio):
    """The crop draw (Python's ``random``) follows torchvision's ``get_params`` (torch's generator): per crop size
    and position, the frequencies of 6,000 draws each agree within sampling error; torch's generator is not used."""
    import random
    from collections import Counter

    from PIL import Image
    from torchvision import transforms as T

    from cadenza.datasets.transforms import RandomResizedCrop

    ours, image, draws = RandomResizedCrop(24, scale=scale, ratio=ratio), Image.new("RGB", size), 6000
    random.seed(0)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    drawn = [ours.crop_params(*size) for _ in range(draws)]
    assert torch.equal(torch.get_rng_state(), before)
    expected = [T.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(draws)]
    random.seed(0)
    assert [ours.crop_params(*size) for _ in range(draws)] == drawn  # reproducible from the seed

    def outcome(crop: tuple[int, int, int, int]) -> tuple:  # size; top and left relative to their room, in 5 bins
        top, left, h, w = crop
        return (h, w), min(int(5 * top / max(size[1] - h, 1)), 4), min(int(5 * left / max(size[0] - w, 1)), 4)

    for part in range(3):
        a, b = (Counter(outcome(crop)[part] for crop in crops) for crops in (drawn, expected))
        for value in a.keys() | b.keys():
            p = (a[value] + b[value]) / (2 * draws)
            sigma = (2 * p * (1 - p) / draws) ** 0.5  # the spread of the difference of two frequencies
            assert abs(a[value] - b[value]) / draws <= 5 * sigma + 1e-9, (value, a[value], b[value])


def write_bad_csv(folder):
    """40 rows; rows 3 (bad JPEG bytes), 7 (missing file), 12 (empty caption), 20 (extra field) are bad."""
    path = write_csv(folder, 40)
    (folder / "images" / "00003.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (folder / "images" / "00007.jpg").unlink()
    lines = path.read_text().splitlines()
    lines[1 + 12] = "images/00012.jpg\t   "
    lines[1 + 20] = "images/00020.jpg\tsample 20\tstray field"
    path.write_text("\n".join(lines) + "\n")
    return path, {3: "undecodable image", 7: "missing file", 12: "empty caption", 20: "malformed row at line 22"}


def expected_skips(bad: set[int], num_rows: int) -> int:
    """Skips for one pass over every row: each bad row, plus bad candidates tried before its substitute."""
    total = 0
    for row in bad:
        for candidate in substitutes(row, num_rows):
            if candidate not in bad:
                break
            total += 1
    return total


@pytest.mark.parametrize("workers", [2])
def test_bad_rows_are_replaced_counted_and_logged(tiny, tmp_path, workers):
    path, bad = write_bad_csv(tmp_path / "data")
    recorder = RecordIds()
    overrides = (*csv_args(path), "data.val=null", "data.batch_size=8", f"data.workers={workers}")
    trainer = Trainer(tiny(*overrides, "run.duration=10ba", "run.log_interval=5ba"), callbacks=[recorder])
    before = set(multiprocessing.active_children())
    trainer.fit()
    assert not set(multiprocessing.active_children()) - before  # fit stopped its persistent workers
    assert all(len(ids) == 8 for ids in recorder.ids)  # batches stay full
    seen = set(sum(recorder.ids, []))
    assert not seen & set(bad)
    per_epoch = expected_skips(set(bad), 40)
    rows = metric_rows(trainer.run_dir, "data/skipped")
    assert [(r["step"], r["data/skipped"]) for r in rows] == [(5, per_epoch), (10, 2 * per_epoch)]
    log = (trainer.run_dir / "out.log").read_text()
    for row, reason in bad.items():
        assert f"row {row + 1}: {reason}" in log


def test_skip_count_survives_resume(tiny, tmp_path):
    path, bad = write_bad_csv(tmp_path / "data")
    common = (*csv_args(path), "data.val=null", "data.batch_size=8", "run.log_interval=5ba", "run.name=job")
    Trainer(tiny(*common, "run.duration=5ba")).fit()
    trainer = Trainer(tiny(*common, "run.duration=10ba", "checkpoint.resume=latest"))
    trainer.fit()
    assert metric_rows(trainer.run_dir, "data/skipped")[-1]["data/skipped"] == 2 * expected_skips(set(bad), 40)


def test_malformed_csv_rows(tmp_path):
    """Short rows, long rows, empty paths and blank lines; the good rows all load."""
    folder = tmp_path / "data"
    path = write_csv(folder, 6)
    lines = path.read_text().splitlines()
    lines[2] = "images/00001.jpg"  # one field
    lines[3] = "\tsample 2"  # empty path
    lines.insert(5, "")  # a blank line is not a row
    path.write_text("\n".join(lines) + "\n")
    dataset = CsvDataset(str(path), context())
    assert len(dataset) == 6
    assert set(dataset.malformed) == {1, 2}
    assert "1 fields, the header has 2" in dataset.malformed[1] and "empty image path" in dataset.malformed[2]
    sample = dataset[1]
    assert sample.skipped[0].startswith("row 2: malformed row at line 3")
    assert dataset[4].skipped == ()


def test_a_csv_where_nothing_decodes_fails_clearly(tiny, tmp_path):
    path = write_csv(tmp_path / "data", 16)
    for image in (tmp_path / "data" / "images").iterdir():
        image.write_bytes(image_bytes(0)[:100])  # truncated JPEGs
    trainer = Trainer(tiny(*csv_args(path), "data.val=null", "data.batch_size=8"))
    with pytest.raises(DataError, match=rf"no sample of csv {path} can be used: 16 tried.*undecodable image"):
        trainer.fit()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_open_image_opens_what_image_open_opens(fmt, monkeypatch):
    """PNG and JPEG skip Image.open's search through the formats: same image, same size limit."""
    import io

    import numpy as np
    from PIL import Image

    from cadenza.datasets.samples import decode_image, open_image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buffer, fmt)
    data = buffer.getvalue()
    ours, theirs = decode_image(data), Image.open(io.BytesIO(data))
    theirs.load()
    assert (ours.format, ours.mode, ours.size) == (theirs.format, theirs.mode, theirs.size)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 600 pixels: more than twice the limit
    with pytest.raises(Image.DecompressionBombError):
        open_image(data)
    with pytest.raises(SampleError, match="DecompressionBombError"):
        decode_image(data)


def test_worker_batches_arrive_as_named_shared_memory_and_leave_none_behind(tmp_path):
    """Workers send batches as torch's file_system shared memory: the same batches as without workers, and no
    segment is left in /dev/shm once the loader is gone."""
    import gc
    from pathlib import Path

    from cadenza.datasets.loader import ResumableLoader

    path = write_csv(tmp_path / "data", 24)
    shm = Path("/dev/shm")
    before = set(shm.iterdir()) if shm.is_dir() else set()
    pids = tmp_path / "pids"
    pids.mkdir()
    batches = {}
    for workers in (0, 1):
        loader = ResumableLoader(CsvDataset(str(path), context(workers=workers)), context(workers=workers))
        assert (loader.loader.worker_init_fn is not None) == (workers > 0)
        if workers:  # note each worker's pid: /dev/shm is the machine's, other processes' segments come and go
            loader.loader.worker_init_fn = functools.partial(_note_pid, loader.loader.worker_init_fn, pids)
        batches[workers] = [(images.clone(), tokens.clone()) for images, tokens in loader]
        del loader
    gc.collect()
    assert len(batches[1]) == len(batches[0]) == 3
    for (a, ta), (b, tb) in zip(batches[0], batches[1], strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    ours = {str(os.getpid())} | {p.name for p in pids.iterdir()}
    assert len(ours) == 2  # this process and its worker
    if shm.is_dir():  # torch names a segment torch_<pid of its maker>_...
        assert not [p for p in set(shm.iterdir()) - before if p.name.split("_")[1:2] and p.name.split("_")[1] in ours]


def _note_pid(init, folder, worker_id):
    (folder / str(os.getpid())).touch()
    init(worker_id)


def test_read_image_file_reasons(tmp_path):
    with pytest.raises(SampleError, match="missing file"):
        read_image_file(str(tmp_path / "none.jpg"))
    (tmp_path / "cut.jpg").write_bytes(image_bytes(1)[:150])
    with pytest.raises(SampleError, match="undecodable image"):
        read_image_file(str(tmp_path / "cut.jpg"))


def test_relative_image_paths_follow_image_root_and_errors_name_both_candidates(tmp_path, monkeypatch):
    """A YAML's CSV reads relative paths from its own folder; ``image_root: .`` from the working directory
    (OpenCLIP's rule, which ``composer openclip`` sets). A CSV written for the other rule stops with both paths named."""
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    for index in range(8):
        (tmp_path / "data" / "imgs" / f"{index}.jpg").write_bytes(image_bytes(index))
    rows = "".join(f"data/imgs/{i}.jpg\tsample {i}\n" for i in range(8))
    (tmp_path / "data" / "train.csv").write_text("filepath\ttitle\n" + rows)  # OpenCLIP's: relative to where it runs
    monkeypatch.chdir(tmp_path)
    cwd_path, csv_path = tmp_path / "data" / "imgs" / "0.jpg", tmp_path / "data" / "data" / "imgs" / "0.jpg"
    with pytest.raises(ValueError, match=f"{csv_path} \\(relative to the CSV's folder.* does not exist, {cwd_path}"):
        CsvDataset("data/train.csv", context())
    assert not CsvDataset("data/train.csv", context(), image_root=".")[0].skipped
    own = write_csv(tmp_path / "own", 8)  # relative to the CSV's folder
    with pytest.raises(ValueError, match="relative to image_root=\\.\\).* does not exist, .*own/images/00000.jpg"):
        CsvDataset(str(own), context(), image_root=".")
    assert not CsvDataset(str(own), context())[0].skipped
