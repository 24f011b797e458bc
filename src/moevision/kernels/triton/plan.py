"""Triton kernel: the expert-sorted plan's two index tensors in one pass.

After the stable sort of the assignments by expert (``moe.dispatch.sort_by_expert``: ``order`` and the
sorted expert ids ``e_sorted``), the ``fused`` layer needs

- ``pos``, the inverse permutation (``pos[order[i]] = i``: the sorted row of each token-major assignment),
  and
- ``offs``, the end of each expert's segment (``searchsorted(e_sorted, arange(E), right=True)``: the number
  of rows whose expert is <= e), what ``torch._grouped_mm`` takes.

In PyTorch that is an ``arange`` and a ``scatter_`` for ``pos``, and an ``arange`` and a ``searchsorted``
for ``offs`` (and a division for the token of each sorted row when K > 1): four or five kernels of a few
microseconds each on a GPU. Here one program per block of sorted rows
writes ``pos`` for its rows and, for each row i whose next row belongs to a later expert (or that is the
last row), ``offs[e] = i + 1`` for every e from its expert up to the next row's (exclusive): each e < E is
written by exactly one row, except those below the first row's expert, which the first program sets to 0.
No atomics, no host synchronisation. Reference: the PyTorch ops above (tests hold them equal, empty
experts at either end and in the middle included; ``kernels.ops.plan_indices_torch``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import cdiv, next_pow2

from ..ops import plan_indices_torch


@triton.jit
def _plan_index_kernel(order_ptr, es_ptr, pos_ptr, offs_ptr, tok_ptr, A, E, K: tl.constexpr, EP: tl.constexpr,
                       BA: tl.constexpr):
    rows = tl.program_id(0) * BA + tl.arange(0, BA)
    rmask = rows < A
    o = tl.load(order_ptr + rows, mask=rmask, other=0)
    tl.store(pos_ptr + o, rows.to(tl.int32), mask=rmask)
    if K > 1:  # the token of each sorted row (what the permutation gathers)
        tl.store(tok_ptr + rows, (o // K).to(tl.int32), mask=rmask)
    cur = tl.load(es_ptr + rows, mask=rmask, other=0).to(tl.int32)
    nxt = tl.load(es_ptr + rows + 1, mask=(rows + 1) < A, other=0).to(tl.int32)
    nxt = tl.where((rows + 1) < A, nxt, E)  # past the last row: every expert from its own up ends there
    e = tl.arange(0, EP)
    hit = rmask[:, None] & (e[None, :] >= cur[:, None]) & (e[None, :] < nxt[:, None]) & (e[None, :] < E)
    val = (rows + 1).to(tl.int32)[:, None] + tl.zeros((BA, EP), dtype=tl.int32)
    tl.store(offs_ptr + e[None, :] + tl.zeros((BA, EP), dtype=tl.int32), val, mask=hit)
    if tl.program_id(0) == 0:  # the experts before the first row's own have no rows: their segments end at 0
        first = tl.load(es_ptr).to(tl.int32)
        tl.store(offs_ptr + e, tl.zeros((EP,), dtype=tl.int32), mask=(e < first) & (e < E))


_MAX_E = 1024  # more experts than this: the PyTorch ops (arange + scatter_, arange + searchsorted)


def plan_indices(order: torch.Tensor, e_sorted: torch.Tensor, num_experts: int, k: int = 1):
    """``(pos, offs, tok)``: ``pos`` (int32) the inverse of the permutation ``order`` (A,), ``offs`` (E,) (int32)
    the segment ends of the sorted expert ids ``e_sorted`` (A,) (any integer dtype, ascending, in [0, E)), and
    ``tok = order // k`` (int32; the token of each sorted row) for ``k`` > 1, ``order`` itself for k = 1, in one
    kernel launch (for E <= 1024; more experts take the PyTorch ops)."""
    if order.dim() != 1 or e_sorted.shape != order.shape:
        raise ValueError(f"plan_indices: order and e_sorted must be vectors of one length, got "
                         f"{tuple(order.shape)} and {tuple(e_sorted.shape)}")
    E, K = int(num_experts), int(k)
    if E < 1 or K < 1:
        raise ValueError(f"plan_indices: num_experts and k must be >= 1, got {num_experts!r} and {k!r}")
    A = order.numel()
    dev = order.device
    if E > _MAX_E:  # the kernel's (rows, experts) tile would not fit: the PyTorch ops
        return plan_indices_torch(order, e_sorted, E, K)
    pos = torch.empty(A, dtype=torch.int32, device=dev)
    tok = torch.empty(A, dtype=torch.int32, device=dev) if K > 1 else order
    if A == 0:
        return pos, torch.zeros(E, dtype=torch.int32, device=dev), tok
    offs = torch.empty(E, dtype=torch.int32, device=dev)
    EP = next_pow2(E)
    BA = max(16, min(1024, 8192 // EP))
    order = order.contiguous()
    _plan_index_kernel[(cdiv(A, BA),)](order, e_sorted.contiguous(), pos, offs, tok if K > 1 else pos, A, E,
                                              K=K, EP=EP, BA=BA)
    return pos, offs, tok
