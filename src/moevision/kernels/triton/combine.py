"""Triton kernels: the gate-weighted combine of expert outputs back into token order, the segment sum
of expert-sorted rows, and the K-row gather-sum of the permutation's backward.

``gather_sum``: the backward of ``permute_rows``, sum_j grad[pos[t*K + j]] for each token t in one pass.

``combine``: out[t] = sum_j g[t, j] * (y[pos[t*K + j]] + b2[e[t*K + j]]) in one pass: the expert rows
are read in place through ``pos`` (no token-major copy of y is made), the output bias is gathered
inside the kernel and the K rows are mixed in registers. Backward, one program per block of tokens:
grad_y[pos[t*K + j]] = g[t, j] * grad_out[t] (written straight into expert-sorted order) and
grad_g[t, j] = <grad_out[t], y[pos[t*K + j]] + b2[e]> (a dot product accumulated over D chunks);
the b2 gradient is then the segment sum of grad_y over each expert's rows (``segment_sum``: per-tile
partial sums, one atomic add per column and expert met by the tile).
Reference: ``kernels.ops.combine_rows`` (tests hold them equal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import narrow_ids, cdiv


@triton.jit
def _combine_fwd_kernel(y_ptr, b_ptr, g_ptr, pos_ptr, e_ptr, out_ptr, T, D, stride_y, stride_b, stride_o,
                        K: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                        HAS_GATES: tl.constexpr = True):
    """out[t] = sum_j g[t, j] * (y[pos[t*K + j]] + b[e[t*K + j]]); without gates (HAS_GATES=False) and bias,
    the plain gather-sum of ``gather_sum``."""
    toks = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    tmask = toks < T
    mask = tmask[:, None] & (cols < D)[None, :]
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for j in tl.static_range(K):
        a = toks * K + j
        row = tl.load(pos_ptr + a, mask=tmask, other=0).to(tl.int32)
        v = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            e = tl.load(e_ptr + a, mask=tmask, other=0).to(tl.int32)
            v += tl.load(b_ptr + e[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GATES:
            g = tl.load(g_ptr + a, mask=tmask, other=0.0).to(tl.float32)
            acc += g[:, None] * v
        else:
            acc += v
    tl.store(out_ptr + toks[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(go_ptr, y_ptr, b_ptr, g_ptr, pos_ptr, e_ptr, gy_ptr, gg_ptr, T, D, stride_go, stride_y,
                        stride_b, stride_gy, K: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr,
                        BD: tl.constexpr):
    toks = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = toks < T
    for j in tl.static_range(K):
        a = toks * K + j
        row = tl.load(pos_ptr + a, mask=tmask, other=0).to(tl.int32)
        g = tl.load(g_ptr + a, mask=tmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            e = tl.load(e_ptr + a, mask=tmask, other=0).to(tl.int32)
        dot = tl.zeros((BT,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            mask = tmask[:, None] & (cols < D)[None, :]
            go = tl.load(go_ptr + toks[:, None] * stride_go + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            v = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v += tl.load(b_ptr + e[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(go * v, axis=1)
            tl.store(gy_ptr + row[:, None] * stride_gy + cols[None, :], (g[:, None] * go).to(gy_ptr.dtype.element_ty),
                     mask=mask)
        tl.store(gg_ptr + a, dot, mask=tmask)


@triton.jit
def _segment_sum_kernel(v_ptr, e_ptr, out_ptr, A, D, stride_v, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < A
    cmask = cols < D
    e = tl.load(e_ptr + rows, mask=rmask, other=0).to(tl.int32)
    v = tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    e_lo = tl.min(tl.where(rmask, e, 2147483647), axis=0)
    e_hi = tl.max(tl.where(rmask, e, -1), axis=0)
    for ee in range(e_lo, e_hi + 1):
        part = tl.sum(tl.where((e == ee)[:, None], v, 0.0), axis=0)
        tl.atomic_add(out_ptr + ee * D + cols, part, mask=cmask)


def segment_sum(v_AD: torch.Tensor, expert_of_row: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E, D) fp32 sums of the rows of each expert (rows sorted by expert for speed; any order is correct)."""
    v_AD = v_AD.contiguous()
    A, D = v_AD.shape
    out = torch.zeros(num_experts, D, device=v_AD.device, dtype=torch.float32)
    if A:
        BM, BN = 64, 128
        _segment_sum_kernel[(cdiv(A, BM), cdiv(D, BN))](
            v_AD, narrow_ids(expert_of_row), out, A, D, v_AD.stride(0), BM=BM, BN=BN)
    return out


