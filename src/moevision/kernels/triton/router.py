"""Triton kernels: the top-k router's row work in one pass each way (softmax, top-k, importance sums, and in
training the noisy gates with the load loss).

The token-choice router (V-MoE's form: softmax over all E experts *before* top-k, gates not
renormalised here) does, per token, a softmax over E logits, a top-k of the probabilities and, for the
importance loss, the sum of the probabilities over each routing group's tokens. In training V-MoE adds
Gaussian noise of std sigma to the logits: the gates and the top-k come from the softmax of the noisy
logits, the importance loss from the clean softmax, and the load loss from the smooth load
1 - Phi((eta - l_e) / sigma), eta the K-th largest noisy logit (``moe.losses.load_cv2``). Eagerly that is
two softmaxes, a top-k, the threshold's top-k, an erf, reductions and their backward ops: 15-40 small
kernels on a GPU, each a few microseconds (docs/performance.md, session 13). Here:

- forward, one program per block of BT tokens: the row softmax in fp32 (max-shifted), the top-k by K
  passes of (max, lowest index among equal values, mask it), the probabilities, the top-k values and
  indices written out, and the block's per-group column sums of the probabilities added to an fp32
  (G, E) buffer with one atomic add per column and group met. With noise (``NOISY``) the same block also
  forms l + sigma * n, its softmax (the gates; the top-k is taken on it), the threshold eta (the noisy
  logit of the K-th choice) and the smooth load, summed per group like the importance;
- the importance loss (and the load loss), mean over groups of CV² of those sums, in a one-program kernel;
- backward, one program per block: g_p = g_probs + d loss / d imp[group] (the CV² gradient recomputed
  from the group's sums in registers) through the clean softmax's backward p * (g_p - <g_p, p>), plus
  scatter(top_i, g_top_v) through the softmax that made the gates (the clean one without noise, the noisy
  one with it), plus the load loss's gradient: phi(z_e) / sigma * c_e for each logit and minus their sum
  for the K-th choice's logit (through eta), c_e = d loss / d load_e - the logit gradient in one write.

Ties in the top-k go to the lowest expert index (``torch.topk`` leaves their order unspecified).
Reference: the eager ``softmax`` / ``topk`` / ``sum`` / ``load_cv2`` in ``moe.router.TopKRouter.forward``
(tests hold them equal, forward and backward, with and without noise)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._util import cdiv, next_pow2


@triton.jit
def _row_block(T, E, EP: tl.constexpr, BT: tl.constexpr):
    """This program's block of BT token rows of a (T, E) row-major tensor: row and column indices, their
    masks, the 2D mask and the element offsets."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, EP)
    rmask = rows < T
    cmask = cols < E
    return rows, cols, rmask, cmask, rmask[:, None] & cmask[None, :], rows[:, None] * E + cols[None, :]


@triton.jit
def _softmax_rows(lg, rmask, mask):
    m = tl.max(lg, axis=1)
    m = tl.where(rmask, m, 0.0)
    ex = tl.where(mask, tl.exp(lg - m[:, None]), 0.0)
    s = tl.sum(ex, axis=1)
    s = tl.where(rmask, s, 1.0)
    return ex / s[:, None]


@triton.jit
def _group_sums(v, rows, rmask, cols, cmask, buf_ptr, T, E, S, BT: tl.constexpr):
    """Add the block's per-group column sums of v to buf (G, E): rows r belong to group r // S."""
    g_lo = (tl.program_id(0) * BT) // S
    g_hi = (tl.minimum(tl.program_id(0) * BT + BT, T) - 1) // S
    grp = rows // S
    for g in range(g_lo, g_hi + 1):
        part = tl.sum(tl.where(((grp == g) & rmask)[:, None], v, 0.0), axis=0)
        tl.atomic_add(buf_ptr + g * E + cols, part, mask=cmask)


