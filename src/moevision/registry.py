"""A name -> object registry whose misses first import the techniques package (which registers its
layers there), then fail with a ConfigError listing what is known."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError


class Registry:
    def __init__(self, kind: str, plugins: str = "moevision.techniques"):
        self.kind, self.plugins = kind, plugins
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> None:
        self._items[name] = obj

    def get(self, name: str) -> Any:
        if name not in self._items:
            importlib.import_module(self.plugins)
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {sorted(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)