def gather_sum(g_AD: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """out[t] = sum_j g[pos[t*k + j]] (fp32 sums): the backward of ``permute_rows`` in one pass - the K
    expert-sorted gradient rows of each token read in place, no token-major (A, D) copy, no reduction
    kernel over it."""
    g_AD = g_AD.contiguous()
    A, D = g_AD.shape
    T = A // k
    out = torch.empty(T, D, device=g_AD.device, dtype=g_AD.dtype)
    if T:
        pos32 = narrow_ids(pos)  # the combine kernel, no gates and no bias (placeholder pointers)
        _combine_fwd_kernel[(cdiv(T, _BT), cdiv(D, _BD))](
            g_AD, g_AD, g_AD, pos32, pos32, out, T, D, g_AD.stride(0), 0, out.stride(0), K=k, HAS_BIAS=False,
            BT=_BT, BD=_BD, HAS_GATES=False)
    return out


_BT, _BD = 32, 128


class _TritonCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_AD, gates_TK, pos, order, bias_ED, expert_tok, e_sorted):
        T, K = gates_TK.shape
        D = y_AD.shape[-1]
        y_AD = y_AD.contiguous()
        g = gates_TK.contiguous()
        pos32 = narrow_ids(pos)
        has_bias = bias_ED is not None
        b = bias_ED.contiguous() if has_bias else y_AD  # placeholder pointer when there is no bias
        e32 = narrow_ids(expert_tok) if has_bias else pos32
        out = torch.empty(T, D, device=y_AD.device, dtype=y_AD.dtype)
        if T:
            _combine_fwd_kernel[(cdiv(T, _BT), cdiv(D, _BD))](
                y_AD, b, g, pos32, e32, out, T, D, y_AD.stride(0), b.stride(0), out.stride(0),
                K=K, HAS_BIAS=has_bias, BT=_BT, BD=_BD)
        ctx.save_for_backward(y_AD, g, pos32, e32, b, e_sorted if has_bias else None)
        ctx.has_bias, ctx.E = has_bias, (bias_ED.shape[0] if has_bias else 0)
        return out

    @staticmethod
    def backward(ctx, go_TD):
        y_AD, g, pos32, e32, b, e_sorted = ctx.saved_tensors
        T, K = g.shape
        D = y_AD.shape[-1]
        go_TD = go_TD.contiguous()
        gy = torch.empty_like(y_AD)
        gg = torch.empty(T, K, device=g.device, dtype=torch.float32)
        if T:
            _combine_bwd_kernel[(cdiv(T, _BT),)](
                go_TD, y_AD, b, g, pos32, e32, gy, gg, T, D, go_TD.stride(0), y_AD.stride(0), b.stride(0),
                gy.stride(0), K=K, HAS_BIAS=ctx.has_bias, BT=_BT, BD=_BD)
        gb = segment_sum(gy, e_sorted, ctx.E).to(b.dtype) if ctx.has_bias else None
        return gy, gg.to(g.dtype), None, None, gb, None, None


def combine_triton(y_AD, gates_TK, pos, order, bias_ED=None, expert_tok=None, e_sorted=None) -> torch.Tensor:
    """Same contract as ``kernels.ops.combine_rows`` (plus ``e_sorted``, the expert of each sorted row,
    for the bias gradient)."""
    if bias_ED is not None and (expert_tok is None or e_sorted is None):
        raise ValueError("combine_triton: a bias needs expert_tok and e_sorted")
    return _TritonCombine.apply(y_AD, gates_TK, pos, order, bias_ED, expert_tok, e_sorted)
