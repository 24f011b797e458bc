"""Model registry (timm-style): ``register_model``, ``create_model``, ``list_models``, and
``save_pretrained`` / ``from_pretrained`` (``config.json`` + ``model.safetensors``; no pickles)."""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError, ConfigError
from ..utils import atomic_write

_MODELS: dict[str, Callable[..., torch.nn.Module]] = {}
_ARCHS: dict[str, tuple[type, type]] = {}  # architecture name -> (model class, config class)
FORMAT_VERSION = 1


@dataclass
class ModelOutput:
    """What classification models return."""

    logits: torch.Tensor
    aux_loss: torch.Tensor  # summed over MoE layers, already weighted
    routing: list = field(default_factory=list)  # RoutingStats per MoE layer, in block order
    moe_layers: tuple[int, ...] = ()  # block index of each entry of ``routing``


def register_arch(name: str, model_cls: type, config_cls: type) -> None:
    _ARCHS[name] = (model_cls, config_cls)


def register_model(fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides: Any) -> torch.nn.Module:
    if name not in _MODELS:
        close = [m for m in _MODELS if name.split("_")[0] in m][:5]
        hint = f"; did you mean one of {close}?" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint} (see `moevision list-models`)")
    model = _MODELS[name](**overrides)
    model.model_name = name
    return model


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (full model, contiguous CPU tensors)."""
    from safetensors.torch import save_file

    if any(getattr(m, "expert_shard", False) for m in model.modules()):
        raise CheckpointError("this model's experts are sharded over ranks (expert parallel): a save here would "
                              "hold only this rank's experts. Call moevision.distributed.save_pretrained(model, "
                              "directory) on every rank: it gathers the experts and rank 0 writes the full model")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    meta = {"format_version": FORMAT_VERSION, "architecture": model.arch_name,
            "model_name": getattr(model, "model_name", None), "config": cfg.to_dict()}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(d / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(d / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return d


def read_model_config(directory: str | os.PathLike):
    d = Path(directory)
    path = d / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a moevision model directory (expected config.json "
                              f"and model.safetensors written by save_pretrained)")
    try:
        meta = json.loads(path.read_text())
        if isinstance(meta, dict) and "architecture" not in meta and "model_name" in meta and "train" in meta:
            finished = (d / "model" / "config.json").is_file()
            raise CheckpointError(f"{d} is a `moevision train` run directory, not a model directory; pass its "
                                  f"model directory {d / 'model'}" + ("" if finished else
                                                                       " (written when the run finishes)"))
        arch = meta["architecture"]
        raw = meta["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}); re-save the model") from None
    if arch not in _ARCHS:
        raise CheckpointError(f"{path}: unknown architecture {arch!r}; known: {sorted(_ARCHS)}")
    model_cls, config_cls = _ARCHS[arch]
    try:
        cfg = config_cls.from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{path}: invalid model config: {e}") from None
    return model_cls, cfg, meta


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None


_FORMATS: dict[str, Callable[..., torch.nn.Module]] = {}  # derived checkpoint formats (e.g. "qmoe")


def register_format(name: str, loader: Callable[..., torch.nn.Module]) -> None:
    """Register ``loader(directory, map_location=...)`` for config.json files with ``"format": name``."""
    _FORMATS[name] = loader


def _load_format(d: Path, meta: dict, map_location) -> torch.nn.Module:
    import importlib

    fmt, module = meta["format"], meta.get("format_module")
    if fmt not in _FORMATS and isinstance(module, str) and module.startswith("moevision."):
        try:
            importlib.import_module(module)  # the module that wrote the format registers its loader
        except ImportError:
            pass
    if fmt not in _FORMATS:
        raise CheckpointError(f"{d}: unknown checkpoint format {fmt!r}; known: {sorted(_FORMATS)}")
    return _FORMATS[fmt](d, map_location=map_location)


def state_mismatch(expected: dict, state: dict) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, keys present in both with different shapes), each sorted."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = sorted(k for k in expected if k in state and tuple(expected[k].shape) != tuple(state[k].shape))
    return missing, unexpected, bad


def from_pretrained(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a model written by ``save_pretrained``; every key must match (no expert silently lost).
    Directories of a registered derived format (``"format"`` in config.json) go to its loader."""
    d = Path(directory)
    model_cls, cfg, meta = read_model_config(d)
    if meta.get("format") is not None:
        return _load_format(d, meta, map_location)
    model = model_cls(cfg)
    model.model_name = meta.get("model_name")
    state = load_state_file(d / "model.safetensors")
    expected = model.state_dict()
    missing, unexpected, bad = state_mismatch(expected, state)
    if missing or unexpected:
        raise CheckpointError(f"{d}: weights do not match the config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    if bad:
        k = bad[0]
        raise CheckpointError(f"{d}: {k} has shape {tuple(state[k].shape)}, config expects {tuple(expected[k].shape)}")
    model.load_state_dict(state)
    return model.to(map_location)
