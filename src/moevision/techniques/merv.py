"""MERV: multi-encoder representation of videos (Chung et al. 2024, "Unifying Specialized Visual Encoders
for Video Language Models"; spec ``multimodal_compression_systems.md`` §7.2, tests §7.4 6-8).

Several frozen image/video encoders see the same clip, each at its own frame count. Per encoder ``e`` the
token features ``[B, T_e·H_e·W_e, C_e]`` are viewed as ``[B, T_e, H_e, W_e, C_e]``, pooled by
``AdaptiveAvgPool3d(T', s, s)`` to ``[B, T'·s², C_e]`` and projected (``linear`` or GELU-MLP) to the language
model's width ``D``. Every encoder must then give the same token count ``L = T'·s²``. A mixer turns the
``E`` sequences into one; the default ``cross_attention_avg_lq`` is a single learnable query attending, with
one head, over the per-encoder mean tokens ``v̄_e = mean_L V_e``; its attention weights ``a ∈ Δ^E`` (per
sample) mix the *full* sequences: ``fused = Σ_e a_e V_e``.

Pieces: ``pool_3d`` (the alignment), ``SpatioTemporalAligner`` (pool + projector), the mixers
(``CrossAttentionMixer`` and the ablations ``SequenceConcatMixer``, ``ChannelConcatMixer`` with optional
LayerNorm, ``ScalarMixer``), ``PerFrame`` and ``Tiny3DConv`` (tiny encoders), and ``MERVEncoder`` that
assembles encoders + aligners + mixer into one video encoder (``MERVConfig`` holds the knobs).

Read in the official code [V] (princetonvisualai/merv, ``merv/util/nn_utils.py``, ``vidlms/merv.py``): the
``B F (H W) C -> B C F H W`` pooling layout, ``T' = temporal_resolution // frame_factor``, the same-``L``
assertion, the query (xavier-uniform, width 3072 by default) projected by the attention's query projection
and the mean tokens by its key projection (``kdim = D``), scale ``1/sqrt(query width)``, the weights applied
to the un-projected sequences, the optional learned per-encoder embedding added to the mean tokens (off by
default), channel concat = ``Linear(E·D -> D)`` with an optional LayerNorm before it, and scalar mixing =
softmax over learned scalars initialised from a standard normal.

Deviations (each a documented choice):
- The attention is written out (query and key projections only). The official ``nn.MultiheadAttention`` also
  builds value and output projections whose output is discarded, so they never affect the result; they are
  left out here (fewer parameters, same function).
- ``query_dim`` defaults to ``D`` (the official 3072 is independent of the LLM width; set it explicitly).
- ``out_frames`` may be given per encoder (the official code has one global ``frame_factor``), so encoders
  with different native temporal resolutions can be made to agree on ``L``.
- Encoders returning a single (CLS-like) token, which the official mixer repeats ``L`` times, are not
  supported: every encoder must return a ``T_e × H_e × W_e`` token grid.
- The official ``ScalarAdapter`` hard-codes 4 scalars; here there is one per encoder.
- Frames per encoder are sampled by stride from the clip (``sample_frames``); the official code decodes each
  encoder's frames from the video file with its own sampler.

Shape legend: B batch, T frames, H×W token grid, C encoder width, L aligned tokens per encoder (T'·s²),
D output (LLM) width, E encoders, Q query width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

PROJECTORS = ("linear", "gelu-mlp")
MIXERS = ("cross_attention_avg_lq", "concat_sequence", "concat_channel", "concat_channel_ln", "scalar")


def _positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")


# ---------------------------------------------------------------------------------------------------
# alignment
def pool_3d(x_BNC: torch.Tensor, grid: tuple[int, int, int], out_frames: int, out_size: int) -> torch.Tensor:
    """``[B, T·H·W, C]`` tokens in (t, h, w) order -> ``[B, T'·s·s, C]`` by ``AdaptiveAvgPool3d((T', s, s))``;
    the output keeps the (t', h', w') order."""
    T, H, W = grid
    B, N, C = x_BNC.shape
    if N != T * H * W:
        raise ConfigError(f"pool_3d: got {N} tokens, but grid (T, H, W) = {grid} needs {T * H * W}")
    x_BCTHW = x_BNC.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)
    pooled = F.adaptive_avg_pool3d(x_BCTHW, (out_frames, out_size, out_size))
    return pooled.flatten(2).transpose(1, 2)


