"""Autograd building blocks of the fused dispatch path (plain PyTorch; Triton versions in ``triton/``).

The fast path keeps the A = T*K assignments of dropless token choice in two orders: token-major
(assignment ``a = t*K + j`` is token t's j-th choice, the router's order) and expert-major (sorted
by expert, what the grouped GEMMs read). ``order[i]`` is the token-major index of sorted row i and
``pos`` its inverse (``pos[order[i]] == i``). With both at hand no step needs an atomic scatter:

- ``permute_rows``: x_TD -> rows sorted by expert. Forward is a gather; backward gathers the K copies
  of each token back (``pos``) and sums them, instead of ``index_add`` (atomics on GPU, serial on CPU).
- ``combine_rows``: expert outputs -> tokens: gather to token-major, add the expert's output bias and
  mix the K rows with the gates (K fused multiply-adds); backward is gathers and one (T,K,D)
  product, no scatter. The output bias b2 is folded in here (it is per expert, per row).
- ``bias_act``: act(h + b1[expert_of_row]) with a hand-written backward: the bias gradient is a
  segment sum over the expert-sorted rows, computed as a one-hot (E x A) @ (A x F) GEMM rather than an
  ``index_add`` of A rows into E (thousands of atomic adds on the same addresses on a GPU).

Shape legend: T tokens, K choices per token, A = T*K assignments, D width, F hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GELU_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}


def act_forward(name: str, x: torch.Tensor) -> torch.Tensor:
    if name in _GELU_APPROX:
        return F.gelu(x, approximate=_GELU_APPROX[name])
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"bias_act: unsupported activation {name!r}")


def act_backward(name: str, grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """d act(x)/dx * grad, with the same formulas autograd uses; written into ``out`` when given (which
    may be ``grad`` itself: elementwise, each element is read before it is written)."""
    if name in _GELU_APPROX:
        if out is not None:
            return torch.ops.aten.gelu_backward.grad_input(grad, x, approximate=_GELU_APPROX[name], grad_input=out)
        return torch.ops.aten.gelu_backward(grad, x, approximate=_GELU_APPROX[name])
    if name == "relu":
        if out is not None:
            return torch.ops.aten.threshold_backward.grad_input(grad, x, 0, grad_input=out)
        return torch.ops.aten.threshold_backward(grad, F.relu(x), 0)
    if name == "silu":
        if out is not None:
            return torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out)
        return torch.ops.aten.silu_backward(grad, x)
    raise ValueError(f"bias_act: unsupported activation {name!r}")


def segment_sum_rows(v_AF: torch.Tensor, expert_of_row: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E, F) sums of the rows of each expert, as a one-hot GEMM (no atomics, any row order)."""
    # built by comparison: F.one_hot validates its input on the host (a sync)
    experts = torch.arange(num_experts, device=expert_of_row.device)
    onehot_EA = (experts.unsqueeze(1) == expert_of_row.unsqueeze(0)).to(v_AF.dtype)
    return onehot_EA @ v_AF


def plan_indices_torch(order: torch.Tensor, e_sorted: torch.Tensor, num_experts: int, k: int = 1):
    """``(pos, offs, tok)`` of an expert-sorted plan in PyTorch ops (the reference of the Triton plan kernel,
    ``kernels/triton/plan.py``): ``pos`` (int32) the inverse permutation of ``order``, ``offs`` (E,) int32 the
    segment ends of the ascending ids ``e_sorted`` (binary search: no host sync, unlike ``bincount`` on CUDA),
    ``tok`` the token of each sorted row (``order // k`` in order's dtype: no conversion kernel; ``order`` itself
    for k = 1; the Triton kernel writes it int32, and either indexes the same rows)."""
    A, dev = order.numel(), order.device
    pos = torch.empty(A, dtype=torch.int32, device=dev).scatter_(0, order, torch.arange(A, dtype=torch.int32, device=dev))
    offs = torch.searchsorted(e_sorted, torch.arange(num_experts, device=dev, dtype=e_sorted.dtype), right=True,
                              out_int32=True)
    tok = torch.div(order, k, rounding_mode="floor") if k > 1 else order
    return pos, offs, tok


