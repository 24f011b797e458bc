"""Routers: token choice top-k (V-MoE / Switch / GShard / Mixtral), expert choice, soft MoE, random, hash.

Papers: V-MoE (Riquelme et al., NeurIPS 2021) for noisy top-k with capacity and Batch Prioritized
Routing; Expert Choice (Zhou et al., NeurIPS 2022); Soft MoE (Puigcerver et al., ICLR 2024); EWA
(Huang et al., 2023) for the random uniform partition. Every router maps a (G, S, D) batch of routing
groups to a plan; groups never influence each other.

Shape legend: G groups, S tokens per group, D width, E experts, K top-k, C capacity, P = E * slots.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from . import losses as L
from .capacity import compute_capacity
from .types import LowpGates, RoutingPlan, SoftRoutingPlan

_ZERO = torch.zeros(())


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Router math in fp32 at least (fp64 stays fp64, so float64 tests are exact)."""
    return t if t.dtype == torch.float64 else t.float()


def _autocast_available(device_type: str) -> bool:
    # cpu/cuda answered by a plain comparison: torch.compile (dynamo of torch 2.11, measured on an H200)
    # cannot trace torch.amp.is_autocast_available and would break the layer's graph here
    if device_type in ("cpu", "cuda"):
        return True
    check = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    return check(device_type) if check is not None else False


_triton_router_core = None  # kernels.triton.router.router_core_triton, set by moevision.kernels (Triton present)
_TRITON_ROUTER_CPU = {"on": False}  # tests: take the Triton core on CPU tensors too (Triton's interpreter)
# kernels.use_lean_routing: the plan's lazy fields and the Triton core's folded loss weights (the A/B switch)
_LEAN = {"on": True}
# kernels.use_lowp_router_gemm: the A/B switch; "compile": also under torch.compile (off until measured)
_LOWP_ROUTER = {"on": True, "compile": False}


def _mm_f32out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 16-bit a and b, accumulated and returned in fp32: one tensor-core GEMM on CUDA
    (``torch.mm(..., out_dtype=float32)``, torch >= 2.8); elsewhere, or where that overload is missing
    (older torch: then it is not tried again), the upcast product (same value)."""
    if a.is_cuda and _LOWP_ROUTER.get("out_dtype", True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, NotImplementedError, RuntimeError):
            _LOWP_ROUTER["out_dtype"] = False
    return a.float() @ b.float()


class _LowpLogits(torch.autograd.Function):
    """logits = x @ w.T in fp32 for x and w both bf16 (or both fp16), without upcasting them first.

    Forward: the products of two 16-bit numbers are exact in fp32 and the GEMM accumulates in fp32, so
    this is the upcast router's value (up to summation order) - V-MoE's fp32 router logits - from one
    tensor-core GEMM instead of a copy of x in fp32 and a SIMT fp32 GEMM. Backward: the (T, E) logit
    gradient is rounded to x's dtype and both gradient GEMMs run on tensor cores with fp32 accumulation;
    x's and w's gradients are 16-bit anyway, so this adds about one 16-bit rounding to them. Measured on
    an H200 in docs/performance.md; ``kernels.use_lowp_router_gemm(False)`` restores the upcast form."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _mm_f32out(x.reshape(-1, x.shape[-1]), w.t()).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(x.dtype)
        dx = (g2 @ w).view_as(x) if ctx.needs_input_grad[0] else None
        dw = _mm_f32out(g2.t(), x.reshape(-1, x.shape[-1])).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


class _LowpLogitsFork(torch.autograd.Function):
    """``_LowpLogits`` that also passes x on: ``(logits, x_pass)``, x_pass an alias of x (no copy). The experts
    dispatch from x_pass (``RoutingPlan.dispatch_x``), so both of x's gradients - the router's and the
    experts' - reach this one node, and its backward makes x's gradient ``g_pass + g_logits @ w`` in one pass
    (``kernels/triton/router.py``'s ``router_dx_triton``: the fp32 logit gradient read as it is) where autograd
    would run a GEMM writing (T, D) and an add reading it back and writing the sum. Without the Triton kernel
    (or E > its limit) the same sum is ``addmm``. Taken where ``_LowpLogits`` is and x requires a gradient
    (``kernels.use_fused_x_grad``, on by default)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        ctx.set_materialize_grads(False)
        logits = _mm_f32out(x.reshape(-1, x.shape[-1]), w.t()).view(*x.shape[:-1], w.shape[0])
        return logits, x.view_as(x)

    @staticmethod
    def backward(ctx, g, g_pass):
        if g is None:  # nothing reached the logits (e.g. only the output's gradient, no router path)
            return g_pass, None
        if torch.is_grad_enabled() and g_pass is not None and g_pass.requires_grad:
            # create_graph (a gradient penalty, say): the experts' gradient stays differentiable, the router's
            # part is a constant, as ``_LowpLogits``'s once-differentiable gradient was before the fork
            with torch.no_grad():
                dx, dw = _LowpLogitsFork._grads(ctx, g, None)
            return (None if dx is None else g_pass + dx), dw
        with torch.no_grad():
            return _LowpLogitsFork._grads(ctx, g, g_pass)

    @staticmethod
    def _grads(ctx, g, g_pass):
        x, w = ctx.saved_tensors
        D, E = x.shape[-1], w.shape[0]
        g2 = g.reshape(-1, E)
        gp = None if g_pass is None else g_pass.reshape(-1, D)
        dx = dw = gl = None
        if ctx.needs_input_grad[0]:
            if _triton_router_dx is not None and x.is_cuda and E <= _ROUTER_DX_MAX_E:
                # the kernel also writes the rounded logit gradient the weight's GEMM reads (no conversion kernel)
                r = _triton_router_dx(g2, w, gp, with_lowp_g=ctx.needs_input_grad[1])
                dx, gl = r if ctx.needs_input_grad[1] else (r, None)
                dx = dx.view_as(x)
            else:
                gl = g2.to(x.dtype)
                dx = (gl @ w if gp is None else torch.addmm(gp, gl, w)).view_as(x)
        if ctx.needs_input_grad[1]:
            gl = g2.to(x.dtype) if gl is None else gl
            dw = _mm_f32out(gl.t(), x.reshape(-1, D)).to(w.dtype)
        return dx, dw


_triton_router_dx = None  # kernels.triton.router.router_dx_triton, set by moevision.kernels (Triton present)
_ROUTER_DX_MAX_E = 64  # that kernel's limit (kernels.triton.router.ROUTER_DX_MAX_E); above it, addmm
_XGRAD = {"on": True}  # kernels.use_fused_x_grad: the A/B switch of _LowpLogitsFork


def _lowp_router_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Take ``_LowpLogits``: CUDA, x and w of one 16-bit dtype, outside torch.func (no vmap rule), eager
    (under torch.compile only with ``_LOWP_ROUTER["compile"]``)."""
    return (_LOWP_ROUTER["on"] and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and w.dtype == x.dtype and not _functorch_active()
            and (_LOWP_ROUTER["compile"] or not torch.compiler.is_compiling()))