class SpatioTemporalAligner(nn.Module):
    """One encoder's alignment: ``pool_3d`` to ``L = out_frames·out_size²`` tokens, then the projector
    (``linear``: Linear(C, D); ``gelu-mlp``: Linear(C, D), GELU, Linear(D, D)), with an optional LayerNorm
    before it (``pre_norm``)."""

    def __init__(self, in_dim: int, out_dim: int, *, grid: tuple[int, int, int], out_frames: int, out_size: int,
                 projector: str = "linear", pre_norm: bool = False):
        super().__init__()
        for k, v in (("in_dim", in_dim), ("out_dim", out_dim), ("out_frames", out_frames), ("out_size", out_size)):
            _positive_int(k, v)
        if len(grid) != 3:
            raise ConfigError(f"grid must be (T, H, W), got {grid!r}")
        for k, v in zip("THW", grid):
            _positive_int(f"grid {k}", v)
        if projector not in PROJECTORS:
            raise ConfigError(f"projector must be one of {PROJECTORS}, got {projector!r}")
        self.grid, self.out_frames, self.out_size = tuple(grid), out_frames, out_size
        self.norm = nn.LayerNorm(in_dim) if pre_norm else nn.Identity()
        if projector == "linear":
            self.proj = nn.Linear(in_dim, out_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    @property
    def token_length(self) -> int:
        return self.out_frames * self.out_size ** 2

    def pool(self, x_BNC: torch.Tensor) -> torch.Tensor:
        return pool_3d(x_BNC, self.grid, self.out_frames, self.out_size)

    def project(self, pooled_BLC: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(pooled_BLC))

    def forward(self, x_BNC: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool(x_BNC))


# ---------------------------------------------------------------------------------------------------
# mixers: [B, E, L, D] -> MixerOutput
@dataclass
class MixerOutput:
    tokens: torch.Tensor  # [B, L', D]: L' = L, or E·L for sequence concat
    weights: torch.Tensor | None  # [B, E] on the simplex (attention / scalar mixers), else None


class CrossAttentionMixer(nn.Module):
    """``cross_attention_avg_lq``: ``a = softmax_e((W_q q + b_q) · (W_k v̄_e + b_k) / sqrt(Q))`` with one learnable
    query ``q``, ``v̄_e = mean_L V_e`` (+ a learned per-encoder embedding if ``encoder_embedding``);
    ``fused = Σ_e a_e V_e``."""

    def __init__(self, dim: int, num_encoders: int, *, query_dim: int | None = None,
                 encoder_embedding: bool = False):
        super().__init__()
        query_dim = dim if query_dim is None else query_dim
        for k, v in (("dim", dim), ("num_encoders", num_encoders), ("query_dim", query_dim)):
            _positive_int(k, v)
        self.num_encoders, self.query_dim = num_encoders, query_dim
        self.query = nn.Parameter(torch.empty(1, query_dim))
        self.q_proj = nn.Linear(query_dim, query_dim)
        self.k_proj = nn.Linear(dim, query_dim)
        self.encoder_embed = nn.Parameter(torch.empty(num_encoders, dim)) if encoder_embedding else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # as nn.MultiheadAttention with kdim != embed_dim: xavier-uniform projections, zero biases
        for p in (self.query, self.q_proj.weight, self.k_proj.weight):
            nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.q_proj.bias)
        nn.init.zeros_(self.k_proj.bias)
        if self.encoder_embed is not None:
            nn.init.xavier_uniform_(self.encoder_embed)

    def attention_weights(self, V_BELD: torch.Tensor) -> torch.Tensor:
        vbar_BED = V_BELD.mean(2)
        if self.encoder_embed is not None:
            vbar_BED = vbar_BED + self.encoder_embed
        q_Q = self.q_proj(self.query)[0]
        k_BEQ = self.k_proj(vbar_BED)
        return torch.softmax(k_BEQ @ q_Q / math.sqrt(self.query_dim), dim=-1)

    def forward(self, V_BELD: torch.Tensor) -> MixerOutput:
        a_BE = self.attention_weights(V_BELD)
        return MixerOutput(torch.einsum("be,beld->bld", a_BE, V_BELD), a_BE)


class SequenceConcatMixer(nn.Module):
    """Ablation ``concat_sequence``: the encoders' sequences one after another, ``[B, E·L, D]``."""

    def forward(self, V_BELD: torch.Tensor) -> MixerOutput:
        return MixerOutput(V_BELD.flatten(1, 2), None)


