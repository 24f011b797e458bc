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


def all_reduce_max_float(value: float, device: torch.device, group=None) -> float:
    """The maximum of a float over the group (one fp64 scalar all-reduce; a host sync on GPUs)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


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


# -- 2DH all-to-all (Tutel, spec §2(b)4) --------------------------------------------------------------
#
# W = n nodes x m local ranks; rank r = a * m + u is local rank u of node a. A flat all-to-all with equal
# chunks sends chunk d of every rank to rank d. The two-dimensional hierarchical (2DH) form gives the same
# result with every inter-node message m times larger (each rank sends n - 1 inter-node messages instead
# of W - m):
#   1. stride copy: group this rank's chunks by destination *local* index v   -> [v, b, c]
#   2. all-to-all among the m ranks of the node (block v to local rank v)      -> [u', b, c]
#   3. stride copy: group by destination node b                                -> [b, u', c]
#   4. all-to-all among the n ranks with this local index (block b to node b) -> [a, u', c]
# which is chunk order by source rank (a, u'), as the flat exchange leaves it. Tutel runs the inter-node
# exchange first and fixes the order with a view/transpose; the permutation is the same.


def _two_dh(x: torch.Tensor, nodes: int, local: int, intra, inter) -> torch.Tensor:
    """The 2DH permutation of ``x`` (W * c rows, destination-major) with the exchanges ``intra(t)`` and
    ``inter(t)`` (equal-split all-to-alls over the node and over the same-local-index ranks)."""
    W = nodes * local
    if x.shape[0] % W:
        raise ValueError(f"2DH all-to-all needs equal chunks: {x.shape[0]} rows do not split over {W} ranks")
    c, rest = x.shape[0] // W, tuple(x.shape[1:])
    y = x.reshape(nodes, local, c, *rest).transpose(0, 1).reshape(W * c, *rest)  # 1: by local index
    y = intra(y)  # 2
    y = y.reshape(local, nodes, c, *rest).transpose(0, 1).reshape(W * c, *rest)  # 3: by node
    return inter(y)  # 4


def _equal_a2a(group):
    def run(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t.contiguous(), group=group)
        return out
    return run


class _AllToAll2DH(torch.autograd.Function):
    """The equal-chunk all-to-all is its own inverse (chunk (s -> d) goes back d -> s), so the backward is
    the same 2DH exchange of the gradient."""

    @staticmethod
    def forward(ctx, x, nodes, local, intra_group, inter_group):
        ctx.args = (nodes, local, intra_group, inter_group)
        return _two_dh(x, nodes, local, _equal_a2a(intra_group), _equal_a2a(inter_group))

    @staticmethod
    def backward(ctx, grad):
        nodes, local, intra_group, inter_group = ctx.args
        return _AllToAll2DH.apply(grad.contiguous(), nodes, local, intra_group, inter_group), None, None, None, None


def all_to_all_2dh(x: torch.Tensor, nodes: int, local: int, intra_group, inter_group) -> torch.Tensor:
    """Differentiable equal-chunk all-to-all along dim 0 in Tutel's two-dimensional hierarchical form;
    the same result as ``all_to_all(x, [c] * W, [c] * W)`` over the W = nodes * local ranks. Groups from
    ``hierarchical_groups``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllToAll2DH.apply(x, nodes, local, intra_group, inter_group)
    return _two_dh(x, nodes, local, _equal_a2a(intra_group), _equal_a2a(inter_group))


def hierarchical_groups(ranks: list[int], local: int):
    """(intra_group, inter_group, nodes) for this rank, from the global ``ranks`` of a group laid out
    node-major (``ranks[a * local + u]`` = local rank u of node a). ``dist.new_group`` is collective:
    every process of the world must call this with the same arguments."""
    W = len(ranks)
    if local < 1 or W % local:
        raise ValueError(f"2DH: a group of {W} ranks does not split into nodes of {local} ranks")
    nodes, me = W // local, dist.get_rank()
    intra = inter = None
    for a in range(nodes):
        g = dist.new_group([ranks[a * local + u] for u in range(local)])
        if me in ranks[a * local:(a + 1) * local]:
            intra = g
    for u in range(local):
        members = [ranks[a * local + u] for a in range(nodes)]
        g = dist.new_group(members)
        if me in members:
            inter = g
    return intra, inter, nodes


def simulate_all_to_all(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Flat equal-chunk all-to-all over W simulated ranks (list index = rank): rank d receives chunk d
    of every rank, in source order."""
    W = len(xs)
    chunks = [x.chunk(W) for x in xs]
    return [torch.cat([chunks[s][d] for s in range(W)]) for d in range(W)]


def simulate_2dh(xs: list[torch.Tensor], nodes: int, local: int) -> list[torch.Tensor]:
    """The 2DH exchange on simulated ranks, step by step (the oracle of ``all_to_all_2dh``'s steps)."""
    W = nodes * local
    if len(xs) != W:
        raise ValueError(f"{len(xs)} ranks given for {nodes} x {local}")
    state = list(xs)

    def exchange(members: list[int], tensors: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        out = simulate_all_to_all([tensors[r] for r in members])
        return dict(zip(members, out))

    def step(kind: str, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        new = list(ys)
        groups = ([[a * local + u for u in range(local)] for a in range(nodes)] if kind == "intra"
                  else [[a * local + u for a in range(nodes)] for u in range(local)])
        for members in groups:
            for r, t in exchange(members, {r: ys[r] for r in members}).items():
                new[r] = t
        return new

    c = xs[0].shape[0] // W
    rest = tuple(xs[0].shape[1:])
    state = [x.reshape(nodes, local, c, *rest).transpose(0, 1).reshape(W * c, *rest) for x in state]
    state = step("intra", state)
    state = [y.reshape(local, nodes, c, *rest).transpose(0, 1).reshape(W * c, *rest) for y in state]
    return step("inter", state)


# -- asynchronous equal-chunk all-to-all (for the pipelined padded exchange, spec §2(b)6) -------------

class _AllToAllAsync(torch.autograd.Function):
    """Starts an equal-split all-to-all and returns its output buffer at once; the work handle goes into
    ``handles`` and must be waited on before the output is read. The backward is a blocking all-to-all
    of the gradient (the exchange is its own inverse)."""

    @staticmethod
    def forward(ctx, x, group, handles):
        ctx.group = group
        out = torch.empty_like(x)
        handles.append(dist.all_to_all_single(out, x.contiguous(), group=group, async_op=True))
        return out

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None, None


def all_to_all_async(x: torch.Tensor, group, handles: list) -> torch.Tensor:
    """Differentiable equal-split all-to-all along dim 0, started asynchronously (see ``_AllToAllAsync``)."""
    return _AllToAllAsync.apply(x, group, handles)
