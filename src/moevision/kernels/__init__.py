"""Implementations of the MoE dispatch/experts/combine contract, chosen by name.

Every implementation takes the flattened tokens x (T, D), a ``RoutingPlan`` and the ``Experts`` module
and returns (T, D); all compute the same function and are tested equal to the references (forward
and backward, random inputs). Registered names:

==========  ============================================================================================
``loop``    reference: one boolean mask per expert (``kernels.reference``)
``einsum``  reference: GShard/V-MoE one-hot (G, S, E, C) dispatch/combine tensors
``sorted``  CPU: sort by expert, one ``addmm`` per expert (bias fused into the GEMM)
``cpu_fused`` CPU fast path: the whole expert MLP as one autograd function with a hand-written
            backward; its grouped GEMMs run in a native C++ op (``kernels.native``, built on first
            use) or, without a compiler, a per-expert loop into preallocated buffers (``kernels.cpu``)
``padded``  capacity buffers (E, G*C, D) + one batched matmul (V-MoE / Tutel layout)
``grouped`` sort + ``torch._grouped_mm`` (the torchtitan-style baseline)
``fused``   fast path: grouped GEMMs, scatter-free permute/combine, fused bias + activation (Triton on
            CUDA when installed), no host sync when dropless (``kernels.fused``)
``triton``  opt-in GPU path: Triton grouped GEMMs that gather the tokens in their loads and scatter the
            gate-weighted rows in their epilogue; bias, activation and its backward fused too
            (``kernels/triton/grouped.py``; needs Triton; not chosen by ``auto``: slower than ``fused``
            on an H200, docs/performance.md)
==========  ============================================================================================

``MoE(impl="auto")`` (the default) asks ``resolve_impl`` at run time: the name given to ``set_impl``
if any, else on CPU ``cpu_fused`` (any float dtype; measured: the fastest forward, forward+backward on
par with ``grouped``, the least memory saved for backward, no private torch op), on CUDA ``fused``
where ``torch._grouped_mm`` runs (Hopper, bf16), else ``sorted``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..moe.dispatch import DISPATCH_IMPLS, get_dispatch, register_dispatch
from . import fused as _fused
from . import ops as _ops
from ..moe import router as _router
from . import native as _native
from . import triton as _triton
from .cpu import dispatch_cpu_fused, topk_moe_fused
from .fused import dispatch_fused, dispatch_triton

register_dispatch("fused", dispatch_fused)
register_dispatch("cpu_fused", dispatch_cpu_fused)
register_dispatch("triton", dispatch_triton)
if _triton.AVAILABLE:
    _fused._triton_bias_act, _fused._triton_combine = _triton.bias_act_triton, _triton.combine_triton
    _fused._triton_plan = _triton.plan_indices
    _ops._triton_gather_sum = _triton.gather_sum
    _router._triton_router_core = _triton.router_core_triton
    _router._triton_router_dx = _triton.router_dx_triton

TRITON_AVAILABLE = _triton.AVAILABLE
_DEFAULT: str | None = None


def set_impl(name: str | None) -> None:
    """Choose the implementation every ``MoE(impl="auto")`` layer uses (None: automatic choice)."""
    global _DEFAULT
    if name is not None and name != "auto":
        get_dispatch(name)  # validates
    _DEFAULT = None if name == "auto" else name


def get_impl() -> str:
    """The implementation chosen by ``set_impl`` (``auto`` when none was)."""
    return _DEFAULT or "auto"


def list_impls() -> list[str]:
    return sorted(DISPATCH_IMPLS)


def resolve_impl(name: str, x: torch.Tensor, experts) -> str:
    """The concrete implementation for a layer configured with ``name`` on input ``x``."""
    if name != "auto":
        return name
    if _DEFAULT is not None:
        return _DEFAULT
    dev = x.device.type
    if not x.is_cuda:
        # measured (docs/performance.md). Under torch.compile ``fused``: its expert GEMMs are opaque
        # ops (``segment_mm`` / ``_grouped_mm``), so the layer is one graph
        return "fused" if torch.compiler.is_compiling() else "cpu_fused"
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else experts.w1.dtype
    if experts.grouped_mm_ok(x, dtype):
        return "fused"  # measured: fastest on CUDA, and sync-free (CUDA-graph capturable)
    return "sorted"


def use_triton(enabled: bool) -> None:
    """Switch the Triton kernels (``fused``'s bias + activation, combine, the permutation's gather-sum and the
    plan's index kernel, and the top-k router's, with its x-gradient kernel) on or off (for A/B benchmarks)."""
    if enabled and not _triton.AVAILABLE:
        raise ConfigError(f"Triton is not available: {_triton.REASON}")
    _fused._triton_bias_act = _triton.bias_act_triton if enabled else None
    _fused._triton_combine = _triton.combine_triton if enabled else None
    _fused._triton_plan = _triton.plan_indices if enabled else None
    _ops._triton_gather_sum = _triton.gather_sum if enabled else None
    _router._triton_router_core = _triton.router_core_triton if enabled else None
    _router._triton_router_dx = _triton.router_dx_triton if enabled else None


def use_native(enabled: bool) -> None:
    """Switch ``cpu_fused``'s native C++ grouped kernels (``kernels.native``) on or off (A/B benchmarks);
    off, it runs its Python per-expert loop."""
    _native.set_enabled(enabled)


def use_folded_router(enabled: bool) -> None:
    """Fold the top-k router into ``cpu_fused``'s autograd node where it applies (on by default; see
    ``kernels.cpu.topk_moe_fused``), or keep it a separate module feeding a plan to the dispatch (A/B)."""
    from . import cpu as _cpu

    _cpu._FOLD_ROUTER["on"] = bool(enabled)


def use_whole_expert_split(enabled: bool) -> None:
    """Share whole experts out among the native op's threads when that balances them (on by default), or
    always cut the sorted rows into equal blocks, an expert straddling two blocks computed in two parts
    (A/B benchmarks, tests). No effect without the native kernels."""
    ops = _native.ops()
    if ops is not None:
        ops.set_whole_experts(bool(enabled))


def use_fast_activations(enabled: bool) -> None:
    """Run the expert activation in fp32 in the native op's own kernels (on by default; GELU erf and tanh
    forms, SiLU, SwiGLU: the bias added in the activation pass, the bias gradient summed in the activation
    backward; ~3x faster than ATen's in-place GELU backward on CPU), or ATen's (A/B benchmarks, tests).
    No effect without the native kernels."""
    ops = _native.ops()
    if ops is not None:
        ops.set_fast_act(bool(enabled))


def native_ops():
    """``torch.ops.moevision_cpu`` when the native kernels are on and built (building them on first
    call), else None."""
    return _native.ops()


def native_status() -> str:
    """Whether ``cpu_fused`` runs the native C++ kernels, and if not why (one line)."""
    return _native.status()


def use_k_major_weights(enabled: bool) -> None:
    """Feed ``fused``'s grouped GEMMs K-major copies of the expert weights (an A/B switch for GPU
    benchmarks: which operand layout CUTLASS's grouped GEMM runs faster; off by default)."""
    _fused._k_major_weights = bool(enabled)


