"""Process groups for expert parallelism: a DP x EP mesh over ``torch.distributed``.

Tutel (Hwang et al. 2023, spec multimodal_compression_systems.md §2) and DeepSpeed-MoE lay W ranks out as
``dp`` data-parallel replicas of an ``ep``-way expert-parallel group (W = dp * ep). Rank r has
``ep_rank = r % ep`` and ``dp_rank = r // ep``, so an EP group is ``ep`` consecutive ranks (on GPUs: the
GPUs of one node first, where all-to-all is cheapest) and holds every expert once; the ranks that hold the
same expert shard (same ``ep_rank``) form that shard's expert-data-parallel group, over which expert
gradients are reduced. Shared (non-expert) parameters are replicated on all W ranks.

Launch: ``torchrun --nproc-per-node N ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; ``init_distributed`` reads them (backend ``nccl`` on CUDA, ``gloo`` on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")


def launched() -> bool:
    """Whether this process was started by torchrun (or any launcher setting RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank: from the initialised process group, else the launcher's RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that prints, logs and writes files."""
    return env_rank() == 0


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"parallel.backend={backend!r} must be one of {BACKENDS}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend='nccl' needs CUDA devices; use 'gloo' (or 'auto') on CPU")
    return backend


def init_distributed(backend: str = "auto", device: str = "auto") -> torch.device:
    """Initialise the default process group from the launcher's environment (once) and return this
    rank's device: ``cuda:LOCAL_RANK`` when CUDA is used, else ``cpu``."""
    if not launched():
        raise ConfigError("torch.distributed needs a launcher: run under `torchrun --nproc-per-node N "
                          "-m moevision ...` (RANK and WORLD_SIZE are not set)")
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device!r} but CUDA is not available here; use --device cpu")
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kw: dict[str, Any] = {"backend": resolve_backend(backend, dev)}
        if dev.type == "cuda":
            kw["device_id"] = dev
        dist.init_process_group(**kw)
    return dev


@dataclass
class Mesh:
    """The DP x EP layout of the initialised world (see the module docstring).

    ``ep_group``: the ranks sharing one copy of all experts (tokens travel inside it).
    ``dp_group``: the ranks holding the same expert shard (their expert gradients are averaged);
    only meaningful when dp > 1. A ``None`` group is the default (world) group.
    """

    world_size: int
    rank: int
    ep: int
    ep_group: Any = None
    dp_group: Any = None

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def ep_ranks(self) -> list[int]:
        return [self.dp_rank * self.ep + i for i in range(self.ep)]

    def dp_ranks(self) -> list[int]:
        return [j * self.ep + self.ep_rank for j in range(self.dp)]


def build_mesh(ep: int = 1) -> Mesh:
    """Split the initialised world into ``world_size // ep`` EP groups of ``ep`` consecutive ranks.

    Every rank must call this (``new_group`` is collective) with the same ``ep``."""
    if not dist.is_initialized():
        raise ConfigError("build_mesh needs an initialised process group (init_distributed or "
                          "torch.distributed.init_process_group first)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"parallel.ep={ep!r} must be a positive integer")
    if world % ep:
        raise ConfigError(f"parallel.ep={ep} must divide the world size {world} (W = dp * ep)")
    mesh = Mesh(world_size=world, rank=rank, ep=ep)
    dp = world // ep
    # new_group is collective over the world: every rank creates every group, in the same order.
    # A group spanning the whole world is the default group (None).
    for i in range(dp):
        ranks = [i * ep + j for j in range(ep)]
        g = None if ep == world else dist.new_group(ranks)
        if rank in ranks:
            mesh.ep_group = g
    if 1 < dp < world:
        for j in range(ep):
            ranks = [i * ep + j for i in range(dp)]
            g = dist.new_group(ranks)
            if rank in ranks:
                mesh.dp_group = g
    return mesh