def _functorch_active() -> bool:
    """Inside a torch.func transform (grad, vmap, jacrev, ...)."""
    return torch._C._are_functorch_transforms_active()


class _SoftmaxSmall(torch.autograd.Function):
    """Softmax over a short last axis (the E experts), for CPU: ATen's last-axis softmax kernel costs
    ~0.5 ms for a (6400, 8) tensor (per-row setup dominates at E=8) where these few vectorised passes
    take ~0.08 ms; same formula (max-shifted exp over its sum), backward p * (g - sum(g * p))."""

    @staticmethod
    def forward(x):
        p = (x - x.amax(-1, keepdim=True)).exp_()
        return p.div_(p.sum(-1, keepdim=True))

    @staticmethod
    def setup_context(ctx, inputs, output):  # the torch.func-compatible form
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return p * (g - (g * p).sum(-1, keepdim=True))


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax(x, -1): the small-axis CPU version where it is faster (measured, see _SoftmaxSmall)."""
    if x.is_cuda or x.shape[-1] > 64 or torch.compiler.is_compiling() or _functorch_active():
        return x.softmax(dim=-1)
    return _SoftmaxSmall.apply(x)


class _NativeRouterCore(torch.autograd.Function):
    """logits = x @ w.T, probs = softmax(logits + noise), top-k of probs - one native CPU op each way
    (``kernels/native``: one GEMM and one pass over the (T, E) rows, where the eager composition is ~12
    small ops and autograd nodes; measured in docs/performance.md). The losses are built on the outputs
    by autograd as before, so their gradients reach the core as grads of logits, probs and top_v."""

    @staticmethod
    def forward(ctx, x_TD, w_ED, noise_TE, k, ops):
        logits, probs, top_v, top_i = ops.router_fwd(x_TD, w_ED, noise_TE, k)
        ctx.save_for_backward(x_TD, w_ED, probs, top_i)
        ctx.mark_non_differentiable(top_i)
        ctx.set_materialize_grads(False)
        ctx.ops = ops
        return logits, probs, top_v, top_i

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logits, g_probs, g_topv, _g_top_i):
        x, w, probs, top_i = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if g_logits is None and g_probs is None and g_topv is None:
            return None, None, None, None, None
        dx, dw = ctx.ops.router_bwd(x, w, probs, top_i, g_logits, g_probs, g_topv, need_x, need_w)
        return (dx if need_x else None), (dw if need_w else None), None, None, None


def _native_router_ops(x: torch.Tensor):
    """The native CPU router ops when they apply (CPU, fp32/fp64, eager, outside torch.func), else None."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or _functorch_active():
        return None
    from ..kernels import native  # lazy: kernels imports moe

    ops = native.ops()
    return ops if ops is not None and hasattr(ops, "router_fwd") else None


def _group_offsets(G: int, S: int, device) -> torch.Tensor:
    return (torch.arange(G, device=device) * S).view(G, 1)


