"""Union of Experts (UoE): Yang, Lian & Li, "Union of Experts: Adapting Hierarchical Routing to Equivalently
Decomposed Transformer" (arXiv 2503.02495, 2025); vision_moe.md §13.

UoE cuts a dense transformer *exactly* into experts along tensor-parallel partitions and then routes at two
levels:

- ``DecomposedMLP``: the ViT MLP ``fc2(act(fc1 x))`` as n hidden-slice experts (column-parallel W1,
  row-parallel W2) whose outputs sum to the dense MLP (b2 added once). ``from_mlp`` loads a dense ``Mlp``.
- ``DecomposedMHA``: attention heads (or groups of heads) as experts; ``MHA(x) = sum_e W_O[:, e] Attn_e(x)
  + b_O``. ``from_attention`` loads a dense ``Attention`` (timm keys ``qkv``, ``proj``).
- ``UoME`` (Union of MLP Experts): **expert selection** (ES: each image picks its top-k of n experts with a
  sequence-level router, a linear layer on the image's flattened token sequence, as in the released
  ``UoME_ES`` code; ``router="mean"`` routes on the token mean instead) then **data selection** (DS: the
  patch tokens are cut into m contiguous token patches per image, and each selected expert keeps its top-c
  patches). Each selected expert runs on its patches and the partial outputs are **index-added** back to
  their token positions: a patch chosen by experts B and D gets B + D, a patch nobody chose gets 0 (the
  block's residual only).
- ``SMHA`` (Selective Multi-Head Attention): per token, a router ``softmax(W_g x)`` over the head experts
  keeps the top n/2 heads (``top_k``); each head attends only among the tokens routed to it, projects with
  its slice of W_O, and the head outputs are summed (scatter-add). SwitchGate normalisation (masked scores
  divided by their sum over the batch dimension, times ``int(capacity_factor * B)``) gives the gate values.
- ``uoe_vit``: a dense ``VisionTransformer`` converted by module replacement (``mlp`` -> UoME, optionally
  ``attn`` -> SMHA), dense weights loaded; with k = n, c = m (and SMHA keeping every head) and the default
  ``weight_by_prob=False`` it computes the dense model's function exactly.
- ``uome_flops`` / ``smha_flops``: analytic FLOPs (2 x multiply-adds; norms, softmaxes and activations left
  out, as everywhere in moevision). The expert term of UoME scales as (k/n)(c/m).

How the routers learn. In the released code (``UoME_ES.py``, ``UoME_DS.py``, ``SMHA_v3.py``) the router
probabilities reach the output only through ``topk`` indices: the selected experts are not multiplied by
their probabilities, the SwitchGate values are used for ordering only, and the auxiliary-loss branch is a
``pass``. So the routers get **no gradient** and stay at their initialisation (a fixed random, but
input-dependent, routing). That is the default here (``weight_by_prob=False, straight_through=False``), for
parity. Two options give them a gradient: ``weight_by_prob=True`` multiplies the outputs by the routing
weights w (changes the forward pass); ``straight_through=True`` keeps the forward pass of the code exactly
and multiplies by ``1 + w - sg(w)`` (sg = stop-gradient): value 1, and for a given upstream gradient the
routers receive exactly the gradient that ``weight_by_prob`` would give them. (A variant with the gradient
of log w, i.e. divided by w, was unstable in the §13(e) experiment and was dropped.)

Deviations and [R] details made explicit (each an option where it matters):

1. Exact decomposition by default; ``DecomposedMLP(input_split=True)`` is the released code's
   block-diagonal first layer (expert e maps ``x[..., slice_e]`` of width d/n to h/n), for parity; it is not
   a decomposition of a dense MLP, so ``from_mlp`` refuses it. The released RowParallel layer also adds a
   bias per expert (n copies of b2 in the union); here b2 is added once, to every token that at least one
   selected expert processed, so an unselected token gets exactly 0 and k = n, c = m gives the dense MLP.
2. DS scorer [R]: the image code is not released. Each patch is represented by the mean of its tokens; a
   linear layer gives one score per expert, softmax over the m patches (the patch-routing variant left
   commented in the released ``process_ds.py``); each selected expert takes its top-c patches. The LM code
   selects single tokens (c = l/2); here a patch is l_p = (N - prefix) / m consecutive patch tokens in
   row-major order (with 49 tokens and m = 7: one row of the 7x7 grid), so a patch never straddles images.
3. ``weight_by_prob=True`` weights expert e's output by its ES probability p_e and each patch by m·s_e,j
   (its DS score, scaled so that a uniform score is 1); SMHA by its gate value (SwitchGate-normalised with
   ``normalize="switch"``, which depends on the batch size as in the code, or the raw probability with
   ``normalize="none"``).
4. Prefix tokens (CLS): always processed by every selected expert of UoME (not subject to DS), so the class
   token is never skipped; in SMHA they are routed like any token. The sequence router needs the sequence
   length at construction (``seq_len``, prefix included); a mismatch, or a patch-token count that m does not
   divide, raises ``ConfigError`` naming the values.
5. SMHA: a head processes exactly its routed tokens. The code pads every (head, sequence) to the largest
   routed count with unrouted tokens (which then also get output); that padding is not reproduced. No RoPE
   (the ViT has learned positions), no causal mask. The reference implementation masks a full attention
   matrix (same function, not the sparse speed); FLOPs are counted for the routed tokens only.
6. Routers are ``nn.Linear`` with bias and PyTorch's default init, as in the code; no auxiliary loss (the
   code's is disabled), so ``aux_loss`` is 0. Dropout as in the dense modules.

Shape legend: B batch, N tokens per image (prefix included), D width, F hidden (Fe per expert), E experts
(n), K selected experts (k), M token patches per image (m), L tokens per patch (l_p), C patches kept per
expert (c), T tokens an expert processes per image (prefix + C·L), G heads per expert, Dh head width,
De = G·Dh.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..layers import Attention, Mlp
from ..models.vit import MLP_ACTS, Block, VisionTransformer
from ..moe import moe_layer_indices
from ..moe.types import MoEOutput, RoutingStats


def _positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def _act_name(act: nn.Module) -> str:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    for name, cls in (("relu", nn.ReLU), ("silu", nn.SiLU)):
        if isinstance(act, cls):
            return name
    raise ConfigError(f"activation {type(act).__name__} is not supported; use one of {tuple(MLP_ACTS)}")


# ---------------------------------------------------------------------------------------------------
# exact decompositions
class DecomposedMLP(nn.Module):
    """The ViT MLP as ``num_experts`` hidden slices: expert e = ``W2[:, H_e] act(W1[H_e] x + b1[H_e])``;
    ``forward`` sums all of them and adds b2 once (== the dense MLP). Weights are stacked, expert axis
    first: ``w1`` (E, D or D/E, Fe), ``b1`` (E, Fe), ``w2`` (E, Fe, D), ``b2`` (D,)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, *, activation: str = "gelu",
                 bias: bool = True, input_split: bool = False, drop: float = 0.0):
        super().__init__()
        for k, v in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            _positive_int(k, v)
        if hidden_dim % num_experts:
            raise ConfigError(f"num_experts={num_experts} must divide hidden_dim={hidden_dim}")
        if input_split and dim % num_experts:
            raise ConfigError(f"input_split=True needs num_experts={num_experts} to divide dim={dim}")
        if activation not in MLP_ACTS:
            raise ConfigError(f"activation={activation!r} must be one of {tuple(MLP_ACTS)}")
        E, Fe = num_experts, hidden_dim // num_experts
        d_in = dim // E if input_split else dim
        self.dim, self.hidden_dim, self.num_experts, self.input_split = dim, hidden_dim, E, input_split
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(E, d_in, Fe))
        self.w2 = nn.Parameter(torch.empty(E, Fe, dim))
        self.b1 = nn.Parameter(torch.zeros(E, Fe)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(dim)) if bias else None
        self.act = MLP_ACTS[activation]()
        self.drop = nn.Dropout(drop)
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)

    @classmethod
    def from_mlp(cls, mlp: Mlp, num_experts: int, *, input_split: bool = False) -> "DecomposedMLP":
        """The exact decomposition of a dense ``Mlp`` (fc1, act, fc2) into ``num_experts`` hidden slices."""
        if input_split:
            raise ConfigError("input_split=True (the released code's block-diagonal first layer) is not a "
                              "decomposition of a dense MLP; build DecomposedMLP(..., input_split=True) directly")
        if not isinstance(mlp, Mlp):
            raise ConfigError(f"from_mlp needs a dense moevision Mlp, got {type(mlp).__name__}")
        W1, W2 = mlp.fc1.weight, mlp.fc2.weight  # (F, D), (D, F)
        F_, D = W1.shape
        new = cls(D, F_, num_experts, activation=_act_name(mlp.act), bias=mlp.fc1.bias is not None,
                  drop=mlp.drop.p).to(device=W1.device, dtype=W1.dtype)
        E, Fe = num_experts, F_ // num_experts
        with torch.no_grad():
            new.w1.copy_(W1.view(E, Fe, D).transpose(1, 2))
            new.w2.copy_(W2.t().reshape(E, Fe, D))
            if new.b1 is not None:
                new.b1.copy_(mlp.fc1.bias.view(E, Fe))
                new.b2.copy_(mlp.fc2.bias)
        return new

    def partial(self, x_GTD: torch.Tensor, expert_G: torch.Tensor) -> torch.Tensor:
        """Expert ``expert_G[g]`` on the tokens ``x_GTD[g]``, without b2 and without the output dropout
        (the caller applies ``self.drop`` once to the sum + b2, as the dense MLP does): (G, T, D)."""
        x = x_GTD
        if self.input_split:
            G, T, _ = x.shape
            x = x.view(G, T, self.num_experts, -1)[torch.arange(G, device=x.device), :, expert_G]
        h = torch.bmm(x, self.w1[expert_G])
        if self.b1 is not None:
            h = h + self.b1[expert_G].unsqueeze(1)
        return torch.bmm(self.drop(self.act(h)), self.w2[expert_G])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every expert plus b2: the dense MLP (x: (..., D))."""
        xs = x.reshape(-1, self.dim)
        if self.input_split:
            h = torch.einsum("sed,edf->esf", xs.view(xs.shape[0], self.num_experts, -1), self.w1)
        else:
            h = torch.einsum("sd,edf->esf", xs, self.w1)
        if self.b1 is not None:
            h = h + self.b1.unsqueeze(1)
        y = torch.einsum("esf,efd->sd", self.drop(self.act(h)), self.w2)
        if self.b2 is not None:
            y = y + self.b2
        return self.drop(y).view(x.shape)


class DecomposedMHA(nn.Module):
    """Multi-head self-attention as ``num_experts`` groups of heads: ``forward(x) = sum_e expert_e(x) + b_o``
    (== the dense MHA). ``w_q``, ``w_k``, ``w_v`` (E, D, De), ``b_q`` ... (E, De), ``w_o`` (E, De, D),
    ``b_o`` (D,). ``heads(x, mask)`` restricts each expert's attention to its routed tokens."""

    def __init__(self, dim: int, num_heads: int, num_experts: int, *, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        for k, v in (("dim", dim), ("num_heads", num_heads), ("num_experts", num_experts)):
            _positive_int(k, v)
        if dim % num_heads:
            raise ConfigError(f"num_heads={num_heads} must divide dim={dim}")
        if num_heads % num_experts:
            raise ConfigError(f"num_experts={num_experts} must divide num_heads={num_heads} (a head group "
                              f"per expert)")
        E = num_experts
        self.dim, self.num_heads, self.num_experts = dim, num_heads, E
        self.head_dim = dim // num_heads
        self.heads_per_expert = num_heads // E
        De = self.heads_per_expert * self.head_dim
        for n in ("w_q", "w_k", "w_v"):
            setattr(self, n, nn.Parameter(nn.init.trunc_normal_(torch.empty(E, dim, De), std=0.02)))
        for n in ("b_q", "b_k", "b_v"):
            setattr(self, n, nn.Parameter(torch.zeros(E, De)) if qkv_bias else None)
        self.w_o = nn.Parameter(nn.init.trunc_normal_(torch.empty(E, De, dim), std=0.02))
        self.b_o = nn.Parameter(torch.zeros(dim))
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)

    @classmethod
    def from_attention(cls, attn: Attention, num_experts: int) -> "DecomposedMHA":
        """The exact decomposition of a dense ``Attention`` into ``num_experts`` head groups."""
        if not isinstance(attn, Attention):
            raise ConfigError(f"from_attention needs a dense moevision Attention, got {type(attn).__name__}")
        W, b = attn.qkv.weight, attn.qkv.bias  # (3D, D): rows s*D + h*Dh + j
        D, H = W.shape[1], attn.num_heads
        new = cls(D, H, num_experts, qkv_bias=b is not None, attn_drop=attn.attn_drop,
                  proj_drop=attn.proj_drop.p).to(device=W.device, dtype=W.dtype)
        E = num_experts
        De = D // E
        with torch.no_grad():
            Ws = W.view(3, E, De, D)
            for s, n in enumerate(("q", "k", "v")):
                getattr(new, f"w_{n}").copy_(Ws[s].transpose(1, 2))
                if b is not None:
                    getattr(new, f"b_{n}").copy_(b.view(3, E, De)[s])
            new.w_o.copy_(attn.proj.weight.t().reshape(E, De, D))
            new.b_o.copy_(attn.proj.bias)
        return new

    def heads(self, x_BND: torch.Tensor, mask_BEN: torch.Tensor | None = None) -> torch.Tensor:
        """Each expert's output before the sum, (B, E, N, D), without b_o. With ``mask_BEN`` (bool), expert
        e attends only among the tokens routed to it and gives 0 at the others (a masked reference
        implementation: the full score matrix is formed)."""
        B, N, D = x_BND.shape
        E, G, Dh = self.num_experts, self.heads_per_expert, self.head_dim

        def proj(w, b):
            y = torch.einsum("bnd,edf->benf", x_BND, w)
            if b is not None:
                y = y + b[None, :, None]
            return y.reshape(B, E, N, G, Dh).transpose(2, 3)  # (B, E, G, N, Dh)

        q, k, v = proj(self.w_q, self.b_q), proj(self.w_k, self.b_k), proj(self.w_v, self.b_v)
        scores = (q @ k.transpose(-1, -2)) * (Dh ** -0.5)
        if mask_BEN is not None:
            scores = scores.masked_fill(~mask_BEN[:, :, None, None, :], torch.finfo(scores.dtype).min)
        attn = scores.softmax(-1)
        if self.training and self.attn_drop > 0:
            attn = F.dropout(attn, self.attn_drop)
        o = (attn @ v).transpose(2, 3).reshape(B, E, N, G * Dh)
        y = torch.einsum("benf,efd->bend", o, self.w_o)
        if mask_BEN is not None:
            y = y * mask_BEN[..., None].to(y.dtype)
        return y

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.heads(x_BND).sum(1) + self.b_o)


