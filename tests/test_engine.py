"""The engine on a minimal State, without a trainer: matching, ordering rules, reversal, compatibility."""

from __future__ import annotations

import pytest
import torch

from cadenza.engine import Algorithm, Callback, ConfigError, Event
from cadenza.engine.engine import Engine, check_algorithms
from cadenza.engine.logger import Logger
from cadenza.engine.passes import sort_to_back, sort_to_front
from cadenza.engine.registry import ALGORITHMS, Registry
from cadenza.engine.state import State, get_rng_state, set_rng_state


class Recorder(Algorithm):
    def __init__(self, name: str, log: list, events=(Event.BATCH_START, Event.BATCH_END)):
        self.name = name
        self.log = log
        self.events = events

    def match(self, event, state):
        return event in self.events

    def apply(self, event, state, logger):
        self.log.append((event, self.name))


def minimal_state(*algorithms, callbacks=()) -> State:
    return State(model=torch.nn.Linear(2, 2), algorithms=list(algorithms), callbacks=list(callbacks))


def test_algorithms_run_in_order_and_reverse_on_after_events():
    log: list = []
    state = minimal_state(Recorder("a", log), Recorder("b", log))
    engine = Engine(state, Logger([]))
    engine.run_event(Event.BATCH_START)
    engine.run_event(Event.BATCH_END)
    engine.run_event(Event.EPOCH_START)  # matches nothing
    assert log == [(Event.BATCH_START, "a"), (Event.BATCH_START, "b"), (Event.BATCH_END, "b"), (Event.BATCH_END, "a")]


def test_named_ordering_rules():
    log: list = []
    compile_, lock, other = Recorder("torch_compile", log), Recorder("lock_image", log), Recorder("ema", log)
    assert [a.name for a in sort_to_back([compile_, other], Event.INIT)] == ["ema", "torch_compile"]
    assert [a.name for a in sort_to_front([other, lock], Event.INIT)] == ["lock_image", "ema"]
    Engine(minimal_state(compile_, other, lock), Logger([])).run_event(Event.BATCH_START)
    assert [name for _, name in log] == ["lock_image", "ema", "torch_compile"]


def test_callbacks_run_after_algorithms_and_dispatch_by_name():
    log: list = []

    class Watch(Callback):
        def batch_start(self, state, logger):
            log.append((Event.BATCH_START, "callback"))

    Engine(minimal_state(Recorder("a", log), callbacks=[Watch()]), Logger([])).run_event(Event.BATCH_START)
    assert log == [(Event.BATCH_START, "a"), (Event.BATCH_START, "callback")]


def test_incompatible_algorithms_fail_naming_both_keys():
    class Exclusive(Algorithm):
        name = "first"

        def match(self, event, state):
            return False

        def apply(self, event, state, logger):
            pass

        def check_compatible(self, others, state):
            for other in others:
                if other.name == "second":
                    raise ConfigError(f"algorithms.{self.name}", f"cannot run with algorithms.{other.name}")

    second = Recorder("second", [])
    with pytest.raises(ConfigError, match="algorithms.first.*algorithms.second"):
        check_algorithms([Exclusive(), second], minimal_state())


def test_algorithm_without_match_cannot_be_built():
    class Incomplete(Algorithm):
        pass

    with pytest.raises(TypeError):
        Incomplete()


def test_registry_checks_arguments():
    registry: Registry = Registry("widget")

    @registry.register("knob")
    class Knob:
        def __init__(self, turns: int, label: str = "", *, device=None):
            self.turns = turns

    assert registry.build("knob", {"turns": 3}, "widgets.knob", device="cpu").turns == 3
    with pytest.raises(ConfigError, match="'widgets.knob.turns'.*needs"):
        registry.build("knob", {}, "widgets.knob", device="cpu")
    with pytest.raises(ConfigError, match="'widgets.knob.turnz'.*Did you mean 'turns'"):
        registry.build("knob", {"turns": 1, "turnz": 2}, "widgets.knob")
    with pytest.raises(ConfigError, match="'widgets.knob.device'"):
        registry.build("knob", {"turns": 1, "device": "cuda"}, "widgets.knob", device="cpu")  # runtime-only
    with pytest.raises(ConfigError, match="unknown widget 'knb'.*Did you mean 'knob'"):
        registry.get("knb", "widgets.knb")
    assert "gradient_clipping" in ALGORITHMS.names()


def test_rng_state_round_trip():
    import random

    import numpy as np

    saved = get_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
