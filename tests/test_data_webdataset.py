"""The ``webdataset`` format: OpenCLIP's shard strings, seeded order, exact resume (any worker count, S3 shards
through a real S3 server), resampling with upsampling factors, and bad data skipped and counted."""

from __future__ import annotations

import json
import tarfile

import pytest

from cadenza.datasets.webdataset import SHARD_DONE, ShardPlan, dataset_size, expand_sources, iter_tar
from cadenza.engine import ConfigError, DataError
from cadenza.engine.dist import DistInfo
from cadenza.engine.object_store import S3Store
from cadenza.train.trainer import Trainer

from .data_helpers import (
    RecordIds,
    add_member,
    caption_of,
    check_exact_resume,
    image_bytes,
    metric_rows,
    write_shard,
    write_shards,
)


def wds_args(path, *extra: str) -> tuple[str, ...]:
    return ("data.train.type=webdataset", f"+data.train.path={path}", "data.train.num_samples=null", *extra)


@pytest.mark.parametrize("workers", [(0, 0), (0, 2)], ids=["w0", "w0-then-w2"])
def test_resume_sees_the_same_samples_and_weights(tiny, tmp_path, workers):
    """A checkpoint mid-epoch, with a half-full shuffle buffer, resumes exactly (the buffer is re-read)."""
    path = write_shards(tmp_path / "shards", shards=4, per_shard=10)
    args = wds_args(path, "+data.train.shuffle_buffer=6", "data.batch_size=8")
    ids = check_exact_resume(tiny, args, steps=7, split=3, workers=workers).ids
    assert sorted(sum(ids[:5], [])) == list(range(40))  # epoch 0 (5 batches, from sizes.json) shows every sample once
    assert ids[5:7] != ids[0:2]  # epoch 1 has its own order


def test_resampled_sources_with_upsampling_factors_resume_exactly(tiny, tmp_path):
    first = write_shards(tmp_path / "a", shards=2, per_shard=6)
    second = write_shards(tmp_path / "b", shards=2, per_shard=6, first=100)
    args = wds_args(f"{first}::{second}", "+data.train.resampled=true", "+data.train.upsampling_factors=[1,3]")
    ids = check_exact_resume(tiny, (*args, "data.batch_size=8"), steps=5, split=2, workers=(0, 0)).ids
    drawn = sum(ids, [])
    assert len(drawn) == 40 and len(set(drawn)) < 24  # 24 samples in all (sizes.json): drawn with replacement


def test_shard_plan_orders_deals_and_weights_shards():
    urls = [f"s{i}.tar" for i in range(10)]
    plans = [ShardPlan(urls, [1.0] * 10, DistInfo(rank, 2), seed=0, train=True, resampled=False) for rank in (0, 1)]
    epoch0 = [[plan.url(0, cursor) for cursor in range(5)] for plan in plans]
    assert sorted(epoch0[0] + epoch0[1]) == sorted(urls)  # the two processes split the shards
    assert epoch0[0] != [plans[0].url(1, cursor) for cursor in range(5)]  # a new order each epoch
    assert sorted(plans[0].url(0, cursor) for cursor in range(5, 10)) == sorted(epoch0[0])  # pass 2: the same shards
    weights = [1.0] * 5 + [3.0] * 5
    resampled = ShardPlan(urls, weights, DistInfo(), seed=0, train=True, resampled=True)
    draws = [resampled.url(0, cursor) for cursor in range(4000)]
    assert abs(sum(d in urls[5:] for d in draws) / 4000 - 0.75) < 0.03
    evaluation = ShardPlan(urls, [1.0] * 10, DistInfo(1, 2), seed=0, train=False, resampled=False)
    assert [evaluation.url(0, cursor) for cursor in range(6)] == urls[1::2] + [None]


def test_shard_strings_and_sample_counts(tmp_path):
    first = write_shards(tmp_path / "a", shards=3, per_shard=4)
    write_shards(tmp_path / "b", shards=2, per_shard=5, sizes=False)
    (tmp_path / "b" / "__len__").write_text("10")
    urls, weights = expand_sources(f"{first}::{tmp_path}/b/{{00000..00001}}.tar", [1, 2.5])
    assert [u.rsplit("/", 2)[-2:] for u in urls] == [["a", "00000.tar"], ["a", "00001.tar"], ["a", "00002.tar"]] + [
        ["b", "00000.tar"],
        ["b", "00001.tar"],
    ]
    assert weights == [1.0, 1.0, 1.0, 2.5, 2.5]
    assert expand_sources(f"{first}::{first}", "1::2")[1] == [1.0] * 3 + [2.0] * 3  # OpenCLIP's string form
    assert dataset_size(urls) == 12 + 10
    assert dataset_size(urls[:2]) == 8
    (tmp_path / "b" / "__len__").unlink()
    assert dataset_size(urls) is None
    with pytest.raises(ValueError, match="2 values for 1"):
        expand_sources(first, [1, 2])
    (tmp_path / "a" / "sizes.json").write_text(json.dumps({"00000.tar": 4}))
    with pytest.raises(ValueError, match="sizes.json has no count for"):
        dataset_size(urls[:2])


