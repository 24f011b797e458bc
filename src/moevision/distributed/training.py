"""What ``train.fit`` does differently on W ranks: data sharding, gradient reduction, metric reduction,
rank-0-only writes, gathered checkpoints. ``SingleProcess`` is today's behaviour, unchanged.

Gradient semantics (DP x EP, W = dp * ep ranks; each rank's loss is the mean over its B/W images):
the objective is the mean of the W local losses, i.e. the single-process loss on the global batch.
- Shared (replicated) parameters: all-reduce SUM over all W ranks, divide by W (DDP's mean).
- Expert shards: the backward all-to-all already delivered, to the rank owning an expert, the
  gradient from the tokens of every rank of its EP group; all-reduce SUM over the expert's DP group
  (the ranks holding the same shard) and divide by W. With ep == W there is no expert DP group.
Gradient clipping uses the global norm: the shared part plus the expert norms summed over the EP
group. Grads are reduced in one flat bucket per group after ``backward`` (no overlap with backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .checkpoint import full_model, load_checkpoint_distributed, save_checkpoint_distributed, save_pretrained_distributed
from .expert_parallel import expert_parameters, set_overlap_degree, shard_experts
from .mesh import Mesh, build_mesh, init_distributed, launched


def _flat_all_reduce(tensors: list[torch.Tensor], group, divisor: float) -> None:
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for ts in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        flat.div_(divisor)
        off = 0
        for t in ts:
            t.copy_(flat[off:off + t.numel()].view_as(t))
            off += t.numel()


def split_parameters(model: torch.nn.Module) -> tuple[list, list]:
    """(shared parameters, expert-shard parameters), in ``model.parameters()`` order."""
    ex = expert_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in ex], [p for p in params if id(p) in ex]


def reduce_gradients(model: torch.nn.Module, mesh: Mesh) -> None:
    shared, experts = split_parameters(model)
    W = mesh.world_size
    if shared:  # a parameter unused on every rank keeps grad None (as in one process)
        has = torch.tensor([p.grad is not None for p in shared], dtype=torch.int32, device=shared[0].device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [p for p, h in zip(shared, has.tolist()) if h]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _flat_all_reduce([p.grad for p in live], None, W)
    for p in experts:  # a shard whose experts got no token this step still steps (zero grad), as in one process
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if experts:
        if mesh.dp > 1:
            _flat_all_reduce([p.grad for p in experts], mesh.dp_group, W)
        else:
            for p in experts:
                p.grad.div_(W)


def clip_grad_norm_(model: torch.nn.Module, mesh: Mesh, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole (unsharded) model's gradients."""
    shared, experts = split_parameters(model)
    dev = next(model.parameters()).device
    sq = lambda ps: sum((p.grad.detach().float().pow(2).sum() for p in ps if p.grad is not None),
                        torch.zeros((), device=dev))
    expert_sq = sq(experts)
    if experts and mesh.ep > 1:
        dist.all_reduce(expert_sq, group=mesh.ep_group)
    total = (sq(shared) + expert_sq).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in shared + experts:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))
    return total


class SingleProcess:
    """One process: exactly what ``fit`` always did."""

    rank, world_size, is_main, data_shard, device = 0, 1, True, None, None

    def prepare_model(self, model, seed: int):
        return model

    def reduce_gradients(self, model) -> None:
        pass

    def clip_grad_norm_(self, model, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def all_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def aug_seed(self, base: int) -> int:
        return base

    def save_checkpoint(self, path, *, model, optimizer, state) -> None:
        from ..train.checkpoint import save_checkpoint
        save_checkpoint(path, model=model, optimizer=optimizer, state=state)

    def load_checkpoint(self, path, *, model, optimizer):
        from ..train.checkpoint import load_checkpoint
        return load_checkpoint(path, model=model, optimizer=optimizer)

    def save_pretrained(self, model, directory) -> None:
        model.save_pretrained(directory)

    def full_model(self, model):
        return model

    def close(self) -> None:
        pass


class DistributedRun(SingleProcess):
    """W ranks under torchrun: a DP x EP mesh with ``cfg.parallel.ep``-way expert parallelism."""

    def __init__(self, cfg):
        par = cfg.parallel
        self.owns_group = not (dist.is_available() and dist.is_initialized())
        self.device = init_distributed(par.backend, cfg.train.device)
        self.mesh = build_mesh(par.ep)
        self.layout, self.overlap_degree = par.layout, par.overlap_degree
        self.rank, self.world_size, self.is_main = self.mesh.rank, self.mesh.world_size, self.mesh.is_main
        self.data_shard = (self.rank, self.world_size)
        bs = cfg.data.batch_size
        if bs % self.world_size:
            raise ConfigError(f"data.batch_size={bs} (the global batch) must be divisible by the world size "
                              f"{self.world_size}")
        if par.ep > 1 and getattr(cfg.train, "init_from", None) is not None:
            raise ConfigError("train.init_from is not supported with parallel.ep > 1 yet: start the run on one "
                              "process (or parallel.ep=1) and resume it with expert parallelism")

    def check_hooks(self, hooks) -> None:
        if hooks and self.mesh.ep > 1:
            raise ConfigError("techniques with step hooks (EWA) act on all experts of a layer and do not support "
                              f"parallel.ep={self.mesh.ep} > 1 yet; use parallel.ep=1 (data parallel)")

    def prepare_model(self, model, seed: int):
        model = shard_experts(model, self.mesh, layout=self.layout)
        if self.overlap_degree != 1 and self.mesh.ep > 1:  # pipelines the padded exchanges only
            set_overlap_degree(model, self.overlap_degree)
        torch.manual_seed(seed * 1_000_003 + 7919 * self.rank)  # decorrelate dropout / router noise
        return model

    def reduce_gradients(self, model) -> None:
        reduce_gradients(model, self.mesh)

    def clip_grad_norm_(self, model, max_norm: float):
        return clip_grad_norm_(model, self.mesh, max_norm)

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def aug_seed(self, base: int) -> int:
        return base * self.world_size + self.rank

    def save_checkpoint(self, path, *, model, optimizer, state) -> None:
        save_checkpoint_distributed(path, model=model, optimizer=optimizer, state=state, mesh=self.mesh)

    def load_checkpoint(self, path, *, model, optimizer):
        return load_checkpoint_distributed(path, model=model, optimizer=optimizer, mesh=self.mesh)

    def save_pretrained(self, model, directory) -> None:
        save_pretrained_distributed(model, directory, self.mesh)

    def full_model(self, model):
        return full_model(model)

    def idle_forward(self, model, image_shape, device) -> None:
        """A rank with no images in a short last batch still joins the layers' collectives."""
        model(torch.zeros((1,) + tuple(image_shape), device=device))

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_parallel(cfg) -> SingleProcess:
    """``DistributedRun`` under a launcher (torchrun), else ``SingleProcess`` (ep must then be 1)."""
    par = getattr(cfg, "parallel", None)
    ep = par.ep if par is not None else 1
    if not launched():
        if ep > 1:
            raise ConfigError(f"parallel.ep={ep} needs {ep} (or a multiple of {ep}) processes: launch with "
                              f"`torchrun --nproc-per-node {ep} -m moevision train ... --set parallel.ep={ep}`")
        return SingleProcess()
    return DistributedRun(cfg)
