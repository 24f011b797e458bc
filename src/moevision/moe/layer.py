"""``moevision.MoE``: router -> dispatch -> experts -> combine, one layer for every routing scheme.

Routers: ``topk`` (token choice: V-MoE, Switch, GShard, Mixtral), ``expert_choice`` (Zhou et al. 2022),
``soft`` (Soft MoE, Puigcerver et al. 2024), ``random`` (EWA's random uniform partition, Huang et al.
2023) and ``hash`` (deterministic by token position). The dispatch implementation is chosen by name
(``impl``); all of them compute the same function (tests hold them equal).

Shape legend: T tokens, D width, F hidden, E experts, K top-k, G routing groups, S tokens per group,
P soft-MoE slots.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn as nn

from .. import kernels as _kernels
from ..errors import ConfigError
from . import losses as L
from .dispatch import get_dispatch
from .experts import EXPERT_ACTIVATIONS, Experts
from .router import ExpertChoiceRouter, RandomRouter, SoftRouter, TopKRouter
from .types import MoEOutput, RoutingPlan, RoutingStats, SoftRoutingPlan

ROUTERS = ("topk", "expert_choice", "soft", "random", "hash")
_SAME = ...  # sentinel: eval capacity factor defaults to the training one
_DEFAULT_NOISE = {"topk": 1.0, "expert_choice": 0.0, "soft": 0.0}


def _check_factor(name: str, value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f"{name} must be > 0 or None (dropless), got {value!r}")


class MoE(nn.Module):
    """A sparse Mixture-of-Experts FFN.

    Args (defaults follow V-MoE unless stated):
        dim, hidden_dim: width D and expert hidden width F.
        num_experts: E.  top_k: K, experts per token (``topk`` router only; 1 <= K <= E).
        router: one of ``ROUTERS``.
        capacity_factor: training capacity factor c; None = dropless (no token is dropped). For
            ``expert_choice`` it is the average number of experts per token (None -> 1.0).
        eval_capacity_factor: capacity factor in eval mode; defaults to ``capacity_factor``.
        normalize_topk: renormalise the selected K gates to sum to 1 (Mixtral). Default False (V-MoE).
        activation: expert activation, ``gelu`` (exact), ``gelu_tanh``, ``relu``, ``silu`` or ``swiglu``.
        bias: expert biases (ViT-style experts True; SwiGLU experts must use False).
    Keyword-only options:
        normalize_after_drop: zero dropped gates before renormalising (DeepSpeed/MoE-LLaVA) instead of
            after (Tutel). Default False.
        softmax_order: ``before_topk`` (softmax over all E, then top-k; default) or ``after_topk``
            (softmax over the K selected logits, Mixtral's formulation).
        noise_std: router logit noise in training: for ``topk`` and ``expert_choice`` its std is
            ``noise_std / E`` (V-MoE: 1.0); for ``soft`` it is ``noise_std`` itself (vmoe's SoftRouter).
            None = the router's default (topk 1.0, expert_choice 0.0, soft 0.0). Never applied in eval.
        batch_priority: Batch Prioritized Routing (fill buffers by router confidence). Default False.
        bpr_score: ``max`` (max gate, default) or ``sum`` (sum of top-k gates) as BPR priority [R].
        capacity_mode / capacity_multiple_of: ``ceil`` and 4 (V-MoE); ``round`` and 1 for the Soft MoE
            paper's expert-choice comparisons.
        group_size: tokens per routing group (V-MoE routes groups independently; capacity is per
            group). None = all tokens of the call form one group, except ``soft``, whose group is one
            image (the second-to-last input axis).
        slots_per_expert: Soft MoE slots per expert (default 1, the JFT configs). Soft MoE has no
            capacity factor: vmoe's ``p = round(m * c / E)`` for m tokens per image is this number, which
            the parameters' shape needs at construction (a ``capacity_factor`` given with ``soft`` is
            ignored with a warning).
        importance_loss_weight, load_loss_weight: V-MoE aux losses (0.005 each; load needs noise > 0).
        load_threshold: the load loss's threshold: ``kth`` (vmoe: the k-th largest noisy logit, default) or
            ``shazeer_in_out`` (Shazeer et al. 2017 / M³ViT / ShiftAddViT: the (k+1)-th for the experts already
            in the top-k); ``topk`` router only. See ``moe.losses.prob_in_top_k``.
        importance_on: ``probs`` (V-MoE: CV² of the summed clean softmax, default) or ``gates`` (Shazeer
            et al. 2017 / M³ViT: CV² of the summed sparse top-k gates; ``topk`` router only).
        router_logits: ``linear`` (x @ W^T, default) or ``cosine`` (SwinV2-MoE / Tutel ``cosine_top``:
            a scaled cosine between a ``cosine_dim``-wide projection of x and each expert's vector, scale
            learnable and clamped at 100; ``topk`` router only).
        second_expert_noise: ``none`` (default) or ``gumbel`` (DeepSpeed / MoE-LLaVA top-2: choices 2..K
            sampled by the Gumbel-max trick on the logits, the first kept the argmax; ``topk`` router,
            K >= 2). In training only unless ``second_expert_noise_in_eval`` (older DeepSpeed). See
            ``TopKRouter``.
        switch_loss_weight: Switch/GShard balance loss weight (0). z_loss_weight: router z-loss (0).
        switch_use_all_k: count all top-k choices in the Switch loss's f_e (default: top-1 only).
        random_eval_mode: ``random`` router in eval: ``hash`` (deterministic, default) or ``random``.
        expert_init: ``independent`` (default) or ``shared`` (V-MoE: identical experts at init).
        router_init_std: router weight init std; None = LeCun normal 1/sqrt(D) (vmoe).
        impl: dispatch implementation (see ``moevision.kernels``): ``auto`` (default: ``set_impl``'s
            choice, else ``cpu_fused`` on CPU, ``fused`` on CUDA where ``torch._grouped_mm`` runs, else
            ``sorted``), ``cpu_fused``, ``fused``, ``grouped``, ``sorted``, ``padded``, or the
            references ``einsum`` and ``loop``.
        check_finite: raise ValueError on non-finite input (costs a sync; off by default).
        record_routing: put per-token expert ids and gates in ``stats`` (for analytics).
        num_tasks, task_routing, task_embed_dim, task_init_std: task-dependent routing (M³ViT, ``topk``
            router only): ``task_routing`` ``none`` (default), ``multi_gate`` (a gate per task) or
            ``task_conditioned`` (one gate on the token and the task id); ``forward`` then needs ``task``.
            See ``TopKRouter``.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int = 1,
        *,
        router: str = "topk",
        capacity_factor: float | None = None,
        eval_capacity_factor=_SAME,
        normalize_topk: bool = False,
        activation: str = "gelu",
        bias: bool = True,
        normalize_after_drop: bool = False,
        softmax_order: str = "before_topk",
        noise_std: float | None = None,
        batch_priority: bool = False,
        bpr_score: str = "max",
        capacity_mode: str = "ceil",
        capacity_multiple_of: int | None = 4,
        group_size: int | None = None,
        slots_per_expert: int = 1,
        importance_loss_weight: float = 0.005,
        load_loss_weight: float = 0.005,
        switch_loss_weight: float = 0.0,
        switch_use_all_k: bool = False,
        z_loss_weight: float = 0.0,
        random_eval_mode: str = "hash",
        expert_init: str = "independent",
        router_init_std: float | None = None,
        impl: str = "auto",
        check_finite: bool = False,
        record_routing: bool = False,
        num_tasks: int = 0,
        task_routing: str = "none",
        task_embed_dim: int | None = None,
        task_init_std: float | None = None,
        importance_on: str = "probs",
        router_logits: str = "linear",
        cosine_dim: int = 256,
        second_expert_noise: str = "none",
        second_expert_noise_in_eval: bool = False,
        load_threshold: str = "kth",
    ):
        super().__init__()
        for name, v in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if router not in ROUTERS:
            raise ConfigError(f"unknown router {router!r}; choose one of {ROUTERS}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k must be in [1, num_experts={num_experts}], got {top_k!r}")
        if activation not in EXPERT_ACTIVATIONS:
            raise ConfigError(f"activation must be one of {EXPERT_ACTIVATIONS}, got {activation!r}")
        if eval_capacity_factor is _SAME:
            eval_capacity_factor = capacity_factor
        _check_factor("capacity_factor", capacity_factor)
        _check_factor("eval_capacity_factor", eval_capacity_factor)
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ConfigError(f"group_size must be a positive integer or None, got {group_size!r}")
        for name, w in (("importance_loss_weight", importance_loss_weight), ("load_loss_weight", load_loss_weight),
                        ("switch_loss_weight", switch_loss_weight), ("z_loss_weight", z_loss_weight)):
            if w < 0:
                raise ConfigError(f"{name} must be >= 0, got {w!r}")
        if noise_std is not None and noise_std < 0:
            raise ConfigError(f"noise_std must be >= 0, got {noise_std!r}")
        if impl != "auto":
            get_dispatch(impl)  # validates the name
        if router == "soft" and (capacity_factor is not None or eval_capacity_factor is not None):
            c = capacity_factor if capacity_factor is not None else eval_capacity_factor
            warnings.warn(f"router='soft' ignores capacity_factor={c!r}: a Soft MoE layer's capacity is its "
                          f"slots_per_expert={slots_per_expert} (vmoe's p = round(m * c / E) for m tokens per "
                          f"image; pass slots_per_expert=p for that)", stacklevel=2)
        noise = _DEFAULT_NOISE.get(router, 0.0) if noise_std is None else noise_std
        if router_logits != "linear" and router != "topk":
            raise ConfigError(f"router_logits={router_logits!r} needs router='topk', got router={router!r}")
        if load_threshold != "kth" and router != "topk":
            raise ConfigError(f"load_threshold={load_threshold!r} needs router='topk', got router={router!r}")
        if importance_on != "probs" and router != "topk":
            raise ConfigError(f"importance_on={importance_on!r} needs router='topk', got router={router!r}")
        if second_expert_noise != "none" and (router != "topk" or top_k < 2):
            raise ConfigError(f"second_expert_noise={second_expert_noise!r} picks the 2nd..K-th experts of the 'topk' "
                              f"router: it needs router='topk' and top_k >= 2, got router={router!r}, top_k={top_k}")
        if (task_routing != "none" or num_tasks) and router != "topk":
            raise ConfigError(f"task_routing={task_routing!r} needs router='topk', got router={router!r}")

        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.router_name, self.group_size, self.impl = router, group_size, impl
        self.check_finite, self.record_routing = check_finite, record_routing
        if router == "topk":
            self.router = TopKRouter(
                dim, num_experts, top_k, capacity_factor=capacity_factor,
                eval_capacity_factor=eval_capacity_factor, normalize_topk=normalize_topk,
                normalize_after_drop=normalize_after_drop, softmax_order=softmax_order, noise_std=noise,
                batch_priority=batch_priority, bpr_score=bpr_score, capacity_mode=capacity_mode,
                capacity_multiple_of=capacity_multiple_of, importance_loss_weight=importance_loss_weight,
                load_loss_weight=load_loss_weight, switch_loss_weight=switch_loss_weight,
                switch_use_all_k=switch_use_all_k, z_loss_weight=z_loss_weight, init_std=router_init_std,
                num_tasks=num_tasks, task_routing=task_routing, task_embed_dim=task_embed_dim,
                task_init_std=task_init_std, importance_on=importance_on, logits=router_logits,
                cosine_dim=cosine_dim, second_expert_noise=second_expert_noise, load_threshold=load_threshold,
                second_expert_noise_in_eval=second_expert_noise_in_eval)
        elif router == "expert_choice":
            self.router = ExpertChoiceRouter(
                dim, num_experts, capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                noise_std=noise, capacity_mode=capacity_mode, capacity_multiple_of=capacity_multiple_of,
                z_loss_weight=z_loss_weight, init_std=router_init_std)
        elif router == "soft":
            self.router = SoftRouter(dim, num_experts, slots_per_expert=slots_per_expert, noise_std=noise,
                                     z_loss_weight=z_loss_weight, init_std=router_init_std)
        else:
            self.router = RandomRouter(num_experts, mode=router if router == "hash" else "random",
                                       eval_mode=random_eval_mode)
        self.experts = Experts(num_experts, dim, hidden_dim, activation=activation, bias=bias, init=expert_init)

    def extra_repr(self) -> str:
        task = f", task_routing={self.task_routing}, num_tasks={self.num_tasks}" if self.task_aware else ""
        return f"router={self.router_name}, top_k={self.top_k}, impl={self.impl}{task}"

    @property
    def task_routing(self) -> str:
        return getattr(self.router, "task_routing", "none")

    @property
    def num_tasks(self) -> int:
        return getattr(self.router, "num_tasks", 0)

    @property
    def task_aware(self) -> bool:
        """True when routing depends on a task id (``forward`` then needs ``task``)."""
        return self.task_routing != "none"

    def _task(self, task, lead, G: int, S: int):
        """The task id as an int (one task for the whole call) or a (G, S) int64 tensor (one per token)."""
        if not self.task_aware:
            raise ConfigError("task= was given but this layer does not route by task "
                              "(set task_routing='multi_gate' or 'task_conditioned')")
        if task is None:
            raise ValueError(f"this layer routes by task (task_routing={self.task_routing!r}); pass task=<id>")
        n = self.num_tasks
        if isinstance(task, bool) or (isinstance(task, torch.Tensor) and task.dtype == torch.bool):
            raise ValueError("task must be an integer task id (or an integer tensor), got a bool")
        if isinstance(task, torch.Tensor) and task.dim() == 0:
            task = int(task)
        if isinstance(task, int):
            if not 0 <= task < n:
                raise ValueError(f"task must be in [0, num_tasks={n}), got {task}")
            return task
        if not isinstance(task, torch.Tensor) or task.dtype.is_floating_point or task.dtype == torch.bool:
            raise ValueError(f"task must be an int or an integer tensor, got {type(task).__name__}"
                             f"{'' if not isinstance(task, torch.Tensor) else ' of dtype ' + str(task.dtype)}")
        lead = tuple(lead)
        if tuple(task.shape) != lead[:task.dim()]:
            raise ValueError(f"task must have shape {lead} or a prefix of it (e.g. one id per sample, "
                             f"{lead[:1]}), got {tuple(task.shape)}")
        if task.device.type == "cpu" and task.numel() and not (0 <= int(task.min()) and int(task.max()) < n):
            raise ValueError(f"task ids must be in [0, num_tasks={n}), got ids in "
                             f"[{int(task.min())}, {int(task.max())}]")
        t = task.to(device=self.router.weight.device, dtype=torch.long)
        t = t.reshape(task.shape + (1,) * (len(lead) - task.dim())).expand(lead)
        return t.reshape(G, S)

    def _groups(self, x: torch.Tensor, T: int) -> tuple[int, int]:
        S = self.group_size
        if S is None:
            S = x.shape[-2] if (self.router_name == "soft" and x.dim() >= 3) else T
        if T % S:
            raise ConfigError(f"group_size={S} does not divide the {T} tokens of this batch; "
                              f"use a batch whose token count is a multiple of it")
        return T // S, S

    def forward(self, x: torch.Tensor, expert_mask: torch.Tensor | None = None, task=None) -> MoEOutput:
        """``expert_mask`` (optional, bool, shape ``x.shape[:-1] + (E,)``, True = allowed): the experts each
        token may be routed to (MoMa-style modality groups; ``topk`` router only). ``task`` (layers with
        task-dependent routing only, and then required): an int, one task for every token, or an integer
        tensor of shape ``x.shape[:-1]`` or a prefix of it (e.g. (B,), one task per sample). CPU task tensors
        are range-checked; on a GPU that check would be a host sync, so it is skipped."""
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE input width must be dim={self.dim}, got input of shape {tuple(x.shape)}")
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError("MoE input contains NaN or Inf values (check_finite=True)")
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, self.dim)
        T = x_TD.shape[0]
        G, S = self._groups(x, T)
        if task is not None or self.task_aware:
            task_kw = {"task": self._task(task, lead, G, S)}
        else:
            task_kw = {}
        impl = _kernels.resolve_impl(self.impl, x_TD, self.experts)
        if expert_mask is None and not task_kw and self.router_name == "topk" and impl == "cpu_fused":
            fused = _kernels.topk_moe_fused(self, x_TD, G, S)
            if fused is not None:  # cpu_fused with the router in the same autograd node (kernels/cpu.py)
                out, plan = fused
                return MoEOutput(out=out.view(*lead, self.dim), aux_loss=plan.aux_loss,
                                 stats=self._stats(plan, T, lead))
        if expert_mask is None:
            plan = self.router(x_TD.view(G, S, self.dim), **task_kw)
        else:
            if self.router_name != "topk":
                raise ConfigError(f"expert_mask needs router='topk', this layer has router={self.router_name!r}")
            if tuple(expert_mask.shape) != tuple(lead) + (self.num_experts,):
                raise ValueError(f"expert_mask must have shape {tuple(lead) + (self.num_experts,)}, "
                                 f"got {tuple(expert_mask.shape)}")
            plan = self.router(x_TD.view(G, S, self.dim), expert_mask.reshape(G, S, self.num_experts).bool(),
                               **task_kw)
        if isinstance(plan, SoftRoutingPlan):
            out, stats = self._soft(x_TD.view(G, S, self.dim), plan, lead)
        else:
            x_d = x_TD if plan.dispatch_x is None else plan.dispatch_x  # the same values (see RoutingPlan)
            out = get_dispatch(impl)(x_d, plan, self.experts, num_groups=G, group_size=S)
            plan.dispatch_x = None  # the lazy stats keep the plan: not x with it (it would outlive the backward)
            stats = self._stats(plan, T, lead)
        return MoEOutput(out=out.view(*lead, self.dim), aux_loss=plan.aux_loss, stats=stats)

    def _soft(self, x_GSD: torch.Tensor, plan: SoftRoutingPlan, lead=None):
        G, S, D = x_GSD.shape
        E, p = self.num_experts, plan.slots_per_expert
        disp, comb = plan.dispatch_GSP.to(x_GSD.dtype), plan.combine_GSP.to(x_GSD.dtype)
        slots_GPD = torch.einsum("gsp,gsd->gpd", disp, x_GSD)  # slots from the un-normalised input
        x_ECD = slots_GPD.view(G, E, p, D).transpose(0, 1).reshape(E, G * p, D)
        y_GPD = self.experts.forward_padded(x_ECD).view(E, G, p, D).transpose(0, 1).reshape(G, E * p, D)
        out = torch.einsum("gsp,gpd->gsd", comb, y_GPD).reshape(G * S, D)
        with torch.no_grad():
            cw = plan.combine_GSP.view(G, S, E, p).sum(-1)  # (G, S, E) combine mass per expert
            zero = cw.new_zeros(())
            stats = RoutingStats(
                tokens_per_expert=cw.sum(dim=(0, 1)), dropped_fraction=zero, dropped_token_fraction=zero,
                router_entropy=L.router_entropy(cw), importance=cw.sum(dim=(0, 1)),
                aux_losses={k: v.detach() for k, v in plan.aux_losses.items()}, capacity=p)
            if self.record_routing and lead is not None:
                stats.gates = stats.probs = cw.reshape(*lead, E)
                stats.dispatch = plan.dispatch_GSP.detach().view(G, S, E, p).sum(-1).reshape(*lead, E)
        return out, stats

    def _stats(self, plan: RoutingPlan, T: int, lead) -> RoutingStats:
        """Statistics computed on first access (a training step that does not read them launches no
        kernel for them: on a GPU the layer's time is otherwise partly spent launching tiny ops). Under
        ``torch.compile`` they are computed in the graph (fused there, and dynamo cannot trace the lazy
        object)."""
        if torch.compiler.is_compiling():
            return self._compute_stats(plan, T, lead)
        return _LazyRoutingStats(lambda: self._compute_stats(plan, T, lead))

    @torch.no_grad()
    def _compute_stats(self, plan: RoutingPlan, T: int, lead) -> RoutingStats:
        E = self.num_experts
        kept = plan.kept.float()
        tpe = torch.zeros(E, device=kept.device, dtype=kept.dtype).scatter_add_(0, plan.expert_idx, kept)
        per_token = torch.zeros(T, device=kept.device, dtype=kept.dtype).scatter_add_(0, plan.token_idx, kept)
        dropped_tokens = (per_token == 0).float().mean()
        # expert choice drops no assignment; the tokens nobody picked are its dropped ones
        dropped = dropped_tokens if plan.top_k == 0 else 1.0 - kept.mean()
        expert_idx = gates = kept_k = probs = None
        if self.record_routing:
            probs = plan.probs_GSE.detach().reshape(*lead, E)
            if plan.top_k > 0:
                expert_idx = plan.expert_idx.view(*lead, plan.top_k)
                gates = plan.gates.detach().view(*lead, plan.top_k)
                kept_k = plan.kept.view(*lead, plan.top_k)
            else:  # expert choice: dense (T, E) combine weights
                dense = torch.zeros(T, E, device=kept.device, dtype=plan.gates.dtype)
                dense.index_put_((plan.token_idx, plan.expert_idx), plan.gates.detach(), accumulate=True)
                gates = dense.view(*lead, E)
        return RoutingStats(
            tokens_per_expert=tpe, dropped_fraction=dropped, dropped_token_fraction=dropped_tokens,
            router_entropy=L.router_entropy(plan.probs_GSE), importance=plan.probs_GSE.sum(dim=(0, 1)),
            aux_losses={k: v.detach() for k, v in plan.aux_losses.items()}, capacity=plan.capacity,
            expert_idx=expert_idx, gates=gates, kept=kept_k, probs=probs)


class _LazyRoutingStats(RoutingStats):
    """A ``RoutingStats`` whose fields are computed by ``compute()`` when one is first read (fields with
    class-level defaults are intercepted too, hence ``__getattribute__``)."""

    def __init__(self, compute):  # noqa: D107 - deliberately skips the dataclass __init__
        object.__setattr__(self, "_compute", compute)

    def __getattribute__(self, name):
        d = object.__getattribute__(self, "__dict__")
        if "_compute" in d and name in _STATS_FIELDS:
            full = d.pop("_compute")()
            for k, v in full.__dict__.items():  # fields assigned before the first read win
                d.setdefault(k, v)
        return object.__getattribute__(self, name)


_STATS_FIELDS = frozenset(f.name for f in dataclasses.fields(RoutingStats))
