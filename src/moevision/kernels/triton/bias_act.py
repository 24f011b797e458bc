"""Triton kernels: per-expert bias + activation over expert-sorted rows, forward and backward.

Forward reads the grouped GEMM's output h (A, F) once and writes act(h + b1[expert_of_row]) - the
bias gather is fused, nothing (A, F)-sized is materialised besides the output. Backward reads the
incoming gradient and h, writes d/dh, and accumulates the bias gradient per expert inside the kernel:
each (BM x BN) tile sums its rows expert by expert (rows are sorted, so a tile meets one or two
experts) and adds the partial sums to an fp32 (E, F) buffer with one atomic add per column and expert
- a few hundred atomics per address instead of one per row. Correct for any row order, fastest
when sorted. Reference: ``kernels.ops.bias_act_torch`` (tests hold them equal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import narrow_ids, cdiv

ACT_IDS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}
_SQRT1_2 = 0.7071067811865476
_SQRT_2_PI = 0.7978845608028654  # sqrt(2 / pi)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 1:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        return 0.5 * x * (1.0 + t)
    elif ACT == 2:
        return tl.maximum(x, 0.0)
    else:
        return x * tl.sigmoid(x)


@triton.jit
def _dact(x, ACT: tl.constexpr):
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        return cdf + x * pdf
    elif ACT == 1:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACT == 2:
        return tl.where(x > 0.0, 1.0, 0.0)
    else:
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))


@triton.jit
def _bias_tile(b_ptr, e, rmask, cols, cmask, mask, stride_b, ROWBIAS: tl.constexpr):
    """The (BM, BN) tile of b[e[row], col] in fp32, and the tile's lowest and highest expert. Rows are
    sorted by expert, so a tile nearly always meets one or two experts: then (ROWBIAS) two rows of b are
    loaded and selected per row, instead of a gathered load per element; otherwise the gather."""
    e_lo = tl.min(tl.where(rmask, e, 2147483647), axis=0)
    e_hi = tl.max(tl.where(rmask, e, -1), axis=0)
    if ROWBIAS and e_hi - e_lo <= 1:
        b_lo = tl.load(b_ptr + e_lo * stride_b + cols, mask=cmask, other=0.0).to(tl.float32)
        b_hi = tl.load(b_ptr + e_hi * stride_b + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.where((e == e_lo)[:, None], b_lo[None, :], b_hi[None, :])
    else:
        b = tl.load(b_ptr + e[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return b, e_lo, e_hi


@triton.jit
def _bias_act_fwd_kernel(h_ptr, b_ptr, e_ptr, out_ptr, A, F, stride_h, stride_b, stride_o,
                         ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ROWBIAS: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < A
    cmask = cols < F
    mask = rmask[:, None] & cmask[None, :]
    e = tl.load(e_ptr + rows, mask=rmask, other=0).to(tl.int32)
    h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b, e_lo, e_hi = _bias_tile(b_ptr, e, rmask, cols, cmask, mask, stride_b, ROWBIAS)
    y = _act(h + b, ACT)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_bwd_kernel(g_ptr, h_ptr, b_ptr, e_ptr, gh_ptr, gb_ptr, A, F, stride_g, stride_h, stride_b,
                         stride_gh, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ROWBIAS: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < A
    cmask = cols < F
    mask = rmask[:, None] & cmask[None, :]
    e = tl.load(e_ptr + rows, mask=rmask, other=0).to(tl.int32)
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b, e_lo, e_hi = _bias_tile(b_ptr, e, rmask, cols, cmask, mask, stride_b, ROWBIAS)
    gp = g * _dact(h + b, ACT)
    tl.store(gh_ptr + rows[:, None] * stride_gh + cols[None, :], gp.to(gh_ptr.dtype.element_ty), mask=mask)
    gp = tl.where(mask, gp, 0.0)
    for ee in range(e_lo, e_hi + 1):
        part = tl.sum(tl.where((e == ee)[:, None], gp, 0.0), axis=0)
        tl.atomic_add(gb_ptr + ee * F + cols, part, mask=cmask)


# (BM, BN, num_warps) of each kernel, and whether tiles load two rows of b (see _bias_tile). Module
# state so benchmarks/gpu_breakdown.py can sweep them. The defaults are the measured choice (H200, bf16,
# session 13: docs/results/gpu/s13/breakdown_s13c.txt and _s13e.txt, 22 tile shapes): (32, 128, 4)
# forward, (32, 64, 4) backward, fastest or tied at F = 3072 and 1536 (backward 256 -> 185 us at ViT-B,
# 135 -> 96 us at ViT-S, against the (64, 128, 4) tiles before); the two-row bias load (ROWBIAS) made the
# backward slower (the layer 1.825 -> 1.900 ms), so it is off.
BLOCKS = {"fwd": (32, 128, 4), "bwd": (32, 64, 4)}
ROWBIAS = False


def _grid(A, F, blocks):
    return (cdiv(A, blocks[0]), cdiv(F, blocks[1]))


class _TritonBiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_AF, b_EF, expert_of_row, act):
        h_AF, b_EF = h_AF.contiguous(), b_EF.contiguous()
        e = narrow_ids(expert_of_row)
        A, F = h_AF.shape
        out = torch.empty_like(h_AF)
        if A:
            bm, bn, nw = BLOCKS["fwd"]
            _bias_act_fwd_kernel[_grid(A, F, BLOCKS["fwd"])](h_AF, b_EF, e, out, A, F, h_AF.stride(0), b_EF.stride(0),
                                                             out.stride(0), ACT=ACT_IDS[act], BM=bm, BN=bn,
                                                             ROWBIAS=ROWBIAS, num_warps=nw)
        ctx.save_for_backward(h_AF, b_EF, e)
        ctx.act = act
        return out

    @staticmethod
    def backward(ctx, g_AF):
        h_AF, b_EF, e = ctx.saved_tensors
        g_AF = g_AF.contiguous()
        A, F = h_AF.shape
        gh = torch.empty_like(h_AF)
        gb = torch.zeros(b_EF.shape, device=b_EF.device, dtype=torch.float32)
        if A:
            bm, bn, nw = BLOCKS["bwd"]
            _bias_act_bwd_kernel[_grid(A, F, BLOCKS["bwd"])](g_AF, h_AF, b_EF, e, gh, gb, A, F, g_AF.stride(0),
                                                             h_AF.stride(0), b_EF.stride(0), gh.stride(0),
                                                             ACT=ACT_IDS[ctx.act], BM=bm, BN=bn, ROWBIAS=ROWBIAS,
                                                             num_warps=nw)
        return gh, gb.to(b_EF.dtype), None, None


def bias_act_triton(h_AF: torch.Tensor, b_EF: torch.Tensor, expert_of_row: torch.Tensor, act: str) -> torch.Tensor:
    if act not in ACT_IDS:
        raise ValueError(f"bias_act_triton: unsupported activation {act!r}; known {sorted(ACT_IDS)}")
    return _TritonBiasAct.apply(h_AF, b_EF, expert_of_row, act)
