"""Training checkpoints: one safetensors file (model, optimizer tensors, RNG states) whose metadata holds
the JSON state (step, epoch, optimizer hyper-parameters, run config). Written to a temporary file and
renamed, so a crash never leaves a half-written checkpoint; loading never unpickles anything."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..utils import atomic_write

CHECKPOINT_NAME = "checkpoint.safetensors"


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, state_meta = {}, {}
    for pid, st in opt_state["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
                entry[k] = "tensor"
            else:
                entry[k] = v
        state_meta[str(pid)] = entry
    return tensors, {"state": state_meta, "param_groups": opt_state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"optim.{pid}.{k}"] if v == "tensor" else v) for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any],
                    model_state: dict[str, torch.Tensor] | None = None, optimizer_state: dict | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model and optimizer (modules, or their state dicts: ``model_state`` /
    ``optimizer_state``, e.g. gathered from expert-parallel ranks), the RNG state and ``state``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model_state = model.state_dict() if model_state is None else model_state
    optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tensors.update(extra_tensors or {})
    meta = {"state": json.dumps(state), "optimizer": json.dumps(opt_meta), "format": "moevision-ckpt-1"}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """(all tensors, JSON state, optimizer metadata) of a checkpoint; CheckpointError if missing/corrupt."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing; the run has no checkpoint to resume from")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "moevision-ckpt-1":
            raise ValueError(f"unknown format {meta.get('format')!r}")
        state = json.loads(meta["state"])
        opt_meta = json.loads(meta["optimizer"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    return tensors, state, opt_meta


def model_state_from(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def optimizer_state_from(tensors: dict[str, torch.Tensor], opt_meta: dict) -> dict:
    return _unflatten_optimizer(tensors, opt_meta)


def _mismatch(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], show: int = 3) -> str:
    """What differs between a saved state dict and the model's, briefly: counts and the first few keys."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in saved and saved[k].shape != v.shape]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes)):
        if keys:
            parts.append(f"{len(keys)} keys {what} (" + ", ".join(keys[:show]) + (", ..." if len(keys) > show else "")
                         + ")")
    return "; ".join(parts) or "the tensors differ"


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True) -> dict[str, Any]:
    """Restore what is given; return the JSON state. Raises CheckpointError on a missing/corrupt file."""
    path = Path(path)
    tensors, state, opt_meta = read_checkpoint(path)
    if model is not None:
        sd = model_state_from(tensors)
        try:
            model.load_state_dict(sd)
        except RuntimeError:
            raise CheckpointError(f"checkpoint {path} does not match the model: {_mismatch(sd, model.state_dict())}; "
                                  f"it was saved from a different model config (restore the run's config.json, "
                                  f"or start a new run with --overwrite or another --out)") from None
    if optimizer is not None:
        try:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, opt_meta))
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not match ({type(e).__name__}: {e})") \
                from None
    if restore_rng:
        if "rng.torch" not in tensors:
            raise CheckpointError(f"checkpoint {path} is corrupt: it lacks the RNG state rng.torch, so the run "
                                  f"cannot resume exactly; resume from an intact copy, or start it again with "
                                  f"--overwrite")
        try:
            torch.set_rng_state(tensors["rng.torch"])
        except (RuntimeError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} is corrupt: invalid RNG state rng.torch ({e})") from None
        cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return state
