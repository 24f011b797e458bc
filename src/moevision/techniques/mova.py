"""MoVA: coarse-to-fine mixture of vision experts (Zong et al., "MoVA: Adapting Mixture of Vision Experts to
Multimodal Context", 2024), as specified in multimodal_compression_systems.md §7.1 ([V]: TempleX98/MoVA).

A base encoder is always used. *Coarse* routing: the LLM reads a prompt listing a lettered pool of vision
experts and the question, and answers with the letters of at most 3 useful experts (``routing_prompt``,
``parse_routing``). *Fine* fusion: the MoV-Adapter (``MoVAAdapter``) aligns every expert's token map to the
base R x R grid (``feature_align``), and in each block adds to the base tokens a gated sum of per-expert
cross-attentions (2-D RoPE on q/k), followed by self-attention and a SwiGLU; the result is averaged with the
base tokens and compressed by a RegStage / adaptive-pool / RegStage downsampler and a GELU MLP to the LLM
width. The gate is an MLP over [text CLS ; mean token] whose softmax is masked by the routing multi-hot and
cut to the top-k (default 3) renormalised weights. Every output projection of the blocks, the gate's last
layer, the last norm of every RegStage residual branch and the position embedding start at zero, so a
fresh adapter is ``MLP(AdaptiveAvgPool(base grid))``.

Shape legend: B batch, R grid side, N = R*R tokens, C base width, Ce an expert's width, E experts,
D output (LLM) width, H heads, Dh head width, L text tokens, Dt text width.

Deviations and choices (the [R] items of the spec are options, not truths):
- ``num_blocks`` (3), ``rope_base`` (10000), ``reg_depth`` (3 blocks per RegStage, Honeybee's C-Abstractor),
  ``se_ratio`` (0.25), ``norm_eps`` (1e-6), SE activation (ReLU + sigmoid, timm's SE) and ``align_corners``
  (False) are config fields; the RegStage blocks are RegNet bottlenecks with ``bottle_ratio`` 1 and groups 1.
- The RegStage residual block ends linearly (``linear_out=True``: ``x + branch``, no activation after the
  sum), as the spec's zero-init property requires; ``linear_out=False`` applies SiLU after the sum (timm).
  "Last layer zero-init" is the branch's last LayerNorm2d weight set to 0, which zeroes the branch exactly.
- 2-D RoPE: the first half of each head's rotary pairs turn with the row index, the second half with the
  column index (frequencies ``rope_base ** (-i / (Dh / 4))``); the queries (base grid) and keys (expert maps
  aligned to the same grid) use the same positions.
- Cross-attention gets an inner LayerNorm on the attention output before the output projection; the
  self-attention has no RoPE (the spec names none).
- ``skip_unrouted``: cross-attention is not run for an expert that no sample of the batch routes (at batch
  size 1: the unselected experts); ``None`` features are replaced by zeros. Since an unrouted expert's gate
  weight is exactly 0 in float32 (``exp(-1e6)`` underflows), this gives the same output.
- The BERT CLS text encoder is replaced by ``TextEncoder``, a tiny pre-norm transformer over a word tokenizer
  with a learned [CLS] slot (no pre-trained BERT is available offline).
- ``parse_routing``: an item counts only if, after stripping spaces, case and punctuation, it is one pool
  letter (optionally written "model X" / "expert X"); other items are ignored (``strict=True`` raises).
  The official parser tests whether the letter occurs in the item text.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..layers import Attention

MASK_VALUE = -1e6  # added to unrouted logits: exp(-1e6) is 0 in float32 and float64


# ---------------------------------------------------------------------------------------------------
# alignment
def tokens_to_grid(tokens_BNC: torch.Tensor, name: str = "tokens") -> torch.Tensor:
    """(B, N, C) row-major tokens of a square grid -> (B, C, h, h)."""
    if tokens_BNC.dim() != 3:
        raise ConfigError(f"{name} must be (B, N, C) tokens, got shape {tuple(tokens_BNC.shape)}")
    B, N, C = tokens_BNC.shape
    h = math.isqrt(N)
    if h * h != N:
        raise ConfigError(f"{name}: {N} tokens do not form a square grid")
    return tokens_BNC.transpose(1, 2).reshape(B, C, h, h)


def resize_tokens(tokens_BNC: torch.Tensor, grid: int, *, align_corners: bool = False,
                  name: str = "tokens") -> torch.Tensor:
    """Bilinear resize of a square token map to ``grid`` x ``grid``: (B, N, Ce) -> (B, grid*grid, Ce)."""
    m = tokens_to_grid(tokens_BNC, name)
    if m.shape[-1] != grid:
        m = F.interpolate(m, size=(grid, grid), mode="bilinear", align_corners=align_corners)
    return m.flatten(2).transpose(1, 2)


def feature_align(base_BNC: torch.Tensor, experts: Sequence[torch.Tensor], *, align_corners: bool = False
                  ) -> torch.Tensor:
    """MoVA's ``feature_align``: every expert token map bilinearly resized to the base grid, then all
    concatenated channel-wise after the base: (B, N, C + sum Ce)."""
    grid = tokens_to_grid(base_BNC, "base").shape[-1]
    aligned = [resize_tokens(f, grid, align_corners=align_corners, name=f"experts[{i}]")
               for i, f in enumerate(experts)]
    return torch.cat([base_BNC, *aligned], dim=-1)


def split_aligned(x_BNX: torch.Tensor, base_dim: int, expert_dims: Sequence[int]
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The inverse of the channel concatenation: (base (B, N, C), [expert e (B, N, Ce)])."""
    total = base_dim + sum(expert_dims)
    if x_BNX.shape[-1] != total:
        raise ConfigError(f"aligned features have {x_BNX.shape[-1]} channels, expected base_dim + "
                          f"sum(expert_dims) = {total}")
    parts = torch.split(x_BNX, [base_dim, *expert_dims], dim=-1)
    return parts[0], list(parts[1:])


