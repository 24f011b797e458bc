"""``fused``: the fast dispatch path. Sort by expert, grouped GEMMs, scatter-free permute/combine.

Dropless top-k token choice (the common training mode) runs with no host-device synchronisation and
no atomic scatter:

1. ``order = argsort(expert_idx)`` (stable), its inverse ``pos``, ``offs = cumsum(bincount)`` - all on
   the device (``pos`` and ``offs`` from one Triton kernel on CUDA); the segment sizes never reach the host.
2. ``permute_rows``: gather x into expert-sorted rows (backward: gather + sum of the K copies).
3. ``torch._grouped_mm`` for w1 (and w3), the bias + activation in one op (``bias_act``: a Triton
   kernel on CUDA when Triton is installed, else PyTorch with a scatter-free bias gradient), then
   ``torch._grouped_mm`` for w2.
4. ``combine_rows``: back to token order, + b2, gates mixed by a (T,1,K) x (T,K,D) batched matmul.

With a capacity (token choice), dropped assignments stay in their expert's segment with gate 0 instead
of being removed: the output and every gradient are exactly those of dropping them (0 * finite), no
size reaches the host, and the cost is computing the dropped rows (the dropped fraction, a few % at
c >= 1). Expert choice and soft MoE use the ``grouped`` / padded paths.

Under ``torch.compile`` the hand-written Triton kernels are left out: inductor fuses the same
elementwise work into its own kernels, and the whole layer is one graph (no host sync, no graph break).

Where ``torch._grouped_mm`` cannot run (float64, unaligned widths, pre-Hopper GPUs, fp32 under
``torch.compile``) the GEMMs are ``moevision::segment_mm`` (``kernels/segment_mm.py``): one GEMM per
expert inside an opaque operator, which reads the segment ends on the host (one sync on a GPU).
"""

from __future__ import annotations

import torch

from ..moe.dispatch import sort_by_expert
from ..moe.experts import Experts
from ..moe.types import RoutingPlan
from . import ops
from .segment_mm import segment_mm

_triton_bias_act = None  # the Triton kernels, set by moevision.kernels when Triton imports
_triton_combine = None
_triton_plan = None  # kernels/triton/plan.py: pos and the segment ends in one launch
_lean = True  # kernels.use_lean_routing: the plan kernel and the router's fp32 gates in the combine (A/B)
_k_major_weights = False  # set by moevision.kernels.use_k_major_weights (an A/B switch for GPU benchmarks)


def _gemm_layout(w: torch.Tensor) -> torch.Tensor:
    """The (E, K, N) expert weights for ``torch._grouped_mm``: as stored (N-major: the forward is an
    "NN" GEMM), or with ``use_k_major_weights`` the same values copied K-major ("TN", the layout of
    ``F.linear``'s forward) - a per-step copy of the weights, small beside the GEMMs."""
    if _k_major_weights and w.stride(-2) != 1:
        return w.transpose(-2, -1).contiguous().transpose(-2, -1)
    return w


def _bias_act(h_AF, b_EF, expert_of_row, act):
    if _triton_bias_act is not None and h_AF.is_cuda and not torch.compiler.is_compiling():
        return _triton_bias_act(h_AF, b_EF, expert_of_row, act)  # reads the narrow ids as they are
    return ops.bias_act_torch(h_AF, b_EF, expert_of_row.long(), act)  # index_select: int64 (or int32) ids


def _compute_dtype(x: torch.Tensor, experts: Experts) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else the weights' dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return experts.w1.dtype


