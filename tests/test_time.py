from __future__ import annotations

import pytest

from cadenza.engine import ConfigError, Time, Timestamp, TimeUnit


@pytest.mark.parametrize(
    ("text", "value", "unit"),
    [
        ("32ep", 32, TimeUnit.EPOCH),
        ("2000ba", 2000, TimeUnit.BATCH),
        ("4e8sp", 4e8, TimeUnit.SAMPLE),
        ("0.1dur", 0.1, TimeUnit.DURATION),
    ],
)
def test_parse(text, value, unit):
    time = Time.parse(text)
    assert (time.value, time.unit) == (value, unit)


def test_wall_clock_only_where_allowed():
    assert Time.parse("30m", allow_wall_clock=True).seconds == 1800
    assert Time.parse("2h", allow_wall_clock=True).seconds == 7200
    with pytest.raises(ConfigError, match="run.duration.*wall-clock"):
        Time.parse("30m", "run.duration")


@pytest.mark.parametrize("text", ["8", "8 batches", "ep", "1.5ba", "2dur", 8, "-3ba"])
def test_bad_time_strings_name_the_key(text):
    with pytest.raises(ConfigError, match="'optim.warmup'"):
        Time.parse(text, "optim.warmup")


def test_to_batches():
    # 10 steps per epoch, 64 samples per step, 100 steps in the run
    assert Time.parse("3ep").to_batches(10, 64) == 30
    assert Time.parse("7ba").to_batches(10, 64) == 7
    assert Time.parse("129sp").to_batches(10, 64) == 3  # rounds up to whole steps
    assert Time.parse("0.25dur").to_batches(10, 64, 100) == 25


def test_timestamp_round_trip():
    ts = Timestamp()
    ts.after_batch(32)
    ts.after_batch(32)
    ts.after_epoch()
    ts.after_batch(32)
    assert (ts.epoch, ts.batch, ts.sample, ts.batch_in_epoch, ts.sample_in_epoch) == (1, 3, 96, 1, 32)
    other = Timestamp()
    other.load_state_dict(ts.state_dict())
    assert other == ts
