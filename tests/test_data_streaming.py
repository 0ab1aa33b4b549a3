"""The ``streaming`` format and ``composer convert``: exact and elastic resume, S3, bad samples, conversions.

Every test reads its own MDS folder (and cache) under ``tmp_path``; streaming's shared memory is keyed by
those folders. The 2-process tests fork children that join a gloo group, as ``torchrun`` would.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cadenza.datasets.context import LoaderContext
from cadenza.datasets.convert import MARKER
from cadenza.datasets.convert import main as convert_main
from cadenza.datasets.samples import substitutes
from cadenza.datasets.streaming import StreamingLoader
from cadenza.datasets.transforms import image_transform
from cadenza.engine.dist import DistInfo
from cadenza.engine.errors import DataError
from cadenza.models.tokenizer import get_tokenizer
from cadenza.train.trainer import Trainer

from .test_trainer import RecordBatches, assert_bit_identical, weights

CONTEXT_LENGTH = 32  # tiny-vit's
TOKENIZER = get_tokenizer("tiny-vit", context_length=CONTEXT_LENGTH)


# -- helpers --------------------------------------------------------------------------------------------
def jpeg(value: int, size: int = 16) -> bytes:
    """A small JPEG whose pixels encode ``value`` (so images differ)."""
    pixels = np.full((size, size, 3), (value * 37 % 256, value * 11 % 256, value * 5 % 256), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_mds(
    folder: Path,
    num: int,
    prefix: str = "sample",
    bad: dict[int, str] | None = None,
    encoding="jpeg",
    compression: str | None = None,
) -> Path:
    """``num`` samples captioned ``f"{prefix} {i}"``; ``bad`` maps an index to 'image' or 'caption' damage."""
    from streaming import MDSWriter

    bad = bad or {}
    columns = {"jpg": encoding, "txt": "str"}
    with MDSWriter(out=str(folder), columns=columns, size_limit=1 << 12, compression=compression) as writer:
        for i in range(num):
            image, caption = jpeg(i), f"{prefix} {i}"
            if bad.get(i) == "image":
                image = image[: len(image) // 3]  # truncated JPEG
            elif bad.get(i) == "caption":
                caption = "   "
            if encoding == "pil":
                image = Image.open(io.BytesIO(image)) if bad.get(i) != "image" else image
            writer.write({"jpg": image, "txt": caption})
    return folder


def sample_ids(tokens: torch.Tensor, prefix: str = "sample") -> list[int]:
    """Recover ``i`` from the token rows of captions ``f"{prefix} {i}"`` (the trainer may have cut their padding)."""
    lookup = {tuple(row.tolist()): i for i, row in enumerate(TOKENIZER([f"{prefix} {i}" for i in range(512)]))}
    tokens = torch.nn.functional.pad(tokens, (0, CONTEXT_LENGTH - tokens.shape[1]))
    return [lookup[tuple(row.tolist())] for row in tokens]


def loader(remote: str | None, batch_size: int, dist: DistInfo | None = None, workers: int = 0, **kwargs):
    context = LoaderContext(
        train=True,
        batch_size=batch_size,
        dist=dist or DistInfo(),
        seed=0,
        image_size=32,
        context_length=CONTEXT_LENGTH,
        transform=image_transform(32, True),
        tokenizer=TOKENIZER,
        workers=workers,
        cache_dir=kwargs.pop("cache_dir", None),
    )
    return StreamingLoader(remote=remote, context=context, **kwargs)


def streaming_train(remote: str, *overrides: str) -> tuple[str, ...]:
    train = (
        f"data.train={{type: streaming, remote: '{remote}', num_samples: null}}"  # replaces tiny.yaml's synthetic set
    )
    return (train, "data.val=null", "optim.grad_clip_norm=null", "checkpoint.keep=-1", *overrides)


# -- exact resume through the trainer -----------------------------------------------------------------------
def test_resume_sees_the_same_samples_and_ends_with_the_same_weights(tiny, tmp_path):
    """6 steps straight == 2 steps + resume, and == 4 steps (an epoch's end) + resume with 2 workers."""
    remote = str(write_mds(tmp_path / "mds", 32))
    common = streaming_train(remote, "data.batch_size=8", "run.duration=6ba", "checkpoint.save_interval=2ba")
    straight = RecordBatches()
    full = Trainer(tiny(*common, "run.name=full"), callbacks=[straight])
    full_weights = weights(full.fit())
    seen = [sample_ids(tokens) for tokens in straight.seen]
    assert sorted(sum(seen[:4], [])) == list(range(32))  # epoch 0: every sample once
    assert seen[4:] != seen[:2]  # epoch 1 is reshuffled
    folder = full.run_dir / "checkpoints"
    for step, workers in ((2, 0), (4, 2)):
        checkpoint = next(folder.glob(f"ep*-ba{step}.pt"))
        resumed_batches = RecordBatches()
        resumed = Trainer(
            tiny(*common, f"run.name=resumed{step}", f"data.workers={workers}", f"checkpoint.resume={checkpoint}"),
            callbacks=[resumed_batches],
        )
        assert resumed.state.timestamp.batch == step
        assert_bit_identical(full_weights, weights(resumed.fit()))
        assert [sample_ids(tokens) for tokens in resumed_batches.seen] == seen[step:]


def test_checkpoint_holds_the_loader_state_and_a_changed_seed_is_refused(tiny, tmp_path):
    remote = str(write_mds(tmp_path / "mds", 32))
    trainer = Trainer(tiny(*streaming_train(remote, "data.batch_size=8", "run.duration=2ba", "run.name=a")))
    trainer.fit()
    checkpoint = torch.load(trainer.run_dir / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert checkpoint["dataloader"] == {
        "epoch": 0,
        "sample_in_epoch": 16,
        "num_canonical_nodes": 1,
        "shuffle_seed": 0,
        "initial_physical_nodes": 1,
    }
    with pytest.raises(ValueError, match="shuffle_seed=0, this config sets 5"):
        loader(remote, 8, shuffle_seed=5).load_state_dict(checkpoint["dataloader"])


def test_streaming_validation_data_is_read_whole_at_every_evaluation(tiny, tmp_path):
    remote = str(write_mds(tmp_path / "mds", 20))
    val = f"data.val={{type: streaming, remote: '{remote}', num_samples: null}}"  # replaces tiny.yaml's
    overrides = (val, "eval.interval=2ba", "run.duration=4ba")
    trainer = Trainer(tiny(*overrides, "data.batch_size=8", "optim.grad_clip_norm=null"))
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val/num_samples"]) for r in rows if "val/num_samples" in r] == [(2, 20), (4, 20)]


# -- elastic resume: 1 process ↔ 2 processes -----------------------------------------------------------------
def _rank_main(rank: int, world: int, port: int, remote: str, batch_size: int, state, steps, out: str) -> None:
    """One of ``world`` processes: load ``state`` (if any), take ``steps`` batches (all if None), record them."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = loader(remote, batch_size, DistInfo(rank, world, rank))
        if state is not None:
            data.load_state_dict(state)
        batches = []
        for _, tokens in data:
            batches.append(sample_ids(tokens))
            if steps is not None and len(batches) == steps:
                break
        Path(out, f"rank{rank}.json").write_text(json.dumps({"batches": batches, "state": data.state_dict()}))
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(world: int, remote: str, batch_size: int, state, steps, out: Path) -> list[dict]:
    import torch.multiprocessing as mp

    from .s3 import free_port

    out.mkdir()
    args = (world, free_port(), remote, batch_size, state, steps, str(out))
    mp.start_processes(_rank_main, args=args, nprocs=world, start_method="fork")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


def global_batches(per_rank: list[dict]) -> list[list[int]]:
    """Global batch k = rank 0's batch k + rank 1's batch k + ..."""
    return [sum(parts, []) for parts in zip(*(r["batches"] for r in per_rank), strict=True)]


def test_elastic_resume_from_one_process_to_two_and_back(tmp_path):
    remote = str(write_mds(tmp_path / "mds", 64))
    whole = run_ranks(1, remote, 8, None, None, tmp_path / "whole")[0]["batches"]  # the uninterrupted epoch
    assert sorted(sum(whole, [])) == list(range(64))

    # 1 process x 8 for 3 steps, then 2 processes x 4 for the rest of the epoch
    first = run_ranks(1, remote, 8, None, 3, tmp_path / "one")[0]
    assert first["state"]["sample_in_epoch"] == 24
    rest = run_ranks(2, remote, 4, first["state"], None, tmp_path / "two")
    batches = first["batches"] + global_batches(rest)
    assert sorted(sum(batches, [])) == list(range(64))  # every sample of the epoch exactly once
    assert [sorted(b) for b in batches] == [sorted(b) for b in whole]  # and the same global batches

    # 2 processes x 4 for 5 steps, then 1 process x 8
    first = run_ranks(2, remote, 4, None, 5, tmp_path / "two-first")
    assert first[0]["state"] == first[1]["state"] and first[0]["state"]["sample_in_epoch"] == 40
    rest = run_ranks(1, remote, 8, first[0]["state"], None, tmp_path / "one-after")[0]
    batches = global_batches(first) + rest["batches"]
    assert sorted(sum(batches, [])) == list(range(64))
    assert [sorted(b) for b in batches] == [sorted(b) for b in whole]


# -- S3 ---------------------------------------------------------------------------------------------------
def write_csv_source(folder: Path, num: int) -> Path:
    (folder / "images").mkdir(parents=True)
    rows = ["filepath\ttitle"]
    for i in range(num):
        (folder / "images" / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append(f"images/{i}.jpg\tsample {i}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return folder / "train.csv"


def test_convert_uploads_to_s3_and_training_reads_it_back(tiny, tmp_path, s3_bucket, moto_server):
    from streaming import StreamingDataset

    source = write_csv_source(tmp_path / "csv", 24)
    remote = f"s3://{s3_bucket}/mds/train"
    assert convert_main(["--from", "csv", str(source), "--to", remote, "--no-progress"]) == 0
    keys = {o["Key"] for o in moto_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {"mds/train/index.json", f"mds/train/{MARKER}", "mds/train/shard.00000.mds"} <= keys

    plain = StreamingDataset(remote=remote, local=str(tmp_path / "plain-cache"), batch_size=4)
    assert sorted(plain[i]["txt"] for i in range(len(plain))) == sorted(f"sample {i}" for i in range(24))

    recorder = RecordBatches()
    trainer = Trainer(
        tiny(*streaming_train(remote, "data.batch_size=8", "run.duration=3ba", "run.name=s3")), callbacks=[recorder]
    )
    trainer.fit()
    assert sorted(i for tokens in recorder.seen for i in sample_ids(tokens)) == list(range(24))
    assert list((trainer.run_dir / "data-cache" / "streaming-train").glob("shard.*.mds"))  # the per-run cache


# -- bad samples ----------------------------------------------------------------------------------------------
def failed_attempts(bad: dict[int, str], num: int) -> int:
    """Decoding attempts that fail in one epoch: each bad sample, and any bad stand-in tried before a good one."""
    count = 0
    for index in bad:
        for candidate in substitutes(index, num):
            if candidate not in bad:
                break
            count += 1
    return count


def test_corrupt_images_and_empty_captions_are_replaced_and_counted(tmp_path):
    bad = {3: "image", 10: "image", 17: "caption"}
    remote = str(write_mds(tmp_path / "mds", 32, bad=bad))
    data = loader(remote, 8)
    batches = [sample_ids(tokens) for _, tokens in data]
    assert [len(b) for b in batches] == [8, 8, 8, 8]  # batches stay full: positions (and resume) are unaffected
    seen = sum(batches, [])
    assert not set(seen) & set(bad)
    assert set(seen) == set(range(32)) - set(bad)
    assert data.skipped == failed_attempts(bad, 32) >= 3


def test_skipped_samples_reach_the_metrics(tiny, tmp_path):
    bad = {3: "image", 10: "image", 17: "caption"}
    remote = str(write_mds(tmp_path / "mds", 32, bad=bad))
    trainer = Trainer(tiny(*streaming_train(remote, "data.batch_size=8", "run.duration=4ba", "run.log_interval=2ba")))
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    counts = [r["data/skipped"] for r in rows if "data/skipped" in r]
    assert len(counts) == 2 and counts[-1] == failed_attempts(bad, 32) >= 3
    assert "skipped a sample of streaming" in (trainer.run_dir / "out.log").read_text()


def test_a_source_where_nothing_decodes_is_a_clear_error(tmp_path):
    remote = str(write_mds(tmp_path / "mds", 8, bad={i: "image" for i in range(8)}))
    with pytest.raises(DataError, match=r"no sample of streaming .*mds.* can be used"):
        next(iter(loader(remote, 4)))


def test_missing_columns_are_named(tmp_path):
    remote = str(write_mds(tmp_path / "mds", 8))
    with pytest.raises(DataError, match=r"no column 'image' \(image_key\); the shards have columns \['jpg', 'txt'\]"):
        loader(remote, 4, image_key="image")


# -- shard preparation ----------------------------------------------------------------------------------------
def count_prepare_calls(monkeypatch) -> dict[int, list[str]]:
    """Record the shard's state at each call into streaming's own ``prepare_shard``, per shard id."""
    from streaming import StreamingDataset
    from streaming.base.dataset import _ShardState

    calls: dict[int, list[str]] = {}
    original = StreamingDataset.prepare_shard

    def counted(self, shard_id, blocking=True):
        calls.setdefault(int(shard_id), []).append(_ShardState(self._shard_states[shard_id]).name)
        return original(self, shard_id, blocking)

    monkeypatch.setattr(StreamingDataset, "prepare_shard", counted)
    return calls


def test_a_copied_shard_is_prepared_once_per_process(tmp_path, monkeypatch):
    """streaming prepares a shard for every sample; once it is local, Cadenza skips that (0.6 ms a sample)."""
    calls = count_prepare_calls(monkeypatch)
    remote = str(write_mds(tmp_path / "mds", 64))
    data = loader(remote, 8, local=str(tmp_path / "copy"))
    shards = len(data.dataset.shards)
    assert shards > 2
    for epoch in range(2):
        data.set_epoch(epoch)
        assert sorted(sum((sample_ids(tokens) for _, tokens in data), [])) == list(range(64))
    assert sorted(calls) == list(range(shards))
    # once a shard is local, at most one call sees it so (streaming's own loop makes one per sample and thread)
    assert all(states.count("LOCAL") <= 1 for states in calls.values()), calls


def test_an_epoch_left_early_stops_streamings_threads(tmp_path, monkeypatch):
    """Without workers, streaming's download and ready threads run in the training process; leaving an epoch
    (after one batch here) stops them instead of letting them download the rest of the epoch in the background."""
    from streaming.base.dataset import _IterState

    calls = count_prepare_calls(monkeypatch)
    remote = str(write_mds(tmp_path / "mds", 64))
    data = loader(remote, 8, local=str(tmp_path / "copy"), predownload=64, shuffle=False)
    for _ in data:
        break
    assert data.dataset._iterator._state == _IterState.EXITED  # the threads have returned
    prepared = sum(len(states) for states in calls.values())
    time.sleep(0.3)
    assert sum(len(states) for states in calls.values()) == prepared  # and nothing is fetched after
    data.set_epoch(1)
    assert sorted(sum((sample_ids(tokens) for _, tokens in data), [])) == list(range(64))  # the next epoch is whole


def test_with_a_cache_limit_evicted_shards_are_fetched_again(tmp_path, monkeypatch):
    """With ``cache_limit`` streaming evicts shards, so every sample goes through its ``prepare_shard``."""
    calls = count_prepare_calls(monkeypatch)
    remote = str(write_mds(tmp_path / "mds", 64))
    sizes = [path.stat().st_size for path in Path(remote).glob("*.mds")]
    assert sum(sizes) > 6 * max(sizes)
    # four shards, in order, one batch ahead: streaming evicts and downloads again, and a shard evicted while the
    # ready thread waits for it (one run in many, with streaming 0.13's own thread a hang) is fetched again
    data = loader(remote, 8, local=str(tmp_path / "copy"), cache_limit=4 * max(sizes), predownload=8, shuffle=False)
    for epoch in range(2):
        data.set_epoch(epoch)
        assert sorted(sum((sample_ids(tokens) for _, tokens in data), [])) == list(range(64))
    # every sample goes through streaming's prepare_shard (nothing skipped), at least once per sample over the two
    # epochs: its download thread stops early when its ready thread reaches the end first, so not always twice
    assert sum(len(states) for states in calls.values()) >= 64
    assert len(list((tmp_path / "copy").glob("*.mds"))) <= 4  # evicted: at most four shards fit


def test_a_shard_evicted_while_the_ready_thread_waits_is_fetched_again(tmp_path, monkeypatch):
    """streaming's ready thread waits for a shard it saw being fetched; evicted meanwhile, it is fetched again.

    The third shard's copy is slowed so that the ready thread is already waiting for it, and right after the copy
    the shard is evicted, as another reader's download does under a full cache. streaming 0.13's own ready thread
    then waits forever (the reader yields nothing more, with no error); Cadenza's fetches the shard again.
    """
    import threading

    from streaming import StreamingDataset
    from streaming.base.dataset import _ShardState
    from streaming.base.stream import Stream

    remote = str(write_mds(tmp_path / "mds", 64))
    sizes = [path.stat().st_size for path in Path(remote).glob("*.mds")]
    data = loader(remote, 8, local=str(tmp_path / "copy"), cache_limit=len(sizes) * max(sizes), predownload=8)
    target = data.dataset.shards[2]
    evictions = []
    copy, prepare = Stream.prepare_shard, StreamingDataset.prepare_shard

    def slow_copy(stream, shard):
        if shard is target and not evictions:
            time.sleep(0.5)  # the ready thread reaches the shard and waits for it
        return copy(stream, shard)

    def prepare_then_evict(dataset, shard_id, blocking=True):
        prepare(dataset, shard_id, blocking)
        if shard_id == 2 and not evictions and dataset._shard_states[2] == _ShardState.LOCAL:
            evictions.append(threading.current_thread().name)
            dataset.evict_shard(2)

    monkeypatch.setattr(Stream, "prepare_shard", slow_copy)
    monkeypatch.setattr(StreamingDataset, "prepare_shard", prepare_then_evict)
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.extend(sum((sample_ids(tokens) for _, tokens in data), [])))
    reader.daemon = True  # streaming's thread would leave it waiting forever
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), f"the reader stalled after {len(seen)} samples (evicted by {evictions})"
    assert evictions and sorted(seen) == list(range(64))


def test_a_cache_limit_too_small_for_the_read_ahead_is_warned_about(tmp_path, caplog):
    """Shuffled reads with predownload 64 can need every shard at once: 4 shards of cache can stall streaming."""
    remote = str(write_mds(tmp_path / "mds", 64))
    sizes = [path.stat().st_size for path in Path(remote).glob("*.mds")]
    with caplog.at_level(logging.WARNING, logger="cadenza"):
        loader(remote, 8, local=str(tmp_path / "a"), cache_limit=4 * max(sizes))  # predownload: 8 x batch 8
    assert f"cache_limit ({4 * max(sizes)} bytes) holds 4 of its largest shards" in caplog.text
    assert f"up to {len(sizes)} can be in use at once (1 readers x predownload 64 samples, shuffled)" in caplog.text
    assert f"Raise cache_limit to at least {len(sizes) * max(sizes)} bytes" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cadenza"):
        loader(remote, 8, local=str(tmp_path / "b"), cache_limit=len(sizes) * max(sizes))  # everything fits
        loader(remote, 8, local=str(tmp_path / "c"), cache_limit=4 * max(sizes), predownload=8, shuffle=False)
    # the second: the in-order read the test above runs (Cadenza's records only: a streaming thread an earlier test
    # left behind may log an error whose path names that test)
    assert not [r for r in caplog.records if r.name == "cadenza" and "cache_limit" in r.getMessage()]


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_local_shards_are_read_through_memory_maps(tmp_path, monkeypatch, compression):
    """A shard local for good is read from a memory map: streaming's bytes for every sample, however many maps."""
    from streaming import StreamingDataset

    from cadenza.datasets.mds import MDSImageCaptions

    monkeypatch.setattr(MDSImageCaptions, "MAPPED_SHARDS", 2)  # fewer maps than shards: maps are closed and reopened
    remote = str(write_mds(tmp_path / "mds", 64, compression=compression))
    data = loader(remote, 8, local=str(tmp_path / "copy"))
    dataset = data.dataset
    assert len(dataset.shards) > 2
    for epoch in range(2):
        data.set_epoch(epoch)
        assert sorted(sum((sample_ids(tokens) for _, tokens in data), [])) == list(range(64))
    assert dataset._ready_shards == set(range(len(dataset.shards)))
    for sample_id in range(64):
        assert dataset.read_sample(sample_id) == StreamingDataset.get_item(dataset, sample_id)
    assert 0 < len(dataset._mapped) <= 2


def test_a_damaged_offset_table_skips_the_sample(tmp_path):
    """A shard whose offset table points past its end: the sample is skipped and counted, never a crash."""
    remote = write_mds(tmp_path / "mds", 16)
    shard = sorted(remote.glob("*.mds"))[0]
    raw = bytearray(shard.read_bytes())
    raw[8:12] = (len(raw) + 100).to_bytes(4, "little")  # sample 0 ends beyond the file
    shard.write_bytes(bytes(raw))
    data = loader(str(remote), 4, shuffle=False)
    dataset = data.dataset
    dataset.prepare_shard(0)
    assert 0 in dataset._ready_shards
    sample = dataset.get_item(0)
    assert sample.skipped and "bad offset" in sample.skipped[0]


# -- streams, epoch size, encodings -------------------------------------------------------------------------
def test_streams_are_mixed_by_proportion(tmp_path):
    a = str(write_mds(tmp_path / "a", 40, prefix="sample"))
    b = str(write_mds(tmp_path / "b", 40, prefix="other"))
    streams = [{"remote": a, "proportion": 0.75}, {"remote": b, "proportion": 0.25}]
    data = loader(None, 8, streams=streams, num_samples=32)
    assert data.batches_per_epoch == 4
    captions = [TOKENIZER.decode(row) for _, tokens in data for row in tokens]
    assert len(captions) == 32
    assert sum(">sample " in c for c in captions) == 24 and sum(">other " in c for c in captions) == 8


def test_jpeg_bytes_and_pil_columns_read_the_same(tmp_path):
    """The same samples decode to the same tensors (the shard layout, hence the order, differs)."""
    by_id = []
    for encoding in ("jpeg", "bytes", "pil"):
        data = loader(str(write_mds(tmp_path / encoding, 16, encoding=encoding)), 8)
        by_id.append({i: image for images, tokens in data for i, image in zip(sample_ids(tokens), images, strict=True)})
    assert sorted(by_id[0]) == list(range(16))
    for other in by_id[1:]:
        assert other.keys() == by_id[0].keys()
        assert all(torch.equal(other[i], by_id[0][i]) for i in other)


STREAMING_WITHOUT_TRANSFORMERS = """
import sys
from cadenza.datasets.mds import MDSImageCaptions
from cadenza.datasets.streaming_import import _Deferred
from streaming.base import dataloader
from streaming.text import c4
assert "transformers" not in sys.modules, "streaming imported transformers"
assert dataloader.StreamingDataLoader._get_batch_size(None, ([1, 2, 3], [4, 5, 6])) == 3
assert dataloader.StreamingDataLoader._get_batch_size(None, {"a": [1, 2]}) == 2
# transformers, imported afterwards, is the real one, and streaming's names resolve to it
import transformers.tokenization_utils_base as real
from transformers.models.auto.tokenization_auto import AutoTokenizer
assert not isinstance(real.BatchEncoding, _Deferred) and not isinstance(AutoTokenizer, _Deferred)
assert isinstance(real.BatchEncoding({"a": [1]}), dataloader.BatchEncoding)
assert not isinstance({"a": [1]}, dataloader.BatchEncoding)
assert dataloader.StreamingDataLoader._get_batch_size(None, real.BatchEncoding({"a": [1, 2, 3, 4]})) == 4
assert c4.AutoTokenizer.from_pretrained == AutoTokenizer.from_pretrained
print("checked")
"""

TRANSFORMERS_FIRST = """
import transformers.tokenization_utils_base as real
from cadenza.datasets.mds import MDSImageCaptions
from streaming.base import dataloader
assert dataloader.BatchEncoding is real.BatchEncoding  # already imported: streaming gets the real names
print("checked")
"""


@pytest.mark.parametrize("code", [STREAMING_WITHOUT_TRANSFORMERS, TRANSFORMERS_FIRST], ids=["alone", "after"])
def test_streaming_is_imported_without_transformers(code):
    """streaming imports transformers (2.5-3 s here) for names Cadenza never uses; Cadenza imports it without,
    and the names still work once transformers is imported."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "checked", done.stderr[-3000:]


# -- composer convert -------------------------------------------------------------------------------------------
def read_plain(folder: Path) -> list[dict]:
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(folder), batch_size=1)
    return [dataset[i] for i in range(len(dataset))]


def test_convert_csv_skips_and_counts_bad_rows(tmp_path, caplog):
    source = write_csv_source(tmp_path / "csv", 6)
    (tmp_path / "csv" / "images" / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with source.open("a") as handle:
        handle.write("images/missing.jpg\tgone\nimages/bad.jpg\tbroken\nimages/0.jpg\t \n")
    out = tmp_path / "out"
    assert convert_main(["--from", "csv", str(source), "--to", str(out), "--no-progress"]) == 0
    samples = read_plain(out)
    assert sorted(s["txt"] for s in samples) == sorted(f"sample {i}" for i in range(6))
    assert samples[0]["jpg"].size == (16, 16)  # a PIL image for plain readers, the original bytes inside
    assert json.loads((out / MARKER).read_text())["skipped"] == 3
    assert "missing file" in caplog.text and "undecodable image" in caplog.text and "empty caption" in caplog.text


def test_convert_webdataset_with_brace_expansion_and_a_truncated_shard(tmp_path):
    for shard in range(3):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for i in range(4):
                for name, data in ((f"{shard}-{i}.jpg", jpeg(i)), (f"{shard}-{i}.txt", f"wds {shard} {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    whole = (tmp_path / "shard-2.tar").read_bytes()
    (tmp_path / "shard-2.tar").write_bytes(whole[:1500])  # cut inside the first member's data
    out = tmp_path / "out"
    source = f"{tmp_path}/shard-{{0..1}}.tar::{tmp_path}/shard-2.tar"
    assert convert_main(["--from", "webdataset", source, "--to", str(out), "--no-progress"]) == 0
    assert sorted(s["txt"] for s in read_plain(out)) == sorted(f"wds {s} {i}" for s in range(2) for i in range(4))
    assert json.loads((out / MARKER).read_text())["skipped"] == 1


def test_convert_imagefolder_with_templates_reads_back_in_cadenza(tmp_path):
    for label, name in enumerate(("cat", "hot_dog")):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "src" / name / f"{i}.jpg").write_bytes(jpeg(label * 4 + i))
    out = tmp_path / "out"
    args = ["--from", "imagefolder", str(tmp_path / "src"), "--to", str(out), "--no-progress"]
    assert convert_main([*args, "--templates", "a photo of a {}.", "a {} picture"]) == 0
    samples = read_plain(out)
    assert sorted((s["cls"], s["txt"]) for s in samples) == sorted(
        [(0, "a photo of a cat."), (0, "a cat picture")] * 2
        + [(1, "a photo of a hot dog."), (1, "a hot dog picture")] * 2
    )
    assert sum(len(tokens) for _, tokens in loader(str(out), 4)) == 8
    assert convert_main([*args, "--to", str(tmp_path / "out2"), "--templates", "no placeholder"]) == 1


def test_convert_to_pixels_reads_back_the_same_images(tmp_path):
    """``--image-encoding pil`` stores decoded pixels: plain readers get the images, Cadenza the same tensors as
    from the original files. A palette image is stored as RGB (the encoding keeps no palette)."""
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    modes = ("RGB", "L", "P", "RGBA")
    for label, mode in enumerate(modes):
        (tmp_path / "src" / mode).mkdir(parents=True)
        Image.fromarray(np.roll(pixels, label, axis=0)).convert(mode).save(tmp_path / "src" / mode / "0.png")
    args = ["--from", "imagefolder", str(tmp_path / "src"), "--no-progress", "--templates", "a {} image"]
    assert convert_main([*args, "--to", str(tmp_path / "files")]) == 0
    assert convert_main([*args, "--to", str(tmp_path / "pixels"), "--image-encoding", "pil"]) == 0
    for sample in read_plain(tmp_path / "pixels"):
        mode = sorted(modes)[sample["cls"]]  # class folders in name order
        original = Image.open(tmp_path / "src" / mode / "0.png")
        assert sample["jpg"].mode == ("RGB" if mode == "P" else mode)
        assert np.array_equal(np.asarray(sample["jpg"]), np.asarray(original.convert(sample["jpg"].mode)))
    captions = {tuple(TOKENIZER([f"a {mode.lower()} image"])[0].tolist()): mode for mode in modes}
    tensors = []
    for name in ("files", "pixels"):
        data = loader(str(tmp_path / name), 4, shuffle=False)
        tensors.append(
            {
                captions[tuple(t.tolist())]: image
                for images, tokens in data
                for t, image in zip(tokens, images, strict=True)
            }
        )
    assert tensors[0].keys() == tensors[1].keys() == set(modes)
    # the same crops of the same pixels (palette images aside: PIL resizes those nearest-neighbor)
    assert all(torch.equal(tensors[0][mode], tensors[1][mode]) for mode in ("RGB", "L", "RGBA"))


def test_a_failed_conversion_leaves_no_index_and_an_empty_source_is_an_error(tmp_path, capsys):
    from cadenza.datasets.convert import Item, convert

    def items():
        yield Item("a", jpeg(1), "one")
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        convert(items(), str(tmp_path / "out"), {"jpg": "jpeg", "txt": "str"}, progress=False)
    assert not (tmp_path / "out" / "index.json").exists()  # MDSWriter wrote one on exit; it was removed

    (tmp_path / "empty.csv").write_text("filepath\ttitle\nmissing.jpg\tnothing\n")
    args = ["--from", "csv", str(tmp_path / "empty.csv"), "--to", str(tmp_path / "out3"), "--no-progress"]
    assert convert_main(args) == 1
    assert "no usable sample in csv" in capsys.readouterr().err
    assert not (tmp_path / "out3" / "index.json").exists()


def test_readme_convert_commands_are_valid():
    import re
    import shlex

    from cadenza.datasets.convert import build_parser

    from .conftest import ROOT

    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = [shlex.split(line) for b in blocks for line in b.splitlines() if line.startswith("composer convert ")]
    assert len(commands) == 4  # the three of "Data on S3 or disk" and the reinforced-data example's
    for command in commands:
        args = build_parser().parse_args(command[2:])
        assert args.kind in ("csv", "webdataset", "imagefolder") and args.out