# ---------------------------------------------------------------------------------------------------
# FLOPs (2 x multiply-adds, per image; norms, softmaxes, activations left out)
def uome_flops(dim: int, hidden_dim: int, num_experts: int, top_k: int, n_patches: int, patch_capacity: int,
               seq_len: int, num_prefix_tokens: int = 0, router: str = "sequence",
               input_split: bool = False) -> dict[str, int]:
    """UoME per image: ``experts`` (k experts x (prefix + c·l_p) tokens x their two matmuls), ``routing``
    (ES router + DS scorer) and ``total``. ``experts`` / dense = (k/n)(c/m) without prefix tokens."""
    E, P = num_experts, seq_len - num_prefix_tokens
    Fe, L = hidden_dim // E, P // n_patches
    d_in = dim // E if input_split else dim
    T = num_prefix_tokens + patch_capacity * L
    experts = top_k * T * (d_in * Fe + Fe * dim)
    es = (seq_len * dim if router == "sequence" else dim) * E
    ds = n_patches * dim * E
    return {"experts": 2 * experts, "routing": 2 * (es + ds), "total": 2 * (experts + es + ds)}


def smha_flops(dim: int, num_experts: int, tokens_per_expert: list[float], seq_len: int) -> dict[str, float]:
    """SMHA per image, expert e on its ``tokens_per_expert[e]`` = t_e routed tokens: q, k, v and output
    projections ``4·t_e·D·De``, scores and weighted sum ``2·t_e²·De``; the gate ``N·D·E``."""
    De = dim // num_experts
    heads = sum(4 * t * dim * De + 2 * t * t * De for t in tokens_per_expert)
    gate = seq_len * dim * num_experts
    return {"experts": 2 * heads, "routing": 2 * gate, "total": 2 * (heads + gate)}


