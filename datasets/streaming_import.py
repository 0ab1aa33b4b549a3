"""``import streaming`` without importing transformers: 2.5-3 s less before the first step of a streaming run.

mosaicml-streaming imports three names from transformers as it is imported: ``AutoTokenizer`` for its C4 and
Pile datasets, and ``BatchFeature`` and ``BatchEncoding`` for an ``isinstance`` check on batches in
``StreamingDataLoader``. Importing them pulls in transformers' generation code and, through it, scikit-learn
and SciPy: 2.6-3.1 s on a 2-core EPYC after Cadenza's own imports, against 0.3 s for streaming itself.
Cadenza uses neither, so ``load_streaming`` serves those modules, while streaming is imported, as stand-ins
whose names resolve to the real ones when used:

- ``isinstance(x, BatchEncoding)`` is false while transformers is not imported (no object can be one), and
  asks the real class once it is;
- any other use (``AutoTokenizer.from_pretrained(...)``, a call) imports transformers and forwards to it.

The stand-ins leave ``sys.modules`` right after, so importing transformers later gets the real modules. When
transformers is already imported, or something imports it while streaming is being imported (a streaming
version that needs more of it), streaming is imported the ordinary way.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

#: the transformers modules streaming imports names from as it is imported
DEFERRED_MODULES = (
    "transformers.feature_extraction_utils",
    "transformers.tokenization_utils_base",
    "transformers.models.auto.tokenization_auto",
)


class _Deferred(type):
    """Metaclass of a stand-in for transformers' ``module.name``: a class that turns into the real one in use."""

    def _real(cls) -> Any:
        return getattr(importlib.import_module(cls._module), cls.__name__)

    def __instancecheck__(cls, instance: Any) -> bool:
        return "transformers" in sys.modules and isinstance(instance, cls._real())

    def __subclasscheck__(cls, subclass: type) -> bool:
        return "transformers" in sys.modules and issubclass(subclass, cls._real())

    def __getattr__(cls, name: str) -> Any:  # only for names the stand-in lacks: from_pretrained, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(cls._real(), name)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real()(*args, **kwargs)


def _stand_in(module: str) -> types.ModuleType:
    stand_in = types.ModuleType(module, f"stand-in for {module} while streaming is imported (cadenza)")

    def deferred(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Deferred(name, (), {"_module": module, "__module__": module})

    stand_in.__getattr__ = deferred  # any name streaming imports from the module
    return stand_in


def load_streaming() -> types.ModuleType:
    """The ``streaming`` package, imported without transformers when that is possible (see the module doc)."""
    if "streaming" in sys.modules or "transformers" in sys.modules:
        return importlib.import_module("streaming")
    stand_ins = {module: _stand_in(module) for module in DEFERRED_MODULES}
    sys.modules.update(stand_ins)
    try:
        streaming = importlib.import_module("streaming")
    except Exception:  # noqa: BLE001 - a streaming that needs more of transformers: the ordinary import below
        streaming = None
    finally:
        for module, stand_in in stand_ins.items():
            if sys.modules.get(module) is stand_in:
                del sys.modules[module]
    if streaming is None or "transformers" in sys.modules:  # transformers imported meanwhile, perhaps around a
        _forget("streaming")  # stand-in: start again, the ordinary way
        _forget("transformers")
        streaming = importlib.import_module("streaming")
    return streaming


def _forget(package: str) -> None:
    for module in [name for name in sys.modules if name == package or name.startswith(f"{package}.")]:
        del sys.modules[module]
