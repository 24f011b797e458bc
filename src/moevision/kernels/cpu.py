"""CPU paths: ``sorted`` (sort by expert, one addmm per expert; ``moe/dispatch.py``) and ``cpu_fused``
(this module): the whole expert MLP - gather, both projections, bias, activation and the gate-weighted
combine - as one autograd function with a hand-written backward.

Why a separate CPU path: on a CPU a host "sync" costs nothing, so the segment sizes can be read and
each expert's GEMM can write straight into its rows of one preallocated buffer (``addmm(..., out=)``,
the bias fused into the GEMM as the dense ``nn.Linear`` does), while what costs on a CPU is every extra
pass over the (A, F) activations and every serial scatter. Against a dense FFN on the A = T*K
assignments (the limit), this path adds only passes over (A, D)-sized tensors:

forward   gather x into expert-sorted rows; per expert ``addmm`` (b1) -> activation -> ``addmm`` (b2);
          gather back to token order and mix the K rows with the gates (K multiply-adds).
backward  gather grad-out into sorted rows (one pass, reused for the gate gradient, a row-wise dot, and
          scaled in place by the gates); per expert the two weight-gradient GEMMs, the bias sums and
          the two input-gradient GEMMs into preallocated buffers; the activation backward in place;
          grad x by a gather of the K copies of each token and a sum (no ``index_add``, serial on CPU).

No autograd graph is built inside (the autograd engine sees one node), nothing of shape (A, F) is
allocated beyond what the dense FFN also keeps (the pre-activation and the activation), and the bias
gradients are per-segment column sums (no (A, F) bias gather and no scatter into (E, F)).

On CPU tensors the forward and backward run as two native C++ ops (``kernels/native``, built on first
use): each thread takes an equal block of the expert-sorted rows and runs the gather, every expert
segment's GEMMs (single-threaded), activation and bias sums in it, then the combine / the K-copy sum of
grad x in a second pass; per-expert GEMMs split by MKL across threads paid its per-call overhead once
per expert. Without a compiler (or ``MOEVISION_NATIVE=0``, ``kernels.use_native(False)``) the Python
per-expert loop below runs; it is the reference the C++ is tested against (``tests/test_native.py``).

The segment sizes are read on the host (one ``tolist``): cheap on a CPU, a synchronisation on a GPU,
where ``fused`` (``kernels/fused.py``) is the sync-free path. The function is device-agnostic and is
tested against the loop reference on CPU in float64 and float32, forward and backward.

Under autocast the experts run in the autocast dtype and return it, as ``fused`` does (``grouped`` on
CPU runs them in fp32: ``torch._grouped_mm`` is not an autocast op). The backward is first-order only
(``once_differentiable``); inside ``torch.func`` transforms and ``torch.compile`` the path steps aside
(see ``dispatch_cpu_fused``).

The router folded in (``topk_moe_fused``, used by ``MoE.forward``): for the top-k router in its V-MoE
form (linear logits, softmax before top-k, dropless or with a capacity and batch priority, importance
and load losses, noise) on CPU tensors
with the native kernels, router core, losses and expert MLP are one autograd node (``_TopKMoE``) instead
of the router module's nodes feeding a plan to this dispatch: the losses' gradients are written out
(``_cv2_grad``, the load loss's normal density) rather than recorded op by op, and the router's x
gradient is added by its GEMM into the experts' x gradient buffer instead of autograd summing two (T, D)
tensors. Same function and same router noise as the separate router (``tests/test_native.py``); any
other router option, a hook on the router, autocast, ``torch.compile`` or ``torch.func`` keeps them
apart. ``kernels.use_folded_router(False)`` switches it off (the benchmark's A/B). Measured gain: ~1%
of the layer (docs/performance.md, session 11).

Shape legend: T tokens, K choices per token, A = T*K assignments, D width, F hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..moe.dispatch import dispatch_sorted  # noqa: F401  (re-exported: the other CPU path)
from ..moe.dispatch import sort_by_expert
from ..moe.experts import Experts
from ..moe.types import RoutingPlan
from .fused import _compute_dtype, _w, eager_under_compile
from .fused import dispatch_fused  # noqa: F401
from . import native as _native
from .ops import act_backward, act_forward


def _parts(t: torch.Tensor | None, counts: list[int]):
    """Row blocks of ``t`` per expert (views; one C++ call rather than a slice per expert)."""
    return None if t is None else t.split(counts)


def _per_expert(t: torch.Tensor | None):
    return None if t is None else t.unbind(0)


class _ExpertMLP(torch.autograd.Function):
    """out[t] = sum_j gates[t*K+j] * MLP_{e(t,j)}(x[t]) for the A = T*K token-major assignments."""

    @staticmethod
    def forward(ctx, x_TD, gates_A, w1, b1, w2, b2, w3, order, pos, counts, k, act, offs=None):
        T, D = x_TD.shape
        tok_sorted = torch.div(order, k, rounding_mode="floor") if k > 1 else order
        nat = _native.ops() if x_TD.device.type == "cpu" else None
        g = gates_A.to(x_TD.dtype).contiguous()
        if nat is not None:  # the grouped C++ op (kernels/native): same function, one parallel region
            if offs is None:
                offs = torch.tensor([0] + counts, dtype=torch.int64).cumsum_(0)
            out, xs, h, h3, a, y = nat.expert_mlp_fwd(x_TD.contiguous(), tok_sorted, g, pos, k, w1, b1, w2, b2, w3,
                                                      offs, _native.ACT_CODES[act])
            h3 = h3 if w3 is not None else None
        else:
            offs = None  # the backward then runs the loop too
            xs, h, h3, a, y = _expert_mlp_loop(x_TD, tok_sorted, w1, b1, w2, b2, w3, counts, act)
            y_tok = y.index_select(0, pos)  # token-major
            if k == 1:
                out = y_tok.mul_(g.unsqueeze(1))
            else:
                y3, g2 = y_tok.view(T, k, D), g.view(T, k)
                out = y3[:, 0] * g2[:, :1]
                for j in range(1, k):
                    out.addcmul_(y3[:, j], g2[:, j:j + 1])
        ctx.save_for_backward(xs, h, h3, a, y, g, w1, w2, w3, order, pos, tok_sorted, offs)
        ctx.counts, ctx.k, ctx.act = counts, k, act
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.gates_dtype = gates_A.dtype
        return out

    @staticmethod
    @once_differentiable  # first-order only: the backward writes into preallocated buffers (out=)
    def backward(ctx, g_TD):
        xs, h, h3, a, y, g, w1, w2, w3, order, pos, tok_sorted, offs = ctx.saved_tensors
        counts, k = ctx.counts, ctx.k
        need_x, need_g, need_w1, need_b1, need_w2, need_b2, need_w3 = ctx.needs_input_grad[:7]
        T, D = g_TD.shape
        nat = _native.ops() if offs is not None else None
        if nat is not None:
            empty = g.new_empty(0)
            gx, grad_gates, gw1, gb1, gw2, gb2, gw3 = nat.expert_mlp_bwd(
                g_TD.to(g.dtype), tok_sorted, order, pos, g, k, xs, h, h3 if h3 is not None else empty, a, y, w1, w2,
                w3, offs, _native.ACT_CODES[ctx.act], need_x, need_g, need_w1, need_b1 and ctx.has_b1, need_w2,
                need_b2 and ctx.has_b2, need_w3 and w3 is not None)
            gx, grad_gates, gw1, gb1, gw2, gb2, gw3 = (
                t if t.numel() else None for t in (gx, grad_gates, gw1, gb1, gw2, gb2, gw3))
            if grad_gates is not None:
                grad_gates = grad_gates.to(ctx.gates_dtype)
            return gx, grad_gates, gw1, gb1, gw2, gb2, gw3, None, None, None, None, None, None
        gy = g_TD.contiguous().index_select(0, tok_sorted)  # (A, D) grad-out of each sorted row
        grad_gates = None
        if need_g:  # d out / d gate = the expert's output row
            grad_gates = torch.linalg.vecdot(gy, y).index_select(0, pos).to(ctx.gates_dtype)
        gy.mul_(g.index_select(0, order).unsqueeze(1))  # now grad of y (sorted)
        gxs, gw1, gb1, gw2, gb2, gw3 = _expert_mlp_loop_backward(ctx, gy, xs, h, h3, a, w1, w2, w3, counts)
        gx = None
        if gxs is not None:  # the K copies of token t are token-major rows t*K .. t*K+K-1
            gx = gxs.index_select(0, pos)
            if k > 1:
                gx = gx.view(T, k, D).sum(1)
        return gx, grad_gates, gw1, gb1, gw2, gb2, gw3, None, None, None, None, None, None


def _expert_mlp_loop(x_TD, tok_sorted, w1, b1, w2, b2, w3, counts, act):
    """Forward of the expert MLP, one GEMM per expert (the reference of the native op)."""
    xs = x_TD.index_select(0, tok_sorted)  # (A, D) expert-sorted rows
    A, D, Fh = xs.shape[0], xs.shape[1], w1.shape[-1]
    h = xs.new_empty(A, Fh)
    h3 = xs.new_empty(A, Fh) if w3 is not None else None
    live = [e for e, n in enumerate(counts) if n]
    W1, W2, W3, B1, B2 = (_per_expert(t) for t in (w1, w2, w3, b1, b2))
    XS, H, H3 = _parts(xs, counts), _parts(h, counts), _parts(h3, counts)
    for e in live:
        if B1 is not None:
            torch.addmm(B1[e], XS[e], W1[e], out=H[e])
        else:
            torch.mm(XS[e], W1[e], out=H[e])
        if H3 is not None:
            torch.mm(XS[e], W3[e], out=H3[e])
    a = F.silu(h).mul_(h3) if h3 is not None else act_forward(act, h)
    y = xs.new_empty(A, D)
    AA, Y = _parts(a, counts), _parts(y, counts)
    for e in live:
        if B2 is not None:
            torch.addmm(B2[e], AA[e], W2[e], out=Y[e])
        else:
            torch.mm(AA[e], W2[e], out=Y[e])
    return xs, h, h3, a, y


def _expert_mlp_loop_backward(ctx, gy, xs, h, h3, a, w1, w2, w3, counts):
    """Backward of the expert MLP, per expert (the reference of the native op): (gxs, gw1, gb1, gw2,
    gb2, gw3), None where not asked for."""
    need_x, _, need_w1, need_b1, need_w2, need_b2, need_w3 = ctx.needs_input_grad[:7]
    A, D, E = gy.shape[0], gy.shape[1], w1.shape[0]
    gw1 = torch.empty_like(w1) if need_w1 else None
    gw2 = torch.empty_like(w2) if need_w2 else None
    gw3 = torch.empty_like(w3) if w3 is not None and need_w3 else None
    gb1 = w1.new_empty(E, w1.shape[-1]) if ctx.has_b1 and need_b1 else None
    gb2 = w2.new_empty(E, D) if ctx.has_b2 and need_b2 else None
    dead = [e for e, n in enumerate(counts) if not n]
    if dead:  # an expert with no rows gets a zero gradient
        for t in (gw1, gw2, gw3, gb1, gb2):
            if t is not None:
                t[dead] = 0
    need_h = need_x or need_w1 or need_b1 or need_w3
    ga = h.new_empty(h.shape) if need_h else None
    live = [e for e, n in enumerate(counts) if n]
    W1, W2, W3 = _per_expert(w1), _per_expert(w2), _per_expert(w3)
    GY, AA, GA = _parts(gy, counts), _parts(a, counts), _parts(ga, counts)
    GW1, GW2, GW3, GB1, GB2 = (_per_expert(t) for t in (gw1, gw2, gw3, gb1, gb2))
    for e in live:
        if GW2 is not None:
            torch.mm(AA[e].t(), GY[e], out=GW2[e])
        if GB2 is not None:
            torch.sum(GY[e], 0, out=GB2[e])
        if GA is not None:
            torch.mm(GY[e], W2[e].t(), out=GA[e])
    if ga is None:
        return None, None, None, gw2, gb2, None
    gh3 = None
    if h3 is not None:  # a = silu(h) * h3
        gh3 = F.silu(h).mul_(ga) if (need_x or need_w3) else None
        gh = act_backward("silu", ga.mul_(h3), h, out=ga)
    else:
        gh = act_backward(ctx.act, ga, h, out=ga)  # in place: no second (A, F) buffer
    gxs = xs.new_empty(A, D) if need_x else None
    GH, XS, GH3, GXS = _parts(gh, counts), _parts(xs, counts), _parts(gh3, counts), _parts(gxs, counts)
    for e in live:
        if GW1 is not None:
            torch.mm(XS[e].t(), GH[e], out=GW1[e])
        if GB1 is not None:
            torch.sum(GH[e], 0, out=GB1[e])
        if GW3 is not None:
            torch.mm(XS[e].t(), GH3[e], out=GW3[e])
        if GXS is not None:
            torch.mm(GH[e], W1[e].t(), out=GXS[e])
            if GH3 is not None:
                GXS[e].addmm_(GH3[e], W3[e].t())
    return gxs, gw1, gb1, gw2, gb2, gw3


_DISABLED: dict = {}  # the torch.compiler.disable'd function, made on first use under compile


def dispatch_cpu_fused(x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts, **kw) -> torch.Tensor:
    """The ``cpu_fused`` implementation (see the module docstring). Expert choice (tokens appear 0..E
    times) goes to ``sorted``; inside a torch.func transform (the function has no functorch rule) to
    ``grouped`` where it runs, else ``sorted``. Never traced by ``torch.compile``: its sizes are
    data-dependent and dynamo would re-specialise on every pattern of empty experts; the call runs
    eagerly and the rest of the model compiles. (``torch.compiler.disable`` is applied on first use,
    not at import: it imports dynamo, ~0.9 s.)"""
    return eager_under_compile(_DISABLED, _dispatch_cpu_fused, x_TD, plan, experts, **kw)


def _dispatch_cpu_fused(x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts, **kw) -> torch.Tensor:
    if plan.top_k == 0:
        return dispatch_sorted(x_TD, plan, experts, **kw)
    if torch._C._are_functorch_transforms_active():
        from ..moe.dispatch import dispatch_grouped
        return dispatch_grouped(x_TD, plan, experts, **kw)
    E, K = experts.num_experts, plan.top_k
    exp = plan.expert_idx  # (A,) token-major
    nat = _native.ops() if exp.device.type == "cpu" else None
    if nat is not None:  # one counting-sort pass for order, pos and the counts
        order, pos, offs = nat.sort_by_expert(exp, E)
        o = offs.tolist()
        counts = [b - a for a, b in zip(o, o[1:])]
    else:
        order = sort_by_expert(exp, E)
        pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = torch.bincount(exp, minlength=E).tolist()  # host read: free on a CPU
        offs = None
    dt = _compute_dtype(x_TD, experts)
    with torch.autocast(x_TD.device.type, enabled=False):  # dtypes are explicit
        b1 = _w(experts.b1, dt) if experts.has_bias else None
        b2 = _w(experts.b2, dt) if experts.has_bias else None
        w3 = _w(experts.w3, dt) if experts.swiglu else None
        act = "silu" if experts.swiglu else experts.activation
        return _ExpertMLP.apply(_w(x_TD, dt), plan.gates, _w(experts.w1, dt), b1, _w(experts.w2, dt), b2, w3,
                                order, pos, counts, K, act, offs)


# ---------------------------------------------------------------------------------------------------
# The router folded in: top-k router core, V-MoE losses and expert MLP as one autograd node.

def _cv2_grad(v_GE: torch.Tensor, eps: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """CV²(v) per row (``moe.losses.cv_squared``: population variance over mean² + eps) and its gradient
    d CV² / d v, both from one pass: with m = mean(v), var = mean((v - m)²), n = m² + eps,
    d/dv_e = 2 (v_e - m) / (E n) - var 2 m / (E n²) (the variance's m-term vanishes: sum(v - m) = 0)."""
    E = v_GE.shape[-1]
    m = v_GE.mean(-1, keepdim=True)
    d = v_GE - m
    var = d.square().mean(-1, keepdim=True)
    n = m * m + eps
    cv = (var / n).squeeze(-1)
    grad = d * (2.0 / (E * n)) - var * (2.0 * m / (E * n * n))
    return cv, grad


class _TopKMoE(torch.autograd.Function):
    """A top-k token-choice MoE layer in one autograd node: the router core (logits, softmax, top-k), the
    V-MoE importance and load losses, the counting sort and the expert MLP forward; backward the expert
    MLP, the losses' gradients written out (``_cv2_grad``, the normal density of the load loss), then
    the router core, whose x gradient is added by its GEMM into the experts' x gradient buffer.

    Inputs: x (T, D), the router weight (E, D), the expert parameters, the router noise (T, E) or None,
    G routing groups of T / G tokens, K, the activation, the loss weights, the noise std sigma, and with a
    capacity ``slots(top_i, top_v) -> (slot, kept)`` (the router's buffer positions, (G, S, K)).
    Outputs: out (T, D), the weighted aux loss, and (not differentiable) the unweighted importance and
    load losses, the clean logits and probabilities (T, E), the gates (top_v, 0 where dropped), top_i and
    kept (T, K), and the slots (T, K) (empty without a capacity)."""

    @staticmethod
    def forward(ctx, x_TD, w_r, w1, b1, w2, b2, w3, noise_TE, G, K, act, w_imp, w_load, sigma, ops, slots):
        T, D = x_TD.shape
        E = w_r.shape[0]
        S = T // G
        x = x_TD.contiguous()
        logits, probs, top_v, top_i = ops.router_fwd(x, w_r, noise_TE, K)
        clean = probs
        if noise_TE is not None:  # the losses and the statistics read the clean softmax
            clean = (logits - logits.amax(-1, keepdim=True)).exp_()
            clean.div_(clean.sum(-1, keepdim=True))
        imp_loss, load_loss = logits.new_zeros(()), logits.new_zeros(())
        imp_grad = load_grad = z = None
        if w_imp:
            cv, imp_grad = _cv2_grad(clean.view(G, S, E).sum(1))
            imp_loss = cv.mean()
        if w_load and sigma > 0:  # p_e(x) = 1 - Phi((eta(x) - l_e(x)) / sigma), eta the K-th noisy logit
            eta = (logits + noise_TE).gather(1, top_i[:, K - 1:K])
            z = (eta - logits).div_(sigma)
            p = torch.special.erfc(z * (0.5 ** 0.5)).mul_(0.5)
            cv, load_grad = _cv2_grad(p.view(G, S, E).mean(1))
            load_loss = cv.mean()
        aux = w_imp * imp_loss + (w_load * load_loss if z is not None else 0.0)
        order, pos, offs = ops.sort_by_expert(top_i.view(-1), E)
        tok_sorted = torch.div(order, K, rounding_mode="floor") if K > 1 else order
        kept = slot = None
        g = top_v.view(-1)
        if slots is not None:  # a capacity: (slot, kept) per choice; dropped rows stay, with gate 0
            slot, kept = slots(top_i.view(G, S, K), top_v.view(G, S, K))
            slot, kept = slot.reshape(T, K), kept.reshape(T, K)
            g = (top_v * kept).view(-1)
        out, xs, h, h3, a, y = ops.expert_mlp_fwd(x, tok_sorted, g, pos, K, w1, b1, w2, b2, w3, offs,
                                                  _native.ACT_CODES[act])
        ctx.save_for_backward(x, w_r, probs, clean, top_i, z, xs, h, h3 if w3 is not None else None, a, y, g,
                              w1, w2, w3, order, pos, tok_sorted, offs, kept)
        ctx.imp_grad, ctx.load_grad = imp_grad, load_grad
        ctx.G, ctx.K, ctx.act, ctx.ops, ctx.sigma = G, K, act, ops, sigma
        ctx.w_imp, ctx.w_load = w_imp, (w_load if z is not None else 0.0)
        ctx.noisy = noise_TE is not None
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        if not torch.is_tensor(aux) or not (ctx.w_imp or ctx.w_load):
            aux = logits.new_zeros(())
            ctx.mark_non_differentiable(aux)
        ctx.set_materialize_grads(False)
        if kept is None:
            kept = torch.ones(T, K, dtype=torch.bool)
            slot = kept.new_empty(0, dtype=torch.long)
        gates = g.view(T, K) if slots is not None else top_v
        ctx.mark_non_differentiable(imp_loss, load_loss, logits, clean, gates, top_i, kept, slot)
        return out, aux, imp_loss, load_loss, logits, clean, gates, top_i, kept, slot

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_aux, *_unused):
        (x, w_r, probs, clean, top_i, z, xs, h, h3, a, y, g, w1, w2, w3, order, pos, tok_sorted,
         offs, kept) = ctx.saved_tensors
        need_x, need_wr, need_w1, need_b1, need_w2, need_b2, need_w3 = ctx.needs_input_grad[:7]
        G, K, ops = ctx.G, ctx.K, ctx.ops
        T, E = probs.shape
        S = T // G
        need_router = need_x or need_wr
        empty = g.new_empty(0)
        if g_out is None:  # only the aux loss reached the loss
            g_out = x.new_zeros(x.shape)
        gx, g_topv, gw1, gb1, gw2, gb2, gw3 = ops.expert_mlp_bwd(
            g_out.contiguous(), tok_sorted, order, pos, g, K, xs, h, h3 if h3 is not None else empty, a, y, w1, w2,
            w3, offs, _native.ACT_CODES[ctx.act], need_x, need_router, need_w1, need_b1 and ctx.has_b1, need_w2,
            need_b2 and ctx.has_b2, need_w3 and w3 is not None)
        gx, gw1, gb1, gw2, gb2, gw3 = (t if t.numel() else None for t in (gx, gw1, gb1, gw2, gb2, gw3))
        gwr = None
        if need_router:
            g_logits = g_probs = None
            scale = g_aux / G if g_aux is not None else None
            if ctx.w_imp and scale is not None:  # d loss / d clean probs: one (E,) row per group
                c = (ctx.imp_grad * (scale * ctx.w_imp)).view(G, 1, E)
                if not ctx.noisy:
                    g_probs = c.expand(G, S, E).reshape(T, E) if G > 1 else c.view(1, E).expand(T, E)
                else:  # through the clean softmax: p * (c - <c, p>)
                    c = c.expand(G, S, E).reshape(T, E)
                    g_logits = clean * (c - (c * clean).sum(-1, keepdim=True))
            if ctx.w_load and scale is not None:  # p = 1 - Phi(z), z = (eta - l) / sigma
                c = (ctx.load_grad * (scale * ctx.w_load / S)).view(G, 1, E).expand(G, S, E).reshape(T, E)
                q = z.square().mul_(-0.5).exp_().mul_(c * ((2 * torch.pi) ** -0.5 / ctx.sigma))  # dL/dl (T, E)
                q.scatter_add_(1, top_i[:, K - 1:K], -q.sum(-1, keepdim=True))  # eta: the K-th noisy logit
                g_logits = q if g_logits is None else g_logits.add_(q)
            g_topv = g_topv.view(T, K)
            if kept is not None:  # a dropped choice's gate is 0 whatever its probability
                g_topv = g_topv * kept
            _, gwr = ops.router_bwd(x, w_r, probs, top_i, g_logits, g_probs, g_topv, need_x, need_wr,
                                    gx if need_x else None)
            gwr = gwr if need_wr else None
        return gx, gwr, gw1, gb1, gw2, gb2, gw3, None, None, None, None, None, None, None, None, None


