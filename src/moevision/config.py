"""Typed dataclass configs: build from dicts, set fields from ``key=value`` strings, validate once.

Configs are nested dataclasses. ``set_by_path(cfg, "model.num_experts", "8")`` converts the string to
the field's annotated type (int, float, bool, str, None, lists as JSON or comma lists) and raises
``ConfigError`` naming the key and the value when the key does not exist or the value does not fit.
Each config class validates itself in ``validate()``; call ``validate_config`` after every change.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from .errors import ConfigError

_NONE_WORDS = {"none", "null"}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _options(tp) -> tuple:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _convert_one(tp, value: Any, key: str):
    origin = typing.get_origin(tp)
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS):
            return None
        raise ValueError
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            s = value.strip()
            value = json.loads(s) if s.startswith("[") else [v for v in s.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError
        items = [_convert_one(item_tp, v, key) if item_tp is not Any else v for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError
        return dict(value)
    if tp is Any:
        return value
    raise ValueError


def convert(tp, value: Any, key: str):
    """Convert ``value`` (often a string from the command line) to the annotated type ``tp``."""
    opts = _options(tp)
    # try None first, then non-str options, then str (so "4" becomes 4 for int | str)
    ordered = sorted(opts, key=lambda t: (t is not type(None), t is str))
    for t in ordered:
        try:
            return _convert_one(t, value, key)
        except (ValueError, TypeError, json.JSONDecodeError):
            continue
    names = " | ".join(getattr(t, "__name__", str(t)) for t in opts)
    raise ConfigError(f"{key}={value!r} is not a valid {names}")


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from a (possibly partial) dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!r}; known keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = convert(tp, value, f"{prefix}{name}")
    return cls(**kwargs)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def set_by_path(cfg, path: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dataclass config from a string or value, with type conversion."""
    parts = path.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        fields = {f.name for f in dataclasses.fields(obj)}
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"unknown config key {path!r}: {where} has no field {part!r}; "
                              f"known: {', '.join(sorted(fields))}")
        if i == len(parts) - 1:
            tp = _hints(type(obj))[part]
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{path} is a section, set one of its fields (e.g. {path}.<field>=...)")
            setattr(obj, part, convert(tp, value, path))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"unknown config key {path!r}: {'.'.join(parts[:i + 1])} is not a section")


def parse_overrides(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def validate_config(cfg) -> None:
    """Call ``validate()`` on every nested dataclass that defines it."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate_config(v)
    if hasattr(cfg, "validate"):
        cfg.validate()


def check(cond: bool, key: str, value: Any, requirement: str) -> None:
    """Raise ConfigError('key=value: requirement') unless cond."""
    if not cond:
        raise ConfigError(f"{key}={value!r} is out of range: {requirement}")