class _LinearRouter(nn.Module):
    """Holds ``weight`` (E, D): logits = x @ weight.T in fp32 (the checkpoint key ``router.weight``)."""

    def __init__(self, dim: int, num_experts: int, init_std: float | None = None):
        super().__init__()
        self.dim, self.num_experts = dim, num_experts
        self.weight = nn.Parameter(torch.empty(self._weight_shape()))
        self.init_std = init_std
        self.reset_parameters()

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.num_experts, self.dim)

    def reset_parameters(self) -> None:
        # LeCun normal (vmoe's Flax Dense default) unless a std is given.
        std = self.init_std if self.init_std is not None else 1.0 / math.sqrt(self.dim)
        nn.init.normal_(self.weight, std=std) if std > 0 else nn.init.zeros_(self.weight)

    def _lowp_applies(self, x_GSD: torch.Tensor, task) -> bool:
        """The plain linear logits of 16-bit x and weight on CUDA: ``_LowpLogits`` (see ``_lowp_router_ok``)."""
        return (task is None and type(self)._logits in (_LinearRouter._logits, TopKRouter._logits)
                and getattr(self, "task_routing", "none") == "none" and getattr(self, "logit_type", "linear") == "linear"
                and _lowp_router_ok(x_GSD, self.weight))

    def logits(self, x_GSD: torch.Tensor, task: torch.Tensor | int | None = None) -> torch.Tensor:
        dev = x_GSD.device.type
        if self._lowp_applies(x_GSD, task):
            return _LowpLogits.apply(x_GSD, self.weight)  # fp32 logits, autocast or not
        if not _autocast_available(dev):  # meta tensors, backends without autocast
            return self._logits(_fp32(x_GSD), task)
        with torch.autocast(dev, enabled=False):  # fp32 under autocast too (as vmoe)
            return self._logits(_fp32(x_GSD), task)

    def _logits(self, x_GSD: torch.Tensor, task) -> torch.Tensor:
        return x_GSD @ _fp32(self.weight).t()

    def _logits_passing_x(self, x_GSD: torch.Tensor, task) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, x_pass)``: with ``_LowpLogitsFork`` (16-bit GPU training, see there) x_pass is x passed on
        through the logits' node, for the experts to dispatch from (``RoutingPlan.dispatch_x``); else
        ``(self.logits(x, task), None)`` (also under torch.compile: eager only, not measured there)."""
        if (_XGRAD["on"] and x_GSD.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and type(self).logits is _LinearRouter.logits and self._lowp_applies(x_GSD, task)):
            return _LowpLogitsFork.apply(x_GSD, self.weight)
        return self.logits(x_GSD, task), None


TASK_ROUTING = ("none", "multi_gate", "task_conditioned")
SECOND_EXPERT_NOISE = ("none", "gumbel")
ROUTER_LOGITS = ("linear", "cosine")


class TopKRouter(_LinearRouter):
    """Token choice: each token picks its top-k experts; experts have a capacity per group (or none).

    Defaults follow V-MoE: softmax over all experts *before* top-k, selected gates NOT renormalised,
    Gaussian logit noise with std ``noise_std / E`` in training only (noise_std=1.0), capacity rounded up
    to a multiple of 4, priority by token position, importance + load losses (0.005 each).
    ``importance_on="gates"`` computes the importance loss on the summed sparse top-k gates (Shazeer et
    al. 2017, M³ViT) instead of the clean softmax (V-MoE, the default). ``load_threshold`` is the load
    loss's threshold (``moe.losses.prob_in_top_k``): ``kth`` (vmoe, default) or ``shazeer_in_out`` (Shazeer
    et al. 2017: the (k+1)-th noisy logit for the experts already in the top-k; M³ViT's and ShiftAddViT's
    gates).
    ``normalize_topk=True`` renormalises the selected gates (Mixtral, MoE-LLaVA, CLIP-MoE);
    ``normalize_after_drop`` decides whether dropped assignments are zeroed before that normalisation
    (DeepSpeed / MoE-LLaVA: True) or after it (Tutel: False, the default).
    ``batch_priority=True`` (BPR) fills buffers in order of router confidence (max gate, or the sum of the
    top-k gates with ``bpr_score="sum"``, [R]) instead of position; ties keep position order.
    All first choices are placed before any second choice, so a top-1 choice is never displaced by a
    top-2 choice.

    ``second_expert_noise="gumbel"`` (DeepSpeed's top-2 gating, used by MoE-LLaVA; spec
    multimodal_compression_systems.md §0.2): the first expert is the argmax of the probabilities (no Gumbel);
    choices 2..K are the top-(K-1) of the logits plus Gumbel(0, 1) noise, the first choice masked - the
    Gumbel-max trick, so the second expert is *sampled* from the softmax over the remaining experts. The
    gates stay the clean probabilities of the chosen experts. Training only, unless
    ``second_expert_noise_in_eval`` (older DeepSpeed versions also sampled in eval).

    Task-dependent routing (M³ViT, Liang et al., NeurIPS 2022; vision_moe.md §10), with ``num_tasks`` > 0:
    ``task_routing="multi_gate"`` gives each task its own gate: ``weight`` is (num_tasks, E, D) and task t
    routes with ``weight[t]``. ``task_routing="task_conditioned"`` is one gate on ``[x ; e_t]``, e_t the
    one-hot task id: its first D columns are ``weight`` (E, D) and its task columns ``task_weight``
    (E, num_tasks), so the logits are ``x @ weight.T + task_weight[:, t]``. With ``task_embed_dim`` set, e_t
    is a learned task embedding ``task_embed[t]`` (num_tasks, task_embed_dim) instead of the one-hot (the
    reference code's ``gate_task_specific_dim`` option; its exact embedding network is [R], here one
    embedding table). ``task_init_std`` initialises the task columns (None = the token columns' std; 0 =
    zero, which leaves routing task-independent at step 0). ``from_single_gate`` in
    ``moevision.techniques.multitask`` builds either form from a trained single gate without changing
    the function.

    Cosine router (SwinV2-MoE, as in Tutel's ``cosine_top`` gate; spec §2(b)8), ``logits="cosine"``:
    ``logits = exp(min(t, ln max_scale)) * <normalize(P x), normalize(w_e)>`` with a projection
    ``cosine_proj`` = Linear(D, ``cosine_dim``=256), ``weight`` (E, cosine_dim) initialised N(0, 0.01), and
    a learnable log-scale ``logit_scale`` t initialised ln(1 / ``cosine_init_temperature``) = ln(1/0.5);
    the clamp keeps the scale <= ``cosine_max_scale`` = 100, so |logits| <= 100. Everything downstream
    (softmax, top-k, capacity, losses) is unchanged.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        *,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        normalize_topk: bool = False,
        normalize_after_drop: bool = False,
        softmax_order: str = "before_topk",
        noise_std: float = 1.0,
        batch_priority: bool = False,
        bpr_score: str = "max",
        capacity_mode: str = "ceil",
        capacity_multiple_of: int | None = 4,
        importance_loss_weight: float = 0.005,
        load_loss_weight: float = 0.005,
        switch_loss_weight: float = 0.0,
        switch_use_all_k: bool = False,
        z_loss_weight: float = 0.0,
        init_std: float | None = None,
        num_tasks: int = 0,
        task_routing: str = "none",
        task_embed_dim: int | None = None,
        task_init_std: float | None = None,
        importance_on: str = "probs",
        logits: str = "linear",
        cosine_dim: int = 256,
        cosine_init_temperature: float = 0.5,
        cosine_max_scale: float = 100.0,
        second_expert_noise: str = "none",
        second_expert_noise_in_eval: bool = False,
        load_threshold: str = "kth",
    ):
        if load_threshold not in L.LOAD_THRESHOLDS:
            raise ConfigError(f"load_threshold must be one of {L.LOAD_THRESHOLDS}, got {load_threshold!r}")
        self.load_threshold = load_threshold
        if second_expert_noise not in SECOND_EXPERT_NOISE:
            raise ConfigError(f"second_expert_noise must be one of {SECOND_EXPERT_NOISE}, got {second_expert_noise!r}")
        self.second_expert_noise, self.second_expert_noise_in_eval = second_expert_noise, bool(second_expert_noise_in_eval)
        if logits not in ROUTER_LOGITS:
            raise ConfigError(f"logits must be one of {ROUTER_LOGITS}, got {logits!r}")
        if logits == "cosine":
            if task_routing != "none":
                raise ConfigError("logits='cosine' does not combine with task routing (task_routing must be 'none')")
            if not isinstance(cosine_dim, int) or cosine_dim < 1:
                raise ConfigError(f"cosine_dim must be a positive integer, got {cosine_dim!r}")
            if not cosine_init_temperature > 0 or not cosine_max_scale > 0:
                raise ConfigError(f"cosine_init_temperature and cosine_max_scale must be > 0, got "
                                  f"{cosine_init_temperature!r} and {cosine_max_scale!r}")
        self.logit_type, self.cosine_dim = logits, cosine_dim
        self.cosine_init_temperature, self.cosine_max_scale = cosine_init_temperature, cosine_max_scale
        if importance_on not in ("probs", "gates"):
            raise ConfigError(f"importance_on must be 'probs' or 'gates', got {importance_on!r}")
        self.importance_on = importance_on
        if task_routing not in TASK_ROUTING:
            raise ConfigError(f"task_routing must be one of {TASK_ROUTING}, got {task_routing!r}")
        if task_routing != "none" and (not isinstance(num_tasks, int) or num_tasks < 1):
            raise ConfigError(f"task_routing={task_routing!r} needs num_tasks >= 1, got {num_tasks!r}")
        if task_routing == "none" and num_tasks:
            raise ConfigError(f"num_tasks={num_tasks!r} needs task_routing 'multi_gate' or 'task_conditioned'")
        if task_init_std is not None and task_init_std < 0:
            raise ConfigError(f"task_init_std must be >= 0 or None, got {task_init_std!r}")
        if task_embed_dim is not None and (task_routing != "task_conditioned" or task_embed_dim < 1):
            raise ConfigError(f"task_embed_dim={task_embed_dim!r} needs task_routing='task_conditioned' and "
                              f"a positive size")
        self.num_tasks, self.task_routing = (num_tasks if task_routing != "none" else 0), task_routing
        self.task_embed_dim, self.task_init_std = task_embed_dim, task_init_std
        super().__init__(dim, num_experts, init_std)
        if softmax_order not in ("before_topk", "after_topk"):
            raise ConfigError(f"softmax_order must be 'before_topk' or 'after_topk', got {softmax_order!r}")
        if bpr_score not in ("max", "sum"):
            raise ConfigError(f"bpr_score must be 'max' or 'sum', got {bpr_score!r}")
        self.top_k = top_k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.normalize_topk, self.normalize_after_drop = normalize_topk, normalize_after_drop
        self.softmax_order, self.noise_std = softmax_order, noise_std
        self.batch_priority, self.bpr_score = batch_priority, bpr_score
        self.capacity_mode, self.capacity_multiple_of = capacity_mode, capacity_multiple_of
        self.weights = dict(importance=importance_loss_weight, load=load_loss_weight,
                            switch=switch_loss_weight, z=z_loss_weight)
        self.switch_use_all_k = switch_use_all_k

    # -- task-dependent routing (M³ViT)
    def _weight_shape(self) -> tuple[int, ...]:
        if self.task_routing == "multi_gate":
            return (self.num_tasks, self.num_experts, self.dim)
        if self.logit_type == "cosine":
            return (self.num_experts, self.cosine_dim)
        return (self.num_experts, self.dim)

    def reset_parameters(self) -> None:
        if self.logit_type == "cosine":
            if not hasattr(self, "cosine_proj"):
                self.cosine_proj = nn.Linear(self.dim, self.cosine_dim, device=self.weight.device)
                self.logit_scale = nn.Parameter(torch.empty((), device=self.weight.device))
            self.cosine_proj.reset_parameters()
            nn.init.normal_(self.weight, std=0.01 if self.init_std is None else self.init_std)
            nn.init.constant_(self.logit_scale, math.log(1.0 / self.cosine_init_temperature))
            return
        super().reset_parameters()
        if self.task_routing != "task_conditioned":
            return
        cols = self.task_embed_dim or self.num_tasks
        if not hasattr(self, "task_weight"):
            self.task_weight = nn.Parameter(torch.empty(self.num_experts, cols, device=self.weight.device))
            if self.task_embed_dim:
                self.task_embed = nn.Parameter(torch.empty(self.num_tasks, cols, device=self.weight.device))
        std = self.task_init_std
        if std is None:
            std = self.init_std if self.init_std is not None else 1.0 / math.sqrt(self.dim)
        for p in (self.task_weight, getattr(self, "task_embed", None)):
            if p is not None:
                nn.init.normal_(p, std=std) if std > 0 else nn.init.zeros_(p)
        if self.task_embed_dim and std == 0:  # a zero table would get no gradient through a zero weight
            nn.init.normal_(self.task_embed, std=1.0)

    def _logits(self, x_GSD: torch.Tensor, task) -> torch.Tensor:
        if self.task_routing == "none":
            if task is not None:
                raise ValueError("task= was given but this router does not route by task (task_routing='none')")
            if self.logit_type == "cosine":
                proj = F.normalize(F.linear(x_GSD, _fp32(self.cosine_proj.weight), _fp32(self.cosine_proj.bias)), dim=-1)
                w = F.normalize(_fp32(self.weight), dim=-1)
                scale = _fp32(self.logit_scale).clamp(max=math.log(self.cosine_max_scale)).exp()
                return (proj @ w.t()) * scale
            return x_GSD @ _fp32(self.weight).t()
        if task is None:
            raise ValueError(f"this router routes by task (task_routing={self.task_routing!r}); pass task=<id>")
        if isinstance(task, bool) or (isinstance(task, int) and not 0 <= task < self.num_tasks):
            raise ValueError(f"task must be an integer in [0, num_tasks={self.num_tasks}), got {task!r}")
        w = _fp32(self.weight)
        if self.task_routing == "multi_gate":
            if isinstance(task, int):
                return x_GSD @ w[task].t()
            # per-token tasks: every gate on every token (num_tasks x E logits, cheap), then each token's own
            all_GSTE = (x_GSD @ w.reshape(-1, self.dim).t()).unflatten(-1, (self.num_tasks, self.num_experts))
            return all_GSTE.gather(-2, task[..., None, None].expand(*task.shape, 1, self.num_experts)).squeeze(-2)
        cols = _fp32(self.task_weight)  # (E, num_tasks) or (E, task_embed_dim)
        bias_TE = (_fp32(self.task_embed) @ cols.t()) if self.task_embed_dim else cols.t()  # (num_tasks, E)
        return x_GSD @ w.t() + (bias_TE[task] if isinstance(task, int) else bias_TE[task])

    def current_capacity_factor(self) -> float | None:
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def forward(self, x_GSD: torch.Tensor, expert_mask_GSE: torch.Tensor | None = None,
                task: torch.Tensor | int | None = None) -> RoutingPlan:
        """``expert_mask_GSE`` (bool, True = allowed) restricts each token to a subset of the experts
        (MoMa's modality groups): the other logits become -inf, so their probability is exactly 0 and
        top-k is taken over the allowed experts only. Every token needs at least K allowed experts.
        ``task`` (task-dependent routers only): one task id for all tokens (int) or one per token, (G, S)."""
        G, S, D = x_GSD.shape
        E, K = self.num_experts, self.top_k
        sigma = self.noise_std / E if (self.training and self.noise_std > 0) else 0.0
        gumbel = (self.second_expert_noise == "gumbel" and K > 1
                  and (self.training or self.second_expert_noise_in_eval))
        ops = None
        if (not gumbel and expert_mask_GSE is None and task is None and self.task_routing == "none"
                and self.logit_type == "linear"
                and type(self).logits is _LinearRouter.logits and type(self)._logits is TopKRouter._logits):
            ops = _native_router_ops(x_GSD)
        # the fp32 weight and x only for the native core (on a GPU the copy would be one more kernel)
        w = _fp32(self.weight) if ops is not None else None
        x32 = _fp32(x_GSD) if ops is not None else None
        imp_loss = load_loss = clean_probs = None  # the losses and clean softmax, when the Triton core made them
        x_pass = None  # x passed on through the logits' node (_LowpLogitsFork), for the experts to dispatch from
        core_aux, folded = None, set()  # ... and its weighted sum of the losses in ``folded``
        if ops is not None and x32.dtype == w.dtype:  # the fused native core (same function; the eager form
            # below is its reference). The noise draws the same numbers as randn_like there
            noise = sigma * torch.randn(G, S, E, dtype=w.dtype) if sigma > 0 else None
            with torch.autocast("cpu", enabled=False):
                logits, probs, top_v, top_i = _NativeRouterCore.apply(
                    x32.reshape(G * S, D), w, None if noise is None else noise.view(G * S, E), K, ops)
            logits, probs = logits.view(G, S, E), probs.view(G, S, E)
            top_v, top_i = top_v.view(G, S, K), top_i.view(G, S, K)
            noisy = logits + noise if sigma > 0 else logits
        elif (_triton_router_core is not None and not gumbel and expert_mask_GSE is None
              and self.softmax_order == "before_topk" and E <= 256 and (x_GSD.is_cuda or _TRITON_ROUTER_CPU["on"])
              and (self.load_threshold == "kth" or sigma == 0 or not self.weights["load"])  # its load is vmoe's
              and not torch.compiler.is_compiling() and not _functorch_active()):
            # softmax(es), top-k, the importance sums and (with noise) the smooth load in one Triton kernel each
            # way (kernels/triton/router.py); the noise is the eager branch's draw (same numbers for a seed)
            logits, x_pass = self._logits_passing_x(x_GSD, task)
            noise = torch.randn_like(logits) if sigma > 0 else None
            # the weighted sum of the importance and load losses comes from the loss kernel too
            w_imp = float(self.weights["importance"]) if self.importance_on != "gates" and _LEAN["on"] else 0.0
            w_load = float(self.weights["load"]) if sigma > 0 and _LEAN["on"] else 0.0
            clean_probs, top_v, top_i, imp_loss, load_loss, core_aux = _triton_router_core(
                logits, K, noise, sigma, (w_imp, w_load))
            folded = {n for n, w in (("importance", w_imp), ("load", w_load)) if w}
            probs, noisy = clean_probs, None  # the noisy logits and their softmax stay inside the kernel
        else:
            logits, x_pass = self._logits_passing_x(x_GSD, task)  # (G, S, E) clean
            if expert_mask_GSE is not None:
                if bool((expert_mask_GSE.sum(-1) < K).any()):
                    raise ValueError(f"expert_mask allows fewer than top_k={K} experts for some token")
                logits = logits.masked_fill(~expert_mask_GSE, float("-inf"))
            noisy = logits + sigma * torch.randn_like(logits) if sigma > 0 else logits
            probs = _softmax(noisy)
            if gumbel:  # DeepSpeed: 1st = argmax; the rest by the Gumbel-max trick on the logits
                top1 = (probs if expert_mask_GSE is None else noisy).argmax(-1, keepdim=True)
                # Gumbel(0, 1) = -log Exp(1); a zero draw would give +inf, and -inf + inf = nan on a masked expert
                g = -torch.empty_like(noisy).exponential_().clamp_min_(1e-30).log()
                rest = (noisy + g).scatter(-1, top1, float("-inf")).topk(K - 1, dim=-1).indices
                top_i = torch.cat([top1, rest], dim=-1)
                top_v = probs.gather(-1, top_i)
            elif expert_mask_GSE is None and K == 1:  # max, not topk: 27 vs 47 us on an H200 at T=25216,
                top_v, top_i = probs.max(dim=-1, keepdim=True)  # 0.12 vs 0.36 ms on CPU (T=6400); ties -> first
            elif expert_mask_GSE is None:
                top_v, top_i = probs.topk(K, dim=-1)  # (G, S, K); top-k of probs == top-k of logits
            else:  # select on logits: an allowed expert whose probability underflows still beats a masked one
                top_i = noisy.topk(K, dim=-1).indices
                top_v = probs.gather(-1, top_i)
        if self.softmax_order == "after_topk":
            top_v = noisy.gather(-1, top_i).softmax(dim=-1)

        cf = self.current_capacity_factor()
        if cf is None:
            capacity, slot = None, None
            kept = None  # all kept (made when first read, or below under torch.compile)
        else:
            capacity = compute_capacity(S * K, E, cf, mode=self.capacity_mode, multiple_of=self.capacity_multiple_of)
            slot = self._slots(top_i, top_v)
            kept = slot < capacity

        gates = top_v
        if self.normalize_topk and not self.normalize_after_drop:
            gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-9)
        if capacity is not None:  # dropless keeps everything: no multiply by an all-true mask
            gates = gates * kept
        if self.normalize_topk and self.normalize_after_drop:
            gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-9)

        if clean_probs is None:
            clean_probs = probs if sigma == 0 else _softmax(logits)
        aux_losses: dict[str, torch.Tensor] = {}
        if self.weights["importance"]:
            if self.importance_on == "gates":  # Shazeer / M³ViT: CV² of the summed sparse gates
                imp_src = torch.zeros_like(probs).scatter(-1, top_i, gates.to(probs.dtype))
                aux_losses["importance"] = L.importance_cv2(imp_src)
            elif imp_loss is not None:  # V-MoE, from the Triton core: L.importance_cv2(clean_probs)
                aux_losses["importance"] = imp_loss
            else:  # V-MoE: CV² of the summed clean softmax
                aux_losses["importance"] = L.importance_cv2(clean_probs)
        if self.weights["load"] and sigma > 0:
            aux_losses["load"] = (load_loss if load_loss is not None
                                  else L.load_cv2(logits, noisy, sigma, K, self.load_threshold))
        if self.weights["switch"]:
            aux_losses["switch"] = L.switch_loss(clean_probs, top_i, use_all_k=self.switch_use_all_k)
        if self.weights["z"]:
            aux_losses["z"] = L.z_loss(logits)
        aux = core_aux if folded else None  # the weighted sum, without adding a zero first (one kernel fewer
        for name, v in aux_losses.items():  # on a GPU); the Triton core's losses are in core_aux already
            if name in folded:
                continue
            aux = self.weights[name] * v if aux is None else aux + self.weights[name] * v
        if aux is None:
            aux = logits.new_zeros(())

        # assignments are token-major over the flattened G*S tokens: assignment a is token a // K. Eagerly,
        # token_idx, an all-kept ``kept`` and the gates rounded to x's dtype are made when first read
        # (RoutingPlan's lazy fields: the fused GPU path reads none of them, and the Triton combine takes the
        # fp32 gates); under torch.compile (and torch.func transforms) they are made here, in the graph
        lazy = _LEAN["on"] and not torch.compiler.is_compiling() and not _functorch_active()
        if lazy:
            token_idx = None
            g_flat = gates.reshape(-1)
            if g_flat.dtype == x_GSD.dtype:
                plan_gates = g_flat
            elif g_flat.dtype == torch.float32:
                plan_gates = LowpGates(g_flat, x_GSD.dtype)
            else:
                plan_gates = g_flat.to(x_GSD.dtype)
        else:
            token_idx = torch.arange(G * S * K, device=x_GSD.device)
            if K > 1:
                token_idx = torch.div(token_idx, K, rounding_mode="floor")
            plan_gates = gates.reshape(-1).to(x_GSD.dtype)
            if kept is None:
                kept = torch.ones_like(top_i, dtype=torch.bool)
        return RoutingPlan(
            token_idx=token_idx,
            expert_idx=top_i.reshape(-1),
            gates=plan_gates,
            kept=None if kept is None else kept.reshape(-1),
            slot=None if slot is None else slot.reshape(-1),
            probs_GSE=clean_probs,
            logits_GSE=logits,
            capacity=capacity,
            aux_losses=aux_losses,
            aux_loss=aux,
            top_k=K,
            dispatch_x=None if x_pass is None else x_pass.reshape(G * S, D),
        )

    def _slots(self, top_i: torch.Tensor, top_v: torch.Tensor) -> torch.Tensor:
        """Position of each (token, choice) in its expert's buffer: choice-major, then by priority."""
        G, S, K = top_i.shape
        E = self.num_experts
        if self.batch_priority:
            score = top_v[..., 0] if self.bpr_score == "max" else top_v.sum(-1)
            order = torch.sort(score, dim=1, descending=True, stable=True).indices  # (G, S)
            idx = top_i.gather(1, order.unsqueeze(-1).expand(G, S, K))
        else:
            order, idx = None, top_i
        flat = idx.transpose(1, 2).reshape(G, K * S)  # all 1st choices, then all 2nd choices
        # (G, K*S, E): O(T*K*E), never (T, E, C); by comparison, as F.one_hot syncs to validate
        onehot = (flat.unsqueeze(-1) == torch.arange(E, device=flat.device)).to(torch.int32)
        pos = (onehot.cumsum(dim=1) - 1).gather(2, flat.unsqueeze(-1)).squeeze(-1)  # (G, K*S)
        pos = pos.view(G, K, S).transpose(1, 2)  # (G, S, K) in priority order
        if order is not None:
            pos = torch.empty_like(pos).scatter_(1, order.unsqueeze(-1).expand(G, S, K), pos)
        return pos.long()


