"""Autograd-aware collectives for expert parallelism (GShard / Tutel all-to-all; spec §2(b)3).

``all_to_all(x, out_splits, in_splits, group)`` sends ``in_splits[p]`` rows of ``x`` to peer p and
receives ``out_splits[p]`` rows from it; its backward is the reverse all-to-all (splits swapped), so
gradients flow back to the rank that sent each row. Split sizes are exchanged first with
``exchange_counts`` (an all-to-all of an int64 count matrix). Both need ``dist.all_to_all_single``,
which gloo (CPU) and NCCL (GPU) support, with uneven splits.

Every rank of the group must make the same calls in the same order, in forward and in backward:
callers keep the autograd graph connected on every rank (see ``expert_parallel``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group=None) -> int:
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    return dist.get_rank(group)


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (list(out_splits), list(in_splits)), group
        return _a2a(x, list(out_splits), list(in_splits), group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 with (possibly uneven) split sizes."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllToAll.apply(x, out_splits, in_splits, group)
    return _a2a(x, list(out_splits), list(in_splits), group)


def exchange_counts(send_PL: torch.Tensor, group=None) -> torch.Tensor:
    """``send_PL[p, j]``: rows this rank sends to peer p for p's local slot j. Returns ``recv_PL`` with
    ``recv_PL[s, j]`` = rows peer s sends to this rank for its slot j. One small all-to-all."""
    P = send_PL.shape[0]
    flat = send_PL.reshape(-1).contiguous()
    out = torch.empty_like(flat)
    dist.all_to_all_single(out, flat, group=group)
    return out.view(P, -1)


def all_reduce_max(value: int, device: torch.device, group=None) -> int:
    """The maximum of an integer over the group (one scalar all-reduce; a host sync on GPUs)."""
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


class _AllGather(torch.autograd.Function):
    """Concatenate equal-shaped shards along dim 0; backward sums the gradient over the group and keeps
    this rank's slice (a reduce-scatter, written as all-reduce + slice because gloo lacks it)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n = group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(group_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        r = group_rank(ctx.group)
        return grad[r * ctx.n:(r + 1) * ctx.n], None


def all_gather_cat(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-gather of equal shards, concatenated along dim 0 (rank order)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllGather.apply(x, group)
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)
