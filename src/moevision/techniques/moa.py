"""Mixture of attention-head experts (MoA) as Mod-Squad uses it (Chen et al., CVPR 2023; vision_moe.md §14,
[V] Mod-Squad ``mtvit_taskgate_att_mlp_base_MI_twice``; MoA itself: Zhang et al., EMNLP 2022).

E attention experts, each a query projection ``W_q^e: D -> Dh`` and an output projection ``W_o^e: Dh -> D``,
share one single-head key/value projection ``D -> 2·Dh`` (multi-query style). Each token selects its top-k
experts as its heads (k = ``num_heads`` by default); every selected expert attends with the token's query
over the shared keys and values, and the outputs are summed with the gate weights. Mod-Squad defaults:
E = 2·num_heads, Dh = 2·D / num_heads, k = num_heads.

Router (Mod-Squad's task gate): a linear map without bias, **zero-initialised**, one per task when the
model routes by task (``num_tasks`` > 0; task t uses ``router.weight[t]``); ``probs = softmax(logits) + 1e-4``
and the combine weights are those probs at the top-k, **not** renormalised. So with zero routers every
head's output is scaled by 1/E + 1e-4 at the start.

Losses: the router probabilities are what Mod-Squad's task-expert mutual-information loss accumulates
(``MultiTaskViT(mi_weight=...)`` collects them from ``MoAAttention.router``); an optional Switch-style
balance loss (``switch_loss_weight``, 0 in Mod-Squad's MI config) is returned as the aux loss.

This is a reference computation: all E queries and all E attention maps are computed and unselected
experts get gate 0 (as MoH here and the masked MoA implementations), so it saves no FLOPs; the analytic
``active_flops`` counts what a sparse implementation would run.

Shape legend: B batch, N tokens, D width, E experts, K selected experts, Dh expert head width, T tasks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..moe.types import MoEOutput, RoutingStats


class MoARouter(nn.Module):
    """Zero-initialised linear gate (no bias), one weight per task: ``weight`` is (T, E, D) with tasks,
    (1, E, D) without. Returns ``softmax(x W_t^T) + eps`` (B, N, E) in fp32."""

    def __init__(self, dim: int, num_experts: int, num_tasks: int = 0, eps: float = 1e-4):
        super().__init__()
        self.num_tasks, self.eps = num_tasks, eps
        self.weight = nn.Parameter(torch.zeros(max(num_tasks, 1), num_experts, dim))

    def forward(self, x_BND: torch.Tensor, task=None) -> torch.Tensor:
        if self.num_tasks:
            if task is None:
                raise ValueError(f"this MoA layer routes by task ({self.num_tasks} tasks); pass task=<id>")
            t = torch.as_tensor(task, device=x_BND.device)
            if t.dtype == torch.bool or t.is_floating_point() or t.dim() > 1:
                raise ValueError(f"task must be an int or a (B,) integer tensor, got {task!r}")
            if bool(((t < 0) | (t >= self.num_tasks)).any()):
                raise ValueError(f"task ids must be in [0, {self.num_tasks}), got {t.tolist()}")
            w = self.weight[t].float()  # (E, D) or (B, E, D)
        else:
            if task is not None:
                raise ValueError("task= was given but this MoA layer has a single router (num_tasks=0)")
            w = self.weight[0].float()
        logits = x_BND.float() @ w.transpose(-1, -2) if w.dim() == 3 else x_BND.float() @ w.T
        return logits.softmax(-1) + self.eps


class MoAAttention(nn.Module):
    """Mixture of attention-head experts with a shared single-head K/V (Mod-Squad's MoA).
    ``num_experts`` (default 2·num_heads), ``top_k`` (default num_heads), ``head_dim`` (default
    2·dim/num_heads); ``num_tasks`` > 0 gives a router per task (the ViT passes its ``num_tasks`` when it
    routes by task)."""

    accepts_tasks = True  # the ViT hands the forward pass's task id to it and its num_tasks to the constructor

    def __init__(self, dim: int, num_heads: int = 8, *, num_experts: int | None = None, top_k: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 num_tasks: int = 0, prob_eps: float = 1e-4, switch_loss_weight: float = 0.0):
        super().__init__()
        E = 2 * num_heads if num_experts is None else num_experts
        K = num_heads if top_k is None else top_k
        Dh = 2 * dim // num_heads if head_dim is None else head_dim
        for name, v in (("num_experts", E), ("top_k", K), ("head_dim", Dh)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"moa {name} must be a positive integer, got {v!r}")
        if K > E:
            raise ConfigError(f"moa top_k={K} must be <= num_experts={E}")
        if not isinstance(num_tasks, int) or num_tasks < 0:
            raise ConfigError(f"moa num_tasks must be an integer >= 0, got {num_tasks!r}")
        if prob_eps < 0 or switch_loss_weight < 0:
            raise ConfigError(f"moa prob_eps and switch_loss_weight must be >= 0, got {prob_eps}, {switch_loss_weight}")
        self.dim, self.num_experts, self.top_k, self.head_dim = dim, E, K, Dh
        self.num_tasks, self.switch_loss_weight = num_tasks, switch_loss_weight
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)
        self.q_weight = nn.Parameter(torch.empty(E, dim, Dh))
        self.q_bias = nn.Parameter(torch.zeros(E, Dh)) if qkv_bias else None
        self.kv = nn.Linear(dim, 2 * Dh, bias=qkv_bias)
        self.o_weight = nn.Parameter(torch.empty(E, Dh, dim))
        self.o_bias = nn.Parameter(torch.zeros(dim))
        self.router = MoARouter(dim, E, num_tasks, prob_eps)
        nn.init.trunc_normal_(self.q_weight, std=0.02)
        nn.init.trunc_normal_(self.o_weight, std=0.02)

    @property
    def task_aware(self) -> bool:
        return self.num_tasks > 0

    def forward(self, x_BND: torch.Tensor, task=None) -> MoEOutput:
        B, N, D = x_BND.shape
        E, K = self.num_experts, self.top_k
        probs = self.router(x_BND, task)  # (B, N, E)
        top_p, top_i = probs.topk(K, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p)  # not renormalised (Mod-Squad)
        q = torch.einsum("bnd,edh->bneh", x_BND, self.q_weight)
        if self.q_bias is not None:
            q = q + self.q_bias
        k, v = self.kv(x_BND).chunk(2, dim=-1)  # (B, N, Dh) each: one shared head
        q = q.permute(0, 2, 1, 3)  # (B, E, N, Dh)
        kx, vx = k.unsqueeze(1).expand(B, E, N, self.head_dim), v.unsqueeze(1).expand(B, E, N, self.head_dim)
        o = F.scaled_dot_product_attention(q, kx, vx, dropout_p=self.attn_drop if self.training else 0.0)
        o = o.permute(0, 2, 1, 3) * gates.to(o.dtype).unsqueeze(-1)  # (B, N, E, Dh), unselected -> 0
        out = self.proj_drop(torch.einsum("bneh,ehd->bnd", o, self.o_weight) + self.o_bias)
        zero = x_BND.new_zeros((), dtype=torch.float32)
        losses = {}
        mask = (gates > 0).float()
        f, p = mask.mean(dim=(0, 1)) / K, probs.mean(dim=(0, 1))
        losses["switch"] = E * (f * p).sum()  # 1 at perfect balance
        aux = self.switch_loss_weight * losses["switch"] if (self.training and self.switch_loss_weight) else zero
        with torch.no_grad():
            ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
            stats = RoutingStats(tokens_per_expert=mask.sum(dim=(0, 1)), dropped_fraction=zero,
                                 dropped_token_fraction=zero, router_entropy=ent, importance=probs.sum(dim=(0, 1)),
                                 aux_losses={k2: v2.detach() for k2, v2 in losses.items()})
        return MoEOutput(out=out, aux_loss=aux, stats=stats)

    def active_flops(self, num_tokens: int) -> int:
        """Multiply-adds x 2 of a sparse implementation for ``num_tokens`` tokens of one image: router,
        K queries and K output projections per token, the shared K/V, and K attention maps."""
        N, D, Dh, K, E = num_tokens, self.dim, self.head_dim, self.top_k, self.num_experts
        macs = N * D * E + N * K * D * Dh * 2 + N * D * 2 * Dh + 2 * N * N * K * Dh
        return 2 * macs


def multi_query_reference(x_BND: torch.Tensor, q_weight_HDh, q_bias_H, kv: nn.Linear, o_weight_HhD, o_bias,
                          head_scale: float) -> torch.Tensor:
    """Plain multi-query attention (H query heads, one shared K/V head), each head's output scaled by
    ``head_scale``: the oracle MoA reduces to with E = k = heads and zero routers. Loops over heads."""
    k, v = kv(x_BND).chunk(2, dim=-1)
    out = o_bias.expand(*x_BND.shape[:2], -1).clone()
    for h in range(q_weight_HDh.shape[0]):
        q = x_BND @ q_weight_HDh[h] + (0 if q_bias_H is None else q_bias_H[h])
        a = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        out = out + head_scale * (a @ v) @ o_weight_HhD[h]
    return out


def _register() -> None:
    from ..layers import register_attention

    register_attention("moa", MoAAttention)


_register()