# ---------------------------------------------------------------------------------------------------
# 2-D rotary position embedding
def rope_2d_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(N, Dh/2) rotation angles: pair p < Dh/4 turns with the row, pair p >= Dh/4 with the column."""
    if head_dim % 4:
        raise ConfigError(f"head_dim={head_dim} must be divisible by 4 for 2-D RoPE")
    quarter = head_dim // 4
    inv_freq = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    return torch.cat([rows.double()[:, None] * inv_freq, cols.double()[:, None] * inv_freq], dim=1)


def apply_rope(x: torch.Tensor, angles_NP: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., 2p], x[..., 2p+1]) of x (..., N, Dh) by angles (N, Dh/2)."""
    return rotate_pairs(x, angles_NP.cos().to(x.dtype), angles_NP.sin().to(x.dtype))


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` with the (N, Dh/2) cosines and sines given."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def grid_positions(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the row-major tokens of a grid x grid map."""
    idx = torch.arange(grid * grid)
    return idx // grid, idx % grid


# ---------------------------------------------------------------------------------------------------
# the config
@dataclass
class MoVAConfig:
    """MoV-Adapter hyper-parameters. Defaults are the paper's (CLIP ViT-L base at R = 48, the 7-expert
    pool, Llama3-8B width); [R] marks recalled details kept as options."""

    dim: int = 1024  # C, the base encoder width
    grid: int = 48  # R, the base token grid side
    expert_dims: tuple[int, ...] = (1536, 512, 256, 1536, 768, 768, 256)
    out_dim: int = 4096  # D, the LLM width
    text_dim: int = 768  # Dt, the text encoder (BERT CLS) width
    num_blocks: int = 3  # [R]
    num_heads: int = 16
    top_k: int = 3
    mlp_hidden: int | None = None  # SwiGLU hidden width; None = int(8 * dim / 3)
    rope_base: float = 10000.0  # [R]
    reg_depth: int = 3  # [R] bottleneck blocks per RegStage
    se_ratio: float = 0.25  # [R]
    linear_out: bool = True
    norm_eps: float = 1e-6  # [R]
    align_corners: bool = False  # [R] feature_align's bilinear resize
    skip_unrouted: bool = True

    @property
    def num_experts(self) -> int:
        return len(self.expert_dims)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def swiglu_hidden(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else int(8 * self.dim / 3)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        for k in ("dim", "grid", "out_dim", "text_dim", "num_blocks", "num_heads", "top_k", "reg_depth"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"mova.{k}={v!r}: must be a positive integer")
        if not self.expert_dims or any(not isinstance(d, int) or d < 1 for d in self.expert_dims):
            raise ConfigError(f"mova.expert_dims={self.expert_dims!r}: must be a non-empty list of positive ints")
        if self.dim % self.num_heads or self.head_dim % 4:
            raise ConfigError(f"mova.num_heads={self.num_heads}: dim={self.dim} / num_heads must be a multiple "
                              "of 4 (2-D RoPE splits each head's rotary pairs between rows and columns)")
        if self.grid % 2:
            raise ConfigError(f"mova.grid={self.grid}: must be even (the downsampler pools to (R/2)^2 tokens)")
        if self.top_k > self.num_experts:
            raise ConfigError(f"mova.top_k={self.top_k}: must be <= the number of experts ({self.num_experts})")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ConfigError(f"mova.mlp_hidden={self.mlp_hidden!r}: must be a positive integer or None")
        if not 0 < self.se_ratio <= 1:
            raise ConfigError(f"mova.se_ratio={self.se_ratio!r}: must be in (0, 1]")
        if self.rope_base <= 1 or self.norm_eps <= 0:
            raise ConfigError(f"mova.rope_base={self.rope_base!r} must be > 1 and mova.norm_eps={self.norm_eps!r} "
                              "> 0")


# ---------------------------------------------------------------------------------------------------
# adapter parts
class ExpertCrossAttention(nn.Module):
    """q = LN(x) (base grid), k/v = LN'(F_e) (expert map aligned to the same grid); H heads, 2-D RoPE on q and
    k, a LayerNorm on the attention output, zero-init output projection."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, grid: int, *, rope_base: float, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.norm_q, self.norm_kv = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(kv_dim, eps=eps)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim, 2 * dim)
        self.inner_norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        rows, cols = grid_positions(grid)
        angles = rope_2d_angles(rows, cols, self.head_dim, rope_base)  # float64, cast with the module
        self.register_buffer("cos", angles.cos().to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("sin", angles.sin().to(torch.get_default_dtype()), persistent=False)

    def forward(self, x_BNC: torch.Tensor, f_BNCe: torch.Tensor) -> torch.Tensor:
        B, N, C = x_BNC.shape
        H, Dh = self.num_heads, self.head_dim
        q = self.q(self.norm_q(x_BNC)).view(B, N, H, Dh).transpose(1, 2)
        k, v = self.kv(self.norm_kv(f_BNCe)).view(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
        cos, sin = self.cos.to(q.dtype), self.sin.to(q.dtype)
        o = F.scaled_dot_product_attention(rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin), v)
        return self.proj(self.inner_norm(o.transpose(1, 2).reshape(B, N, C)))


class MoVAGate(nn.Module):
    """``softmax(MLP([t ; mean(x)]) + (1 - routed) * -1e6)``, cut to the top-k and renormalised."""

    def __init__(self, text_dim: int, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.fc1, self.fc2 = nn.Linear(text_dim + dim, dim), nn.Linear(dim, num_experts)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, text_BDt: torch.Tensor, x_BNC: torch.Tensor, routed_BE: torch.Tensor) -> torch.Tensor:
        logits_BE = self.fc2(F.gelu(self.fc1(torch.cat([text_BDt, x_BNC.mean(1)], dim=-1))))
        return masked_topk_softmax(logits_BE, routed_BE, self.top_k)


def masked_topk_softmax(logits_BE: torch.Tensor, routed_BE: torch.Tensor, top_k: int) -> torch.Tensor:
    """The gate's weights from its logits (computed in at least float32)."""
    dt = torch.promote_types(logits_BE.dtype, torch.float32)
    w = torch.softmax(logits_BE.to(dt) + (1 - routed_BE.to(dt)) * MASK_VALUE, dim=-1)
    keep = torch.zeros_like(w).scatter_(-1, w.topk(top_k, dim=-1).indices, 1.0)
    w = w * keep
    return (w / w.sum(-1, keepdim=True)).to(logits_BE.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoVABlock(nn.Module):
    def __init__(self, cfg: MoVAConfig):
        super().__init__()
        C, eps = cfg.dim, cfg.norm_eps
        self.gate = MoVAGate(cfg.text_dim, C, cfg.num_experts, cfg.top_k)
        self.cross = nn.ModuleList(ExpertCrossAttention(C, ce, cfg.num_heads, cfg.grid, rope_base=cfg.rope_base,
                                                        eps=eps) for ce in cfg.expert_dims)
        self.norm1, self.norm2 = nn.LayerNorm(C, eps=eps), nn.LayerNorm(C, eps=eps)
        self.attn = Attention(C, cfg.num_heads)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)
        self.mlp = SwiGLU(C, cfg.swiglu_hidden)

    def forward(self, x_BNC, feats: list[torch.Tensor], text_BDt, routed_BE, run_BE: list[bool]):
        """``run_BE[e]``: compute expert e's cross-attention (else its contribution is 0: it is routed by no
        sample, so its weight is exactly 0)."""
        w_BE = self.gate(text_BDt, x_BNC, routed_BE)
        mix = torch.zeros_like(x_BNC)
        for e, (attn, f) in enumerate(zip(self.cross, feats)):
            if run_BE[e]:
                mix = mix + w_BE[:, e, None, None] * attn(x_BNC, f)
        any_routed_B = (routed_BE > 0).any(-1).to(x_BNC.dtype)
        x_BNC = x_BNC + any_routed_B[:, None, None] * mix
        x_BNC = x_BNC + self.attn(self.norm1(x_BNC))
        return x_BNC + self.mlp(self.norm2(x_BNC)), w_BE


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, h, w) map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, ratio: float):
        super().__init__()
        rd = max(1, int(round(channels * ratio)))
        self.reduce, self.expand = nn.Conv2d(channels, rd, 1), nn.Conv2d(rd, channels, 1)

    def forward(self, x):
        s = self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class RegBottleneck(nn.Module):
    """RegNet bottleneck (bottle ratio 1): 1x1 conv, 3x3 conv, SE, 1x1 conv, each conv followed by
    LayerNorm2d, SiLU after the first two; the last norm starts at weight 0, so the branch starts at 0."""

    def __init__(self, channels: int, se_ratio: float, eps: float, linear_out: bool):
        super().__init__()
        C = channels
        self.branch = nn.Sequential(
            nn.Conv2d(C, C, 1, bias=False), LayerNorm2d(C, eps=eps), nn.SiLU(),
            nn.Conv2d(C, C, 3, padding=1, bias=False), LayerNorm2d(C, eps=eps), nn.SiLU(),
            SqueezeExcite(C, se_ratio),
            nn.Conv2d(C, C, 1, bias=False), LayerNorm2d(C, eps=eps))
        nn.init.zeros_(self.branch[-1].weight)
        self.act = nn.Identity() if linear_out else nn.SiLU()

    def forward(self, x):
        return self.act(x + self.branch(x))


class MoVAOutput(NamedTuple):
    tokens: torch.Tensor  # (B, (R/2)^2, D)
    gate_weights: torch.Tensor  # (B, num_blocks, E)


class MoVAAdapter(nn.Module):
    """The MoV-Adapter of spec §7.1 (see the module docstring)."""

    def __init__(self, cfg: MoVAConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        C, R = cfg.dim, cfg.grid
        self.pos_embed = nn.Parameter(torch.zeros(1, R * R, C))
        self.blocks = nn.ModuleList(MoVABlock(cfg) for _ in range(cfg.num_blocks))

        def stage():
            return nn.Sequential(*[RegBottleneck(C, cfg.se_ratio, cfg.norm_eps, cfg.linear_out)
                                   for _ in range(cfg.reg_depth)])

        self.stage1, self.pool, self.stage2 = stage(), nn.AdaptiveAvgPool2d(R // 2), stage()
        self.readout = nn.Sequential(nn.Linear(C, cfg.out_dim), nn.GELU(), nn.Linear(cfg.out_dim, cfg.out_dim))

    def _check(self, base, experts, text, routed):
        cfg = self.config
        R, C, E = cfg.grid, cfg.dim, cfg.num_experts
        if base.dim() != 3 or base.shape[1:] != (R * R, C):
            raise ConfigError(f"base: expected (B, {R * R}, {C}) tokens (grid={R}, dim={C}), got {tuple(base.shape)}")
        B = base.shape[0]
        if len(experts) != E:
            raise ConfigError(f"experts: expected {E} feature maps (one per expert_dims entry), got {len(experts)}")
        for e, f in enumerate(experts):
            if f is not None and (f.dim() != 3 or f.shape[0] != B or f.shape[2] != cfg.expert_dims[e]):
                raise ConfigError(f"experts[{e}]: expected (B={B}, N_e, {cfg.expert_dims[e]}) tokens, "
                                  f"got {tuple(f.shape)}")
        if text.shape != (B, cfg.text_dim):
            raise ConfigError(f"text: expected (B={B}, text_dim={cfg.text_dim}), got {tuple(text.shape)}")
        if routed.shape != (B, E):
            raise ConfigError(f"routed: expected a (B={B}, {E}) multi-hot, got {tuple(routed.shape)}")
        if not ((routed == 0) | (routed == 1)).all():
            raise ConfigError("routed: must hold only 0 and 1")
        for e, f in enumerate(experts):
            if f is None and bool(routed[:, e].any()):
                raise ConfigError(f"experts[{e}] is None but routed[:, {e}] selects it")

    def forward(self, base_BNC: torch.Tensor, experts: Sequence[torch.Tensor | None], text_BDt: torch.Tensor,
                routed_BE: torch.Tensor) -> MoVAOutput:
        """``experts[e]``: expert e's tokens (B, N_e, Ce) on any square grid, or None when it was not run
        (zeros are substituted; it must then be routed by no sample)."""
        cfg = self.config
        self._check(base_BNC, experts, text_BDt, routed_BE)
        B, N, _ = base_BNC.shape
        filled = [f if f is not None else base_BNC.new_zeros(B, N, d) for f, d in zip(experts, cfg.expert_dims)]
        _, feats = split_aligned(feature_align(base_BNC, filled, align_corners=cfg.align_corners), cfg.dim,
                                 cfg.expert_dims)
        routed_BE = routed_BE.to(base_BNC.dtype)
        run = [bool(routed_BE[:, e].any()) or not cfg.skip_unrouted for e in range(cfg.num_experts)]
        x = base_BNC + self.pos_embed
        weights = []
        for blk in self.blocks:
            x, w = blk(x, feats, text_BDt, routed_BE, run)
            weights.append(w)
        x = (x + base_BNC) / 2
        m = self.stage2(self.pool(self.stage1(tokens_to_grid(x))))
        return MoVAOutput(self.readout(m.flatten(2).transpose(1, 2)), torch.stack(weights, dim=1))


def run_experts(experts: Sequence[nn.Module], images: torch.Tensor, routed_BE: torch.Tensor,
                skip_unselected: bool = True) -> list[torch.Tensor | None]:
    """Each expert's tokens on ``images``; with ``skip_unselected``, an expert that no sample routes is not
    run (None: the adapter substitutes zeros). At batch size 1 this runs the selected experts only."""
    return [None if skip_unselected and not bool(routed_BE[:, e].any()) else ex(images)
            for e, ex in enumerate(experts)]


# ---------------------------------------------------------------------------------------------------
# the gate's text encoder (BERT CLS stand-in)
def gate_text(questions: Sequence[str]) -> str:
    """The gate's text: "question 0: q0\\n\\n question 1: q1 ...", lower-cased."""
    return "\n\n ".join(f"question {i}: {q}" for i, q in enumerate(questions)).lower()


class TextEncoder(nn.Module):
    """A tiny BERT-style encoder: token + learned position embeddings after a [CLS] slot, pre-norm
    transformer layers, the final-norm CLS vector as the text embedding. Pad id 0 is masked."""

    def __init__(self, vocab_size: int, dim: int = 64, depth: int = 1, num_heads: int = 4, max_len: int = 512,
                 mlp_ratio: float = 2.0):
        super().__init__()
        if vocab_size < 2 or max_len < 1 or dim % num_heads:
            raise ConfigError(f"TextEncoder: vocab_size={vocab_size} must be >= 2, max_len={max_len} >= 1 and "
                              f"num_heads={num_heads} must divide dim={dim}")
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, max_len + 1, dim) * 0.02)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(dim, num_heads, int(dim * mlp_ratio), dropout=0.0,
                                                               activation="gelu", batch_first=True, norm_first=True)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids_BL: torch.Tensor) -> torch.Tensor:
        ids_BL = ids_BL[:, :self.max_len]
        B, L = ids_BL.shape
        x = torch.cat([self.cls.expand(B, -1, -1), self.embed(ids_BL)], dim=1) + self.pos[:, :L + 1]
        pad = torch.cat([ids_BL.new_zeros(B, 1, dtype=torch.bool), ids_BL == 0], dim=1)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        return self.norm(x[:, 0])


def encode_texts(tokenizer, texts: Sequence[str], max_len: int = 512) -> torch.Tensor:
    """(n, L) ids (0-padded, truncated to ``max_len``) of ``texts`` under a ``WordTokenizer``."""
    ids = [tokenizer.encode(t)[:max_len] for t in texts]
    out = torch.zeros(len(ids), max(1, max(map(len, ids), default=1)), dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------------------
# coarse routing: the prompt and the parser
MOVA_EXPERT_POOL: tuple[tuple[str, str], ...] = (
    ("DINOv2", "this model is good at natural-image spatial and semantic understanding."),
    ("Vary", "this model is good at text-rich images such as documents and screenshots."),
    ("Co-DETR", "this model is good at object detection and localisation."),
    ("Pix2Struct", "this model is good at text recognition."),
    ("Deplot", "this model is good at plots and charts."),
    ("BiomedCLIP", "this model is good at biomedical images."),
    ("SAM", "this model is good at segmentation."),
)
ROUTING_SYSTEM = ("Choose the vision models that help to answer the question about the image. Answer with the "
                  "letters of at most 3 most suitable models, separated by commas, or \"none\" if no model "
                  "helps.")
_ITEM = re.compile(r"^(?:model|expert)?\s*([a-z])$")


def routing_prompt(question: str, pool: Sequence[tuple[str, str]] = MOVA_EXPERT_POOL,
                   system: str = ROUTING_SYSTEM) -> str:
    """The coarse-routing prompt: system text, "Model pool:" with one lettered line per expert, the
    question."""
    if not 1 <= len(pool) <= 26:
        raise ConfigError(f"pool: needs 1..26 experts (one letter each), got {len(pool)}")
    lines = [system, "Model pool:"] + [f"{chr(65 + i)}: {desc}" for i, (_, desc) in enumerate(pool)]
    return "\n".join(lines + [f"Question: {question}", "Answer:"])


def routing_letters(multi_hot: Sequence[int] | torch.Tensor) -> str:
    """The routing answer for a multi-hot vector: "A, C", or "none"."""
    letters = [chr(65 + i) for i, v in enumerate(list(map(int, multi_hot))) if v]
    return ", ".join(letters) if letters else "none"


def parse_routing(text: str, num_experts: int = 7, max_experts: int = 3, *, strict: bool = False) -> list[int]:
    """Multi-hot over ``num_experts`` from generated routing text: the first ``max_experts`` comma-separated
    items are kept; an item selects expert i when it is letter i (case, spaces and punctuation ignored,
    "model X" accepted); "none" and empty text select nothing. Unknown items (other words, letters beyond
    the pool) are ignored, or raise ``ConfigError`` with ``strict=True``."""
    if not 1 <= num_experts <= 26:
        raise ConfigError(f"num_experts={num_experts}: must be in 1..26 (one letter each)")
    out = [0] * num_experts
    items = [s for s in (t.strip() for t in text.split(",")) if s][:max_experts]
    for item in items:
        clean = re.sub(r"[^a-z ]", "", item.lower()).strip()
        if clean in ("none", ""):
            continue
        m = _ITEM.match(clean)
        idx = ord(m.group(1)) - 97 if m else -1
        if 0 <= idx < num_experts:
            out[idx] = 1
        elif strict:
            raise ConfigError(f"routing text {text!r}: item {item!r} is not one of the letters "
                              f"A-{chr(64 + num_experts)} or 'none'")
    return out
