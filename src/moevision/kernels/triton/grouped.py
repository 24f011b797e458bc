"""Triton grouped GEMMs that read the tokens in place: the expert MLP of an MoE layer with the gather
fused into the first GEMM and the gate-weighted scatter fused into the second (``impl="triton"``).

``fused`` (``kernels/fused.py``) materialises the expert-sorted copy of the tokens, runs
``torch._grouped_mm``, a bias + activation kernel, ``torch._grouped_mm`` again and a combine kernel. Here
every GEMM is one Triton kernel over the expert-sorted rows, and its operands and epilogues do the rest:

forward   h = x[tok] @ W1[e] + b1[e] and a = act(h)        (A rows gathered in the loads; no x copy)
          y = a @ W2[e] + b2[e];  out[tok] = gate * y        (K = 1: the scatter is a permutation, written
                                                              in place; K > 1: rows written token-major,
                                                              then the K rows of a token summed)
backward  gh = (gate * g_out[tok] @ W2[e]^T) * act'(h)      (grad-out gathered in the loads, the gate
          grad_gate = <g_out[tok], y>                        scale and the activation backward in the
                                                              epilogue; the gate gradient a gather +
                                                              row sum in PyTorch, or a row dot on the
                                                              same loads: ROWDOT_IN_KERNEL, off)
          gW2[e] = a_e^T @ (gate * g_out[tok])_e, gb2 = column sums    (one "wgrad" kernel: the rows of
          gW1[e] = x[tok]_e^T @ gh_e,             gb1 = column sums     each expert's segment, gathered)
          gx[tok] = gh @ W1[e]^T                              (K = 1 scattered in place; K > 1 summed)

So no (A, D) copy of x or of grad-out is made, and h, a, y and gh are each written once.

Scheduling needs no host sync: the (E+1) segment offsets stay on the device. A tile table - for each
of the at most ``cdiv(A, BM) + E`` row tiles its expert and first row - is built by a handful of small
device ops (``_tile_table``); the grid has that static size and the tiles past the end do no work.
The weight-gradient kernel has one program per (expert, K tile, N tile) and walks its expert's rows.

Status: opt-in (``MoE(impl="triton")`` or ``kernels.set_impl("triton")``); measured slower than ``fused``
on an H200 (ViT-B/16 E8 k2 forward+backward, session 12: the GEMMs reach 1/4-1/2 of cuBLAS's rate, the
weight-gradient kernel ~1/4). Tested equal to the
``loop`` reference in Triton's CPU interpreter (``TRITON_INTERPRET=1``; tests/test_triton_grouped.py),
forward and backward, K = 1-3, every activation, with and without biases, with empty experts and with
dropped assignments. Its GPU speed against ``fused`` is measured by ``moevision bench moe-layer``
(the ``triton`` row) and ``benchmarks/gpu_quick.sh``; block sizes are fixed per dtype (``BLOCKS``),
not autotuned. SwiGLU experts are not covered (they take ``fused``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._util import cdiv

from .bias_act import ACT_IDS, _act, _dact

# (BM, BN, BK, num_warps, num_stages) of the row-tile GEMM and (BM, BK, BN, warps, stages) of the wgrad
# kernel, per compute dtype on a GPU; the interpreter (CPU tensors) uses the smallest tiles tl.dot takes.
# The bf16/fp16 weight-gradient tile (64, 128, 64, 4 warps, 4 stages) was measured on an H200 (session 12,
# benchmarks/gpu_triton_diag.py): the expert MLP's forward+backward at ViT-B/16 E8 k2 5.02 -> 3.98 ms
# against (64, 128, 128, 8, 3); the row-tile GEMM's (128, 128, 64, 8, 3) was the best of the 7 swept.
BLOCKS = {
    torch.bfloat16: ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4)),
    torch.float16: ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4)),
    torch.float32: ((64, 64, 32, 4, 2), (32, 64, 64, 4, 2)),
}
_INTERP_BLOCKS = ((16, 16, 16, 1, 1), (16, 16, 16, 1, 1))
# The gate gradient <g_out[tok], y>: a separate gather + row sum in PyTorch (False, the default), or a row
# dot accumulated inside the backward GEMM from its A operand (True). True is correct in Triton's
# interpreter and on a GPU with 1-stage fp32 tiles, but on an H200 (Triton 3.x, torch 2.11) with the bf16
# tiles (128, 128, 64, 8 warps, 3 stages) it corrupts that GEMM's output gh (relative error 0.42 against
# fp32; the row dot itself stays right): reusing a pipelined wgmma operand in registers is miscompiled.
# Measured by benchmarks/gpu_triton_diag.py ("gh"); the PyTorch row dot costs ~0.15 ms of 5 ms there.
ROWDOT_IN_KERNEL = False


def interpreted() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``): kernels then take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _gmm_kernel(a_ptr, a_idx_ptr, w_ptr, bias_ptr, scale_ptr, hact_ptr, pre_ptr, out_ptr, out_idx_ptr,
                y_ptr, rd_ptr, rd_idx_ptr, tile_e_ptr, tile_r_ptr, offs_ptr, N, K,
                stride_a, stride_we, stride_wk, stride_wn, stride_b, stride_h, stride_pre, stride_o, stride_y,
                GATHER_A: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_SCALE: tl.constexpr,
                ACT_GRAD: tl.constexpr, STORE_PRE: tl.constexpr, SCATTER: tl.constexpr, ROWDOT: tl.constexpr,
                IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One (BM x BN) tile of out = epilogue(A[rows] @ W[e]) for the expert-sorted rows of one expert.

    A rows: ``a_idx[row]`` (GATHER_A) or ``row``. Epilogue, in fp32 on the accumulator: + bias[e] ->
    store it to ``pre`` (STORE_PRE) -> activation ACT (>= 0) -> * scale[row] (HAS_SCALE) -> * act'(hact[row])
    (ACT_GRAD, hact the pre-activation) -> store at row ``out_idx[row]`` (SCATTER) or ``row``. ROWDOT: the
    programs of the first N tile also accumulate rd[rd_idx[row]] = <A[row], y[row]> over the K loop."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_e_ptr + pid_m)
    live = e >= 0
    e = tl.maximum(e, 0)
    row0 = tl.load(tile_r_ptr + pid_m)
    seg_end = tl.where(live, tl.load(offs_ptr + e + 1), 0)  # tiles past the end: no row
    rows = row0 + tl.arange(0, BM)
    rmask = rows < seg_end
    rd_end = tl.where(pid_n == 0, seg_end, 0)  # the row dot: the first N tile's programs only
    rdmask = rows < rd_end
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    if GATHER_A:
        src = tl.load(a_idx_ptr + rows, mask=rmask, other=0)
    else:
        src = rows
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rd = tl.zeros((BM,), dtype=tl.float32)
    k_end = tl.where(live, K, 0)  # tiles past the end: no loop
    w_base = w_ptr + e.to(tl.int64) * stride_we
    for k0 in range(0, k_end, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        a = tl.load(a_ptr + src[:, None].to(tl.int64) * stride_a + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        if ROWDOT:
            ym = rdmask[:, None] & kmask[None, :]
            yv = tl.load(y_ptr + rows[:, None].to(tl.int64) * stride_y + ks[None, :], mask=ym, other=0.0)
            rd += tl.sum(a.to(tl.float32) * yv.to(tl.float32), axis=1)
    if ROWDOT:
        ridx = tl.load(rd_idx_ptr + rows, mask=rmask, other=0)
        tl.store(rd_ptr + ridx, rd, mask=rdmask)
    mask = rmask[:, None] & cmask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * stride_b + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + rows[:, None].to(tl.int64) * stride_pre + cols[None, :],
                 acc.to(pre_ptr.dtype.element_ty), mask=mask)
    if ACT >= 0:
        acc = _act(acc, ACT)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    if ACT_GRAD >= 0:
        hv = tl.load(hact_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :], mask=mask, other=0.0)
        acc *= _dact(hv.to(tl.float32), ACT_GRAD)
    if SCATTER:
        dst = tl.load(out_idx_ptr + rows, mask=rmask, other=0)
    else:
        dst = rows
    tl.store(out_ptr + dst[:, None].to(tl.int64) * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _wgrad_kernel(x_ptr, x_idx_ptr, g_ptr, g_idx_ptr, g_scale_ptr, offs_ptr, dw_ptr, db_ptr, KD, N,
                  stride_x, stride_g, stride_dwe, stride_dwk, stride_dwn, stride_db,
                  GATHER_X: tl.constexpr, GATHER_G: tl.constexpr, SCALE_G: tl.constexpr, HAS_DB: tl.constexpr,
                  IEEE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """dW[e][k tile, n tile] = X_e^T @ G_e over the rows of expert e (X rows ``x_idx[row]`` if GATHER_X, G rows
    ``g_idx[row]`` scaled by ``g_scale[row]``); with HAS_DB the programs of the first K tile also write the
    column sums of G_e to db[e]. An expert without rows gets zeros."""
    e = tl.program_id(0)
    pid = tl.program_id(1)
    n_tiles = tl.cdiv(N, BN)
    pk = pid // n_tiles
    pn = pid % n_tiles
    start = tl.load(offs_ptr + e)
    end = tl.load(offs_ptr + e + 1)
    ks = pk * BK + tl.arange(0, BK)
    cols = pn * BN + tl.arange(0, BN)
    kmask = ks < KD
    cmask = cols < N
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    dbacc = tl.zeros((BN,), dtype=tl.float32)
    for r0 in range(start, end, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < end
        if GATHER_X:
            xi = tl.load(x_idx_ptr + rows, mask=rmask, other=0)
        else:
            xi = rows
        if GATHER_G:
            gi = tl.load(g_idx_ptr + rows, mask=rmask, other=0)
        else:
            gi = rows
        xt = tl.load(x_ptr + xi[None, :].to(tl.int64) * stride_x + ks[:, None], mask=kmask[:, None] & rmask[None, :],
                     other=0.0)
        gv = tl.load(g_ptr + gi[:, None].to(tl.int64) * stride_g + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                     other=0.0)
        if SCALE_G:
            s = tl.load(g_scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            gv = (gv.to(tl.float32) * s[:, None]).to(xt.dtype)
        if IEEE:
            acc = tl.dot(xt, gv, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, gv, acc)
        if HAS_DB:
            dbacc += tl.sum(gv.to(tl.float32), axis=0)
    tl.store(dw_ptr + e.to(tl.int64) * stride_dwe + ks[:, None] * stride_dwk + cols[None, :] * stride_dwn,
             acc.to(dw_ptr.dtype.element_ty), mask=kmask[:, None] & cmask[None, :])
    if HAS_DB:
        db_end = tl.where(pk == 0, N, 0)  # the first K tile's programs write the bias gradient
        tl.store(db_ptr + e * stride_db + cols, dbacc.to(db_ptr.dtype.element_ty), mask=cols < db_end)


def _tile_table(offs: torch.Tensor, A: int, BM: int):
    """For each of the ``cdiv(A, BM) + E`` possible row tiles: its expert (-1 past the end) and first row.
    Device ops only (no host sync); ``offs`` (E+1,) int64 segment offsets."""
    E = offs.numel() - 1
    counts = offs[1:] - offs[:-1]
    n_tiles = torch.div(counts + (BM - 1), BM, rounding_mode="floor")
    tile_end = n_tiles.cumsum(0)
    t = torch.arange(cdiv(A, BM) + E, device=offs.device)
    te = torch.searchsorted(tile_end, t, right=True)
    ec = te.clamp(max=E - 1)
    row0 = offs.index_select(0, ec) + (t - (tile_end - n_tiles).index_select(0, ec)) * BM
    return torch.where(te < E, te, -1).to(torch.int32).contiguous(), row0.to(torch.int32).contiguous()


def _gmm(a, w, offs, tiles, n_rows_out, *, a_idx=None, bias=None, act=-1, scale=None, hact=None, act_grad=-1,
         pre=None, out=None, out_idx=None, y=None, rd=None, rd_idx=None, transpose_w=False, blocks):
    """Launch ``_gmm_kernel``: out (n_rows_out, N) from A (.., K) and the per-expert weights w (E, K, N), or
    w (E, N, K) used transposed (``transpose_w``)."""
    BM, BN, BK, warps, stages = blocks
    if transpose_w:
        N, K, swk, swn = w.shape[1], w.shape[2], w.stride(2), w.stride(1)
    else:
        K, N, swk, swn = w.shape[1], w.shape[2], w.stride(1), w.stride(2)
    if out is None:
        out = a.new_empty(n_rows_out, N)
    te, tr = tiles
    dummy = te
    grid = (te.numel(), cdiv(N, BN))
    _gmm_kernel[grid](
        a, a_idx if a_idx is not None else dummy, w, bias if bias is not None else dummy,
        scale if scale is not None else dummy, hact if hact is not None else dummy,
        pre if pre is not None else dummy, out, out_idx if out_idx is not None else dummy,
        y if y is not None else dummy, rd if rd is not None else dummy, rd_idx if rd_idx is not None else dummy,
        te, tr, offs, N, K, a.stride(0), w.stride(0), swk, swn, bias.stride(0) if bias is not None else 0,
        hact.stride(0) if hact is not None else 0, pre.stride(0) if pre is not None else 0, out.stride(0),
        y.stride(0) if y is not None else 0,
        GATHER_A=a_idx is not None, HAS_BIAS=bias is not None, ACT=act, HAS_SCALE=scale is not None,
        ACT_GRAD=act_grad, STORE_PRE=pre is not None, SCATTER=out_idx is not None, ROWDOT=rd is not None,
        IEEE=a.dtype == torch.float32, BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
    return out


def _wgrad(x, g, offs, dw, db, *, x_idx=None, g_idx=None, g_scale=None, blocks):
    BM, BK, BN, warps, stages = blocks
    E, KD, N = dw.shape
    dummy = offs
    grid = (E, cdiv(KD, BK) * cdiv(N, BN))
    _wgrad_kernel[grid](
        x, x_idx if x_idx is not None else dummy, g, g_idx if g_idx is not None else dummy,
        g_scale if g_scale is not None else dummy, offs, dw, db if db is not None else dummy, KD, N,
        x.stride(0), g.stride(0), dw.stride(0), dw.stride(1), dw.stride(2), db.stride(0) if db is not None else 0,
        GATHER_X=x_idx is not None, GATHER_G=g_idx is not None, SCALE_G=g_scale is not None, HAS_DB=db is not None,
        IEEE=x.dtype == torch.float32, BM=BM, BK=BK, BN=BN, num_warps=warps, num_stages=stages)


class _TritonExpertMLP(torch.autograd.Function):
    """out[t] = sum_j gates[t*K+j] * (act(x[t] @ W1[e] + b1[e]) @ W2[e] + b2[e]), e = the j-th expert of t."""

    @staticmethod
    def forward(ctx, x, gates, w1, b1, w2, b2, tok, order, offs, k, act):
        T, D = x.shape
        A, Fh = tok.numel(), w1.shape[-1]
        x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
        b1 = b1.contiguous() if b1 is not None else None
        b2 = b2.contiguous() if b2 is not None else None
        blocks, wblocks = (BLOCKS.get(x.dtype, BLOCKS[torch.float32]) if x.is_cuda else _INTERP_BLOCKS)
        tiles = _tile_table(offs, A, blocks[0])
        gate_s = gates.index_select(0, order).to(torch.float32).contiguous()  # gate of each sorted row
        h = x.new_empty(A, Fh)
        a = _gmm(x, w1, offs, tiles, A, a_idx=tok, bias=b1, act=ACT_IDS[act], pre=h, blocks=blocks)
        y = x.new_empty(A, D)
        if k == 1:  # a permutation: each token's row written in place
            out = _gmm(a, w2, offs, tiles, T, bias=b2, pre=y, scale=gate_s, out_idx=tok, blocks=blocks)
        else:  # token-major rows t*K + j, then the K rows of each token summed
            rows = _gmm(a, w2, offs, tiles, A, bias=b2, pre=y, scale=gate_s, out_idx=order, blocks=blocks)
            out = rows.view(T, k, D).sum(1)
        ctx.save_for_backward(x, h, a, y, w1, w2, tok, order, offs, gate_s, *tiles)
        ctx.k, ctx.act, ctx.blocks, ctx.wblocks = k, act, blocks, wblocks
        ctx.has_b1, ctx.has_b2, ctx.gates_dtype = b1 is not None, b2 is not None, gates.dtype
        return out

    @staticmethod
    def backward(ctx, g_out):
        x, h, a, y, w1, w2, tok, order, offs, gate_s, te, tr = ctx.saved_tensors
        need_x, need_g, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:6]
        k, blocks, wblocks = ctx.k, ctx.blocks, ctx.wblocks
        T, D = g_out.shape
        A, Fh = h.shape
        E = w1.shape[0]
        tiles = (te, tr)
        g_out = g_out.contiguous().to(x.dtype)
        gx = ggate = gw1 = gb1 = gw2 = gb2 = None
        need_gh = need_x or need_w1 or need_b1
        in_kernel = need_g and ROWDOT_IN_KERNEL
        rd = torch.empty(A, device=x.device, dtype=torch.float32) if in_kernel else None
        gh = None
        if need_gh or in_kernel:  # gh = (gate * g_out[tok] @ W2^T) * act'(h); the gate grad as a row dot
            gh = _gmm(g_out, w2, offs, tiles, A, a_idx=tok, scale=gate_s, hact=h, act_grad=ACT_IDS[ctx.act],
                      y=y if in_kernel else None, rd=rd, rd_idx=order if in_kernel else None, transpose_w=True,
                      blocks=blocks)
        if need_g:
            if not in_kernel:  # token-major: rd[order[row]] = <g_out[tok[row]], y[row]>
                dots = (g_out.index_select(0, tok).float() * y.float()).sum(1)
                rd = torch.empty(A, device=x.device, dtype=torch.float32).index_copy_(0, order, dots)
            ggate = rd.to(ctx.gates_dtype)
        if need_w2 or (need_b2 and ctx.has_b2):
            gw2 = torch.empty_like(w2)
            gb2 = x.new_empty(E, D) if (need_b2 and ctx.has_b2) else None
            _wgrad(a, g_out, offs, gw2, gb2, g_idx=tok, g_scale=gate_s, blocks=wblocks)
            gw2 = gw2 if need_w2 else None
        if need_w1 or (need_b1 and ctx.has_b1):
            gw1 = torch.empty_like(w1)
            gb1 = x.new_empty(E, Fh) if (need_b1 and ctx.has_b1) else None
            _wgrad(x, gh, offs, gw1, gb1, x_idx=tok, blocks=wblocks)
            gw1 = gw1 if need_w1 else None
        if need_x:
            if k == 1:
                gx = _gmm(gh, w1, offs, tiles, T, out_idx=tok, transpose_w=True, blocks=blocks)
            else:
                gx = _gmm(gh, w1, offs, tiles, A, out_idx=order, transpose_w=True, blocks=blocks).view(T, k, D).sum(1)
        return gx, ggate, gw1, gb1, gw2, gb2, None, None, None, None, None


def expert_mlp_triton(x, gates, w1, b1, w2, b2, tok, order, offs, k: int, act: str) -> torch.Tensor:
    """The expert MLP over token-major assignments (see the module docstring). ``tok`` (A,) the token of
    each expert-sorted row, ``order`` (A,) its token-major assignment index, ``offs`` (E+1,) int64 segment
    offsets, ``gates`` (A,) token-major."""
    if act not in ACT_IDS:
        raise ValueError(f"expert_mlp_triton: unsupported activation {act!r}; known {sorted(ACT_IDS)}")
    return _TritonExpertMLP.apply(x, gates, w1, b1, w2, b2, tok, order, offs, k, act)