class ExpertChoiceRouter(_LinearRouter):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of the group.

    C = capacity(S, E, capacity_factor) (default factor 1.0, vmoe ceil / multiple of 4; clamped to S).
    Combine weight = the token's softmax probability for that expert, not renormalised; no aux loss
    (z-loss on request). Logit noise (vmoe option; the paper uses none) defaults to 0.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        noise_std: float = 0.0,
        capacity_mode: str = "ceil",
        capacity_multiple_of: int | None = 4,
        z_loss_weight: float = 0.0,
        init_std: float | None = None,
    ):
        super().__init__(dim, num_experts, init_std)
        self.capacity_factor = 1.0 if capacity_factor is None else capacity_factor
        self.eval_capacity_factor = self.capacity_factor if eval_capacity_factor is None else eval_capacity_factor
        self.noise_std, self.capacity_mode, self.capacity_multiple_of = noise_std, capacity_mode, capacity_multiple_of
        self.z_loss_weight = z_loss_weight

    def forward(self, x_GSD: torch.Tensor) -> RoutingPlan:
        G, S, _ = x_GSD.shape
        E = self.num_experts
        logits = self.logits(x_GSD)
        sigma = self.noise_std / E if (self.training and self.noise_std > 0) else 0.0
        noisy = logits + sigma * torch.randn_like(logits) if sigma > 0 else logits
        probs = noisy.softmax(dim=-1)  # (G, S, E)
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        C = min(compute_capacity(S, E, cf, mode=self.capacity_mode, multiple_of=self.capacity_multiple_of), S)
        gates_GEC, tok_GEC = probs.transpose(1, 2).topk(C, dim=-1)  # each expert's top-C tokens
        token = tok_GEC + _group_offsets(G, S, x_GSD.device).view(G, 1, 1)
        expert = torch.arange(E, device=x_GSD.device).view(1, E, 1).expand(G, E, C)
        slot = torch.arange(C, device=x_GSD.device).view(1, 1, C).expand(G, E, C)
        aux_losses = {"z": L.z_loss(logits)} if self.z_loss_weight else {}
        aux = self.z_loss_weight * aux_losses["z"] if aux_losses else logits.new_zeros(())
        return RoutingPlan(
            token_idx=token.reshape(-1),
            expert_idx=expert.reshape(-1),
            gates=gates_GEC.reshape(-1).to(x_GSD.dtype),
            kept=torch.ones(G * E * C, dtype=torch.bool, device=x_GSD.device),
            slot=slot.reshape(-1),
            probs_GSE=logits.softmax(dim=-1),
            logits_GSE=logits,
            capacity=C,
            aux_losses=aux_losses,
            aux_loss=aux,
            top_k=0,
        )