_FOLD_ROUTER = {"on": True}  # kernels.use_folded_router (A/B benchmarks, tests)


def topk_moe_fused(moe, x_TD: torch.Tensor, G: int, S: int):
    """``cpu_fused`` with the router folded in (``_TopKMoE``): (out (T, D), RoutingPlan), or None where it
    does not apply and the layer takes the router -> plan -> dispatch path. It applies to the V-MoE-style
    top-k router - linear logits, softmax before top-k, dropless or with a capacity (position or batch
    priority), no renormalisation,
    importance loss on the probabilities, load loss, noise - on fp32/fp64 CPU tensors with the native
    kernels, outside autocast, torch.compile and torch.func, and when no hook, subclass or override could
    see the difference. Same function as the unfused path, same router noise (tests/test_native.py)."""
    from ..moe.router import TopKRouter

    r, ex = moe.router, moe.experts
    if (not _FOLD_ROUTER["on"] or type(r) is not TopKRouter or x_TD.device.type != "cpu" or r.logit_type != "linear"
            or r.task_routing != "none" or r.softmax_order != "before_topk" or r.normalize_topk
            or r.importance_on != "probs" or r.weights["switch"] or r.weights["z"] or r.load_threshold != "kth"
            or (r.second_expert_noise == "gumbel" and r.top_k > 1
                and (r.training or r.second_expert_noise_in_eval))):
        return None
    dt = x_TD.dtype
    if not isinstance(ex, Experts):
        return None
    w1 = ex.w1  # read once: a parametrised weight (LoRA) is computed on each access
    if (dt not in (torch.float32, torch.float64) or r.weight.dtype != dt or w1.dtype != dt or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()
            or r._forward_hooks or r._forward_pre_hooks or "forward" in r.__dict__
            or torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks):
        return None
    ops = _native.ops()
    if ops is None or not hasattr(ops, "router_bwd"):
        return None
    from ..moe.capacity import compute_capacity
    from ..moe.types import RoutingPlan

    E, K, T = r.num_experts, r.top_k, x_TD.shape[0]
    sigma = r.noise_std / E if (r.training and r.noise_std > 0) else 0.0
    noise = sigma * torch.randn(G, S, E, dtype=dt) if sigma > 0 else None  # as TopKRouter draws it
    w_imp, w_load = float(r.weights["importance"]), float(r.weights["load"])
    act = "silu" if ex.swiglu else ex.activation
    cf = r.current_capacity_factor()
    capacity = slots = None
    if cf is not None:  # the router's own slot assignment (position or batch priority), in the forward
        capacity = compute_capacity(S * K, E, cf, mode=r.capacity_mode, multiple_of=r.capacity_multiple_of)

        def router_slots(top_i, top_v):
            slot = r._slots(top_i, top_v)
            return slot, slot < capacity
        slots = router_slots
    out, aux, imp, load, logits, clean, gates, top_i, kept, slot = _TopKMoE.apply(
        x_TD, r.weight, w1, ex.b1 if ex.has_bias else None, ex.w2, ex.b2 if ex.has_bias else None,
        ex.w3 if ex.swiglu else None, None if noise is None else noise.view(T, E), G, K, act, w_imp, w_load, sigma, ops,
        slots)
    aux_losses = {}
    if w_imp:
        aux_losses["importance"] = imp
    if w_load and sigma > 0:
        aux_losses["load"] = load
    token_idx = torch.arange(T * K)
    if K > 1:
        token_idx = torch.div(token_idx, K, rounding_mode="floor")
    plan = RoutingPlan(token_idx=token_idx, expert_idx=top_i.view(-1), gates=gates.reshape(-1), kept=kept.reshape(-1),
                       slot=None if capacity is None else slot.reshape(-1), probs_GSE=clean.view(G, S, E),
                       logits_GSE=logits.view(G, S, E), capacity=capacity, aux_losses=aux_losses, aux_loss=aux, top_k=K)
    return out, plan
