"""IMP: Alternating Gradient Descent (AGD) and MoE for integrated multimodal perception (Akbari et al.,
NeurIPS 2023; spec multimodal_compression_systems.md §11).

IMP trains one modality-agnostic Transformer encoder on many datasets, modalities and objectives by
**alternating**: each optimiser step samples one (dataset, objective, input shape) task with probability
proportional to its weight and updates on that task alone, so inputs of different shapes and losses never
share a batch; sparse MoE layers reduce the conflict between modalities. This module holds:

- ``AGDTask``: a task = a batch sampler ``sample(step, generator) -> batch``, a loss ``loss(model, batch)``
  and a weight; ``agd_train`` runs AGD (``mode="agd"``: one task per step, sampled from Categorical(w)) or the
  multi-task baseline (``mode="sum"``: every task's loss, weighted, summed into one update) with one
  optimiser and one state for all parameters; ``task_schedule`` is the seeded task sequence.
- ``drop_tokens``: DropToken, a random subset of (1 - rate) of each sample's tokens (same count per sample,
  so shapes stay static within a step).
- ``IMPEncoder``: per-modality embedders (image patches; video tubelets with factorised space/time
  positions, so the frame count can change from step to step; text tokens), one shared stack of ViT blocks
  with ``moevision.MoE`` FFNs in the listed layers (token choice or expert choice: the core router), a final
  norm, mean pooling, and per-objective heads (contrastive projections with a learnable temperature;
  classification heads).
- ``info_nce``: the symmetric InfoNCE, ½[CE(sim(a, b)/τ, diag) + CE(sim(b, a)/τ, diag)].
- The CPU miniature of §11(d) on procedurally generated data (``moevision.techniques.imp_experiment``).

Deviations, stated: no audio; the "glyph classification" task is replaced by counting ShapeWorld objects
(ShapeWorld has no glyphs here); text is padded to a fixed length and the pad tokens take part in
attention (there is no attention mask), the text embedding is the mean over non-pad positions; the MoE
placement (layers 1 and 3), expert count (8) and routing follow §11(d), and [R] items (expert choice vs
token choice, the task weights) are options. Eager PyTorch: there is no per-shape compilation cache.

Shape legend: B batch, N tokens, D width, T frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..layers import Mlp
from ..models.vit import Block
from ..moe import MoE


# ---------------------------------------------------------------------------------------------------
# AGD
@dataclass
class AGDTask:
    """One (dataset, objective) of the mixture. ``sample(step, generator)`` returns a batch (anything
    ``loss`` accepts); ``loss(model, batch)`` returns a scalar (the model's aux loss included)."""

    name: str
    sample: Callable[[int, torch.Generator], Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    weight: float = 1.0


def task_schedule(weights: Sequence[float], steps: int, seed: int) -> list[int]:
    """The AGD task index of every step: i.i.d. draws from Categorical(w / sum w), seeded."""
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    if w.numel() == 0 or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ConfigError(f"task weights must be >= 0 with a positive sum, got {list(weights)}")
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(w / w.sum(), steps, replacement=True, generator=g).tolist() if steps else []


def agd_train(model: nn.Module, tasks: Sequence[AGDTask], *, steps: int, lr: float = 1e-3,
              weight_decay: float = 0.05, warmup_steps: int = 0, mode: str = "agd", seed: int = 0,
              grad_clip: float | None = 1.0, progress: Callable[[int, str, float], None] | None = None
              ) -> list[tuple[str, float]]:
    """Train ``model`` on ``tasks`` for ``steps`` optimiser steps with AdamW (warmup + cosine); returns
    (task name, loss) per step (``mode="sum"``: name "sum"). ``mode="agd"``: each step samples one task
    (``task_schedule``) and updates on its loss alone; ``mode="sum"``: each step sums every task's
    weighted loss (weights normalised to sum 1) into one update."""
    from ..train.optim import set_lr, warmup_cosine
    from ._loop import adamw, optimizer_step

    if mode not in ("agd", "sum"):
        raise ConfigError(f"mode must be 'agd' or 'sum', got {mode!r}")
    if not tasks:
        raise ConfigError("agd_train needs at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}")
    weights = [t.weight for t in tasks]
    schedule = task_schedule(weights, steps, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr, weight_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    total_w = sum(weights)
    history: list[tuple[str, float]] = []
    model.train()
    for step in range(steps):
        set_lr(opt, warmup_cosine(step, total_steps=steps, warmup_steps=warmup_steps, lr=lr, min_lr=lr * 0.01))
        if mode == "agd":
            task = tasks[schedule[step]]
            loss, name = task.loss(model, task.sample(step, gen)), task.name
        else:
            loss = sum(t.weight / total_w * t.loss(model, t.sample(step, gen)) for t in tasks if t.weight > 0)
            name = "sum"
        optimizer_step(opt, loss, params, grad_clip, f"step {step} ({name})")
        history.append((name, float(loss.detach())))
        if progress is not None:
            progress(step, name, history[-1][1])
    return history


def drop_tokens(x_BND: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DropToken: keep a random ``ceil((1 - rate) N)`` of each sample's N tokens (their order kept)."""
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"drop rate must be in [0, 1), got {rate}")
    B, N, D = x_BND.shape
    keep = max(1, math.ceil((1.0 - rate) * N))
    if keep == N:
        return x_BND
    scores = torch.rand(B, N, generator=generator).to(x_BND.device)
    idx = scores.topk(keep, dim=1).indices.sort(dim=1).values
    return x_BND.gather(1, idx[..., None].expand(B, keep, D))


def info_nce(a_BD: torch.Tensor, b_BD: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised embeddings: ½[CE(s·a bᵀ, diag) + CE(s·b aᵀ, diag)], s = exp(scale)."""
    a, b = F.normalize(a_BD.float(), dim=-1), F.normalize(b_BD.float(), dim=-1)
    logits = logit_scale.exp() * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# ---------------------------------------------------------------------------------------------------
# the encoder
@dataclass
class IMPConfig:
    width: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    moe_layers: tuple[int, ...] = (1, 3)  # empty: the dense twin
    num_experts: int = 8
    top_k: int = 1
    router: str = "topk"  # "topk" (token choice) or "expert_choice" ([R] IMP's)
    capacity_factor: float | None = None  # None: dropless token choice; expert choice uses 1.0 if None
    image_size: int = 32
    image_patch: int = 4
    video_patch: int = 8
    tubelet_frames: int = 2
    max_frames: int = 8
    vocab_size: int = 64
    max_text_len: int = 24
    embed_dim: int = 64  # contrastive embedding width
    heads: tuple[tuple[str, int], ...] = ()  # classification heads: (name, classes)

    def validate(self) -> None:
        for k in ("width", "depth", "num_heads", "num_experts", "top_k", "image_patch", "video_patch",
                  "tubelet_frames", "max_frames", "vocab_size", "max_text_len", "embed_dim"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"imp.{k} must be a positive integer, got {v!r}")
        if self.width % self.num_heads:
            raise ConfigError(f"imp.num_heads={self.num_heads} must divide width={self.width}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"imp.moe_layers {bad} out of range for depth={self.depth}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"imp.top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.router not in ("topk", "expert_choice"):
            raise ConfigError(f"imp.router must be 'topk' or 'expert_choice', got {self.router!r}")
        for k, p in (("image_patch", self.image_patch), ("video_patch", self.video_patch)):
            if self.image_size % p:
                raise ConfigError(f"imp.{k}={p} must divide image_size={self.image_size}")
        if self.max_frames % self.tubelet_frames:
            raise ConfigError(f"imp.tubelet_frames={self.tubelet_frames} must divide max_frames={self.max_frames}")


class IMPEncoder(nn.Module):
    """One shared Transformer for images (B, 3, H, W), videos (B, T, 3, H, W) with T a multiple of
    ``tubelet_frames`` up to ``max_frames``, and token ids (B, L); ``encode(modality, x)`` returns the pooled
    (B, D) feature and the summed aux loss of the MoE layers."""

    def __init__(self, cfg: IMPConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.width
        self.image_embed = nn.Conv2d(3, D, cfg.image_patch, cfg.image_patch)
        self.image_pos = nn.Parameter(torch.zeros(1, (cfg.image_size // cfg.image_patch) ** 2, D))
        t, p = cfg.tubelet_frames, cfg.video_patch
        self.video_embed = nn.Conv3d(3, D, (t, p, p), (t, p, p))
        self.video_pos_space = nn.Parameter(torch.zeros(1, 1, (cfg.image_size // p) ** 2, D))
        self.video_pos_time = nn.Parameter(torch.zeros(1, cfg.max_frames // t, 1, D))
        self.text_embed = nn.Embedding(cfg.vocab_size, D)
        self.text_pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, D))
        hidden = int(D * cfg.mlp_ratio)
        blocks = []
        for i in range(cfg.depth):
            if i in cfg.moe_layers:
                cf = cfg.capacity_factor if cfg.capacity_factor is not None else (1.0 if cfg.router == "expert_choice"
                                                                                  else None)
                # experts of hidden / top_k keep the dense twin's active FFN FLOPs per token
                mlp = MoE(D, hidden // cfg.top_k if cfg.router == "topk" else hidden, cfg.num_experts,
                          cfg.top_k if cfg.router == "topk" else 1, router=cfg.router, capacity_factor=cf,
                          eval_capacity_factor=cf)
            else:
                mlp = Mlp(D, hidden)
            blocks.append(Block(D, cfg.num_heads, mlp))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(D)
        self.proj = nn.ModuleDict({"image": nn.Linear(D, cfg.embed_dim), "text": nn.Linear(D, cfg.embed_dim)})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.heads = nn.ModuleDict({name: nn.Linear(D, n) for name, n in cfg.heads})
        for prm in (self.image_pos, self.video_pos_space, self.video_pos_time, self.text_pos):
            nn.init.trunc_normal_(prm, std=0.02)

    def tokens(self, modality: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens (B, N, D), pad mask (B, N) for text or None)."""
        cfg = self.cfg
        if modality == "image":
            if x.dim() != 4 or x.shape[1:] != (3, cfg.image_size, cfg.image_size):
                raise ValueError(f"images must be (B, 3, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}")
            return self.image_embed(x).flatten(2).transpose(1, 2) + self.image_pos, None
        if modality == "video":
            if x.dim() != 5 or x.shape[2:] != (3, cfg.image_size, cfg.image_size):
                raise ValueError(f"videos must be (B, T, 3, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}")
            T = x.shape[1]
            if T % cfg.tubelet_frames or not 0 < T <= cfg.max_frames:
                raise ValueError(f"the frame count must be a multiple of {cfg.tubelet_frames} up to "
                                 f"{cfg.max_frames}, got {T}")
            z = self.video_embed(x.transpose(1, 2))  # (B, D, T', H', W')
            B, D, Tp = z.shape[:3]
            z = z.flatten(3).permute(0, 2, 3, 1) + self.video_pos_space + self.video_pos_time[:, :Tp]
            return z.reshape(B, -1, D), None
        if modality == "text":
            if x.dim() != 2 or x.shape[1] > cfg.max_text_len:
                raise ValueError(f"token ids must be (B, L <= {cfg.max_text_len}), got {tuple(x.shape)}")
            return self.text_embed(x) + self.text_pos[:, :x.shape[1]], x != 0
        raise ValueError(f"unknown modality {modality!r}; use image, video or text")

    def encode(self, modality: str, x: torch.Tensor, *, drop_rate: float = 0.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z, keep = self.tokens(modality, x)
        if drop_rate > 0 and self.training and keep is None:
            z = drop_tokens(z, drop_rate, generator)
        aux = z.new_zeros((), dtype=torch.float32)
        for blk in self.blocks:
            z, a, _ = blk(z)
            if a is not None:
                aux = aux + a
        z = self.norm(z)
        if keep is None:
            return z.mean(1), aux
        k = keep.unsqueeze(-1).to(z.dtype)
        return (z * k).sum(1) / k.sum(1).clamp_min(1.0), aux

    def contrastive(self, a_BD: torch.Tensor, b_BD: torch.Tensor) -> torch.Tensor:
        """info_nce of the image and text projections (learnable temperature, scale clamped at 100)."""
        return info_nce(self.proj["image"](a_BD), self.proj["text"](b_BD), self.logit_scale.clamp(max=math.log(100)))

    def active_ffn_flops_per_token(self) -> int:
        """2 x multiply-adds of the FFNs per token (routers included): equal for the MoE and its dense twin
        with token choice, experts of hidden / k."""
        D, h = self.cfg.width, int(self.cfg.width * self.cfg.mlp_ratio)
        per = [2 * (2 * D * h + (D * self.cfg.num_experts if i in self.cfg.moe_layers else 0))
               for i in range(self.cfg.depth)]
        return sum(per)
