"""``moevision::segment_mm``: per-expert GEMMs over expert-sorted rows, as one opaque operator.

``segment_mm(a, w, offs)``: rows of ``a`` (A, K) are sorted by expert, ``offs`` (E,) int holds each
expert's cumulative end row; row block e is multiplied by ``w[e]`` (K, N) into one preallocated (A, N)
output. The same contract as ``torch._grouped_mm(a, w, offs=offs)``, for where that op cannot run
(float32/float64 on CPU under ``torch.compile``: its compile-time shape function accepts bf16 only;
float64 anywhere; pre-Hopper GPUs).

Why an operator rather than Python: inside it the segment ends are read on the host (free on a CPU,
one sync on a GPU), which under ``torch.compile`` would be a data-dependent size - a graph break and a
recompile for every new pattern of empty experts. As a ``torch.library`` custom op with a fake
(shape-only) implementation it is opaque to the compiler: the layer around it compiles to one graph
and inductor fuses the glue (gathers, bias + activation, the gate combine). Backward: the input
gradient is ``segment_mm`` with the transposed weights, the weight gradient ``segment_mm_wgrad``
(per expert a_e^T g_e, zero for an expert with no rows). Tested against a per-expert loop and by
gradcheck (``tests/test_kernels.py``).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

# the ops read the segment ends on the host: a CUDA-graph capture must not contain them (inductor's
# cudagraphs skip a graph with an op tagged so, where this torch has the tag)
_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
_TAGS = {"tags": (_UNSAFE,)} if _UNSAFE is not None and "tags" in inspect.signature(
    torch.library.custom_op).parameters else {}


@torch.library.custom_op("moevision::segment_mm", mutates_args=(), **_TAGS)
def segment_mm(a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    out = a.new_empty(a.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[start:end], w[e], out=out[start:end])
        start = end
    return out


@segment_mm.register_fake
def _segment_mm_fake(a, w, offs):
    return a.new_empty(a.shape[0], w.shape[-1])


@torch.library.custom_op("moevision::segment_mm_wgrad", mutates_args=(), **_TAGS)
def segment_mm_wgrad(a: Tensor, g: Tensor, offs: Tensor) -> Tensor:
    out = a.new_empty(offs.shape[0], a.shape[1], g.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[start:end].t(), g[start:end], out=out[e])
        else:
            out[e].zero_()
        start = end
    return out


@segment_mm_wgrad.register_fake
def _segment_mm_wgrad_fake(a, g, offs):
    return a.new_empty(offs.shape[0], a.shape[1], g.shape[1])


def _setup_context(ctx, inputs, output):
    a, w, offs = inputs
    ctx.save_for_backward(a, w, offs)


def _backward(ctx, g):
    a, w, offs = ctx.saved_tensors
    g = g.contiguous()
    ga = segment_mm(g, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    gw = segment_mm_wgrad(a, g, offs) if ctx.needs_input_grad[1] else None
    return ga, gw, None


segment_mm.register_autograd(_backward, setup_context=_setup_context)