def test_a_wildcard_names_the_shards_it_matches_locally_and_on_s3(tmp_path, s3_bucket):
    write_shards(tmp_path / "a", shards=3, per_shard=4)
    assert expand_sources(f"{tmp_path}/a/*.tar")[0] == [f"{tmp_path}/a/0000{i}.tar" for i in range(3)]
    assert expand_sources(f"{tmp_path}/a/0000[12].tar")[0] == [f"{tmp_path}/a/0000{i}.tar" for i in (1, 2)]
    with pytest.raises(ValueError, match=r"'.*/a/\*\.tgz' matches no file"):
        expand_sources(f"{tmp_path}/a/*.tgz")
    with pytest.raises(ValueError, match="only the file name"):
        expand_sources(f"{tmp_path}/*/00000.tar")
    store = S3Store(f"s3://{s3_bucket}/shards")
    for name in ("00000.tar", "00001.tar", "notes.txt", "deeper/00002.tar"):
        store.write_bytes(name, b"x")
    assert expand_sources(f"s3://{s3_bucket}/shards/*.tar")[0] == [
        f"s3://{s3_bucket}/shards/00000.tar",
        f"s3://{s3_bucket}/shards/00001.tar",
    ]


def test_a_wildcard_that_matches_nothing_is_a_config_error_of_the_section(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train.*matches no file"):
        Trainer(tiny(f"data.train={{type: webdataset, path: '{tmp_path}/none/*.tar', num_samples: 8}}"))


def test_configuration_errors_name_the_key(tiny, tmp_path):
    path = write_shards(tmp_path / "shards", shards=2, per_shard=4, sizes=False)
    with pytest.raises(ConfigError, match=r"data\.train.*set num_samples, or put a sizes.json"):
        Trainer(tiny(*wds_args(path), "data.val=null"))
    with pytest.raises(ConfigError, match=r"data\.train.*upsampling_factors needs resampled"):
        Trainer(
            tiny(*wds_args(path, "data.train.num_samples=8", "+data.train.upsampling_factors=[2]"), "data.val=null")
        )
    with pytest.raises(ConfigError, match=r"data\.val.*resampled applies to training data only"):
        Trainer(tiny("data.val.type=webdataset", f"+data.val.path={path}", "+data.val.resampled=true"))


def test_iter_tar_resumes_at_any_sample_offset(tmp_path):
    shard = tmp_path / "s.tar"
    write_shard(shard, range(5))
    with tarfile.open(shard, "a") as archive:  # a folder entry and WebDataset metadata are not samples
        info = tarfile.TarInfo("folder")
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
        add_member(archive, "__index__", b"meta")
    steps = list(iter_tar(str(shard)))
    assert [sample.key for sample, _ in steps] == [f"{i:06d}" for i in range(5)]
    assert steps[-1][1] == SHARD_DONE
    for position, (_, resume) in enumerate(steps[:-1]):
        rest = [sample.key for sample, _ in iter_tar(str(shard), resume)]
        assert rest == [sample.key for sample, _ in steps[position + 1 :]]
    third = steps[2][0]
    assert [s.key for s, _ in iter_tar(str(shard), third.start, third.end)] == [third.key]
    assert third.parts["txt"] == caption_of(2).encode()


def write_bad_shard(folder):
    """24 samples; 3 (bad JPEG bytes), 5 (empty caption), 8 (truncated JPEG), 11 (no image), 13 (no caption) and
    16 (two .jpg members) are bad, and a member without an extension follows sample 19."""
    folder.mkdir()
    overrides = {
        3: {"jpg": b"\xff\xd8 not a jpeg"},
        5: {"txt": b"  \n"},
        8: {"jpg": image_bytes(8)[:120]},
        11: {"jpg": None},
        13: {"txt": None},
    }
    path = folder / "00000.tar"
    write_shard(path, range(24), overrides=overrides)
    members = []
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            members.append((member.name, archive.extractfile(member).read()))
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            add_member(archive, name, data)
            if name == "000016.txt":
                add_member(archive, "000016.jpg", image_bytes(16))
            if name == "000019.txt":
                add_member(archive, "README", b"a stray file")
    reasons = ["undecodable image", "empty caption", "no image member", "no caption", "duplicate member"]
    return str(path), {3, 5, 8, 11, 13, 16}, reasons + ["member 'README' has no extension"]


def test_bad_samples_are_skipped_counted_and_logged(tiny, tmp_path):
    path, bad, reasons = write_bad_shard(tmp_path / "shards")
    recorder = RecordIds()
    args = wds_args(path, "data.train.num_samples=18", "+data.train.shuffle_buffer=1", "data.batch_size=6")
    trainer = Trainer(
        tiny(*args, "data.val=null", "data.workers=2", "run.duration=6ba", "run.log_interval=3ba"), callbacks=[recorder]
    )
    trainer.fit()
    ids = recorder.ids
    assert all(len(batch) == 6 for batch in ids)  # batches stay full
    assert sorted(sum(ids[:3], [])) == sorted(set(range(24)) - bad)  # an epoch: every good sample, once
    rows = metric_rows(trainer.run_dir, "data/skipped")
    assert [(r["step"], r["data/skipped"]) for r in rows] == [(3, 7), (6, 14)]  # 6 bad samples + 1 stray member
    log = (trainer.run_dir / "out.log").read_text()
    for reason in reasons:
        assert reason in log, reason


def test_truncated_tar_and_missing_shard(tiny, tmp_path):
    """A truncated shard loses its tail (one skip per pass); a missing shard is one skip per pass."""
    path = write_shards(tmp_path / "cut", shards=2, per_shard=12)
    shard = tmp_path / "cut" / "00001.tar"
    eighth = [s for s, _ in iter_tar(str(shard)) if s.key == "000020"][0]
    shard.write_bytes(shard.read_bytes()[: eighth.start + 700])  # inside sample 20's image
    recorder = RecordIds()
    run = Trainer(
        tiny(*wds_args(path), "data.val=null", "data.batch_size=4", "run.duration=6ba", "run.name=cut"),
        callbacks=[recorder],
    )
    run.fit()
    assert set(sum(recorder.ids, [])) == set(range(20))  # 24 nominal samples (sizes.json): 20 read, 4 repeated
    # The epoch takes a second pass for its last 4 samples; the buffer (larger than a pass) reads the whole pass,
    # and its skip, before handing out any of it: one skip per pass.
    assert metric_rows(run.run_dir, "data/skipped")[-1]["data/skipped"] == 2
    assert "truncated or corrupt tar, stopped at sample 000020" in (run.run_dir / "out.log").read_text()

    path = write_shards(tmp_path / "gone", shards=3, per_shard=10)
    (tmp_path / "gone" / "00001.tar").unlink()
    run = Trainer(tiny(*wds_args(path), "data.val=null", "data.batch_size=5", "run.duration=6ba", "run.name=gone"))
    run.fit()  # 30 nominal samples: pass 1 (20 samples, 1 skip), then pass 2 (1 skip) for the last 10
    assert metric_rows(run.run_dir, "data/skipped")[-1]["data/skipped"] == 2
    assert "cannot read shard" in (run.run_dir / "out.log").read_text()


def test_a_source_where_nothing_decodes_fails_clearly(tiny, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    write_shard(folder / "00000.tar", range(8), overrides={i: {"jpg": b"junk"} for i in range(8)})
    path = str(folder / "00000.tar")
    trainer = Trainer(tiny(*wds_args(path, "data.train.num_samples=8"), "data.val=null", "data.batch_size=8"))
    with pytest.raises(DataError, match=rf"no sample of webdataset {path} can be used: 1000 tried.*undecodable"):
        trainer.fit()
    missing = str(tmp_path / "none" / "{0..2}.tar")
    trainer = Trainer(tiny(*wds_args(missing, "data.train.num_samples=8"), "data.val=null", "data.batch_size=8"))
    with pytest.raises(DataError, match="no sample can be read from any shard of webdataset .*cannot read shard"):
        trainer.fit()


def test_validation_reads_every_sample_once(tiny, tmp_path):
    path = write_shards(tmp_path / "val", shards=2, per_shard=10, sizes=False)  # no count needed to evaluate
    trainer = Trainer(tiny("data.val.type=webdataset", f"+data.val.path={path}", "data.val.num_samples=null"))
    trainer.fit()
    rows = metric_rows(trainer.run_dir, "val/num_samples")
    assert rows and all(row["val/num_samples"] == 20 for row in rows)  # batches of 16 and 4


def test_s3_shards_train_and_resume(tiny, tmp_path, s3_bucket):
    """Shards on a real S3 server (moto); the resumed run re-reads its shuffle buffer with range requests."""
    from cadenza.engine.object_store import s3_client

    write_shards(tmp_path / "shards", shards=2, per_shard=10)
    for file in (tmp_path / "shards").iterdir():
        s3_client().upload_file(str(file), s3_bucket, f"wds/{file.name}")
    path = f"s3://{s3_bucket}/wds/{{00000..00001}}.tar"
    args = wds_args(path, "+data.train.shuffle_buffer=5", "data.batch_size=4")
    ids = check_exact_resume(tiny, args, steps=4, split=2, workers=(0, 0)).ids
    assert len(set(sum(ids, []))) == 16
