"""Generic tests over every registered algorithm, plus each algorithm's own tests."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from cadenza.algorithms.gradient_clipping import GradientClipping, clip_gradients
from cadenza.engine import Event
from cadenza.engine.logger import Logger
from cadenza.engine.registry import ALGORITHMS
from cadenza.engine.state import State
from cadenza.train.config import load_config
from cadenza.train.trainer import Trainer

from .algorithm_settings import ALGORITHM_SETTINGS
from .conftest import TINY


def test_every_algorithm_has_an_entry():
    assert sorted(ALGORITHMS.names()) == sorted(ALGORITHM_SETTINGS)


@pytest.mark.parametrize("name", sorted(ALGORITHM_SETTINGS))
def test_train_checkpoint_resume_rebuild(tmp_path, name):
    """Each algorithm: 2 steps, checkpoint, resume to 3 steps, and its YAML settings rebuild it."""
    settings = ALGORITHM_SETTINGS[name]
    yaml = tmp_path / "algo.yaml"
    OmegaConf.save(
        OmegaConf.merge(OmegaConf.load(TINY), {"algorithms": {name: settings}, "optim": {"grad_clip_norm": None}}), yaml
    )
    common = [f"run.logs={tmp_path}", "data.val=null", "run.name=algo"]
    state = Trainer(load_config(yaml, [*common, "run.duration=2ba"])).fit()
    assert [a.name for a in state.algorithms] == [name]
    resumed = Trainer(load_config(yaml, [*common, "run.duration=3ba", "checkpoint.resume=latest"]))
    assert resumed.state.timestamp.batch == 2
    assert resumed.fit().timestamp.batch == 3
    rebuilt = ALGORITHMS.build(name, settings, f"algorithms.{name}")
    assert repr(rebuilt) == repr(state.algorithms[0])


# -- gradient_clipping ------------------------------------------------------------------------------
def test_clip_gradients_by_norm_by_hand():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # global norm 5
    total = clip_gradients([a, b], norm=1.0)
    assert total.item() == pytest.approx(5.0)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0]), atol=1e-6) and torch.allclose(
        b.grad, torch.tensor([0.8]), atol=1e-6
    )


def test_clip_gradients_by_value_by_hand():
    a = torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([-2.0, 0.1, 5.0])
    assert clip_gradients([a], value=0.5) is None
    assert torch.equal(a.grad, torch.tensor([-0.5, 0.1, 0.5]))


def test_gradient_clipping_on_a_minimal_state():
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([[30.0, 40.0]])
    state = State(model=model)
    algorithm = GradientClipping(norm=5.0)
    assert algorithm.match(Event.BEFORE_OPTIMIZER_STEP, state)
    assert not algorithm.match(Event.AFTER_BACKWARD, state)
    algorithm.apply(Event.BEFORE_OPTIMIZER_STEP, state, Logger([]))
    assert torch.allclose(model.weight.grad, torch.tensor([[3.0, 4.0]]))
    assert state.step_metrics["grad_norm"].item() == pytest.approx(50.0)


@pytest.mark.parametrize("kwargs", [{}, {"norm": 1.0, "value": 1.0}, {"norm": -1.0}])
def test_gradient_clipping_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        GradientClipping(**kwargs)
