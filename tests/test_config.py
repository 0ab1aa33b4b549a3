"""Every class of configuration error fails before any work, with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cadenza.engine.errors import ConfigError
from cadenza.train.config import build_config, load_config
from cadenza.train.trainer import Trainer

from .conftest import ROOT, TINY

YAMLS = sorted(
    p for p in (ROOT / "yamls").rglob("*.yaml") if p.parent.name != "eval"
)  # eval/: suites (test_eval_suite)
EXPECTED_YAMLS = 22  # raise when adding a config under yamls/


def test_every_yaml_loads_and_validates():
    assert len(YAMLS) == EXPECTED_YAMLS, [p.name for p in YAMLS]
    for path in YAMLS:
        cfg = load_config(path)
        assert cfg.data.train is not None
        first_line = path.read_text().splitlines()[0]
        assert first_line.startswith("# composer "), f"{path.name} must start with the command that runs it"


def test_overrides_and_interpolation(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text(
        "run: {name: interp, duration: 4ba}\n"
        "data: {train: {type: synthetic, num_samples: 64}, batch_size: 8}\n"
        "optim: {lr: 0.01, cooldown_end_lr: '${optim.lr}'}\n"
    )
    cfg = load_config(yaml, ["optim.lr=0.5", "data.batch_size=4"])
    assert cfg.optim.lr == 0.5 and cfg.optim.cooldown_end_lr == 0.5  # interpolation after overrides
    assert cfg.data.batch_size == 4
    assert cfg.run.precision == "fp32"  # default from the schema


def _error(tmp_path: Path, *overrides: str, yaml: str | None = None) -> ConfigError:
    path = TINY
    if yaml is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml)
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value


def test_a_whole_mapping_replaces_a_section_and_tilde_removes_a_key():
    vitb16 = ROOT / "yamls" / "vitb16.yaml"  # a cluster YAML: webdataset path, 400M samples
    replaced = load_config(vitb16, ["data.train={type: synthetic, num_samples: 10000}"])
    assert OmegaConf.to_container(replaced.data.train) == {"type": "synthetic", "num_samples": 10000}
    removed = load_config(vitb16, ["data.train.type=synthetic", "~data.train.path", "data.train.num_samples=64"])
    assert OmegaConf.to_container(removed.data.train) == {"type": "synthetic", "num_samples": 64}
    dotted = load_config(vitb16, ["data.train.num_samples=8"])  # a dotted key still changes one value
    assert dotted.data.train.type == "webdataset" and dotted.data.train.num_samples == 8
    assert load_config(vitb16, ["++run.seed=3"]).run.seed == 3  # Hydra's force-add prefix
    assert load_config(vitb16, ["~algorithms.grad_checkpointing"]).algorithms == {}
    with pytest.raises(ConfigError) as info:
        load_config(vitb16, ["data.train.type=synthetic"])  # the old way: the YAML's path stays
    assert info.value.key == "data.train.path"
    assert "~data.train.path" in str(info.value) and "data.train='{type: synthetic, ...}'" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["~data.train.num_sample"], "data.train.num_sample", "Did you mean 'num_samples'"),
        (["~data.train.num_samples=8"], "data.train.num_samples", "takes no value"),
        (["~loggers.console"], "loggers.console", "loggers.console=null"),
        (["~nothing.here"], "nothing.here", "nothing sets it"),
        (["optimm.lr=1"], "optimm", "Did you mean 'optim'"),
        (["optim.lrr=1"], "optim.lrr", "Did you mean 'lr'"),
        (["run.durration=4ba"], "run.durration", "Did you mean 'duration'"),
        (["optim.lr=fast"], "optim.lr", "fast"),
        (["data.batch_size=[1,2]"], "data.batch_size", ""),
        (["run.duration=8"], "run.duration", "no unit"),
        (["run.duration=8 batches"], "run.duration", "not a time string"),
        (["checkpoint.save_interval=often"], "checkpoint.save_interval", "time string"),
        (["optim.warmup=30m"], "optim.warmup", "wall-clock"),
        (["run.duration=0.5dur"], "run.duration", "fraction of itself"),
        (["run.precision=fp64"], "run.precision", "fp32"),
        (["optim.scheduler=cosin"], "optim.scheduler", "Did you mean 'cosine'"),
        (["model.name=tiny-vitt"], "model.name", "Did you mean 'tiny-vit'"),
        (["data.train.type=synthetc"], "data.train", "Did you mean 'synthetic'"),
        (["data.train.num_sample=5"], "data.train.num_sample", "Did you mean 'num_samples'"),
        (["algorithms.grad_cliping={norm: 1}"], "algorithms.grad_cliping", "gradient_clipping"),
        (
            ["optim.grad_clip_norm=null", "+algorithms.gradient_clipping.nrm=1"],
            "algorithms.gradient_clipping.nrm",
            "Did you mean 'norm'",
        ),
        (["loggers.tensorbord={}"], "loggers.tensorbord", "unknown logger"),
        (["+callbacks.nothing={}"], "callbacks.nothing", "unknown callback"),
        (["data.batch_size=0"], "data.batch_size", "at least 1"),
        (["checkpoint.save_interval=0ba"], "checkpoint.save_interval", "greater than zero"),
        (["run.name=../../escaped"], "run.name", "not one folder name"),
        (["run.name=a/b"], "run.name", "may not contain '/'"),
        (["run.name=.."], "run.name", "not one folder name"),
        (["checkpoint.resume=lastest"], "checkpoint.resume", "Did you mean 'latest'"),
        (["optim.accum_freq=0"], "optim.accum_freq", "at least 1"),
        (["checkpoint.keep=0"], "checkpoint.keep", "-1"),
        (["optim.betas=[0.9]"], "optim.betas", "takes 2 numbers"),
        (["optim.cooldown=1ep"], "optim.cooldown", "const-cooldown"),
        (["optim.scheduler=const-cooldown"], "optim.cooldown", "needs a cooldown"),
        (["run.name=null", "checkpoint.resume=latest"], "checkpoint.resume", "run.name"),
        (["data.train=null", "data.val=null"], "data.train", "nothing to do"),
        (["optim.grad_clip_norm=2", "+algorithms.gradient_clipping={norm: 1}"], "optim.grad_clip_norm", "not both"),
    ],
)
def test_config_errors_name_the_key(tmp_path, overrides, key, hint):
    error = _error(tmp_path, *overrides)
    assert error.key == key
    assert f"'{key}'" in str(error)
    assert hint in str(error)


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["eval.zero_shot.templates=openia"], "eval.zero_shot.templates", "neither a template set"),
        (["eval.zero_shot.templates=[a photo]"], "eval.zero_shot.templates", "has no '{}'"),
        (
            ["optim.grad_clip_norm=null", "algorithms.gradient_clipping={norm: 1, value: 1}"],
            "algorithms.gradient_clipping",
            "exactly one",
        ),
        (["algorithms.patch_dropout={prob: 1.5}"], "algorithms.patch_dropout", "[0, 1)"),
    ],
)
def test_component_errors_come_from_their_one_build_before_any_work(tmp_path, monkeypatch, overrides, key, hint):
    """load_config checks the names of an algorithm's arguments; building it (once, first thing in the trainer) checks
    their values, before the process group, the run folder or the model."""
    import cadenza.train.trainer as trainer_module

    cfg = load_config(TINY, [f"run.logs={tmp_path / 'logs'}", "run.name=parts", *overrides])
    monkeypatch.setattr(trainer_module.dist, "init_process_group", lambda *a: pytest.fail("work started"))
    with pytest.raises(ConfigError) as info:
        Trainer(cfg)
    assert info.value.key == key and hint in str(info.value)
    assert not (tmp_path / "logs").exists()


def test_missing_dataset_type_and_bad_yaml(tmp_path):
    assert _error(tmp_path, yaml="data: {train: {num_samples: 4}}").key == "data.train.type"
    assert _error(tmp_path, yaml="run: [1, 2\n").key == "config"
    assert _error(tmp_path, yaml="run: 3\n").key == "run"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY, ["optim.lr"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.batch_size=512"], "data.batch_size"),  # larger than the dataset
        (["optim.accum_freq=32"], "optim.accum_freq"),  # more micro-batches than an epoch has
        (["optim.scheduler=const-cooldown", "optim.cooldown=20ba"], "optim.cooldown"),  # longer than the run
        (["loss.name=siglip", "loss.local_loss=true"], "loss.local_loss"),  # meaningless for SigLIP
        (["loss.name=clipp"], "loss.name"),
    ],
)
def test_impossible_combinations_fail_before_training(tiny, overrides, key):
    with pytest.raises(ConfigError) as info:
        Trainer(tiny(*overrides))
    assert info.value.key == key


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["loss.caption_loss_weight=2.0"], "loss.caption_loss_weight", "no meaning for loss.name=clip"),
        (["loss.name=siglip", "loss.clip_loss_weight=1.0"], "loss.clip_loss_weight", "no meaning"),
        (
            ["model.name=tiny-coca", "loss.name=coca", "loss.caption_loss_weight=-1"],
            "loss.caption_loss_weight",
            "negative",
        ),
        (["model.name=tiny-coca"], "loss.name", "is a CoCa model: train it with loss.name=coca"),
        (["model.name=tiny-coca", "loss.name=siglip"], "loss.name", "is a CoCa model"),
        (["loss.name=coca"], "loss.name", "loss.name=coca trains coca models.*coca_ViT-B-32, tiny-coca"),
        (["loss.name=cocaa"], "loss.name", "Did you mean 'coca'"),
    ],
)
def test_loss_keys_and_model_type_are_checked_when_loading(tiny, overrides, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        tiny(*overrides)
    assert info.value.key == key


def test_coca_loss_weights_default_to_open_clips_and_are_written(tiny):
    assert (tiny().loss.clip_loss_weight, tiny().loss.caption_loss_weight) == (None, None)  # not CLIP's keys
    cfg = tiny("model.name=tiny-coca", "loss.name=coca", "loss.caption_loss_weight=0.5")
    assert (cfg.loss.clip_loss_weight, cfg.loss.caption_loss_weight) == (1.0, 0.5)
    assert build_config(OmegaConf.to_container(cfg)) == cfg  # a written config loads back unchanged
    loss = Trainer(cfg).state.loss_fn
    assert (loss.clip_loss_weight, loss.caption_loss_weight) == (1.0, 0.5)


def test_resolved_config_is_written_and_read_only(tiny, tmp_path):
    cfg = tiny("optim.lr=0.123")
    trainer = Trainer(cfg)
    written = OmegaConf.load(trainer.run_dir / "config.yaml")
    assert written.optim.lr == 0.123
    assert build_config(written) == cfg  # the written file is a complete, valid config
    with pytest.raises(Exception):  # noqa: B017 - omegaconf's ReadonlyConfigError
        cfg.optim.lr = 1.0


def test_disabling_a_default_logger(tiny):
    cfg = tiny("loggers.console=null")
    assert list(cfg.loggers) == ["jsonl"]
