"""Start a training run from the weights of a model directory (``train.init_from``; ``moevision train
--init DIR``), e.g. an upcycled MoE (``moevision upcycle``), a converted checkpoint or a finished run's
``model/``.

Loading is strict: every key of the run's model must be in the directory with the same shape and
nothing may be left over, so a ``--set`` that changes the architecture (more experts, another depth)
fails with a message naming the first mismatching key instead of silently training random weights.

Optionally the directory holds ``optimizer.safetensors``: per-parameter optimiser state by parameter
name (``<name>::exp_avg``, ``<name>::exp_avg_sq``, ``<name>::step``), written by ``moevision upcycle
--copy-optimizer-state`` (sparse upcycling copies the dense Adam moments into every expert slot,
vision_moe.md §4(b)4). ``train.init_optimizer_state=true`` loads it; parameters without an entry (the
new routers) start with empty state.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError

OPTIMIZER_STATE_NAME = "optimizer.safetensors"


def init_run_config(cfg, directory: str | os.PathLike):
    """Point run config ``cfg`` at model directory ``directory``: its model config and name replace the
    recipe's, and ``train.init_from`` is set. Apply ``--set`` overrides after this."""
    from ..models._builder import read_model_config

    d = Path(directory)
    _, model_cfg, meta = read_model_config(d)
    from ..models.vit import ViTConfig

    if not isinstance(model_cfg, ViTConfig):
        raise CheckpointError(f"{d} holds a {meta.get('architecture')!r} model; runs train ViTs")
    cfg.model = model_cfg
    cfg.model_name = meta.get("model_name") or d.name
    cfg.train.init_from = str(d)
    return cfg


def load_init_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Copy the weights of ``directory/model.safetensors`` into ``model``, strictly."""
    from ..models._builder import load_state_file, state_mismatch

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"train.init_from={str(d)!r} is not a directory")
    state = load_state_file(d / "model.safetensors")
    expected = model.state_dict()
    missing, unexpected, bad = state_mismatch(expected, state)
    if missing or unexpected:
        raise CheckpointError(f"train.init_from={str(d)!r} does not fit the run's model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); did a --set change the architecture?")
    if bad:
        k = bad[0]
        raise CheckpointError(f"train.init_from={str(d)!r}: {k} has shape {tuple(state[k].shape)}, the run's "
                              f"model expects {tuple(expected[k].shape)}; did a --set change the architecture?")
    model.load_state_dict(state)


def named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter tensor state keyed ``<param name>::<state key>`` (CPU tensors)."""
    out = {}
    for name, p in model.named_parameters():
        for k, v in optimizer.state.get(p, {}).items():
            if torch.is_tensor(v):
                out[f"{name}::{k}"] = v.detach().cpu().contiguous()
    return out


def save_optimizer_state(directory: str | os.PathLike, named: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    from ..utils import atomic_write

    path = Path(directory) / OPTIMIZER_STATE_NAME
    atomic_write(path, lambda p: save_file(named, p, metadata={"format": "moevision-named-optim-1"}))
    return path


def run_optimizer_state(run_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Named optimiser state of the last checkpoint of a ``moevision train`` run directory."""
    from .checkpoint import CHECKPOINT_NAME, load_checkpoint
    from .engine import build_model, read_run_config
    from .optim import build_optimizer

    run = Path(run_dir)
    cfg = read_run_config(run)
    model = build_model(cfg)
    tc = cfg.train
    optimizer = build_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas)
    load_checkpoint(run / CHECKPOINT_NAME, model=model, optimizer=optimizer, restore_rng=False)
    return named_optimizer_state(model, optimizer)


def load_init_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              directory: str | os.PathLike) -> int:
    """Fill ``optimizer``'s state from ``directory/optimizer.safetensors``; returns how many parameters got
    state. Entries must name parameters of ``model`` and match their shapes."""
    from ..models._builder import load_state_file

    path = Path(directory) / OPTIMIZER_STATE_NAME
    if not path.is_file():
        raise ConfigError(f"train.init_optimizer_state=true but {path} does not exist (write it with "
                          f"`moevision upcycle RUN_DIR --copy-optimizer-state`)")
    named = load_state_file(path)
    params = dict(model.named_parameters())
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in named.items():
        name, _, k = key.partition("::")
        if name not in params:
            raise CheckpointError(f"{path}: state for {name!r}, which the model does not have")
        if k != "step" and tuple(v.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(v.shape)}, parameter is {tuple(params[name].shape)}")
        per_param.setdefault(name, {})[k] = v
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, st in per_param.items():
        p = params[name]
        if id(p) in owned:
            optimizer.state[p] = {k: (v.to(p.device) if k != "step" else v.float()) for k, v in st.items()}
    return len(per_param)