@triton.jit
def _router_fwd_kernel(l_ptr, n_ptr, p_ptr, pn_ptr, tv_ptr, ti_ptr, thr_ptr, imp_ptr, load_ptr, sigma, T, E, S,
                       K: tl.constexpr, EP: tl.constexpr, BT: tl.constexpr, NOISY: tl.constexpr):
    rows, cols, rmask, cmask, mask, offs = _row_block(T, E, EP, BT)
    lg = tl.load(l_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    p = _softmax_rows(lg, rmask, mask)
    tl.store(p_ptr + offs, p, mask=mask)
    _group_sums(p, rows, rmask, cols, cmask, imp_ptr, T, E, S, BT)  # importance: clean probabilities
    if NOISY:
        nz = lg + sigma * tl.load(n_ptr + offs, mask=mask, other=0.0)  # -inf on padded columns
        pg = _softmax_rows(nz, rmask, mask)  # the gates' softmax
        tl.store(pn_ptr + offs, pg, mask=mask)
    else:
        nz = lg
        pg = p
    # top-k: K passes of (max, its lowest index, mask it out)
    q = tl.where(mask, pg, -1.0)
    for j in tl.static_range(K):
        v = tl.max(q, axis=1)
        i = tl.min(tl.where(q == v[:, None], cols[None, :], EP), axis=1)
        tl.store(tv_ptr + rows * K + j, v, mask=rmask)
        tl.store(ti_ptr + rows * K + j, i.to(tl.int64), mask=rmask)
        q = tl.where(cols[None, :] == i[:, None], -2.0, q)
        if NOISY and j == K - 1:  # eta: the K-th choice's noisy logit; smooth load 1 - Phi((eta - l) / sigma)
            eta = tl.where(rmask, tl.sum(tl.where(cols[None, :] == i[:, None], nz, 0.0), axis=1), 0.0)
            tl.store(thr_ptr + rows, eta, mask=rmask)
            z = (eta[:, None] - lg) / sigma
            pl = tl.where(mask, 1.0 - 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)), 0.0)
            _group_sums(pl, rows, rmask, cols, cmask, load_ptr, T, E, S, BT)


@triton.jit
def _cv2_mean_kernel(buf_ptr, out_ptr, G, E, EPS, scale2, w0, w1, NB: tl.constexpr, EP: tl.constexpr,
                     BG: tl.constexpr):
    """out[b] = mean over the G groups of CV²(scale * buf[b, g, :]) (population variance over (mean² + EPS))
    for the NB (1 or 2) buffers, scale 1 for the first and ``scale2`` for the second; out[1] = 0 when NB = 1;
    out[2] = w0 out[0] + w1 out[1] (the router's weighted aux loss: no multiply kernels after this one).
    One program."""
    cols = tl.arange(0, EP)
    cmask = cols < E
    total = 0.0
    for b in tl.static_range(NB):
        acc = tl.zeros((BG,), dtype=tl.float32)
        for g0 in range(0, G, BG):
            gs = g0 + tl.arange(0, BG)
            gmask = gs < G
            mask = gmask[:, None] & cmask[None, :]
            v = tl.load(buf_ptr + b * G * E + gs[:, None] * E + cols[None, :], mask=mask, other=0.0)
            if b == 1:
                v = v * scale2
            m = tl.sum(v, axis=1) / E
            d = tl.where(mask, v - m[:, None], 0.0)
            var = tl.sum(d * d, axis=1) / E
            acc += tl.where(gmask, var / (m * m + EPS), 0.0)
        loss = tl.sum(acc, axis=0) / G
        tl.store(out_ptr + b, loss)
        if b == 0:
            total += w0 * loss
        else:
            total += w1 * loss
    if NB == 1:
        tl.store(out_ptr + 1, 0.0)
    tl.store(out_ptr + 2, total)