class ChannelConcatMixer(nn.Module):
    """Ablation ``concat_channel`` (``concat_channel_ln`` with ``layer_norm``): per token, the E projected
    features concatenated (encoder-major) -> [LayerNorm] -> Linear(E·D, D)."""

    def __init__(self, dim: int, num_encoders: int, *, layer_norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(num_encoders * dim) if layer_norm else nn.Identity()
        self.proj = nn.Linear(num_encoders * dim, dim)

    def forward(self, V_BELD: torch.Tensor) -> MixerOutput:
        B, E, L, D = V_BELD.shape
        x_BLX = V_BELD.permute(0, 2, 1, 3).reshape(B, L, E * D)
        return MixerOutput(self.proj(self.norm(x_BLX)), None)


class ScalarMixer(nn.Module):
    """Ablation ``scalar``: learned global scalars, ``fused = Σ_e softmax(s)_e V_e`` (the same weights for every
    sample). ``init``: ``normal`` (official: standard normal) or ``zeros`` (uniform weights at step 0)."""

    def __init__(self, num_encoders: int, *, init: str = "normal"):
        super().__init__()
        if init not in ("normal", "zeros"):
            raise ConfigError(f"scalar_init must be 'normal' or 'zeros', got {init!r}")
        self.scalars = nn.Parameter(torch.randn(num_encoders) if init == "normal" else torch.zeros(num_encoders))

    def forward(self, V_BELD: torch.Tensor) -> MixerOutput:
        a_BE = torch.softmax(self.scalars, 0).expand(V_BELD.shape[0], -1)
        return MixerOutput(torch.einsum("be,beld->bld", a_BE, V_BELD), a_BE)


def build_mixer(name: str, dim: int, num_encoders: int, *, query_dim: int | None = None,
                encoder_embedding: bool = False, scalar_init: str = "normal") -> nn.Module:
    if name == "cross_attention_avg_lq":
        return CrossAttentionMixer(dim, num_encoders, query_dim=query_dim, encoder_embedding=encoder_embedding)
    if name == "concat_sequence":
        return SequenceConcatMixer()
    if name in ("concat_channel", "concat_channel_ln"):
        return ChannelConcatMixer(dim, num_encoders, layer_norm=name.endswith("_ln"))
    if name == "scalar":
        return ScalarMixer(num_encoders, init=scalar_init)
    raise ConfigError(f"mixer must be one of {MIXERS}, got {name!r}")


# ---------------------------------------------------------------------------------------------------
# tiny encoders: [B, T, 3, H, W] -> [B, T_e·H_e·W_e, C_e]
class PerFrame(nn.Module):
    """An image encoder run on every frame (time folded into the batch): ``forward_features`` of ``image_encoder``
    gives ``[B·T, prefix + H·W, C]``; the first ``drop_prefix`` tokens (e.g. a class token) are dropped."""

    def __init__(self, image_encoder: nn.Module, drop_prefix: int = 0):
        super().__init__()
        self.image_encoder, self.drop_prefix = image_encoder, drop_prefix

    def forward(self, video_BT3HW: torch.Tensor) -> torch.Tensor:
        B, T = video_BT3HW.shape[:2]
        f = self.image_encoder.forward_features(video_BT3HW.flatten(0, 1))[:, self.drop_prefix:]
        return f.reshape(B, T * f.shape[1], f.shape[2])


class Tiny3DConv(nn.Module):
    """A small spatio-temporal encoder: two 3x3x3 convolutions (spatial stride 2 each, temporal stride 1) with
    GELU, then LayerNorm over channels; output grid (T, H/4, W/4)."""

    def __init__(self, dim: int = 32, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv3d(in_chans, dim // 2, 3, stride=(1, 2, 2), padding=1)
        self.conv2 = nn.Conv3d(dim // 2, dim, 3, stride=(1, 2, 2), padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward_grid(self, video_BT3HW: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(video_BT3HW.transpose(1, 2)))
        return F.gelu(self.conv2(x))  # [B, C, T, H/4, W/4]

    def forward(self, video_BT3HW: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_grid(video_BT3HW).flatten(2).transpose(1, 2))


# ---------------------------------------------------------------------------------------------------
# the assembled video encoder
@dataclass(frozen=True)
class EncoderSpec:
    """What ``MERVEncoder`` must know about one encoder: its width ``dim`` (C_e), the number of ``frames`` it
    samples from the clip, and the ``grid`` (T_e, H_e, W_e) of the tokens it returns."""

    name: str
    dim: int
    frames: int
    grid: tuple[int, int, int]


@dataclass
class MERVConfig:
    """The MERV knobs. ``out_size`` is s (official ``sqrt(projector_token_length)`` = 8); each encoder's T' is
    ``out_frames[name]`` if given, else ``grid T_e // frame_factor``."""

    dim: int
    out_size: int = 8
    frame_factor: int = 1
    out_frames: dict[str, int] = field(default_factory=dict)
    projector: str = "linear"
    pre_norm: bool = False
    mixer: str = "cross_attention_avg_lq"
    query_dim: int | None = None
    encoder_embedding: bool = False
    scalar_init: str = "normal"
    freeze_encoders: bool = True

    def validate(self) -> None:
        for k in ("dim", "out_size", "frame_factor"):
            _positive_int(k, getattr(self, k))
        if self.query_dim is not None:
            _positive_int("query_dim", self.query_dim)
        if self.projector not in PROJECTORS:
            raise ConfigError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.mixer not in MIXERS:
            raise ConfigError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        for name, v in self.out_frames.items():
            _positive_int(f"out_frames[{name!r}]", v)


def sample_frames(num_frames: int, n: int) -> torch.Tensor:
    """``n`` frame indices of a ``num_frames`` clip at stride ``num_frames / n`` (floor): 8 -> 4 gives 0,2,4,6."""
    if n > num_frames:
        raise ConfigError(f"an encoder samples {n} frames but the clip has only {num_frames}")
    return torch.div(torch.arange(n) * num_frames, n, rounding_mode="floor")


class MERVEncoder(nn.Module):
    """Encoders + one aligner per encoder + a mixer. ``forward(video [B, T, 3, H, W])`` -> ``MixerOutput``
    (tokens ``[B, L', D]``, per-sample mixer weights or None). ``pooled(video)`` -> the pooled encoder
    features (no projector; without gradient when the encoders are frozen) and ``fuse(pooled)`` the rest, so a
    caller with frozen encoders may cache ``pooled``."""

    def __init__(self, encoders: Sequence[tuple[EncoderSpec, nn.Module]], config: MERVConfig):
        super().__init__()
        config.validate()
        if not encoders:
            raise ConfigError("encoders: MERV needs at least one encoder")
        names = [s.name for s, _ in encoders]
        if len(set(names)) != len(names):
            raise ConfigError(f"encoders: names must be distinct, got {names}")
        unknown = sorted(set(config.out_frames) - set(names))
        if unknown:
            raise ConfigError(f"out_frames names unknown encoders {unknown}; encoders are {names}")
        self.config, self.specs = config, [s for s, _ in encoders]
        self.encoders = nn.ModuleDict({s.name: m for s, m in encoders})
        aligners = {}
        for s in self.specs:
            _positive_int(f"encoder {s.name!r} dim", s.dim)
            _positive_int(f"encoder {s.name!r} frames", s.frames)
            t_out = config.out_frames.get(s.name, s.grid[0] // config.frame_factor)
            if t_out < 1:
                raise ConfigError(f"encoder {s.name!r}: T' = grid T {s.grid[0]} // frame_factor "
                                  f"{config.frame_factor} = 0; lower frame_factor or set out_frames")
            aligners[s.name] = SpatioTemporalAligner(s.dim, config.dim, grid=s.grid, out_frames=t_out,
                                                     out_size=config.out_size, projector=config.projector,
                                                     pre_norm=config.pre_norm)
        lengths = {n: a.token_length for n, a in aligners.items()}
        if len(set(lengths.values())) != 1:
            raise ConfigError("token length L = T'·s² must be equal for every encoder, got "
                              + ", ".join(f"{n}: L={v}" for n, v in lengths.items())
                              + "; set out_frames per encoder or frame_factor")
        self.token_length = next(iter(lengths.values()))
        self.aligners = nn.ModuleDict(aligners)
        self.mixer = build_mixer(config.mixer, config.dim, len(self.specs), query_dim=config.query_dim,
                                 encoder_embedding=config.encoder_embedding, scalar_init=config.scalar_init)
        if config.freeze_encoders:
            self.encoders.requires_grad_(False)
            self.encoders.eval()

    def train(self, mode: bool = True) -> "MERVEncoder":
        super().train(mode)
        if self.config.freeze_encoders:
            self.encoders.eval()  # frozen encoders keep eval behaviour (dropout, norm statistics)
        return self

    def features(self, video_BT3HW: torch.Tensor) -> list[torch.Tensor]:
        """Each encoder's raw tokens ``[B, T_e·H_e·W_e, C_e]`` on its own frame sample."""
        if video_BT3HW.dim() != 5:
            raise ConfigError(f"video must be [B, T, C, H, W], got shape {tuple(video_BT3HW.shape)}")
        out = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoders):
            for s in self.specs:
                idx = sample_frames(video_BT3HW.shape[1], s.frames).to(video_BT3HW.device)
                out.append(self.encoders[s.name](video_BT3HW.index_select(1, idx)))
        return out

    def pooled(self, video_BT3HW: torch.Tensor) -> list[torch.Tensor]:
        """Each encoder's tokens after ``pool_3d``: ``[B, L, C_e]``."""
        return [self.aligners[s.name].pool(f) for s, f in zip(self.specs, self.features(video_BT3HW))]

    def project(self, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        """The projected sequences stacked: ``[B, E, L, D]``."""
        return torch.stack([self.aligners[s.name].project(p) for s, p in zip(self.specs, pooled)], 1)

    def fuse(self, pooled: Sequence[torch.Tensor]) -> MixerOutput:
        if len(pooled) != len(self.specs):
            raise ConfigError(f"fuse: got {len(pooled)} pooled features for {len(self.specs)} encoders")
        return self.mixer(self.project(pooled))

    def forward(self, video_BT3HW: torch.Tensor) -> MixerOutput:
        return self.fuse(self.pooled(video_BT3HW))
