"""``import wandb`` that costs nothing until wandb is used: 0.5-0.7 s less before every run's first step.

timm imports wandb as it is imported (``timm.utils.summary``: ``try: import wandb``, for its own scripts' logging,
which Cadenza never calls), and Cadenza imports timm in every process that builds a model. wandb's import takes
0.5-0.7 s on a 2-core Xeon, about an eighth of the time from ``composer`` to the first step of a small run.

``defer_wandb`` puts a stand-in for wandb in ``sys.modules`` before timm is imported. ``import wandb`` binds the
stand-in, which carries wandb's real ``__spec__`` and ``__file__`` (``importlib.util.find_spec`` and ``inspect``
answer as for wandb without importing it). The first use of any other name (``wandb.init``, ``from wandb import
Settings``, ``import wandb.sdk``, ``wandb.__version__``) imports the real wandb, which replaces the stand-in in
``sys.modules`` and answers. Where wandb is not installed or already imported, nothing changes.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_lock = threading.RLock()  # the real import may look a name up on the stand-in again


class _DeferredModule(types.ModuleType):
    """A module that imports ``self.__name__`` for real on the first use of a name it lacks."""

    def _real(self) -> types.ModuleType:
        with _lock:
            real = self.__dict__.get("_cadenza_real")
            if real is None:
                if sys.modules.get(self.__name__) is self:
                    del sys.modules[self.__name__]
                try:
                    real = importlib.import_module(self.__name__)
                except BaseException:
                    sys.modules.setdefault(self.__name__, self)  # a later use tries again and raises again
                    raise
                self.__dict__["_cadenza_real"] = real
            return real

    def __getattr__(self, name: str) -> Any:  # only names this module lacks: every name of the real one
        return getattr(self._real(), name)

    def __dir__(self) -> list[str]:
        return dir(self._real())


def defer_wandb() -> None:
    """Install the stand-in for wandb (see the module doc), unless wandb is imported or not installed."""
    if "wandb" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("wandb")
    except (ImportError, ValueError):
        return
    if spec is None:  # not installed: timm's own ``except ImportError`` stays in charge
        return
    module = _DeferredModule("wandb", "stand-in for wandb until it is used (cadenza.engine.deferred_imports)")
    module.__spec__ = spec
    module.__file__ = spec.origin  # inspect.getmodule reads every module's __file__ (torch does, as it is imported)
    module.__loader__ = spec.loader
    module.__package__ = "wandb"
    sys.modules["wandb"] = module


defer_wandb()  # importing this module installs the stand-in (cadenza.engine, .models and .algorithms import it first)
