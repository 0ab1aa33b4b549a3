"""Name → class registries for everything a YAML file can name."""

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
        entry_module: module imported on first lookup so that its ``register`` decorators have run.
    """

    def __init__(self, kind: str, entry_module: str | None = None) -> None:
        self.kind = kind
        self._entry_module = entry_module
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

    def _load(self) -> None:
        if self._entry_module is not None:
            import importlib

            importlib.import_module(self._entry_module)
            self._entry_module = None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def get(self, name: str, key: str) -> Callable[..., T]:
        self._load()
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
                    f"{key}.{arg}", f"{self.kind} '{name}' has no argument '{arg}'.{suggest(arg, params)}"
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


ALGORITHMS: Registry = Registry("algorithm", "cadenza.algorithms")
CALLBACKS: Registry = Registry("callback", "cadenza.engine.callbacks")
LOGGERS: Registry = Registry("logger", "cadenza.engine.loggers")
DATASETS: Registry = Registry("dataset", "cadenza.datasets")
MODELS: Registry = Registry("model", "cadenza.models")
