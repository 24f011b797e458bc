"""Triton kernels: the top-k router's row work in one pass each way (softmax, top-k, importance sums).

The token-choice router (V-MoE's form: softmax over all E experts *before* top-k, gates not
renormalised here) does, per token, a softmax over E logits, a top-k of the probabilities and, for the
importance loss, the sum of the probabilities over each routing group's tokens. Eagerly that is a
softmax, a top-k (two kernels for K > 1), a reduction and their backward ops: about 15 small kernels
on a GPU, each a few microseconds (docs/performance.md, session 13). Here:

- forward, one program per block of BT tokens: the row softmax in fp32 (max-shifted), the top-k by K
  passes of (max, lowest index among equal values, mask it), the probabilities, the top-k values and
  indices written out, and the block's per-group column sums of the probabilities added to an fp32
  (G, E) buffer with one atomic add per column and group met;
- the importance loss, mean over groups of CV² of those sums, in a one-program kernel;
- backward, one program per block: g_p = g_probs + scatter(top_i, g_top_v) + d loss / d imp[group] (the
  CV² gradient recomputed from the group's sums in registers), then the softmax backward
  p * (g_p - <g_p, p>) - the logit gradient in one write.

Ties in the top-k go to the lowest expert index (``torch.topk`` leaves their order unspecified).
Reference: the eager ``softmax`` / ``topk`` / ``sum`` in ``moe.router.TopKRouter.forward`` (tests hold
them equal, forward and backward)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _router_fwd_kernel(l_ptr, p_ptr, tv_ptr, ti_ptr, imp_ptr, T, E, S, K: tl.constexpr, EP: tl.constexpr,
                       BT: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, EP)
    rmask = rows < T
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    lg = tl.load(l_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    m = tl.max(lg, axis=1)
    m = tl.where(rmask, m, 0.0)
    ex = tl.where(mask, tl.exp(lg - m[:, None]), 0.0)
    s = tl.sum(ex, axis=1)
    s = tl.where(rmask, s, 1.0)
    p = ex / s[:, None]
    tl.store(p_ptr + rows[:, None] * E + cols[None, :], p, mask=mask)
    # importance: the block's column sums per routing group (rows r belong to group r // S)
    g_lo = (tl.program_id(0) * BT) // S
    g_hi = (tl.minimum(tl.program_id(0) * BT + BT, T) - 1) // S
    grp = rows // S
    for g in range(g_lo, g_hi + 1):
        part = tl.sum(tl.where(((grp == g) & rmask)[:, None], p, 0.0), axis=0)
        tl.atomic_add(imp_ptr + g * E + cols, part, mask=cmask)
    # top-k: K passes of (max, its lowest index, mask it out)
    q = tl.where(mask, p, -1.0)
    for j in tl.static_range(K):
        v = tl.max(q, axis=1)
        i = tl.min(tl.where(q == v[:, None], cols[None, :], EP), axis=1)
        tl.store(tv_ptr + rows * K + j, v, mask=rmask)
        tl.store(ti_ptr + rows * K + j, i.to(tl.int64), mask=rmask)
        q = tl.where(cols[None, :] == i[:, None], -2.0, q)


@triton.jit
def _cv2_mean_kernel(imp_ptr, out_ptr, G, E, EPS, EP: tl.constexpr, BG: tl.constexpr):
    """out = mean over the G groups of CV²(imp[g, :]) (population variance over (mean² + EPS)): one program."""
    cols = tl.arange(0, EP)
    cmask = cols < E
    acc = tl.zeros((BG,), dtype=tl.float32)
    for g0 in range(0, G, BG):
        gs = g0 + tl.arange(0, BG)
        gmask = gs < G
        mask = gmask[:, None] & cmask[None, :]
        v = tl.load(imp_ptr + gs[:, None] * E + cols[None, :], mask=mask, other=0.0)
        m = tl.sum(v, axis=1) / E
        d = tl.where(mask, v - m[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / E
        acc += tl.where(gmask, var / (m * m + EPS), 0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) / G)


@triton.jit
def _router_bwd_kernel(p_ptr, ti_ptr, gtv_ptr, gp_ptr, imp_ptr, gloss_ptr, gl_ptr, T, E, S, G, EPS,
                       K: tl.constexpr, HAS_GP: tl.constexpr, HAS_GTV: tl.constexpr, HAS_GLOSS: tl.constexpr,
                       EP: tl.constexpr, BT: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, EP)
    rmask = rows < T
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    p = tl.load(p_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0.0)
    gp = tl.zeros((BT, EP), dtype=tl.float32)
    if HAS_GP:
        gp += tl.load(gp_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_GLOSS:  # d loss / d imp[g, e] of loss = mean_g CV²(imp[g]), recomputed from the group's sums:
        # 2 (v - m) / (E (m² + eps)) - 2 m var / (E (m² + eps)²), times g_loss / G. (The second term is
        # the same for every e of a row, so the softmax backward below cancels it; kept: it is d/d imp.)
        grp = rows // S
        v = tl.load(imp_ptr + grp[:, None] * E + cols[None, :], mask=mask, other=0.0)
        m = tl.sum(v, axis=1) / E
        d = tl.where(mask, v - m[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / E
        den = m * m + EPS
        gls = tl.load(gloss_ptr).to(tl.float32) / G
        gp += gls * (2.0 * d / (E * den[:, None]) - (2.0 * m * var / (E * den * den))[:, None])
    if HAS_GTV:
        for j in tl.static_range(K):
            i = tl.load(ti_ptr + rows * K + j, mask=rmask, other=0)
            gv = tl.load(gtv_ptr + rows * K + j, mask=rmask, other=0.0).to(tl.float32)
            gp += tl.where(cols[None, :] == i[:, None], gv[:, None], 0.0)
    dot = tl.sum(gp * p, axis=1)
    tl.store(gl_ptr + rows[:, None] * E + cols[None, :], p * (gp - dot[:, None]), mask=mask)


def _blocks(E: int) -> tuple[int, int]:
    EP = triton.next_power_of_2(E)
    return EP, max(16, min(128, 4096 // EP))


_EPS = 1e-10  # moe.losses.cv_squared's


class _TritonRouterCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_GSE, k):
        G, S, E = logits_GSE.shape
        T = G * S
        lg = logits_GSE.contiguous()
        probs = torch.empty(G, S, E, device=lg.device, dtype=torch.float32)
        top_v = torch.empty(G, S, k, device=lg.device, dtype=torch.float32)
        top_i = torch.empty(G, S, k, device=lg.device, dtype=torch.int64)
        imp = torch.zeros(G, E, device=lg.device, dtype=torch.float32)
        loss = torch.zeros((), device=lg.device, dtype=torch.float32)
        EP, BT = _blocks(E)
        if T:
            _router_fwd_kernel[(triton.cdiv(T, BT),)](lg, probs, top_v, top_i, imp, T, E, S, K=k, EP=EP, BT=BT)
            _cv2_mean_kernel[(1,)](imp, loss, G, E, _EPS, EP=EP, BG=max(1, min(64, 4096 // EP)))
        ctx.save_for_backward(probs, top_i, imp)
        ctx.mark_non_differentiable(top_i)
        ctx.set_materialize_grads(False)
        ctx.k = k
        return probs, top_v, top_i, loss

    @staticmethod
    def backward(ctx, g_probs, g_topv, _g_topi, g_loss):
        probs, top_i, imp = ctx.saved_tensors
        if g_probs is None and g_topv is None and g_loss is None:
            return None, None
        G, S, E = probs.shape
        T = G * S
        gl = torch.empty_like(probs)
        EP, BT = _blocks(E)
        dummy = probs
        gp = g_probs.contiguous() if g_probs is not None else dummy
        gtv = g_topv.contiguous() if g_topv is not None else dummy
        gls = g_loss.float().contiguous() if g_loss is not None else dummy
        if T:
            _router_bwd_kernel[(triton.cdiv(T, BT),)](
                probs, top_i, gtv, gp, imp, gls, gl, T, E, S, G, _EPS, K=ctx.k, HAS_GP=g_probs is not None,
                HAS_GTV=g_topv is not None, HAS_GLOSS=g_loss is not None, EP=EP, BT=BT)
        return gl, None


def router_core_triton(logits_GSE: torch.Tensor, k: int):
    """(probs (G, S, E), top_v (G, S, k), top_i (G, S, k) int64, importance loss) of fp32 logits: the
    softmax over E, its top-k, and the mean over groups of CV² of each group's summed probabilities
    (``moe.losses.importance_cv2(probs)``; its gradient is folded into the backward kernel)."""
    if logits_GSE.dim() != 3 or not 1 <= k <= logits_GSE.shape[-1]:
        raise ValueError(f"router_core_triton: logits must be (G, S, E) with 1 <= k <= E, got "
                         f"{tuple(logits_GSE.shape)} and k={k}")
    return _TritonRouterCore.apply(logits_GSE.float(), k)
