"""Dispatch (tokens -> expert inputs) and combine (expert outputs -> tokens), several interchangeable ways.

- ``loop``: per-expert loop over boolean masks, the plain reference (obviously correct, slow).
- ``einsum``: V-MoE / GShard dense one-hot dispatch and combine tensors (G, S, E, C); reference only,
  O(T*E*C) memory.
- ``sorted``: sort assignments by expert, gather, run each expert on its contiguous slice, scale by the
  gate and scatter-add back (MegaBlocks-style dropless; works with capacity by skipping dropped ones).
- ``grouped``: like ``sorted`` but one ``torch._grouped_mm`` per projection (GPU fast path; CPU fp32 too).
- ``padded``: capacity buffers (E, G*C, D) filled by index, one batched matmul (vmoe / Tutel layout).

All take the flattened tokens x (T, D) and a RoutingPlan and return (T, D). They agree to 1e-6 in
float64 forward and backward (tests). Shape legend: T tokens, D width, A assignments, E experts,
G groups, S tokens per group, C capacity.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from .experts import Experts
from .types import RoutingPlan


def _kept(plan: RoutingPlan):
    """The kept assignments. Dropless token choice keeps all of them: no mask, no host sync."""
    if plan.capacity is None and plan.top_k > 0:
        return plan.token_idx, plan.expert_idx, plan.gates
    m = plan.kept
    return plan.token_idx[m], plan.expert_idx[m], plan.gates[m]


def dispatch_loop(x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts, **_) -> torch.Tensor:
    tok, exp, gate = _kept(plan)
    out = torch.zeros_like(x_TD)
    for e in range(experts.num_experts):
        m = exp == e
        if bool(m.any()):
            y = experts.forward_expert(e, x_TD[tok[m]])
            out = out.index_add(0, tok[m], y * gate[m].unsqueeze(-1))
    return out


def _slots_for(plan: RoutingPlan, num_experts: int, G: int, S: int) -> tuple[torch.Tensor, int]:
    """Buffer slot of each kept assignment; counts in assignment order when the router gave none."""
    if plan.slot is not None:
        cap = plan.capacity if plan.capacity is not None else int(plan.slot[plan.kept].max()) + 1
        return plan.slot[plan.kept], cap
    tok, exp, _ = _kept(plan)
    key = (tok // S) * num_experts + exp  # (group, expert) cell of each assignment
    onehot = torch.nn.functional.one_hot(key, G * num_experts)
    slot = (onehot.cumsum(0) - 1).gather(1, key.unsqueeze(1)).squeeze(1)
    return slot, int(slot.max()) + 1 if slot.numel() else 1


def dispatch_einsum(x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts, *, num_groups: int,
                    group_size: int) -> torch.Tensor:
    G, S, E = num_groups, group_size, experts.num_experts
    tok, exp, gate = _kept(plan)
    slot, C = _slots_for(plan, E, G, S)
    g, s = tok // S, tok % S
    dispatch = x_TD.new_zeros(G, S, E, C)
    dispatch[g, s, exp, slot] = 1.0
    combine = x_TD.new_zeros(G, S, E, C).index_put((g, s, exp, slot), gate)
    x_GSD = x_TD.view(G, S, -1)
    x_ECD = torch.einsum("gsec,gsd->egcd", dispatch, x_GSD).reshape(E, G * C, -1)
    y_EGCD = experts.forward_padded(x_ECD).view(E, G, C, -1)
    return torch.einsum("gsec,egcd->gsd", combine, y_EGCD).reshape(G * S, -1)


def expert_keys(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The expert ids in the narrowest sort key that holds them: uint8 (E <= 255), int16 (E <= 32767), else as
    they are."""
    if num_experts <= 255:
        return expert_idx.to(torch.uint8)
    if num_experts <= 32767:
        return expert_idx.to(torch.int16)
    return expert_idx