@dataclass
class UoEStats(RoutingStats):
    """``RoutingStats`` plus the layer's FLOPs for the forward pass, summed over the batch (detached), and
    the fraction of (image, token) positions that no selected expert processed (``dropped_token_fraction``)."""

    flops: torch.Tensor | None = None


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean()


def _route_factor(w: torch.Tensor, weight_by_prob: bool, straight_through: bool) -> torch.Tensor | None:
    """What multiplies an expert's output: w (weighted); straight-through 1 + w - sg(w), exactly 1 in the
    forward pass with the gradient of w; or None (selection only)."""
    if weight_by_prob:
        return w
    if straight_through:
        return 1.0 + (w - w.detach())
    return None


# ---------------------------------------------------------------------------------------------------
# UoME: expert selection + patch-wise data selection + index addition
class UoME(nn.Module):
    """Union of MLP Experts over a ``DecomposedMLP`` (see the module docstring): ES top-``top_k`` of the
    experts per image, DS top-``patch_capacity`` (default ``n_patches // 2``) of ``n_patches`` token patches
    per selected expert. ``forward`` returns an ``MoEOutput`` whose ``stats`` is a ``UoEStats``; ``aux_loss``
    is 0 (the code has none)."""

    def __init__(self, mlp: DecomposedMLP, *, seq_len: int, top_k: int = 2, n_patches: int = 7,
                 patch_capacity: int | None = None, num_prefix_tokens: int = 0, router: str = "sequence",
                 weight_by_prob: bool = False, straight_through: bool = False):
        super().__init__()
        if not isinstance(mlp, DecomposedMLP):
            raise ConfigError(f"UoME needs a DecomposedMLP, got {type(mlp).__name__}")
        E = mlp.num_experts
        for k, v in (("seq_len", seq_len), ("top_k", top_k), ("n_patches", n_patches)):
            _positive_int(k, v)
        if not isinstance(num_prefix_tokens, int) or not 0 <= num_prefix_tokens < seq_len:
            raise ConfigError(f"num_prefix_tokens={num_prefix_tokens!r} must be in [0, seq_len={seq_len})")
        c = n_patches // 2 if patch_capacity is None else patch_capacity
        _positive_int("patch_capacity", c)
        if top_k > E:
            raise ConfigError(f"top_k={top_k} must be <= num_experts={E}")
        if c > n_patches:
            raise ConfigError(f"patch_capacity={c} must be <= n_patches={n_patches}")
        P = seq_len - num_prefix_tokens
        if P % n_patches:
            raise ConfigError(f"n_patches={n_patches} must divide the {P} patch tokens (seq_len={seq_len} minus "
                              f"num_prefix_tokens={num_prefix_tokens}) so that token patches are contiguous and "
                              f"equal")
        if router not in ("sequence", "mean"):
            raise ConfigError(f"router={router!r} must be 'sequence' (linear on the flattened sequence) or 'mean'")
        if weight_by_prob and straight_through:
            raise ConfigError("weight_by_prob=True and straight_through=True exclude each other")
        self.mlp, self.num_experts, self.top_k = mlp, E, top_k
        self.seq_len, self.n_patches, self.patch_capacity = seq_len, n_patches, c
        self.num_prefix_tokens, self.router_kind = num_prefix_tokens, router
        self.weight_by_prob, self.straight_through = weight_by_prob, straight_through
        D = mlp.dim
        self.router = nn.Linear(seq_len * D if router == "sequence" else D, E)
        self.scorer = nn.Linear(D, E)

    def flops(self) -> dict[str, int]:
        return uome_flops(self.mlp.dim, self.mlp.hidden_dim, self.num_experts, self.top_k, self.n_patches,
                          self.patch_capacity, self.seq_len, self.num_prefix_tokens, self.router_kind,
                          self.mlp.input_split)

    def route(self, x_BND: torch.Tensor):
        """(ES log-probabilities (B, E), selected experts (B, K), DS log-scores of the selected experts
        (B, K, M), selected patches (B, K, C), sorted)."""
        B, N, D = x_BND.shape
        if N != self.seq_len:
            raise ConfigError(f"UoME was built for seq_len={self.seq_len} tokens, got {N}")
        feats = x_BND.reshape(B, N * D) if self.router_kind == "sequence" else x_BND.mean(1)
        logp_BE = self.router(feats).float().log_softmax(-1)
        expert_BK = logp_BE.topk(self.top_k, dim=-1).indices
        m, pre = self.n_patches, self.num_prefix_tokens
        patches_BMD = x_BND[:, pre:].reshape(B, m, -1, D).mean(2)
        logs_BME = self.scorer(patches_BMD).float().log_softmax(1)  # over the patches, per expert
        logs_BKM = logs_BME.gather(2, expert_BK[:, None, :].expand(B, m, self.top_k)).transpose(1, 2)
        patch_BKC = logs_BKM.topk(self.patch_capacity, dim=-1).indices.sort(-1).values
        return logp_BE, expert_BK, logs_BKM, patch_BKC

    def forward(self, x_BND: torch.Tensor) -> MoEOutput:
        B, N, D = x_BND.shape
        logp_BE, expert_BK, logs_BKM, patch_BKC = self.route(x_BND)
        K, pre = self.top_k, self.num_prefix_tokens
        L = (N - pre) // self.n_patches
        dev = x_BND.device
        # token positions each (image, selected expert) processes: the prefix, then its patches' tokens
        tok_BKCL = pre + patch_BKC[..., None] * L + torch.arange(L, device=dev)
        tok_BKT = torch.cat([torch.arange(pre, device=dev).expand(B, K, pre), tok_BKCL.flatten(2)], -1)
        T = tok_BKT.shape[-1]
        idx = tok_BKT.reshape(B, K * T)
        x_sel = x_BND.gather(1, idx[..., None].expand(B, K * T, D)).view(B * K, T, D)
        y = self.mlp.partial(x_sel, expert_BK.reshape(-1)).view(B, K, T, D)
        # routing weights: ES probability of the expert x (m x DS score) of the patch (prefix: 1)
        lw_BK = logp_BE.gather(1, expert_BK)
        lw_BKC = logs_BKM.gather(2, patch_BKC) + math.log(self.n_patches)
        lw_BKT = lw_BK[..., None] + torch.cat([lw_BKC.new_zeros(B, K, pre), lw_BKC.repeat_interleave(L, dim=-1)], -1)
        factor = _route_factor(lw_BKT.exp(), self.weight_by_prob, self.straight_through)
        if factor is not None:
            y = y * factor[..., None].to(y.dtype)
        # index addition: overlapping selections sum, unselected positions stay 0
        out = x_BND.new_zeros(B, N, D).scatter_add(1, idx[..., None].expand(B, K * T, D), y.view(B, K * T, D))
        covered_BN = torch.zeros(B, N, dtype=torch.bool, device=dev).scatter(1, idx, True)
        if self.mlp.b2 is not None:
            out = out + covered_BN[..., None].to(out.dtype) * self.mlp.b2
        out = self.mlp.drop(out)  # once, on the union (dropping each expert's output apart changes its variance)
        return MoEOutput(out=out, aux_loss=x_BND.new_zeros((), dtype=torch.float32),
                         stats=self._stats(logp_BE.exp(), expert_BK, covered_BN, T))

    @torch.no_grad()
    def _stats(self, p_BE, expert_BK, covered_BN, T) -> UoEStats:
        E = self.num_experts
        tpe = torch.bincount(expert_BK.flatten(), minlength=E).float() * T
        skipped = 1.0 - covered_BN.float().mean()
        B = p_BE.shape[0]
        return UoEStats(tokens_per_expert=tpe, dropped_fraction=skipped, dropped_token_fraction=skipped,
                        router_entropy=_entropy(p_BE), importance=p_BE.sum(0),
                        flops=torch.tensor(float(self.flops()["total"] * B)))