_triton_gather_sum = None  # kernels.triton.combine.gather_sum, set by moevision.kernels when Triton imports


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, order_tok, pos, k):
        ctx.save_for_backward(pos)
        ctx.k = k
        return x_TD.index_select(0, order_tok)

    @staticmethod
    def backward(ctx, g_AD):
        (pos,) = ctx.saved_tensors
        k = ctx.k
        if k > 1 and _triton_gather_sum is not None and g_AD.is_cuda and not torch.compiler.is_compiling():
            return _triton_gather_sum(g_AD, pos, k), None, None, None  # one pass, no (A, D) copy
        g_tok = g_AD.index_select(0, pos)  # token-major: the K copies of token t are rows t*K..t*K+K-1
        if k == 1:
            return g_tok, None, None, None
        g3 = g_tok.view(-1, k, g_AD.shape[-1])
        if k == 2:  # one elementwise add: a middle-axis sum(1) is a slow reduction kernel on a GPU (44 vs ~15 us
            return torch.add(g3[:, 0], g3[:, 1]), None, None, None  # at ViT-B on an H200); same rounding
        return g3.sum(1), None, None, None


def permute_rows(x_TD: torch.Tensor, order: torch.Tensor, pos: torch.Tensor, k: int,
                 tok: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x for the expert-sorted assignments (row i is token ``order[i] // k``; ``tok``, when given, is
    that already)."""
    if tok is None:
        tok = torch.div(order, k, rounding_mode="floor") if k > 1 else order
    return _PermuteRows.apply(x_TD, tok, pos, k)


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_AD, gates_TK, pos, order, bias_ED, expert_tok):
        T, K = gates_TK.shape
        D = y_AD.shape[-1]
        # Out of place under torch.compile: dynamo of torch 2.11 (measured on an H200) traced the in-place
        # form into a backward fed a zero output gradient - every gradient of the layer came out 0.
        # Inductor fuses the out-of-place form into the same kernels; eager keeps the in-place one.
        inplace = not torch.compiler.is_compiling()
        y_tok = y_AD.index_select(0, pos)  # (A, D) token-major
        if bias_ED is not None:
            b_tok = bias_ED.index_select(0, expert_tok)
            y_tok = y_tok.add_(b_tok) if inplace else y_tok + b_tok
        g = gates_TK.to(y_AD.dtype)
        # K fused multiply-adds, not a (T,1,K) x (T,K,D) bmm: T tiny GEMMs are 5x slower on CPU
        y3 = y_tok.view(T, K, D)
        out = y3[:, 0] * g[:, :1]
        for j in range(1, K):
            out = out.addcmul_(y3[:, j], g[:, j:j + 1]) if inplace else torch.addcmul(out, y3[:, j], g[:, j:j + 1])
        ctx.save_for_backward(y_tok, g, order, expert_tok)
        ctx.has_bias, ctx.num_experts = bias_ED is not None, (bias_ED.shape[0] if bias_ED is not None else 0)
        ctx.gates_dtype = gates_TK.dtype
        return out

    @staticmethod
    def backward(ctx, g_TD):
        y_tok, g, order, expert_tok = ctx.saved_tensors
        T, K = g.shape
        D = g_TD.shape[-1]
        g_TD = g_TD.contiguous()
        grad_gates = torch.bmm(y_tok.view(T, K, D), g_TD.unsqueeze(-1)).view(T, K)
        gy_tok = (g.unsqueeze(-1) * g_TD.unsqueeze(1)).view(T * K, D)
        grad_y = gy_tok.index_select(0, order)
        grad_bias = segment_sum_rows(gy_tok, expert_tok, ctx.num_experts) if ctx.has_bias else None
        return grad_y, grad_gates.to(ctx.gates_dtype), None, None, grad_bias, None


def combine_rows(y_AD, gates_TK, pos, order, bias_ED=None, expert_tok=None) -> torch.Tensor:
    """out[t] = sum_j gates[t, j] * (y[pos[t*K + j]] + bias[expert of (t, j)])."""
    return _CombineRows.apply(y_AD, gates_TK, pos, order, bias_ED, expert_tok)


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_AF, b_EF, expert_of_row, act):
        pre = h_AF + b_EF.index_select(0, expert_of_row)
        ctx.save_for_backward(pre, expert_of_row)
        ctx.act, ctx.num_experts = act, b_EF.shape[0]
        return act_forward(act, pre)

    @staticmethod
    def backward(ctx, g_AF):
        pre, expert_of_row = ctx.saved_tensors
        g_pre = act_backward(ctx.act, g_AF.contiguous(), pre)
        return g_pre, segment_sum_rows(g_pre, expert_of_row, ctx.num_experts), None, None


def bias_act_torch(h_AF: torch.Tensor, b_EF: torch.Tensor, expert_of_row: torch.Tensor, act: str) -> torch.Tensor:
    """act(h + b[expert_of_row]), plain PyTorch with a scatter-free bias gradient."""
    return _BiasAct.apply(h_AF, b_EF, expert_of_row, act)
