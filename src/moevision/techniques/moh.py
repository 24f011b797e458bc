"""Mixture-of-Head attention (MoH; Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head
Attention", arXiv 2410.11842).

Heads are experts: ``shared_heads`` heads are always on, each token activates its top ``top_k`` of the
``num_heads - shared_heads`` routed heads, and head outputs are mixed by a learned weighted sum before
the output projection. Gates follow the official code (``gate_scaling="code"``, the default):
    g_routed = K * topk_renorm(softmax(W_r x)),  g_shared = h_s * softmax(W_s x),  [a1, a2] = 2 * softmax(W_h x)
    g = concat(a1 * g_shared, a2 * g_routed)
so zero router weights with K = h_r give g == 1 and MoH == MHA exactly (``from_mha`` starts there).
``gate_scaling="paper"`` drops the constants K, h_s and 2 (the paper's equation, [R]).
Head-balance loss on the routed heads: L_b = h_r * sum_i f_i P_i (f_i = fraction of tokens routing to
head i, P_i = mean router probability); it equals K at perfect balance. As in the reference training
engine (``0.01 * sum(LOSSES) / len(LOSSES)``) the model's loss term is ``balance_loss_weight`` (0.01)
times the MEAN of L_b over its MoH layers: each layer reports ``balance_loss_weight * L_b / aux_layers``,
where ``aux_layers`` (default 1, a standalone layer) is set by the ViT to its number of MoH layers.

This is the reference (masked) computation: every head is computed and inactive ones are zeroed, as in
the official code, so it saves no FLOPs.

Shape legend: B batch, N tokens, D width, H heads, Dh head width, Hs shared, Hr routed, K active routed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..moe.types import MoEOutput, RoutingStats


class MoHAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, *, shared_heads: int = 0, top_k: int = 0,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 gate_scaling: str = "code", balance_loss_weight: float = 0.01):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim={dim} must be divisible by num_heads={num_heads}")
        routed = num_heads - shared_heads
        if not 0 <= shared_heads <= num_heads:
            raise ConfigError(f"moh shared_heads must be in [0, num_heads={num_heads}], got {shared_heads}")
        if routed and not 1 <= top_k <= routed:
            raise ConfigError(f"moh top_k must be in [1, routed heads={routed}], got {top_k}")
        if gate_scaling not in ("code", "paper"):
            raise ConfigError(f"gate_scaling must be 'code' or 'paper', got {gate_scaling!r}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.shared_heads, self.routed_heads, self.top_k = shared_heads, routed, top_k if routed else 0
        self.gate_scaling, self.balance_loss_weight = gate_scaling, balance_loss_weight
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)
        self.wg_shared = nn.Linear(dim, shared_heads, bias=False) if shared_heads else None
        self.wg_routed = nn.Linear(dim, routed, bias=False) if routed else None
        self.wg_mix = nn.Linear(dim, 2, bias=False) if (shared_heads and routed) else None
        # number of MoH layers the balance loss is averaged over; the ViT sets it (not in the state dict)
        self.aux_layers = 1

    @classmethod
    def from_mha(cls, mha: nn.Module, **kw) -> "MoHAttention":
        """An MoH layer with ``mha``'s weights and zero router weights (== MHA when top_k = routed)."""
        dim = mha.qkv.in_features
        moh = cls(dim, mha.num_heads, qkv_bias=mha.qkv.bias is not None, attn_drop=mha.attn_drop, **kw)
        moh.qkv.load_state_dict(mha.qkv.state_dict())
        moh.proj.load_state_dict(mha.proj.state_dict())
        for lin in (moh.wg_shared, moh.wg_routed, moh.wg_mix):
            if lin is not None:
                nn.init.zeros_(lin.weight)
        return moh.to(mha.qkv.weight.device, mha.qkv.weight.dtype)

    def gates(self, x_BND: torch.Tensor):
        """Per-token head gates g (B, N, H), routed probabilities r and top-K mask (B, N, Hr)."""
        code = self.gate_scaling == "code"
        parts, r, mask = [], None, None
        if self.routed_heads and self.shared_heads:
            a = self.wg_mix(x_BND).float().softmax(-1) * (2.0 if code else 1.0)
        if self.shared_heads:
            gs = self.wg_shared(x_BND).float().softmax(-1)
            gs = gs * (self.shared_heads if code else 1.0)
            parts.append(gs * a[..., :1] if self.routed_heads else gs)
        if self.routed_heads:
            r = self.wg_routed(x_BND).float().softmax(-1)
            idx = r.topk(self.top_k, dim=-1).indices
            mask = torch.zeros_like(r).scatter_(-1, idx, 1.0)
            gr = r * mask
            if code:
                gr = self.top_k * gr / gr.sum(-1, keepdim=True).clamp_min(1e-9)
            parts.append(gr * a[..., 1:] if self.shared_heads else gr)
        return torch.cat(parts, dim=-1), r, mask

    def forward(self, x_BND: torch.Tensor) -> MoEOutput:
        B, N, D = x_BND.shape
        q, k, v = self.qkv(x_BND).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        g, r, mask = self.gates(x_BND)  # (B, N, H)
        o = o.transpose(1, 2) * g.to(o.dtype).unsqueeze(-1)  # (B, N, H, Dh) weighted heads
        out = self.proj_drop(self.proj(o.reshape(B, N, D)))
        zero = x_BND.new_zeros((), dtype=torch.float32)
        aux, losses = zero, {}
        if r is not None:
            f = mask.mean(dim=(0, 1))
            p = r.mean(dim=(0, 1))
            losses["head_balance"] = self.routed_heads * (f * p).sum()
            if self.training and self.balance_loss_weight:
                aux = self.balance_loss_weight * losses["head_balance"] / self.aux_layers
        with torch.no_grad():
            usage = mask.sum(dim=(0, 1)) if mask is not None else zero.new_zeros(0)
            stats = RoutingStats(tokens_per_expert=usage, dropped_fraction=zero, dropped_token_fraction=zero,
                                 router_entropy=zero, importance=r.sum(dim=(0, 1)) if r is not None else usage,
                                 aux_losses={k2: v2.detach() for k2, v2 in losses.items()})
        return MoEOutput(out=out, aux_loss=aux, stats=stats)


def _register() -> None:
    from ..layers import register_attention

    register_attention("moh", MoHAttention)


_register()