# ---------------------------------------------------------------------------------------------------
# SMHA: heads as experts, token-level top-k of heads
class SMHA(nn.Module):
    """Selective multi-head attention over a ``DecomposedMHA`` (see the module docstring). Returns an
    ``MoEOutput`` (``aux_loss`` 0, ``stats`` a ``UoEStats``; the ViT block adds the loss and drops the stats)."""

    def __init__(self, attn: DecomposedMHA, *, top_k: int | None = None, capacity_factor: float = 1.0,
                 eps: float = 1e-6, normalize: str = "switch", weight_by_prob: bool = False,
                 straight_through: bool = False):
        super().__init__()
        if not isinstance(attn, DecomposedMHA):
            raise ConfigError(f"SMHA needs a DecomposedMHA, got {type(attn).__name__}")
        E = attn.num_experts
        k = max(E // 2, 1) if top_k is None else top_k
        _positive_int("top_k", k)
        if k > E:
            raise ConfigError(f"top_k={k} must be <= num_experts={E}")
        if not capacity_factor > 0:
            raise ConfigError(f"capacity_factor={capacity_factor!r} must be > 0")
        if normalize not in ("switch", "none"):
            raise ConfigError(f"normalize={normalize!r} must be 'switch' (SwitchGate, over the batch) or 'none'")
        if weight_by_prob and straight_through:
            raise ConfigError("weight_by_prob=True and straight_through=True exclude each other")
        self.attn, self.num_experts, self.top_k = attn, E, k
        self.capacity_factor, self.eps, self.normalize = capacity_factor, eps, normalize
        self.weight_by_prob, self.straight_through = weight_by_prob, straight_through
        self.gate = nn.Linear(attn.dim, E)

    def route(self, x_BND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities (B, N, E), routed mask (B, N, E) bool, gate values (B, N, E): 0 off the mask)."""
        p_BNE = self.gate(x_BND).float().softmax(-1)
        mask = torch.zeros_like(p_BNE, dtype=torch.bool).scatter(-1, p_BNE.topk(self.top_k, -1).indices, True)
        g = p_BNE * mask
        if self.normalize == "switch":  # SwitchGate: over the batch dimension, times the capacity
            cap = int(self.capacity_factor * x_BND.shape[0])
            if cap == 0 and self.weight_by_prob:
                raise ConfigError(f"SMHA: capacity int(capacity_factor={self.capacity_factor} x batch "
                                  f"{x_BND.shape[0]}) is 0, so every gate value and the attention output would be "
                                  f"0; use a larger batch or capacity_factor, or normalize='none'")
            g = g / (g.sum(0, keepdim=True) + self.eps) * cap
        return p_BNE, mask, g

    def forward(self, x_BND: torch.Tensor) -> MoEOutput:
        B, N, D = x_BND.shape
        p_BNE, mask_BNE, g_BNE = self.route(x_BND)
        mask_BEN = mask_BNE.transpose(1, 2)
        y_BEND = self.attn.heads(x_BND, mask_BEN)
        factor = _route_factor(g_BNE.transpose(1, 2), self.weight_by_prob, self.straight_through)
        if factor is not None:
            y_BEND = y_BEND * factor[..., None].to(y_BEND.dtype)
        out = self.attn.proj_drop(y_BEND.sum(1) + self.attn.b_o)
        with torch.no_grad():
            counts_BE = mask_BNE.sum(1).to(torch.float64)
            fl = smha_flops(D, self.num_experts, [counts_BE[:, e] for e in range(self.num_experts)], N)["total"]
            stats = UoEStats(tokens_per_expert=counts_BE.sum(0).float(), dropped_fraction=torch.zeros(()),
                             dropped_token_fraction=torch.zeros(()), router_entropy=_entropy(p_BNE),
                             importance=p_BNE.sum((0, 1)), flops=fl.sum().float())
        return MoEOutput(out=out, aux_loss=x_BND.new_zeros((), dtype=torch.float32), stats=stats)


# ---------------------------------------------------------------------------------------------------
# a dense ViT -> a UoE ViT
def uoe_vit(model: VisionTransformer, *, mlp_experts: int | None = 4, top_k: int = 2, n_patches: int = 7,
            patch_capacity: int | None = None, router: str = "sequence", attn_experts: int | None = None,
            attn_top_k: int | None = None, blocks: str | list[int] = "all", weight_by_prob: bool = False,
            straight_through: bool = False, smha_options: dict | None = None) -> VisionTransformer:
    """A copy of the dense ``model`` whose blocks ``blocks`` have UoME MLPs (``mlp_experts`` hidden slices,
    ES top-``top_k``, DS top-``patch_capacity`` of ``n_patches``; ``mlp_experts=None`` keeps the dense MLP)
    and, with ``attn_experts``, SMHA attention (top-``attn_top_k`` head groups per token, default half). The
    dense weights are loaded into the decomposed experts; routers are new. With top_k = mlp_experts,
    patch_capacity = n_patches, attn_top_k = attn_experts and no weighting the copy computes the same function.
    The result is for training and evaluation in Python; its ``config`` still describes the dense model, so
    ``save_pretrained`` does not apply (save ``state_dict()``)."""
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"uoe_vit needs a moevision VisionTransformer, got {type(model).__name__}")
    if mlp_experts is None and attn_experts is None:
        raise ConfigError("uoe_vit: give mlp_experts and/or attn_experts (both are None: nothing to convert)")
    new = copy.deepcopy(model)
    N = new.pos_embed.shape[1]
    for i in moe_layer_indices(blocks, len(new.blocks)):
        blk = new.blocks[i]
        if not isinstance(blk, Block):
            raise ConfigError(f"block {i} is a {type(blk).__name__}; uoe_vit converts standard ViT blocks")
        if mlp_experts is not None:
            dec = DecomposedMLP.from_mlp(blk.mlp, mlp_experts)
            blk.mlp = UoME(dec, seq_len=N, top_k=top_k, n_patches=n_patches, patch_capacity=patch_capacity,
                           num_prefix_tokens=new.num_prefix_tokens, router=router, weight_by_prob=weight_by_prob,
                           straight_through=straight_through).to(dec.w1)
        if attn_experts is not None:
            dec_a = DecomposedMHA.from_attention(blk.attn, attn_experts)
            blk.attn = SMHA(dec_a, top_k=attn_top_k, weight_by_prob=weight_by_prob,
                            straight_through=straight_through, **(smha_options or {})).to(dec_a.w_q)
    new.train(model.training)
    return new


__all__ = ["DecomposedMLP", "DecomposedMHA", "UoME", "SMHA", "UoEStats", "uoe_vit", "uome_flops", "smha_flops"]