class SoftRouter(nn.Module):
    """Soft MoE (Puigcerver et al. 2024): logits L = scale * <x/|x|, phi/|phi|> for E*P slots.

    ``weight`` (E*P, D) holds phi (slot-major per expert: rows e*P .. e*P+P-1 belong to expert e) and
    ``scale`` (init 1.0) the learned temperature. Dispatch = softmax over the group's tokens, combine =
    softmax over all slots. The group is one image's tokens by default. No aux loss.
    """

    def __init__(self, dim: int, num_experts: int, *, slots_per_expert: int = 1, noise_std: float = 0.0,
                 z_loss_weight: float = 0.0, init_std: float | None = None):
        super().__init__()
        if slots_per_expert < 1:
            raise ConfigError(f"slots_per_expert must be >= 1, got {slots_per_expert}")
        self.dim, self.num_experts, self.slots_per_expert = dim, num_experts, slots_per_expert
        self.weight = nn.Parameter(torch.empty(num_experts * slots_per_expert, dim))
        self.scale = nn.Parameter(torch.ones(()))
        self.noise_std, self.z_loss_weight, self.init_std = noise_std, z_loss_weight, init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std if self.init_std is not None else 1.0 / math.sqrt(self.dim))
        nn.init.ones_(self.scale)

    def forward(self, x_GSD: torch.Tensor) -> SoftRoutingPlan:
        x = _fp32(x_GSD)
        x_hat = x * torch.rsqrt(x.square().sum(-1, keepdim=True) + 1e-6)
        w = _fp32(self.weight)
        w_hat = w * torch.rsqrt(w.square().sum(-1, keepdim=True) + 1e-6)
        logits = self.scale * (x_hat @ w_hat.t())  # (G, S, P)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        aux_losses = {"z": L.z_loss(logits)} if self.z_loss_weight else {}
        aux = self.z_loss_weight * aux_losses["z"] if aux_losses else logits.new_zeros(())
        return SoftRoutingPlan(
            dispatch_GSP=logits.softmax(dim=1),
            combine_GSP=logits.softmax(dim=2),
            logits_GSP=logits,
            slots_per_expert=self.slots_per_expert,
            aux_losses=aux_losses,
            aux_loss=aux,
        )