def _w(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return p if p.dtype == dtype else p.to(dtype)


def _expert_mlp(experts: Experts, xs_AD: torch.Tensor, offs: torch.Tensor, e_sorted: torch.Tensor,
                grouped: bool, dt: torch.dtype) -> torch.Tensor:
    if grouped:
        def mm(a, w):
            return torch._grouped_mm(a, _gemm_layout(w), offs=offs)
    else:
        def mm(a, w):
            return segment_mm(a, w, offs)
    h = mm(xs_AD, _w(experts.w1, dt))
    if experts.swiglu:
        a = torch.nn.functional.silu(h) * mm(xs_AD, _w(experts.w3, dt))
    elif experts.has_bias:
        a = _bias_act(h, _w(experts.b1, dt), e_sorted, experts.activation)
    else:
        a = experts.act(h)
    return mm(a, _w(experts.w2, dt))


def dispatch_fused(x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts, **kw) -> torch.Tensor:
    if plan.top_k == 0:  # expert choice: tokens appear 0..E times; not this path's structure
        from ..moe.dispatch import dispatch_grouped
        return dispatch_grouped(x_TD, plan, experts, **kw)
    T, K, E = x_TD.shape[0], plan.top_k, experts.num_experts
    exp = plan.expert_idx  # (A,) token-major
    # the sort's keys are narrow (uint8 for E <= 255): its sorted output is the expert of each sorted row, and
    # the index tensors are made int32 where they are made - no gather or conversion kernels for them
    order, e_sorted, e_keys = sort_by_expert(exp, E, with_keys=True)
    if _triton_plan is not None and _lean and exp.is_cuda and not torch.compiler.is_compiling():
        pos, offs, tok = _triton_plan(order, e_sorted, E, K)  # one kernel for the reference's four or five ops
    else:
        pos, offs, tok = ops.plan_indices_torch(order, e_sorted, E, K)  # segment ends by binary search: no sync
    dt = _compute_dtype(x_TD, experts)
    with torch.autocast(x_TD.device.type, enabled=False):  # dtypes are explicit below
        xs = ops.permute_rows(_w(x_TD, dt), order, pos, K, tok)
        y = _expert_mlp(experts, xs, offs, e_sorted, experts.grouped_mm_ok(x_TD, dt), dt)
        b2 = _w(experts.b2, dt) if experts.has_bias else None
        if _triton_combine is not None and y.is_cuda and not torch.compiler.is_compiling():
            # the router's fp32 gates when plan.gates is (to be) their unchanged rounding (RoutingPlan.fp32_gates):
            # the kernel reads fp32 anyway, and no rounding / conversion kernels run either way
            g32 = plan.fp32_gates() if _lean else None
            gates = plan.gates.view(T, K) if g32 is None else g32.view(T, K)
            return _triton_combine(y, gates, pos, order, b2, e_keys, e_sorted)
        return ops.combine_rows(y, plan.gates.view(T, K), pos, order, b2, exp if b2 is not None else None)


_TRITON_DISABLED: dict = {}  # the torch.compiler.disable'd dispatch, made on first use under compile


def eager_under_compile(cache: dict, fn, *args, **kw):
    """``fn(*args, **kw)``, kept out of dynamo's trace when compiling (the eager call inside a compiled
    model). ``torch.compiler.disable`` is applied on first use and kept in ``cache``, not at import: it
    imports dynamo (~0.9 s)."""
    if torch.compiler.is_compiling():
        g = cache.get("fn")
        if g is None:
            g = cache["fn"] = torch.compiler.disable(fn)
        return g(*args, **kw)
    return fn(*args, **kw)


def dispatch_triton(x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts, **kw) -> torch.Tensor:
    """``impl="triton"``: the expert MLP as Triton grouped GEMMs that gather the tokens in their loads and
    scatter the gate-weighted rows in their epilogue (``kernels/triton/grouped.py``). Same routing front
    as ``fused`` (sync-free sort and offsets). SwiGLU experts, activations the kernels do not know and float64 take
    ``fused``; expert choice and calls inside ``torch.func`` transforms take ``grouped``. Runs on CUDA tensors, or on CPU tensors in Triton's
    interpreter (``TRITON_INTERPRET=1``, what the tests use). Under ``torch.compile`` the call runs
    eagerly (dynamo does not trace the kernel launches) and the rest of the model compiles."""
    from . import triton as _tr

    if not _tr.AVAILABLE:
        from ..errors import ConfigError
        raise ConfigError(f"impl='triton' needs Triton (pip install triton): {_tr.REASON}")
    return eager_under_compile(_TRITON_DISABLED, _dispatch_triton, x_TD, plan, experts, **kw)


def _dispatch_triton(x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts, **kw) -> torch.Tensor:
    from .triton import grouped as _g

    if plan.top_k == 0 or torch._C._are_functorch_transforms_active():  # expert choice; torch.func (no rule)
        from ..moe.dispatch import dispatch_grouped
        return dispatch_grouped(x_TD, plan, experts, **kw)
    dt = _compute_dtype(x_TD, experts)
    if experts.swiglu or experts.activation not in _g.ACT_IDS or dt not in _g.BLOCKS:
        return dispatch_fused(x_TD, plan, experts, **kw)  # SwiGLU, other activations, float64
    if not (x_TD.is_cuda or _g.interpreted()):
        from ..errors import ConfigError
        raise ConfigError("impl='triton' runs on CUDA tensors (or in Triton's CPU interpreter, TRITON_INTERPRET=1); "
                          "on a CPU use impl='cpu_fused' (or 'auto')")
    K, E = plan.top_k, experts.num_experts
    exp = plan.expert_idx  # (A,) token-major
    order = sort_by_expert(exp, E)
    e_sorted = exp.index_select(0, order)
    offs = torch.zeros(E + 1, dtype=torch.int64, device=exp.device)
    offs[1:] = torch.searchsorted(e_sorted, torch.arange(E, device=exp.device), right=True)
    tok = torch.div(order, K, rounding_mode="floor") if K > 1 else order
    with torch.autocast(x_TD.device.type, enabled=False):  # dtypes are explicit
        b1 = _w(experts.b1, dt) if experts.has_bias else None
        b2 = _w(experts.b2, dt) if experts.has_bias else None
        return _g.expert_mlp_triton(_w(x_TD, dt), plan.gates, _w(experts.w1, dt), b1, _w(experts.w2, dt), b2,
                                    tok, order, offs, K, experts.activation)
