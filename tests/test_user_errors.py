"""A user's mistake is one message naming the key or file and what to do, never a traceback (issue 20, item 5)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cadenza.engine.errors import ConfigError, DataError
from cadenza.train.trainer import Trainer

from .conftest import ROOT
from .test_config import _error

FAST = ("data.val=null", "data.train.num_samples=16", "data.batch_size=8", "run.log_interval=2ba")


@pytest.mark.parametrize(
    ("yaml", "overrides", "key", "hint"),
    [
        ("- a\n- b\n", (), "config", "holds a list at its top level"),
        ("algorithms: [ema]\n", (), "algorithms", "algorithms: {ema: {}}"),
        (None, ("optim.lr=[1",), "optim.lr", "Quote lists and mappings whole"),
        (None, ("optim.lr=nan",), "optim.lr", "finite number"),
        (None, ("optim.weight_decay=inf",), "optim.weight_decay", "finite number"),
        (None, ("loss.clip_loss_weight=.nan",), "loss.clip_loss_weight", "finite number"),
        (None, ("callbacks=[1]",), "callbacks", "mapping of names"),
        (None, ("data.augment.scale=[0.9, 1.5]",), "data.augment", "0 < low <= high <= 1"),
        (None, ("data.augment.gray_scale_prob=2",), "data.augment", "probability in [0, 1]"),
        (None, ("data.augment.re_prob=0.5",), "data.augment", "need use_timm"),
    ],
)
def test_config_mistakes_name_the_key(tmp_path, yaml, overrides, key, hint):
    error = _error(tmp_path, *overrides, yaml=yaml)
    assert error.key == key and hint in str(error)


def test_the_cli_says_it_in_one_line_with_exit_2(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n")
    result = subprocess.run(
        [sys.executable, "-m", "cadenza.train.cli", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"composer: configuration error: config key 'config': '{bad}' holds a list at its top level; a config is a "
        "mapping of sections (run:, model:, data:, ...). See yamls/tiny.yaml."
    ]


def test_resuming_another_architectures_checkpoint_names_both(tiny, tmp_path):
    Trainer(tiny(*FAST, "run.name=vit", "run.duration=2ba")).fit()
    saved = tmp_path / "logs" / "vit" / "checkpoints" / "epoch_latest.pt"
    with pytest.raises(ConfigError) as info:
        Trainer(tiny(*FAST, "run.name=rn", "model.name=tiny-rn", f"checkpoint.resume={saved}"))
    message = str(info.value)
    assert info.value.key == "checkpoint.resume" and "saved by model.name=tiny-vit" in message
    assert "model.name=tiny-rn" in message and "missing" in message and len(message) < 1000
    assert not (tmp_path / "logs" / "rn" / "config.yaml").exists()


def _streaming(tiny, remote: str):
    return tiny(*FAST, f"data.train={{type: streaming, remote: '{remote}', download_retry: 1, download_timeout: 5}}")


def test_streaming_from_a_missing_folder_is_a_data_error_naming_it(tiny, tmp_path):
    with pytest.raises(DataError, match=f"streaming {tmp_path / 'nothing'}.*index.json"):
        Trainer(_streaming(tiny, str(tmp_path / "nothing")))


def test_streaming_from_a_store_that_is_down_or_refuses_is_a_data_error(tiny, monkeypatch, moto_server):
    from .s3 import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    with pytest.raises(DataError, match="streaming s3://bucket/mds.*Could not connect.*S3_ENDPOINT_URL") as info:
        Trainer(_streaming(tiny, "s3://bucket/mds"))
    assert "testing-secret" not in str(info.value)
    monkeypatch.setenv("S3_ENDPOINT_URL", moto_server.endpoint)
    with pytest.raises(DataError, match="streaming s3://no-such-bucket/mds: .*index.json not found"):
        Trainer(_streaming(tiny, "s3://no-such-bucket/mds"))
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(DataError, match=r"Unable to locate credentials \(NoCredentialsError\)"):
        Trainer(_streaming(tiny, "s3://bucket/mds"))