class RandomRouter(nn.Module):
    """Parameter-free routing with weight-1 gates: random uniform partition (EWA) or hash by position.

    ``mode="random"``: in training each group's tokens are shuffled and split into E contiguous chunks of
    sizes floor(S/E) or ceil(S/E) (EWA's random uniform partition; balanced, nothing dropped). In
    evaluation the partition is deterministic by default (``eval_mode="hash"``), so eval is repeatable;
    ``eval_mode="random"`` keeps the random partition (EWA ablation). ``mode="hash"``: token s of a group
    goes to expert s mod E, always.
    """

    def __init__(self, num_experts: int, *, mode: str = "random", eval_mode: str = "hash"):
        super().__init__()
        if mode not in ("random", "hash"):
            raise ConfigError(f"random router mode must be 'random' or 'hash', got {mode!r}")
        if eval_mode not in ("random", "hash"):
            raise ConfigError(f"eval_mode must be 'random' or 'hash', got {eval_mode!r}")
        self.num_experts, self.mode, self.eval_mode = num_experts, mode, eval_mode

    def forward(self, x_GSD: torch.Tensor) -> RoutingPlan:
        G, S, _ = x_GSD.shape
        E, dev = self.num_experts, x_GSD.device
        mode = self.mode if self.training else (self.eval_mode if self.mode == "random" else "hash")
        pos = torch.arange(S, device=dev)
        if mode == "random":
            perm = torch.rand(G, S, device=dev).argsort(dim=1)  # perm[g, i] = token in rank i
            chunk = (pos * E) // S  # rank i -> expert, contiguous chunks of floor/ceil(S/E)
            expert = torch.empty(G, S, dtype=torch.long, device=dev).scatter_(1, perm, chunk.expand(G, S))
        else:
            expert = (pos % E).expand(G, S)
        probs = torch.full((G, S, E), 1.0 / E, device=dev, dtype=_fp32(x_GSD).dtype)
        token = pos.view(1, S) + _group_offsets(G, S, dev)
        return RoutingPlan(
            token_idx=token.reshape(-1),
            expert_idx=expert.reshape(-1),
            gates=torch.ones(G * S, dtype=x_GSD.dtype, device=dev),
            kept=torch.ones(G * S, dtype=torch.bool, device=dev),
            slot=None,
            probs_GSE=probs,
            logits_GSE=torch.zeros_like(probs),
            capacity=None,
            aux_losses={},
            aux_loss=probs.new_zeros(()),
            top_k=1,
        )