def use_triton_router(enabled: bool) -> None:
    """Switch the top-k router's Triton kernels (softmax, top-k and importance sums in one pass each way,
    ``kernels/triton/router.py``; CUDA, where they apply - see ``moe.router.TopKRouter``) on or off (A/B).
    ``use_triton`` switches them together with the other Triton kernels."""
    if enabled and not _triton.AVAILABLE:
        raise ConfigError(f"Triton is not available: {_triton.REASON}")
    _router._triton_router_core = _triton.router_core_triton if enabled else None


def use_lean_routing(enabled: bool) -> None:
    """Fewer small kernels between the router and the experts on the GPU path (on by default; session 16,
    docs/performance.md): the plan's ``token_idx``, all-kept ``kept`` and rounded gates made only when read,
    ``fused``'s Triton combine reading the router's fp32 gates, ``pos`` and the segment ends from one Triton
    kernel, and the router's weighted importance + load loss made by its Triton loss kernel. Off restores the
    eager tensors and ops (A/B benchmarks); the values are the same either way (up to the gates' rounding)."""
    from ..moe import router as _r

    _r._LEAN["on"] = bool(enabled)
    _fused._lean = bool(enabled)


def use_fused_x_grad(enabled: bool) -> None:
    """Sum x's two gradients - the router's and the experts' - inside the router's logits node (on by default;
    16-bit GPU training, where ``use_lowp_router_gemm`` applies; ``moe.router._LowpLogitsFork``): the experts
    dispatch from x as passed on by that node (``RoutingPlan.dispatch_x``), and its backward makes x's gradient
    in one pass (a Triton kernel; ``addmm`` without Triton) instead of a GEMM and an add. Off: the GEMM and
    autograd's add (A/B benchmarks). The values are the same up to rounding (the kernel sums in fp32 once)."""
    from ..moe import router as _r

    _r._XGRAD["on"] = bool(enabled)


def use_lowp_router_gemm(enabled: bool) -> None:
    """Compute the linear router's fp32 logits from bf16/fp16 inputs with one tensor-core GEMM (fp32
    output; on by default, CUDA only; ``moe.router._LowpLogits``), or upcast x and the weight to fp32 first
    (A/B benchmarks)."""
    from ..moe import router as _router

    _router._LOWP_ROUTER["on"] = bool(enabled)


__all__ = ["use_lean_routing", "use_fused_x_grad", "use_lowp_router_gemm", "use_triton_router", "set_impl", "get_impl", "list_impls", "resolve_impl", "use_triton", "use_native", "use_folded_router",
           "use_whole_expert_split",
           "native_ops", "native_status", "topk_moe_fused",
           "use_k_major_weights",
           "register_dispatch", "get_dispatch", "TRITON_AVAILABLE"]
