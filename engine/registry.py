"""Name → builder tables for everything a YAML file can name.

The tables are filled by the modules that define what they hold (``@ALGORITHMS.register("ema")`` in
``algorithms/ema.py``); whoever looks a name up imports those modules first (``train/config.py`` does, in its
imports). The kernel imports none of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from cadenza.engine.errors import ConfigError, suggest

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of named builders. ``build(name, args, key)`` checks the arguments against the signature.

    Args:
        kind: what the registry holds, used in messages ("algorithm").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._items and self._items[name] is not builder:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = builder
            if isinstance(builder, type):
                builder.name = name
            return builder

        return decorator

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str, key: str) -> Callable[..., T]:
        if name not in self._items:
            raise ConfigError(key, f"unknown {self.kind} '{name}'.{suggest(name, self._items)}")
        return self._items[name]

    def check_args(self, name: str, args: Mapping[str, Any], key: str, runtime: tuple[str, ...] = ()) -> None:
        """Raise ``ConfigError`` for unknown or missing constructor arguments, naming ``key.arg``.

        ``runtime`` names arguments passed at the call (objects, not config), which YAML may not set.
        """
        signature = inspect.signature(self.get(name, key))
        params = {n: p for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
        for arg in args:
            if arg in runtime or (arg not in params and not takes_any):
                raise ConfigError(
                    f"{key}.{arg}",
                    f"{self.kind} '{name}' has no argument '{arg}'.{suggest(arg, [p for p in params if p not in runtime])}",
                )
        for param_name, param in params.items():
            if param.default is param.empty and param_name not in args and param_name not in runtime:
                raise ConfigError(f"{key}.{param_name}", f"{self.kind} '{name}' needs '{param_name}'.")

    def build(self, name: str, args: Mapping[str, Any] | None, key: str, **runtime: Any) -> T:
        """Build ``name`` from config ``args`` (checked) plus runtime objects passed at the call."""
        args = dict(args or {})
        self.check_args(name, args, key, tuple(runtime))
        try:
            return self.get(name, key)(**args, **runtime)
        except ConfigError:
            raise
        except (TypeError, ValueError) as error:
            raise ConfigError(key, f"{self.kind} '{name}': {error}") from error


ALGORITHMS: Registry = Registry("algorithm")  # algorithms/
CALLBACKS: Registry = Registry("callback")  # engine/callbacks.py, engine/remote_sync.py
LOGGERS: Registry = Registry("logger")  # engine/logger_destinations.py
DATASETS: Registry = Registry("dataset")  # datasets/
MODELS: Registry = Registry("model")  # models/factory.py
LOSSES: Registry = Registry("loss")  # models/losses.py