def sort_by_expert(expert_idx: torch.Tensor, num_experts: int, *, with_keys: bool = False):
    """The stable order of assignments by expert id: ``argsort(expert_idx, stable=True)``, with the ids
    sorted as uint8 (E <= 255) or int16 keys (``expert_keys``). A radix sort makes one pass per key byte:
    CUB on CUDA runs 8 passes over int64 keys (profiled on an H200: 8 radix kernels per sort, ~60 us at
    ViT-B); ATen's CPU radix sort took 633 -> 103 us for 50k ids (measured; no change below ~13k, where it
    uses another sort). Same permutation as sorting the int64 ids (tested).

    ``with_keys=True`` returns ``(order, sorted_keys, keys)``: the sort's own output is the expert of each
    sorted row (``expert_idx[order]`` as keys, no gather), and ``keys`` the narrow ids in the input's order
    (what the Triton kernels read without a conversion)."""
    keys = expert_keys(expert_idx, num_experts)
    if not with_keys:
        return torch.argsort(keys, stable=True)
    sorted_keys, order = torch.sort(keys, stable=True)
    return order, sorted_keys, keys


def dispatch_sorted(x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts, **_) -> torch.Tensor:
    tok, exp, gate = _kept(plan)
    order = sort_by_expert(exp, experts.num_experts)
    tok, gate = tok[order], gate[order]
    counts = torch.bincount(exp, minlength=experts.num_experts).tolist()  # host sync: sizes needed
    y = experts.forward_sorted(x_TD.index_select(0, tok), counts)
    return torch.zeros_like(x_TD).index_add_(0, tok, y * gate.unsqueeze(-1))


def dispatch_grouped(x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts, **kw) -> torch.Tensor:
    """Sort by expert + ``torch._grouped_mm`` (one GEMM launch per projection, no Python loop over
    experts). Host syncs: none when dropless; with a capacity, one to drop the dropped assignments
    (their number is a size). Falls back to ``sorted`` where grouped GEMM cannot run (float64,
    unaligned widths, pre-Hopper GPUs)."""
    if not experts.grouped_mm_ok(x_TD):
        return dispatch_sorted(x_TD, plan, experts, **kw)
    tok, exp, gate = _kept(plan)
    order = sort_by_expert(exp, experts.num_experts)
    tok, exp, gate = tok[order], exp[order], gate[order]
    offs = torch.bincount(exp, minlength=experts.num_experts).cumsum(0).to(torch.int32)
    y = experts.forward_grouped(x_TD.index_select(0, tok), offs, exp)
    return torch.zeros_like(x_TD).index_add_(0, tok, y * gate.unsqueeze(-1))


def dispatch_padded(x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts, *, num_groups: int,
                    group_size: int) -> torch.Tensor:
    G, S, E = num_groups, group_size, experts.num_experts
    tok, exp, gate = _kept(plan)
    slot, C = _slots_for(plan, E, G, S)
    row = exp * (G * C) + (tok // S) * C + slot  # row in the flattened (E * G * C) buffer
    buf = x_TD.new_zeros(E * G * C, x_TD.shape[-1]).index_copy(0, row, x_TD.index_select(0, tok))
    y = experts.forward_padded(buf.view(E, G * C, -1)).reshape(E * G * C, -1)
    return torch.zeros_like(x_TD).index_add_(0, tok, y.index_select(0, row) * gate.unsqueeze(-1))


DispatchFn = Callable[..., torch.Tensor]
DISPATCH_IMPLS: dict[str, DispatchFn] = {
    "loop": dispatch_loop,
    "einsum": dispatch_einsum,
    "sorted": dispatch_sorted,
    "grouped": dispatch_grouped,
    "padded": dispatch_padded,
}


def register_dispatch(name: str, fn: DispatchFn) -> None:
    """Register a dispatch implementation (e.g. a GPU kernel or the expert-parallel dispatcher)."""
    DISPATCH_IMPLS[name] = fn


def get_dispatch(name: str) -> DispatchFn:
    if name not in DISPATCH_IMPLS:
        raise ConfigError(f"unknown dispatch impl {name!r}; known: {sorted(DISPATCH_IMPLS)}")
    return DISPATCH_IMPLS[name]