@triton.jit
def _cv2_grad(buf_ptr, grp, cols, mask, E, EPS, scale):
    """d CV²(v) / d v of each row's group, v = scale * buf[group]: 2 (v - m) / (E (m² + eps)) - 2 m var /
    (E (m² + eps)²). (The second term is the same for every e of a row: a softmax backward cancels it; kept,
    it is d/d v.)"""
    v = tl.load(buf_ptr + grp[:, None] * E + cols[None, :], mask=mask, other=0.0) * scale
    m = tl.sum(v, axis=1) / E
    d = tl.where(mask, v - m[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / E
    den = m * m + EPS
    return 2.0 * d / (E * den[:, None]) - (2.0 * m * var / (E * den * den))[:, None]


@triton.jit
def _router_bwd_kernel(p_ptr, pn_ptr, l_ptr, thr_ptr, ti_ptr, gtv_ptr, gp_ptr, imp_ptr, load_ptr, gloss_ptr,
                       gload_ptr, gaux_ptr, gl_ptr, sigma, w0, w1, T, E, S, G, EPS, K: tl.constexpr,
                       HAS_GP: tl.constexpr, HAS_GTV: tl.constexpr, HAS_GLOSS: tl.constexpr,
                       HAS_GLOAD: tl.constexpr, HAS_GAUX: tl.constexpr, NOISY: tl.constexpr, EP: tl.constexpr,
                       BT: tl.constexpr):
    rows, cols, rmask, cmask, mask, offs = _row_block(T, E, EP, BT)
    grp = rows // S
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    gp = tl.zeros((BT, EP), dtype=tl.float32)  # the gradient of the clean probabilities
    if HAS_GP:
        gp += tl.load(gp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # d / d importance loss and d / d load loss: their own gradients plus w0, w1 times the weighted sum's
    c_imp = 0.0
    c_load = 0.0
    if HAS_GLOSS:
        c_imp += tl.load(gloss_ptr).to(tl.float32)
    if HAS_GLOAD:
        c_load += tl.load(gload_ptr).to(tl.float32)
    if HAS_GAUX:
        g_aux = tl.load(gaux_ptr).to(tl.float32)
        c_imp += w0 * g_aux
        c_load += w1 * g_aux
    if HAS_GLOSS or HAS_GAUX:  # importance loss = mean_g CV²(imp[g])
        gp += (c_imp / G) * _cv2_grad(imp_ptr, grp, cols, mask, E, EPS, 1.0)
    gv = tl.zeros((BT, EP), dtype=tl.float32)  # the gradient of the gates' probabilities (scattered top-k)
    if HAS_GTV:
        for j in tl.static_range(K):
            i = tl.load(ti_ptr + rows * K + j, mask=rmask, other=0)
            g = tl.load(gtv_ptr + rows * K + j, mask=rmask, other=0.0).to(tl.float32)
            gv += tl.where(cols[None, :] == i[:, None], g[:, None], 0.0)
    if NOISY:  # two softmaxes: the clean one (importance, probs) and the noisy one (the gates)
        pn = tl.load(pn_ptr + offs, mask=mask, other=0.0)
        gl = p * (gp - tl.sum(gp * p, axis=1)[:, None]) + pn * (gv - tl.sum(gv * pn, axis=1)[:, None])
        if HAS_GLOAD or HAS_GAUX:  # load loss = mean_g CV²(load[g] / S), load = sum_s 1 - Phi((eta - l_e) / sigma)
            c = (c_load / (G * S)) * _cv2_grad(load_ptr, grp, cols, mask, E, EPS, 1.0 / S)
            lg = tl.load(l_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            eta = tl.load(thr_ptr + rows, mask=rmask, other=0.0)
            z = (eta[:, None] - lg) / sigma
            a = tl.where(mask, c * tl.exp(-0.5 * z * z) * (0.3989422804014327 / sigma), 0.0)  # c phi(z) / sigma
            iK = tl.load(ti_ptr + rows * K + (K - 1), mask=rmask, other=0)  # eta = the K-th choice's noisy logit
            gl += a - tl.where(cols[None, :] == iK[:, None], tl.sum(a, axis=1)[:, None], 0.0)
    else:
        gp += gv
        gl = p * (gp - tl.sum(gp * p, axis=1)[:, None])
    tl.store(gl_ptr + offs, gl, mask=mask)


def _blocks(E: int) -> tuple[int, int]:
    EP = next_pow2(E)
    return EP, max(16, min(128, 4096 // EP))


_EPS = 1e-10  # moe.losses.cv_squared's


class _TritonRouterCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_GSE, noise_GSE, k, sigma, w_imp, w_load):
        G, S, E = logits_GSE.shape
        T = G * S
        noisy = noise_GSE is not None
        lg = logits_GSE.contiguous()
        f32 = dict(device=lg.device, dtype=torch.float32)
        probs = torch.empty(G, S, E, **f32)
        pn = torch.empty(G, S, E, **f32) if noisy else probs  # the gates' softmax (the clean one without noise)
        top_v = torch.empty(G, S, k, **f32)
        top_i = torch.empty(G, S, k, device=lg.device, dtype=torch.int64)
        thr = torch.empty(G, S, **f32) if noisy else probs
        sums = torch.zeros(2 if noisy else 1, G, E, **f32)  # importance (and load) sums per group
        losses = torch.empty(3, **f32)  # importance, load, their weighted sum (written by the CV² kernel)
        EP, BT = _blocks(E)
        n = noise_GSE.float().contiguous() if noisy else lg
        if T:
            _router_fwd_kernel[(cdiv(T, BT),)](lg, n, probs, pn, top_v, top_i, thr, sums[0], sums[-1],
                                                      float(sigma), T, E, S, K=k, EP=EP, BT=BT, NOISY=noisy)
            _cv2_mean_kernel[(1,)](sums, losses, G, E, _EPS, 1.0 / S, float(w_imp), float(w_load) if noisy else 0.0,
                                   NB=sums.shape[0], EP=EP, BG=max(1, min(64, 4096 // EP)))
        else:
            losses.zero_()
        ctx.save_for_backward(probs, pn, lg if noisy else None, thr, top_i, sums)
        ctx.mark_non_differentiable(top_i)
        ctx.set_materialize_grads(False)
        ctx.k, ctx.sigma, ctx.noisy = k, float(sigma), noisy
        ctx.w = (float(w_imp), float(w_load) if noisy else 0.0)
        return probs, top_v, top_i, losses[0], losses[1], losses[2]

    @staticmethod
    def backward(ctx, g_probs, g_topv, _g_topi, g_imp, g_load, g_aux):
        probs, pn, lg, thr, top_i, sums = ctx.saved_tensors
        if not ctx.noisy:
            g_load = None  # the load loss is 0 without noise (not a function of the logits)
        if g_probs is None and g_topv is None and g_imp is None and g_load is None and g_aux is None:
            return None, None, None, None, None, None
        G, S, E = probs.shape
        T = G * S
        gl = torch.empty_like(probs)
        EP, BT = _blocks(E)
        dummy = probs

        def arg(t):
            return dummy if t is None else t.float().contiguous()
        if T:
            _router_bwd_kernel[(cdiv(T, BT),)](
                probs, pn, dummy if lg is None else lg, thr, top_i, arg(g_topv), arg(g_probs), sums[0], sums[-1],
                arg(g_imp), arg(g_load), arg(g_aux), gl, ctx.sigma, ctx.w[0], ctx.w[1], T, E, S, G, _EPS, K=ctx.k,
                HAS_GP=g_probs is not None, HAS_GTV=g_topv is not None, HAS_GLOSS=g_imp is not None,
                HAS_GLOAD=g_load is not None, HAS_GAUX=g_aux is not None, NOISY=ctx.noisy, EP=EP, BT=BT)
        return gl, None, None, None, None, None


def router_core_triton(logits_GSE: torch.Tensor, k: int, noise_GSE: torch.Tensor | None = None, sigma: float = 0.0,
                       weights: tuple[float, float] = (0.0, 0.0)):
    """(probs (G, S, E), top_v (G, S, k), top_i (G, S, k) int64, importance loss, load loss, weighted loss) of
    fp32 logits; the weighted loss is ``weights[0] * importance + weights[1] * load`` (what the router adds to its
    aux loss), made by the loss kernel itself and differentiable like the others (no multiply or add kernels
    either way).

    Without noise: the softmax over E, its top-k, and the mean over groups of CV² of each group's summed
    probabilities (``moe.losses.importance_cv2(probs)``); the load loss is 0. With ``noise_GSE`` (standard
    normal draws, e.g. ``torch.randn_like(logits)``) and ``sigma`` > 0: the top-k values and indices are
    those of softmax(logits + sigma * noise), ``probs`` and the importance loss stay the clean softmax's,
    and the load loss is ``moe.losses.load_cv2(logits, logits + sigma * noise, sigma, k)``. The losses'
    gradients are folded into the backward kernel."""
    if logits_GSE.dim() != 3 or not 1 <= k <= logits_GSE.shape[-1]:
        raise ValueError(f"router_core_triton: logits must be (G, S, E) with 1 <= k <= E, got "
                         f"{tuple(logits_GSE.shape)} and k={k}")
    if noise_GSE is not None:
        if noise_GSE.shape != logits_GSE.shape:
            raise ValueError(f"router_core_triton: noise must have the logits' shape {tuple(logits_GSE.shape)}, "
                             f"got {tuple(noise_GSE.shape)}")
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"router_core_triton: noise needs a finite sigma > 0, got {sigma!r}")
    w_imp, w_load = (float(w) for w in weights)
    if not (math.isfinite(w_imp) and math.isfinite(w_load)):
        raise ValueError(f"router_core_triton: the loss weights must be finite, got {weights!r}")
    return _TritonRouterCore.apply(logits_GSE.float(), noise_GSE, k, sigma, w_imp, w_load)


@triton.jit
def _router_dx_kernel(gp_ptr, g_ptr, w_ptr, out_ptr, gl_ptr, T, D, E, stride_gp, stride_g, stride_w, stride_o,
                      HAS_GP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, WRITE_GL: tl.constexpr):
    """out[t] = gp[t] + sum_e g[t, e] * w[e] in fp32, rounded once: a (BT, BD) tile of x's gradient from the
    router's logit gradient (E terms of fused multiply-adds: E is small) plus the experts' gradient read once.
    WRITE_GL: the first column block's programs also write g rounded to gl's dtype (T, E), contiguous."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    rmask = rows < T
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    rows = rows.to(tl.int64)  # row offsets past 2^31 elements (T * D)
    if HAS_GP:
        acc = tl.load(gp_ptr + rows[:, None] * stride_gp + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BT, BD), dtype=tl.float32)
    for e in range(0, E):
        ge = tl.load(g_ptr + rows * stride_g + e, mask=rmask, other=0.0).to(tl.float32)
        we = tl.load(w_ptr + e * stride_w + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += ge[:, None] * we[None, :]
        if WRITE_GL:
            if tl.program_id(1) == 0:
                tl.store(gl_ptr + rows * E + e, ge.to(gl_ptr.dtype.element_ty), mask=rmask)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


ROUTER_DX_MAX_E = 64  # above this the E-term loop loses to a GEMM: router_dx_triton refuses, callers use addmm
_DX_BT, _DX_BD = 32, 128


def router_dx_triton(g_TE: torch.Tensor, w_ED: torch.Tensor, gp_TD: torch.Tensor | None = None,
                     with_lowp_g: bool = False):
    """x's gradient ``gp + g @ w`` (T, D) in w's dtype from the router's logit gradient ``g`` (T, E; read as it
    is, fp32 from the router kernels - not rounded to 16 bits first) and the gradient ``gp`` that x got from the
    experts (None: zero), in one pass: what is otherwise a GEMM writing (T, D) and an add reading it back
    (``moe.router._LowpLogitsFork``). Sums in fp32, one rounding. E <= ROUTER_DX_MAX_E.
    ``with_lowp_g``: returns ``(dx, g.to(w.dtype))``, the rounded logit gradient (for the weight's gradient GEMM)
    written by the same kernel instead of a conversion kernel."""
    T, E = g_TE.shape
    if w_ED.dim() != 2 or w_ED.shape[0] != E or not 1 <= E <= ROUTER_DX_MAX_E:
        raise ValueError(f"router_dx_triton: g must be (T, E) and w (E, D) with 1 <= E <= {ROUTER_DX_MAX_E}, got "
                         f"{tuple(g_TE.shape)} and {tuple(w_ED.shape)}")
    D = w_ED.shape[1]
    if gp_TD is not None and tuple(gp_TD.shape) != (T, D):
        raise ValueError(f"router_dx_triton: gp must be (T, D) = {(T, D)}, got {tuple(gp_TD.shape)}")
    w = w_ED.contiguous()
    g = g_TE if g_TE.stride(-1) == 1 else g_TE.contiguous()
    gp = None if gp_TD is None else (gp_TD if gp_TD.stride(-1) == 1 else gp_TD.contiguous())
    out = torch.empty(T, D, device=w.device, dtype=w.dtype)
    gl = torch.empty(T, E, device=w.device, dtype=w.dtype) if with_lowp_g else None
    if T and D:
        _router_dx_kernel[(cdiv(T, _DX_BT), cdiv(D, _DX_BD))](
            w if gp is None else gp, g, w, out, out if gl is None else gl, T, D, E, 0 if gp is None else gp.stride(0),
            g.stride(0), w.stride(0), out.stride(0), HAS_GP=gp is not None, BT=_DX_BT, BD=_DX_BD, WRITE_GL=with_lowp_g)
    elif with_lowp_g:
        gl.copy_(g)  # no programs ran (D = 0): the rounding is still owed
    return (out, gl) if with_lowp_g else out
