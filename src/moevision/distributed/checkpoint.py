"""Checkpoints of expert-parallel runs that load at any world size (1 included).

On save, every rank gathers the expert shards over its EP group (all-gather along the expert axis)
and rank 0 writes the ordinary single-process checkpoint (``train/checkpoint.py`` format: full model,
full optimizer state, RNG) plus each rank's RNG state; ``save_pretrained`` writes the full model, so a
model directory never depends on the world size that trained it. On load, every rank reads the full
file and keeps its slice of the expert axis (``expert_offset : expert_offset + L``). A checkpoint
whose expert axis does not have the model's E experts, or whose keys do not match, raises
``CheckpointError`` naming the key: experts are never silently dropped or mismatched (the complaint
users of the anchors' converters report).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CheckpointError
from ..train.checkpoint import model_state_from, optimizer_state_from, read_checkpoint, save_checkpoint
from . import all_to_all as A
from .expert_parallel import ShardedExperts, is_sharded, sharded_modules


def _shard_params(model: torch.nn.Module) -> dict[str, tuple[ShardedExperts, torch.nn.Parameter]]:
    return {f"{prefix}.{name}" if prefix else name: (m, p)
            for prefix, m in sharded_modules(model) for name, p in m.named_parameters(recurse=False)}


# -- model state -------------------------------------------------------------------------------------
def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (collective over the EP groups; every rank gets it)."""
    sd = model.state_dict()
    for prefix, m in sharded_modules(model):
        for name, full in m.gather_full().items():
            sd[f"{prefix}.{name}" if prefix else name] = full
    return sd


def shard_model_state(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's slice of a full state dict; CheckpointError when an expert tensor is not (E, ...)."""
    out = dict(full)
    for key, (m, p) in _shard_params(model).items():
        if key not in full:
            raise CheckpointError(f"{key} is missing from the checkpoint (the model has {m.num_experts} experts "
                                  f"there)")
        t = full[key]
        want = (m.num_experts,) + tuple(p.shape[1:])
        if tuple(t.shape) != want:
            raise CheckpointError(f"{key} has shape {tuple(t.shape)} in the checkpoint, the model expects {want} "
                                  f"(E={m.num_experts} experts): experts missing or mismatched, refusing to load")
        out[key] = t[m.expert_offset:m.expert_offset + m.num_local_experts]
    return out


def load_full_state(model: torch.nn.Module, full: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a full (unsharded) state dict into a sharded or plain model, strictly."""
    sd = shard_model_state(model, full)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not match the model: {' '.join(str(e).splitlines()[:2])}") from None


# -- optimizer state ---------------------------------------------------------------------------------
def _params_in_order(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]  # state_dict numbers them so


def _expert_shards(model, optimizer) -> dict[int, tuple[int, ShardedExperts]]:
    """optimizer param index -> (its position, the ShardedExperts owning it) for expert parameters."""
    owner = {id(p): m for m, p in _shard_params(model).values()}
    return {i: owner[id(p)] for i, p in enumerate(_params_in_order(optimizer)) if id(p) in owner}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every expert parameter's state gathered to (E, ...) (collective)."""
    sd = optimizer.state_dict()
    state = {pid: dict(st) for pid, st in sd["state"].items()}  # never mutate the optimizer's own dicts
    params = _params_in_order(optimizer)
    for pid, m in _expert_shards(model, optimizer).items():
        for k, v in sorted(state.get(pid, {}).items()):
            if torch.is_tensor(v) and v.dim() > 0 and v.shape == params[pid].shape:
                state[pid][k] = A.all_gather_cat(v.detach(), m.group)
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> dict:
    params = _params_in_order(optimizer)
    state = {pid: dict(st) for pid, st in full["state"].items()}
    for pid, m in _expert_shards(model, optimizer).items():
        for k, v in state.get(pid, {}).items():
            if torch.is_tensor(v) and v.dim() > 0:
                want = (m.num_experts,) + tuple(params[pid].shape[1:])
                if tuple(v.shape) != want:
                    raise CheckpointError(f"optimizer state {k!r} of parameter {pid} has shape {tuple(v.shape)}, "
                                          f"expected {want}: the checkpoint's experts do not match the model")
                state[pid][k] = v[m.expert_offset:m.expert_offset + m.num_local_experts]
    return {"state": state, "param_groups": full["param_groups"]}


# -- run checkpoints ---------------------------------------------------------------------------------
def save_checkpoint_distributed(path: str | os.PathLike, *, model, optimizer, state: dict[str, Any], mesh) -> None:
    """Gather (collective: every rank calls) and write one full checkpoint from rank 0."""
    model_state = full_model_state(model)
    opt_state = full_optimizer_state(model, optimizer)
    rng = torch.get_rng_state()
    rngs: list = [None] * mesh.world_size
    dist.all_gather_object(rngs, rng)
    if mesh.is_main:
        extra = {f"rng.torch.rank{r}": t.cpu() for r, t in enumerate(rngs)}
        save_checkpoint(path, state={**state, "world_size": mesh.world_size, "ep": mesh.ep},
                        model_state=model_state, optimizer_state=opt_state, extra_tensors=extra)
    dist.barrier()  # nobody reads the checkpoint before it is complete


def load_checkpoint_distributed(path: str | os.PathLike, *, model, optimizer=None, mesh,
                                restore_rng: bool = True) -> dict[str, Any]:
    """Every rank reads the full checkpoint and keeps its expert slice; works whatever world size wrote it.
    RNG: each rank's own state when the world size is unchanged, else a state derived from (step, rank)."""
    path = Path(path)
    tensors, state, opt_meta = read_checkpoint(path)
    load_full_state(model, model_state_from(tensors), source=f"checkpoint {path}")
    if optimizer is not None:
        try:
            optimizer.load_state_dict(shard_optimizer_state(model, optimizer, optimizer_state_from(tensors, opt_meta)))
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not match ({e})") from None
    if restore_rng:
        own = tensors.get(f"rng.torch.rank{mesh.rank}")
        if own is not None and state.get("world_size") == mesh.world_size:
            torch.set_rng_state(own)
        else:
            torch.manual_seed(1_000_003 * int(state.get("step", 0)) + mesh.rank)
    return state


def full_model(model: torch.nn.Module) -> torch.nn.Module:
    """An unsharded copy of an expert-parallel model (collective), built from its config; the global
    RNG stream is left untouched. A model without expert shards is returned as it is."""
    if not is_sharded(model):
        return model
    sd = full_model_state(model)
    with torch.random.fork_rng(devices=[]):
        copy = type(model)(model.config)
    copy.model_name = getattr(model, "model_name", None)
    copy.load_state_dict({k: v.detach().cpu() for k, v in sd.items()})
    return copy


def save_pretrained_distributed(model: torch.nn.Module, directory: str | os.PathLike, mesh) -> Path | None:
    """``save_pretrained`` of the FULL model (experts gathered), written by rank 0; every rank calls it."""
    full = full_model(model)
    out = full.save_pretrained(directory) if mesh.is_main else None
    dist.barrier()
    return out
