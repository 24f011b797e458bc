"""MouSi: poly-visual-expert vision-language models (Fan et al., "MouSi: Poly-Visual-Expert Vision-Language
Models", 2024), as specified in multimodal_compression_systems.md §6. There is no official code: the concepts
are [A] (from the paper), the details [R] (recalled) and therefore config fields here.

Several frozen vision encoders ("experts") feed one LLM. A *poly-expert fusion network* maps every expert's
token sequence to the LLM width and concatenates the results along the sequence axis in a fixed expert
order (``PolyExpertFusion``):

- ``fusion="mlp"``: one 2-layer GELU MLP ``D_e -> D_LLM`` per expert; N_e tokens in, N_e tokens out.
  "Multi-patch-one-token" (``ExpertSpec.group`` = g > 1) first concatenates each group of g neighbouring
  patches channel-wise (``group_tokens``), so the MLP sees ``g * D_e`` channels and the expert contributes
  N_e / g tokens.
- ``fusion="qformer"``: per expert, Q learnable queries pass through BLIP-2-style blocks (self-attention over
  the queries, cross-attention to the expert's tokens, FFN; pre-norm residuals) and a linear projection to
  D_LLM; every expert contributes exactly Q tokens, E*Q in all.

Position ids for the LLM's RoPE over a sequence laid out as text / expert tokens / text (``position_ids``,
built from a list of ``TextSegment`` / ``ExpertSegment``):

- ``original``: every token gets its own consecutive id.
- ``share_all``: all tokens of one expert share one id (1 id per expert).
- ``share_by_row``: tokens on the same (post-grouping) grid row share an id (H ids per expert).
- ``share_by_row_col``: 2-D ids, returned as a (2, N) tensor (row ids, column ids). A visual token at grid
  cell (r, c) of an expert starting at id s gets row id s + r and column id s + c; a text token at id p gets
  (p, p). ``rope_2d`` turns half of the rotary pairs with the row id and the other half with the column id.
- Every segment (text or expert) starts at max(id used so far) + 1, so text after an image continues at
  max + 1.

Shape legend: B batch, N tokens, D_e an expert's width, D the LLM width, Q queries, Dh head width.

Deviations and choices (the [R] items of the spec are options, not truths):
- Neighbourhood of the grouping (``ExpertSpec.group_shape``): ``"row"`` = g consecutive tokens of one grid
  row (requires g | W; grid H x W -> H x W/g); ``"square"`` = a sqrt(g) x sqrt(g) block (requires g a
  perfect square with sqrt(g) | H and sqrt(g) | W; grid -> H/sqrt(g) x W/sqrt(g)). Inside a group the
  patches are concatenated in row-major order of their offsets. Grouping also applies before a Q-Former
  (its keys/values then have g * D_e channels); it does not change the Q-Former's token count.
- The MLP's hidden width (``mlp_hidden``, default D_LLM), Q (``num_queries``, default 32), the Q-Former width
  (``qformer_dim``, default D_LLM), heads, depth and FFN ratio are config fields. The Q-Former has no BERT
  text branch and no pre-trained initialisation (BLIP-2's); the queries are initialised N(0, 0.02).
- For position ids a Q-Former expert is a 1 x Q grid (``PolyExpertFusion.layout``), so ``share_by_row``
  equals ``share_all`` for it.
- ``share_by_row_col``: which rotary pairs take the row id is ``rope_2d(split=...)``: ``"halves"`` (default:
  pairs p < Dh/4 turn with the row, the rest with the column) or ``"alternate"`` (even pairs row, odd pairs
  column). Each pair keeps its 1-D RoPE frequency base^(-2p/Dh), so a text token with ids (p, p) is rotated
  exactly as by 1-D RoPE at p. The ids of an expert after the 2-D block continue at s + max(H, W).
- RoPE rotates the interleaved pairs (x[2p], x[2p+1]) (GPT-J / MoVA layout, not HF's rotate-half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

FUSIONS = ("mlp", "qformer")
GROUP_SHAPES = ("row", "square")
POSITION_SCHEMES = ("original", "share_all", "share_by_row", "share_by_row_col")
ROPE_SPLITS = ("halves", "alternate")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------
# multi-patch-one-token grouping
def grouped_grid(height: int, width: int, group: int, group_shape: str = "row",
                 name: str = "expert") -> tuple[int, int]:
    """The (H', W') grid left after grouping an H x W grid by ``group`` patches; validates the arguments."""
    _positive_int(f"{name}.height", height)
    _positive_int(f"{name}.width", width)
    _positive_int(f"{name}.group", group)
    if group_shape not in GROUP_SHAPES:
        raise ConfigError(f"{name}.group_shape must be one of {GROUP_SHAPES}, got {group_shape!r}")
    if group_shape == "row":
        if width % group:
            raise ConfigError(f"{name}.group={group} must divide the grid width {width} (group_shape='row'; "
                              f"grid {height}x{width}, {height * width} tokens)")
        return height, width // group
    side = math.isqrt(group)
    if side * side != group:
        raise ConfigError(f"{name}.group={group} must be a perfect square for group_shape='square'")
    if height % side or width % side:
        raise ConfigError(f"{name}.group={group}: its side {side} must divide the grid {height}x{width} "
                          f"(group_shape='square')")
    return height // side, width // side


def group_tokens(tokens_BND: torch.Tensor, height: int, width: int, group: int, group_shape: str = "row",
                 name: str = "expert") -> torch.Tensor:
    """Multi-patch-one-token: (B, H*W, D) row-major tokens -> (B, H'*W', g*D), each output token the
    channel-wise concatenation of its g neighbouring patches (row-major order of their offsets)."""
    if tokens_BND.dim() != 3:
        raise ConfigError(f"{name} features must be (B, N, D), got shape {tuple(tokens_BND.shape)}")
    h2, w2 = grouped_grid(height, width, group, group_shape, name)
    B, N, D = tokens_BND.shape
    if N != height * width:
        raise ConfigError(f"{name} has {N} tokens, expected height*width = {height}*{width} = {height * width}")
    if group == 1:
        return tokens_BND
    if group_shape == "row":
        # (B, H, W/g, g, D): consecutive tokens of a row are already adjacent in memory.
        return tokens_BND.reshape(B, h2 * w2, group * D)
    s = height // h2
    x = tokens_BND.reshape(B, h2, s, w2, s, D).permute(0, 1, 3, 2, 4, 5)  # (B, H', W', s_r, s_c, D)
    return x.reshape(B, h2 * w2, group * D)


# ---------------------------------------------------------------------------------------------------
# config
@dataclass
class ExpertSpec:
    """One frozen vision expert as the fusion network sees it: its width and its H x W token grid."""

    name: str
    dim: int
    height: int
    width: int
    group: int = 1  # multi-patch-one-token factor g ([R])
    group_shape: str = "row"  # "row" | "square": which g patches are neighbours

    def validate(self, where: str = "expert") -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"{where}.name must be a non-empty string, got {self.name!r}")
        _positive_int(f"{where}.dim", self.dim)
        grouped_grid(self.height, self.width, self.group, self.group_shape, where)

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    @property
    def grouped_grid(self) -> tuple[int, int]:
        return grouped_grid(self.height, self.width, self.group, self.group_shape, self.name)


@dataclass
class MouSiConfig:
    """The poly-expert fusion network. ``experts`` order is the fixed concatenation order."""

    experts: Sequence[ExpertSpec] = field(default_factory=list)
    llm_dim: int = 64
    fusion: str = "mlp"  # "mlp" | "qformer"
    mlp_hidden: int | None = None  # hidden width of each 2-layer MLP (None: llm_dim)
    num_queries: int = 32  # Q-Former queries per expert ([R])
    qformer_dim: int | None = None  # Q-Former width (None: llm_dim)
    qformer_heads: int = 4
    qformer_layers: int = 1
    qformer_ffn_mult: int = 4

    def validate(self) -> "MouSiConfig":
        if not isinstance(self.experts, (list, tuple)) or not self.experts:
            raise ConfigError(f"experts must be a non-empty list of ExpertSpec, got {self.experts!r}")
        names = set()
        for i, e in enumerate(self.experts):
            if not isinstance(e, ExpertSpec):
                raise ConfigError(f"experts[{i}] must be an ExpertSpec, got {type(e).__name__}")
            e.validate(f"experts[{i}]")
            if e.name in names:
                raise ConfigError(f"experts[{i}].name={e.name!r} is repeated; expert names must be unique")
            names.add(e.name)
        _positive_int("llm_dim", self.llm_dim)
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.mlp_hidden is not None:
            _positive_int("mlp_hidden", self.mlp_hidden)
        _positive_int("num_queries", self.num_queries)
        if self.qformer_dim is not None:
            _positive_int("qformer_dim", self.qformer_dim)
        _positive_int("qformer_heads", self.qformer_heads)
        _positive_int("qformer_layers", self.qformer_layers)
        _positive_int("qformer_ffn_mult", self.qformer_ffn_mult)
        qdim = self.qformer_dim or self.llm_dim
        if self.fusion == "qformer" and qdim % self.qformer_heads:
            raise ConfigError(f"qformer_heads={self.qformer_heads} must divide the Q-Former width {qdim}")
        return self


# ---------------------------------------------------------------------------------------------------
# fusion network
class MLPProjector(nn.Module):
    """2-layer GELU MLP ``D_in -> hidden -> D_LLM``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class QFormerBlock(nn.Module):
    """BLIP-2-style query block (pre-norm): self-attention over queries, cross-attention to features, FFN."""

    def __init__(self, dim: int, kv_dim: int, heads: int, ffn_mult: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def forward(self, q_BQC: torch.Tensor, kv_BNK: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(q_BQC)
        q_BQC = q_BQC + self.self_attn(h, h, h, need_weights=False)[0]
        kv = self.norm_kv(kv_BNK)
        q_BQC = q_BQC + self.cross_attn(self.norm_cross(q_BQC), kv, kv, need_weights=False)[0]
        return q_BQC + self.ffn(self.norm_ffn(q_BQC))


class QFormer(nn.Module):
    """Q learnable queries -> ``layers`` QFormerBlocks over one expert's tokens -> LayerNorm -> Linear(D_LLM)."""

    def __init__(self, kv_dim: int, num_queries: int, dim: int, out_dim: int, heads: int, layers: int,
                 ffn_mult: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.blocks = nn.ModuleList([QFormerBlock(dim, kv_dim, heads, ffn_mult) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, kv_BNK: torch.Tensor) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(kv_BNK.shape[0], -1, -1)
        for blk in self.blocks:
            q = blk(q, kv_BNK)
        return self.proj(self.norm(q))


class PolyExpertFusion(nn.Module):
    """MouSi's poly-expert fusion network: [features of expert e (B, N_e, D_e)] -> (B, T, D_LLM), the
    per-expert projections concatenated along the sequence in ``cfg.experts`` order. T = sum_e N_e / g_e
    (MLP) or E * Q (Q-Former)."""

    def __init__(self, cfg: MouSiConfig):
        super().__init__()
        self.cfg = cfg.validate()
        heads = nn.ModuleDict()
        for e in cfg.experts:
            in_dim = e.dim * e.group
            if cfg.fusion == "mlp":
                heads[e.name] = MLPProjector(in_dim, cfg.mlp_hidden or cfg.llm_dim, cfg.llm_dim)
            else:
                heads[e.name] = QFormer(in_dim, cfg.num_queries, cfg.qformer_dim or cfg.llm_dim, cfg.llm_dim,
                                        cfg.qformer_heads, cfg.qformer_layers, cfg.qformer_ffn_mult)
        self.heads = heads

    def tokens_per_expert(self) -> list[int]:
        if self.cfg.fusion == "qformer":
            return [self.cfg.num_queries] * len(self.cfg.experts)
        return [h * w for h, w in (e.grouped_grid for e in self.cfg.experts)]

    def output_grids(self) -> list[tuple[int, int]]:
        """The token grid each expert contributes: its grouped grid (MLP) or 1 x Q (Q-Former)."""
        if self.cfg.fusion == "qformer":
            return [(1, self.cfg.num_queries)] * len(self.cfg.experts)
        return [e.grouped_grid for e in self.cfg.experts]

    def layout(self, text_before: int = 0, text_after: int = 0) -> list:
        """The segment layout text / expert tokens (in order) / text, for ``position_ids``."""
        segs: list = [TextSegment(text_before)] if text_before else []
        segs += [ExpertSegment(h, w) for h, w in self.output_grids()]
        if text_after:
            segs.append(TextSegment(text_after))
        return segs

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        experts = self.cfg.experts
        if not isinstance(features, (list, tuple)) or len(features) != len(experts):
            got = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
            raise ConfigError(f"features must be a list of {len(experts)} tensors (one per expert, in order "
                              f"{[e.name for e in experts]}), got {got}")
        outs = []
        batch = None
        for e, f in zip(experts, features):
            if not torch.is_tensor(f) or f.dim() != 3 or f.shape[-1] != e.dim:
                shape = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
                raise ConfigError(f"features for expert {e.name!r} must be (B, {e.num_tokens}, {e.dim}), "
                                  f"got {shape}")
            if batch is None:
                batch = f.shape[0]
            elif f.shape[0] != batch:
                raise ConfigError(f"features for expert {e.name!r} have batch {f.shape[0]}, expected {batch}")
            x = group_tokens(f, e.height, e.width, e.group, e.group_shape, e.name)
            outs.append(self.heads[e.name](x))
        return torch.cat(outs, dim=1)


# ---------------------------------------------------------------------------------------------------
# position ids
@dataclass(frozen=True)
class TextSegment:
    """``n`` text tokens."""

    n: int


@dataclass(frozen=True)
class ExpertSegment:
    """One expert's visual tokens: an H x W grid before grouping (row-major), grouped by ``group``."""

    height: int
    width: int
    group: int = 1
    group_shape: str = "row"


Segment = Union[TextSegment, ExpertSegment]


def position_ids(layout: Sequence[Segment], scheme: str = "original") -> torch.Tensor:
    """Position ids of a text / expert / text layout under a MouSi scheme.

    Returns a (N,) long tensor, or for ``share_by_row_col`` a (2, N) long tensor (row ids, column ids).
    Each segment starts at max(id used so far) + 1 (0 for the first)."""
    if scheme not in POSITION_SCHEMES:
        raise ConfigError(f"scheme must be one of {POSITION_SCHEMES}, got {scheme!r}")
    if not isinstance(layout, (list, tuple)) or not layout:
        raise ConfigError(f"layout must be a non-empty list of TextSegment / ExpertSegment, got {layout!r}")
    rows: list[torch.Tensor] = []
    cols: list[torch.Tensor] = []
    start = 0
    for i, seg in enumerate(layout):
        if isinstance(seg, TextSegment):
            n = _positive_int(f"layout[{i}].n", seg.n)
            ids = torch.arange(start, start + n)
            rows.append(ids)
            cols.append(ids)
            start += n
            continue
        if not isinstance(seg, ExpertSegment):
            raise ConfigError(f"layout[{i}] must be a TextSegment or ExpertSegment, got {type(seg).__name__}")
        h, w = grouped_grid(seg.height, seg.width, seg.group, seg.group_shape, f"layout[{i}]")
        r = torch.arange(h).repeat_interleave(w)  # row of each row-major token
        c = torch.arange(w).repeat(h)
        if scheme == "original":
            ids = torch.arange(start, start + h * w)
            rows.append(ids)
            cols.append(ids)
            start += h * w
        elif scheme == "share_all":
            ids = torch.full((h * w,), start, dtype=torch.long)
            rows.append(ids)
            cols.append(ids)
            start += 1
        elif scheme == "share_by_row":
            rows.append(start + r)
            cols.append(start + r)
            start += h
        else:
            rows.append(start + r)
            cols.append(start + c)
            start += max(h, w)
    row = torch.cat(rows)
    if scheme != "share_by_row_col":
        return row
    return torch.stack([row, torch.cat(cols)])


# ---------------------------------------------------------------------------------------------------
# RoPE with arbitrary (possibly repeated) ids
def rope_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(Dh/2,) float64 frequencies base^(-2p/Dh) of the rotary pairs p."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ConfigError(f"head_dim must be a positive even integer, got {head_dim!r}")
    if not base > 0:
        raise ConfigError(f"base must be > 0, got {base!r}")
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[..., 2p], x[..., 2p+1]) of x (..., N, Dh) by angles (..., N, Dh/2)."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def _check_ids(x: torch.Tensor, ids: torch.Tensor, name: str) -> None:
    if not torch.is_tensor(ids) or ids.dtype.is_floating_point or ids.dim() not in (1, 2):
        raise ConfigError(f"{name} must be an integer tensor (N,) or (B, N), got "
                          f"{tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__}")
    if x.dim() < 2 or ids.shape[-1] != x.shape[-2]:
        raise ConfigError(f"{name} has {ids.shape[-1]} positions but x {tuple(x.shape)} has "
                          f"{x.shape[-2] if x.dim() >= 2 else 'no'} tokens (axis -2)")
    if ids.dim() == 2 and x.dim() < 3:
        raise ConfigError(f"batched {name} {tuple(ids.shape)} needs x with a batch axis, got {tuple(x.shape)}")


def _broadcast(angles: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, N, P) angles against x (B, ..., N, Dh): insert the middle axes (e.g. heads)."""
    if angles.dim() == 3:
        angles = angles.reshape(angles.shape[0], *([1] * (x.dim() - 3)), *angles.shape[1:])
    return angles


def rope(x: torch.Tensor, ids: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """1-D RoPE at arbitrary integer positions: x (..., N, Dh), ids (N,) or (B, N) with x (B, ..., N, Dh)."""
    _check_ids(x, ids, "ids")
    angles = ids.double()[..., None] * rope_inv_freq(x.shape[-1], base)
    return _rotate(x, _broadcast(angles, x))


def rope_2d(x: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor, base: float = 10000.0,
            split: str = "halves") -> torch.Tensor:
    """2-D RoPE for ``share_by_row_col``: half of the rotary pairs turn with ``row_ids``, the other half with
    ``col_ids`` (``split``: "halves" = pairs p < Dh/4 take the row; "alternate" = even pairs take the row).
    Each pair keeps its 1-D frequency, so row_ids == col_ids gives exactly ``rope(x, row_ids)``."""
    if split not in ROPE_SPLITS:
        raise ConfigError(f"split must be one of {ROPE_SPLITS}, got {split!r}")
    _check_ids(x, row_ids, "row_ids")
    _check_ids(x, col_ids, "col_ids")
    if row_ids.shape != col_ids.shape:
        raise ConfigError(f"row_ids {tuple(row_ids.shape)} and col_ids {tuple(col_ids.shape)} differ in shape")
    dh = x.shape[-1]
    if dh % 4:
        raise ConfigError(f"head_dim={dh} must be divisible by 4 for 2-D RoPE")
    inv = rope_inv_freq(dh, base)
    pairs = torch.arange(dh // 2)
    use_row = pairs < dh // 4 if split == "halves" else pairs % 2 == 0
    pos = torch.where(use_row, row_ids.double()[..., None], col_ids.double()[..., None])
    return _rotate(x, _broadcast(pos * inv, x))


def apply_position_rope(x: torch.Tensor, ids: torch.Tensor, scheme: str, base: float = 10000.0,
                        split: str = "halves") -> torch.Tensor:
    """RoPE from ``position_ids(layout, scheme)`` output: (2, N) row/col ids -> ``rope_2d`` for
    ``share_by_row_col``, (N,) ids -> ``rope`` for the other schemes."""
    if scheme not in POSITION_SCHEMES:
        raise ConfigError(f"scheme must be one of {POSITION_SCHEMES}, got {scheme!r}")
    if scheme == "share_by_row_col":
        if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[0] != 2:
            raise ConfigError(f"ids for scheme 'share_by_row_col' must be (2, N) row/col ids, got "
                              f"{tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__}")
        return rope_2d(x, ids[0], ids[1], base, split)
    return rope(x, ids, base)
