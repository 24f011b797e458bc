"""Multi-task MoE ViT with task-dependent routing: M³ViT (Liang et al., NeurIPS 2022), vision_moe.md §10.

The routers themselves live in the core (``TopKRouter`` with ``task_routing="multi_gate"`` or
``"task_conditioned"``; ``MoE(..., task=...)``; ``ViTConfig.task_routing``). This module holds what sits
around them:

- ``from_single_gate``: a task-routed copy of a trained single-gate model that computes the same function
  for every task (multi-gate: the gate copied to every task; task-conditioned: zero task columns), as
  M³ViT initialises from a single-gate checkpoint.
- ``MultiTaskViT``: a backbone plus one head per task. With task routing the backbone runs **once per
  task** with that task's routing (M³ViT's training loop); without it, once for all heads (the usual
  shared-encoder multi-task baseline).
- Mod-Squad's mutual-information loss between tasks and experts (§14; ``mutual_information_loss``,
  ``MultiTaskViT(..., mi_weight=w)``): each step accumulates every task's router probabilities per MoE
  layer into A[t, e] and adds w · (-I(T; E)); rows ``modsquad`` / ``modsquad_strong`` of the experiment
  use it with zero-initialised per-task routers (Mod-Squad's router init); ``modsquad_nomi`` is the same
  without the loss. ``prune_for_task`` is Mod-Squad's task-specific expert pruning. Row
  ``modsquad_moa`` adds Mod-Squad's mixture of attention-head experts (``techniques.moa.MoAAttention``,
  per-task zero-init routers, probs + 1e-4 not renormalised) on the even blocks; the MI loss accumulates
  its router probabilities too. Deviations: in the MoE-MLP layers Mod-Squad's ``+1e-4`` on the combine
  weights is left out (the MI loss keeps its 1e-4 inside the log); ``prune_for_task`` prunes MLP experts
  only (MoA layers keep all their experts, with the task's router).
- the CPU experiment of §10(e) on Fashion-MNIST: task ``classify`` (10 classes, the CLS head) and task
  ``patch_stats`` (per-patch regression of the mean and the standard deviation of the patch's pixels, a
  texture/edge proxy, with a linear per-token head). ``run_multitask`` trains the dense multi-task ViT, a
  task-agnostic MoE and the two M³ViT routers over seeds and reports per-task metrics, the task-expert
  usage matrix and the active FLOPs of one task's inference (``moevision multitask``).

Deviations, stated: the aux loss is V-MoE's importance (+ load with noise) at our weights, where M³ViT uses
CV²(Σ gates) + CV²(load) at 0.01 (its forms are the layer options ``importance_on="gates"`` and
``load_threshold="shazeer_in_out"``; the experiment keeps V-MoE's); the experiment is classification + per-patch regression on 28x28 images,
not dense prediction on PASCAL-Context; AdamW with warmup + cosine instead of SGD with a poly schedule.

Shape legend: B batch, N tokens (incl. class token), D width, E experts, T tasks.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.vit import ViTConfig, VisionTransformer
from ..moe import MoE
from ..moe.router import TASK_ROUTING
from ._experiment import check_grid_settings, load_subsets, mean_std, run_grid, write_report
from .moa import MoAAttention

TASKS = ("classify", "patch_stats")


# ---------------------------------------------------------------------------------------------------
# function-preserving conversion from a single gate
def from_single_gate(model: VisionTransformer, num_tasks: int, task_routing: str = "multi_gate") -> VisionTransformer:
    """A copy of ``model`` (a single-gate MoE ViT) whose MoE layers route by task and which computes the
    same function as ``model`` for every task id, until training moves the task gates apart:
    ``multi_gate`` copies each router to every task; ``task_conditioned`` appends zero task columns."""
    cfg = model.config
    if task_routing not in TASK_ROUTING[1:]:
        raise ConfigError(f"task_routing must be 'multi_gate' or 'task_conditioned', got {task_routing!r}")
    if cfg.task_routing != "none":
        raise ConfigError(f"the model already routes by task (task_routing={cfg.task_routing!r})")
    if not cfg.moe_block_indices or cfg.router != "topk":
        raise ConfigError("from_single_gate needs an MoE ViT with router='topk'")
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ConfigError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    new_cfg = dataclasses.replace(cfg, task_routing=task_routing, num_tasks=num_tasks, task_embed_dim=None)
    p0 = next(model.parameters())
    new = VisionTransformer(new_cfg).to(device=p0.device, dtype=p0.dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in cfg.moe_block_indices:
        key = f"blocks.{i}.mlp.router.weight"
        w = state[key]
        if task_routing == "multi_gate":
            state[key] = w.unsqueeze(0).repeat(num_tasks, 1, 1)
        else:
            state[f"blocks.{i}.mlp.router.task_weight"] = w.new_zeros(w.shape[0], num_tasks)
    for key in [k for k in state if k.endswith(".attn.router.weight")]:  # MoA: its single router to every task
        state[key] = state[key][:1].repeat(num_tasks, 1, 1)
    new.load_state_dict(state, strict=True)
    new.train(model.training)
    if hasattr(model, "model_name"):
        new.model_name = model.model_name
    return new


# ---------------------------------------------------------------------------------------------------
# Mod-Squad's mutual-information loss between tasks and experts (vision_moe.md §14, [V] Mod-Squad)
def mutual_information_loss(A_TE: torch.Tensor, num_tokens: float, eps: float = 1e-4) -> torch.Tensor:
    """``-I(T; E)`` from the accumulated router probabilities ``A[t, e] = sum over task t's tokens of
    probs_e`` (one MoE layer, all tasks of the step): A <- A / num_tokens, P(t) = sum_e A, P(e) = sum_t A,
    L = -sum A log(A / (P(t) P(e)) + eps) (Mod-Squad's form; eps = 0 gives exactly -I(T; E) in nats).
    Minimising it makes each task lean on a few experts while the experts stay in use overall."""
    A = A_TE / num_tokens
    Pt, Pe = A.sum(1, keepdim=True), A.sum(0, keepdim=True)
    ratio = A / (Pt * Pe).clamp_min(1e-30)
    return -(A * torch.log(ratio.clamp_min(1e-30) + eps)).sum()  # 0 log 0 = 0 (an unused cell adds nothing)


def mutual_information_from_usage(usage_TE: list[list[float]], task_weights: list[float] | None = None) -> float:
    """I(T; E) in nats of a hard usage matrix (rows: a task's distribution over experts), tasks weighted
    equally (or by ``task_weights``): the evaluation-time counterpart of the loss."""
    U = torch.tensor(usage_TE, dtype=torch.float64)
    w = torch.full((U.shape[0],), 1.0 / U.shape[0], dtype=torch.float64) if task_weights is None \
        else torch.tensor(task_weights, dtype=torch.float64) / sum(task_weights)
    A = U * w[:, None]
    Pe = A.sum(0, keepdim=True)
    nz = A > 0
    return float((A[nz] * torch.log(A[nz] / (w[:, None] * Pe).expand_as(A)[nz])).sum())


class _RouterProbs:
    """Collects the (differentiable) clean router probabilities of every token-choice router in a model
    during a forward pass, summed over tokens: one (E,) tensor per router per call."""

    def __init__(self, model: nn.Module):
        from ..moe.router import TopKRouter
        from .moa import MoARouter

        self.sums: list[torch.Tensor] = []
        self.tokens: list[int] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, (TopKRouter, MoARouter))]

    def _hook(self, mod, inp, out):
        p = out if isinstance(out, torch.Tensor) else out.probs_GSE  # MoA: (B, N, E); MoE: a routing plan
        self.sums.append(p.sum(dim=(0, 1)))
        self.tokens.append(p.shape[0] * p.shape[1])

    def take(self) -> tuple[list[torch.Tensor], list[int]]:
        out = (self.sums, self.tokens)
        self.sums, self.tokens = [], []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def task_expert_keep(usage_E: list[float], thresh: float, k: int) -> list[int]:
    """Mod-Squad's rule for one layer: keep the experts whose usage by the task (the fraction of the task's
    tokens routed to the expert; with top-k routing these sum to k) exceeds ``thresh / k``; if fewer than k
    survive, the top-k by usage. Sorted expert ids."""
    u = torch.tensor(usage_E, dtype=torch.float64)
    keep = (u > thresh / k).nonzero().flatten().tolist()
    if len(keep) < k:
        keep = torch.argsort(u, descending=True, stable=True)[:k].tolist()
    return sorted(keep)


# ---------------------------------------------------------------------------------------------------
# tasks, the multi-task model
def patch_stats(images01: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch (mean, std) of the pixels of [0, 1] images (B, C, H, W) -> (B, N_patches, 2), row-major
    patches as the ViT's patch embedding orders them."""
    B, C, H, W = images01.shape
    p = images01.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, C, H/p, W/p, p, p)
    p = p.permute(0, 2, 3, 1, 4, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)
    return torch.stack([p.mean(-1), p.std(-1, unbiased=False)], dim=-1)


class MultiTaskViT(nn.Module):
    """A ViT backbone with a head per task: ``classify`` uses the backbone's own head (CLS token);
    ``patch_stats`` is a linear head on every patch token. ``task_names[t]`` is task id t."""

    def __init__(self, backbone: VisionTransformer, task_names: tuple[str, ...] = TASKS, *, mi_weight: float = 0.0):
        super().__init__()
        unknown = [t for t in task_names if t not in TASKS]
        if unknown or not task_names:
            raise ConfigError(f"task_names={task_names!r}: each must be one of {TASKS}")
        cfg = backbone.config
        if cfg.task_routing != "none" and cfg.num_tasks != len(task_names):
            raise ConfigError(f"the backbone routes {cfg.num_tasks} tasks but {len(task_names)} task names were "
                              f"given ({task_names})")
        if "patch_stats" in task_names and cfg.stem != "patch":
            raise ConfigError("task patch_stats needs a patch-stem ViT (one token per patch)")
        if mi_weight < 0 or (mi_weight > 0 and cfg.task_routing == "none"):
            raise ConfigError(f"mi_weight={mi_weight!r}: the mutual-information loss needs task-dependent routing "
                              f"and a weight >= 0")
        self.backbone, self.task_names = backbone, tuple(task_names)
        self.patch_head = nn.Linear(cfg.embed_dim, 2) if "patch_stats" in task_names else None
        self.mi_weight = mi_weight

    @property
    def task_routed(self) -> bool:
        return self.backbone.config.task_routing != "none"

    def head(self, name: str, feats_BND: torch.Tensor) -> torch.Tensor:
        if name == "classify":
            return self.backbone.forward_head(feats_BND)
        return self.patch_head(feats_BND[:, self.backbone.num_prefix_tokens:])

    def forward_task(self, x: torch.Tensor, t: int):
        """Task t alone, as at inference: (prediction, aux loss, routing stats); with task routing only
        task t's expert path runs."""
        feats, aux, stats = self.backbone._features(x, t if self.task_routed else None)
        return self.head(self.task_names[t], feats), aux, stats

    def forward(self, x):
        """Every task: ({name: prediction}, summed aux loss, {name: routing stats}). With task routing the
        backbone runs once per task (M³ViT); without, once for all heads. ``x`` is one image batch for
        every task, or (heterogeneous training, Mod-Squad §14) a dict {task name: that task's own images};
        the mutual-information loss then still accumulates over all the step's tasks."""
        if isinstance(x, dict):
            missing = [n for n in self.task_names if n not in x]
            if missing or len(x) != len(self.task_names):
                raise ValueError(f"heterogeneous input needs one batch per task {self.task_names}, got {list(x)}")
            if not self.task_routed:  # no shared pass is possible: the backbone runs on each task's batch
                preds, stats, aux = {}, {}, 0.0
                for n in self.task_names:
                    feats, a, st = self.backbone._features(x[n], None)
                    preds[n], stats[n], aux = self.head(n, feats), st, aux + a
                return preds, aux, stats
        if self.task_routed:
            first = next(iter(x.values())) if isinstance(x, dict) else x
            preds, stats, aux = {}, {}, first.new_zeros(())
            probs = _RouterProbs(self) if (self.mi_weight > 0 and self.training) else None
            per_task = []
            try:
                for t, name in enumerate(self.task_names):
                    preds[name], a, stats[name] = self.forward_task(x[name] if isinstance(x, dict) else x, t)
                    aux = aux + a
                    if probs is not None:
                        per_task.append(probs.take())
            finally:
                if probs is not None:
                    probs.close()
            if per_task:  # Mod-Squad: one (T, E) accumulation per MoE layer over all the step's tasks
                for li in range(len(per_task[0][0])):
                    A = torch.stack([pt[0][li] for pt in per_task])
                    n_tok = float(sum(pt[1][li] for pt in per_task))
                    aux = aux + self.mi_weight * mutual_information_loss(A, n_tok)
            return preds, aux, stats
        feats, aux, s = self.backbone._features(x, None)
        return {n: self.head(n, feats) for n in self.task_names}, aux, {n: s for n in self.task_names}


@torch.no_grad()
def prune_for_task(model: "MultiTaskViT", task: int, usage: list[list[float]], thresh: float,
                   moa_usage: list[list[float]] | None = None) -> tuple["MultiTaskViT", list[list[int]]]:
    """A single-task model for task ``task`` (Mod-Squad's expert pruning, §14 items 8-9) from a multi-gate
    model: per MoE layer keep the experts ``task_expert_keep(usage[layer], thresh, k)`` and task t's router
    rows for them (the softmax then runs over the kept experts only); heads of the other tasks are dropped.
    ``usage[layer]`` is task t's (E,) usage, the fraction of its tokens routed to each expert (sums to k;
    measure it on training data). Deviation: a ViT config has one expert count, so every layer
    keeps the largest count any layer needs, topped up by usage order; the kept lists are returned.
    MoA attention layers (Mod-Squad's attention experts) keep all their experts unless ``moa_usage`` (task t's
    usage per MoA layer, summing to the layer's top-k) is given; then they are pruned by the same rule
    with k = the MoA top-k, and their kept lists follow the MoE layers' in the returned list."""
    cfg = model.backbone.config
    if cfg.task_routing != "multi_gate":
        raise ConfigError(f"prune_for_task needs per-task routers (task_routing='multi_gate'), got "
                          f"{cfg.task_routing!r}")
    if not 0 <= task < cfg.num_tasks:
        raise ConfigError(f"task must be in [0, {cfg.num_tasks}), got {task}")
    layers = list(cfg.moe_block_indices)
    if len(usage) != len(layers):
        raise ConfigError(f"usage has {len(usage)} layers, the model has {len(layers)} MoE layers")
    k = cfg.top_k
    keeps, n = _common_keeps(usage, thresh, k)
    moa_blocks = [i for i, b in enumerate(model.backbone.blocks) if isinstance(b.attn, MoAAttention)]
    new_cfg = dataclasses.replace(cfg, task_routing="none", num_tasks=0, num_experts=n, top_k=min(k, n))
    moa_keeps: list[list[int]] = []
    if moa_usage is not None:
        if len(moa_usage) != len(moa_blocks):
            raise ConfigError(f"moa_usage has {len(moa_usage)} layers, the model has {len(moa_blocks)} MoA layers")
        ka = model.backbone.blocks[moa_blocks[0]].attn.top_k
        moa_keeps, na = _common_keeps(moa_usage, thresh, ka)
        new_cfg = dataclasses.replace(new_cfg, attention_options={**cfg.attention_options, "num_experts": na,
                                                                  "top_k": min(ka, na)})
    p0 = next(model.parameters())
    backbone = VisionTransformer(new_cfg).to(device=p0.device, dtype=p0.dtype)
    state = model.backbone.state_dict()
    new_state = {}
    for key, v in state.items():
        new_state[key] = v
        for li, bi in enumerate(layers):
            pre = f"blocks.{bi}.mlp."
            if key == pre + "router.weight":
                new_state[key] = v[task][keeps[li]].clone()
            elif key.startswith(pre + "experts."):
                new_state[key] = v[keeps[li]].clone()
        if key.endswith(".attn.router.weight"):  # MoA: task t's router (rows of the kept experts)
            new_state[key] = v[task:task + 1].clone()
        for li, bi in enumerate(moa_blocks if moa_keeps else ()):
            pre = f"blocks.{bi}.attn."
            if key == pre + "router.weight":
                new_state[key] = v[task:task + 1, moa_keeps[li]].clone()
            elif key in (pre + "q_weight", pre + "q_bias", pre + "o_weight"):
                new_state[key] = v[moa_keeps[li]].clone()
    backbone.load_state_dict(new_state, strict=True)
    name = model.task_names[task]
    pruned = MultiTaskViT(backbone, (name,)).to(device=p0.device, dtype=p0.dtype)
    if name == "patch_stats":
        pruned.patch_head.load_state_dict(model.patch_head.state_dict())
    pruned.train(model.training)
    return pruned, keeps + moa_keeps


def _common_keeps(usage: list[list[float]], thresh: float, k: int) -> tuple[list[list[int]], int]:
    """``task_expert_keep`` per layer, each topped up (most used first) to the largest count."""
    keeps = [task_expert_keep(u, thresh, k) for u in usage]
    n = max(len(kp) for kp in keeps)
    for li, kp in enumerate(keeps):
        extra = [e for e in torch.argsort(torch.tensor(usage[li]), descending=True, stable=True).tolist()
                 if e not in kp]
        keeps[li] = sorted(kp + extra[:n - len(kp)])
    return keeps, n


def task_losses(preds: dict, labels: torch.Tensor, patch_target: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Cross-entropy for ``classify``; MSE on the standardised (mean, std) targets for ``patch_stats``."""
    out = {}
    if "classify" in preds:
        out["classify"] = F.cross_entropy(preds["classify"], labels)
    if "patch_stats" in preds:
        out["patch_stats"] = F.mse_loss(preds["patch_stats"], patch_target)
    return out


# ---------------------------------------------------------------------------------------------------
# active FLOPs of one task's inference (multiply-adds x 2; norms, softmaxes and activations left out)
def task_flops(model: MultiTaskViT, task: str) -> int:
    cfg = model.backbone.config
    D, depth, N = cfg.embed_dim, cfg.depth, model.backbone.pos_embed.shape[1]
    n_patch = N - model.backbone.num_prefix_tokens
    macs = n_patch * cfg.in_chans * cfg.patch_size ** 2 * D if cfg.stem == "patch" else 0
    hidden = int(D * cfg.mlp_ratio)
    expert_hidden = int(D * (cfg.expert_hidden_ratio or cfg.mlp_ratio))
    for i in range(depth):
        attn = model.backbone.blocks[i].attn
        if isinstance(attn, MoAAttention):
            macs += attn.active_flops(N) // 2
        else:
            macs += N * 4 * D * D + 2 * N * N * D  # qkv + proj, scores + weighted sum
        if i in cfg.moe_block_indices:
            macs += N * (D * cfg.num_experts + cfg.top_k * 2 * D * expert_hidden)
        else:
            macs += N * 2 * D * hidden
    macs += D * cfg.num_classes if task == "classify" else n_patch * D * 2
    return 2 * macs


# ---------------------------------------------------------------------------------------------------
# the experiment
@dataclass
class MultiTaskSettings:
    """The §10(e) experiment, sized for 2 CPU cores (defaults: ~1 min per run)."""

    dataset: str = "fashion_mnist"
    train_subset: int = 10000
    test_subset: int = 2000
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    task_weights: dict = field(default_factory=lambda: {"classify": 1.0, "patch_stats": 1.0})
    # backbone: a patch-4 ViT on 28x28 (49 patches + CLS); MoE on the odd blocks (M³ViT), E=8, top-2
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    num_experts: int = 8
    top_k: int = 2
    # expert hidden width / D: mlp_ratio / top_k keeps the active FFN FLOPs of the dense twin
    expert_hidden_ratio: float | None = 1.0
    noise_std: float = 0.0  # M³ViT's README command: vmoe_noisy_std 0
    patch_size: int | None = None  # None: 4, or 2 for images under 16 pixels (digits)
    prune_thresholds: tuple = (0.1, 0.3, 0.5)  # Mod-Squad pruning for classify (multi-gate rows)
    prune_finetune_epochs: int = 1  # classify-only fine-tuning of each pruned model (0: none)
    prune_finetune_lr: float = 0.1  # its learning rate over lr
    seeds: int = 3
    rows: tuple[str, ...] = ("dense", "moe", "multi_gate", "task_conditioned", "modsquad_nomi", "modsquad",
                             "modsquad_strong", "modsquad_moa", "modsquad_hetero")

    def validate(self) -> None:
        check_grid_settings(self, ("train_subset", "test_subset", "epochs", "batch_size", "seeds", "num_experts",
                                   "top_k"), ROWS)
        if not isinstance(self.prune_finetune_epochs, int) or self.prune_finetune_epochs < 0:
            raise ConfigError(f"prune_finetune_epochs must be an integer >= 0, got {self.prune_finetune_epochs!r}")
        if not self.prune_finetune_lr > 0:
            raise ConfigError(f"prune_finetune_lr must be > 0, got {self.prune_finetune_lr!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")


ROWS = {
    "dense": "dense multi-task ViT (shared encoder, one pass, both heads)",
    "moe": "MoE, task-agnostic router (one pass, both heads)",
    "multi_gate": "M³ViT multi-gate (a router per task, a pass per task)",
    "task_conditioned": "M³ViT task-conditioned router (one router on [x; task one-hot])",
    "modsquad_nomi": "Mod-Squad routers (per-task, zero-init), no mutual-information loss",
    "modsquad": "Mod-Squad routers + mutual-information loss (w=0.005)",
    "modsquad_strong": "Mod-Squad routers + mutual-information loss (w=0.05)",
    "modsquad_moa": "Mod-Squad with MoA attention experts on the even blocks + MI loss (w=0.005)",
    "modsquad_hetero": "Mod-Squad routers + MI loss (w=0.005), heterogeneous data: each task on its own half",
}
HETEROGENEOUS_ROWS = ("modsquad_hetero",)
MI_WEIGHTS = {"modsquad_nomi": 0.0, "modsquad": 0.005, "modsquad_strong": 0.05, "modsquad_moa": 0.005,
              "modsquad_hetero": 0.005}
PRUNED_ROWS = ("multi_gate", *MI_WEIGHTS)  # the rows with per-task routers, pruned for classify
RESULT_VERSION = 4  # 2: pruning results; 3: fine-tuning after pruning; 4: MoA experts pruned too
ROW_VERSION = {"modsquad_moa": 4}  # the version a cached run of the row needs (others: 3)


def build_model(row: str, S: MultiTaskSettings, image_shape: tuple[int, int, int] = (1, 28, 28),
                num_classes: int = 10) -> MultiTaskViT:
    """Configuration ``row`` (one of ``ROWS``) for images of ``image_shape``: patch 4 (2 below 16 pixels)."""
    C_, H, W = image_shape
    if H != W:
        raise ConfigError(f"square images are needed, got {H}x{W}")
    patch = S.patch_size or (4 if H >= 16 and H % 4 == 0 else 2)
    if H % patch:
        raise ConfigError(f"patch_size={patch} does not divide the image size {H}")
    base: dict[str, Any] = dict(img_size=H, in_chans=C_, num_classes=num_classes, patch_size=patch,
                                embed_dim=S.embed_dim, depth=S.depth, num_heads=S.num_heads, mlp_ratio=S.mlp_ratio)
    if row != "dense":
        base.update(moe_layers="every_2", num_experts=S.num_experts, top_k=S.top_k, noise_std=S.noise_std,
                    expert_hidden_ratio=S.expert_hidden_ratio, capacity_factor=None, eval_capacity_factor=None)
    if row in ("multi_gate", "task_conditioned"):
        base.update(task_routing=row, num_tasks=len(TASKS))
    mi = MI_WEIGHTS.get(row, 0.0)
    if row in MI_WEIGHTS:  # Mod-Squad: a zero-initialised router per task (uniform probabilities at the start)
        base.update(task_routing="multi_gate", num_tasks=len(TASKS))
    if row == "modsquad_moa":  # Mod-Squad's "twice" layout: MoA on the even blocks, MoE-MLP on the odd ones
        base.update(attention="moa", attention_layers=list(range(0, S.depth, 2)))
    backbone = VisionTransformer(ViTConfig.from_dict(base))
    if row in MI_WEIGHTS:
        for m in backbone.modules():
            if isinstance(m, MoE):
                nn.init.zeros_(m.router.weight)
    return MultiTaskViT(backbone, TASKS, mi_weight=mi)


def _standardiser(train_images01: torch.Tensor, patch: int):
    t = patch_stats(train_images01, patch)
    mean, std = t.mean(dim=(0, 1)), t.std(dim=(0, 1))
    return lambda imgs: (patch_stats(imgs, patch) - mean) / std


@torch.no_grad()
def evaluate_multitask(model: MultiTaskViT, images01: torch.Tensor, labels: torch.Tensor, target_fn: Callable,
                       norm: Callable, batch_size: int = 256) -> dict[str, Any]:
    """Per-task metrics (accuracy; MSE and R² of the standardised patch statistics), each task run alone
    as at inference, and the task-expert usage matrix per MoE layer (fraction of task t's tokens that
    go to expert e, summed over its top-k choices)."""
    model.eval()
    T, names = len(model.task_names), model.task_names
    correct, sq, tot_var, n = 0, 0.0, 0.0, 0
    usage: list[torch.Tensor] | None = None
    moa = [m for m in model.modules() if isinstance(m, MoAAttention)]
    moa_usage = [torch.zeros(T, m.num_experts) for m in moa]
    current = {"t": 0}

    def moa_hook(li):
        def hook(mod, inp, out):  # returns None: a forward hook's return value would replace the output
            moa_usage[li][current["t"]] += out.stats.tokens_per_expert.float().cpu()
        return hook

    handles = [m.register_forward_hook(moa_hook(li)) for li, m in enumerate(moa)]
    for s in range(0, len(labels), batch_size):
        x01, y = images01[s:s + batch_size], labels[s:s + batch_size]
        x = norm(x01)
        for t, name in enumerate(names):
            current["t"] = t
            pred, _, stats = model.forward_task(x, t)
            if stats:
                if usage is None:
                    usage = [torch.zeros(T, st.tokens_per_expert.numel()) for st in stats]
                for li, st in enumerate(stats):
                    usage[li][t] += st.tokens_per_expert.float().cpu()
            if name == "classify":
                correct += int((pred.argmax(-1) == y).sum())
            else:
                tgt = target_fn(x01)
                sq += float(((pred - tgt) ** 2).sum())
                tot_var += float(((tgt - 0.0) ** 2).sum())  # standardised targets: mean 0 on the train set
        n += len(y)
    for h in handles:
        h.remove()
    out: dict[str, Any] = {}
    if "classify" in names:
        out["accuracy"] = correct / n
    if "patch_stats" in names:
        out["patch_mse"] = sq / max(n * (model.backbone.pos_embed.shape[1] - model.backbone.num_prefix_tokens) * 2, 1)
        out["patch_r2"] = 1.0 - sq / tot_var if tot_var > 0 else float("nan")
    if usage is not None:
        mats = [(u / u.sum(-1, keepdim=True).clamp_min(1)).tolist() for u in usage]
        out["usage"] = mats
        out["specialisation"] = specialisation(mats)
        out["mutual_information"] = sum(mutual_information_from_usage(m) for m in mats) / len(mats)
    if moa:  # MoA attention experts: the same matrices (share of each task's head choices)
        out["moa_usage"] = [(u / u.sum(-1, keepdim=True).clamp_min(1)).tolist() for u in moa_usage]
        out["moa_mutual_information"] = sum(mutual_information_from_usage(m) for m in out["moa_usage"]) / len(moa)
    return out


def specialisation(usage_per_layer: list[list[list[float]]]) -> float:
    """Mean over MoE layers (and task pairs) of the total-variation distance between two tasks' expert
    usage: 0 = the tasks use the experts alike, 1 = disjoint experts."""
    vals = []
    for mat in usage_per_layer:
        for a in range(len(mat)):
            for b in range(a + 1, len(mat)):
                vals.append(0.5 * sum(abs(p - q) for p, q in zip(mat[a], mat[b])))
    return sum(vals) / len(vals) if vals else 0.0


def _fit(model: MultiTaskViT, train, S: MultiTaskSettings, *, seed: int, epochs: int, lr: float, warmup: int,
         target_fn: Callable, norm: Callable, desc: str, progress: bool, heterogeneous: bool = False) -> int:
    """AdamW with warmup + cosine on the sum of the model's task losses (+ aux); returns the steps taken.
    ``heterogeneous``: the training set is split into one disjoint part per task (seeded), and each step
    takes one batch from every task's own part (Mod-Squad's heterogeneous training, §14)."""
    from tqdm.auto import tqdm

    from ..data import iterate_batches
    from ..train.optim import set_lr, warmup_cosine
    from ._loop import adamw, optimizer_step

    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr, S.weight_decay)
    parts = _task_parts(train, model.task_names) if heterogeneous else None
    steps_per_epoch = (min(len(p) for p in parts.values()) if parts else len(train)) // S.batch_size
    total = steps_per_epoch * epochs
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False, dynamic_ncols=True,
               mininterval=1.0)
    step = 0
    model.train()
    for epoch in range(epochs):
        if parts is None:
            batches = iterate_batches(train, S.batch_size, shuffle=True, seed=seed, epoch=epoch, drop_last=True)
        else:  # one batch per task, each from its own part, in lockstep (the shortest part sets the epoch)
            its = [iterate_batches(parts[n], S.batch_size, shuffle=True, seed=seed + 31 * i, epoch=epoch,
                                   drop_last=True) for i, n in enumerate(model.task_names)]
            batches = ({n: b for n, b in zip(model.task_names, group)} for group in zip(*its))
        for batch in batches:
            set_lr(opt, warmup_cosine(step, total_steps=total, warmup_steps=warmup, lr=lr, min_lr=lr * 0.01))
            if parts is None:
                x01, labels = batch  # float32 in [0, 1]
                preds, aux, _ = model(norm(x01))
                losses = task_losses(preds, labels, target_fn(x01) if "patch_stats" in preds else None)
            else:
                preds, aux, _ = model({n: norm(b[0]) for n, b in batch.items()})
                losses = task_losses(preds, batch["classify"][1] if "classify" in batch else None,
                                     target_fn(batch["patch_stats"][0]) if "patch_stats" in batch else None)
            loss = sum(S.task_weights.get(k, 1.0) * v for k, v in losses.items()) + aux
            optimizer_step(opt, loss, params, 1.0, f"{desc}, step {step}")
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in losses.items()})
    bar.close()
    return step


def _task_parts(train, task_names: tuple[str, ...]) -> dict:
    """Disjoint, equal parts of ``train``, one per task (a fixed seeded permutation)."""
    from dataclasses import replace

    T = len(task_names)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345))
    n = len(train) // T
    return {name: replace(train, images=train.images[idx[i * n:(i + 1) * n]].contiguous(),
                          labels=train.labels[idx[i * n:(i + 1) * n]].contiguous())
            for i, name in enumerate(task_names)}


def train_one(row: str, seed: int, S: MultiTaskSettings, data, *, progress: bool = True) -> dict[str, Any]:
    """Train configuration ``row`` with ``seed``; returns metrics, FLOPs and timing. Rows with per-task
    routers are then pruned for classify at each threshold, evaluated, fine-tuned on classify for
    ``S.prune_finetune_epochs`` (Mod-Squad fine-tunes its pruned sub-networks) and evaluated again."""
    from ..data import normalize

    train, test = data
    torch.manual_seed(seed)
    model = build_model(row, S, train.image_shape, train.num_classes)
    patch = model.backbone.config.patch_size
    target_fn = _standardiser(train.float_images(), patch)
    norm = lambda imgs: normalize(imgs, train.mean, train.std)  # noqa: E731
    t0 = time.perf_counter()
    hetero = row in HETEROGENEOUS_ROWS  # each task sees 1/T of the images: T x the epochs keeps the step count
    step = _fit(model, train, S, seed=seed, epochs=S.epochs * (len(model.task_names) if hetero else 1), lr=S.lr,
                warmup=S.warmup_steps, target_fn=target_fn, norm=norm, desc=f"{row} seed {seed}", progress=progress,
                heterogeneous=hetero)
    train_s = time.perf_counter() - t0
    res = evaluate_multitask(model, test.float_images(), test.labels, target_fn, norm)
    if model.backbone.config.task_routing == "multi_gate" and "classify" in model.task_names:
        t = model.task_names.index("classify")
        res["pruning"] = {}
        n_use = min(2000, len(train))  # usage measured on training images, not on the test set
        k = model.backbone.config.top_k
        tr = evaluate_multitask(model, train.float_images()[:n_use], train.labels[:n_use], target_fn, norm)
        usage_t = [[k * v for v in u[t]] for u in tr["usage"]]  # share of choices -> fraction of tokens
        moa_t = None
        if "moa_usage" in tr:  # Mod-Squad prunes the attention experts too, with k = the heads per token
            ka = next(m for m in model.modules() if isinstance(m, MoAAttention)).top_k
            moa_t = [[ka * v for v in u[t]] for u in tr["moa_usage"]]
        for thresh in S.prune_thresholds:  # Mod-Squad: a classify-only model with the experts it uses
            pruned, keeps = prune_for_task(model, t, usage_t, thresh, moa_usage=moa_t)
            r = evaluate_multitask(pruned, test.float_images(), test.labels, target_fn, norm)
            entry = {"accuracy": r["accuracy"], "experts_kept": len(keeps[0]), "kept": keeps}
            if moa_t is not None:
                entry["moa_experts_kept"] = len(keeps[len(usage_t)])
            if S.prune_finetune_epochs:
                _fit(pruned, train, S, seed=seed + 7919, epochs=S.prune_finetune_epochs, lr=S.lr * S.prune_finetune_lr,
                     warmup=0, target_fn=target_fn, norm=norm, desc=f"{row} seed {seed} pruned θ={thresh}",
                     progress=progress)
                entry["accuracy_finetuned"] = evaluate_multitask(pruned, test.float_images(), test.labels,
                                                                 target_fn, norm)["accuracy"]
            res["pruning"][str(thresh)] = entry
    res.update(row=row, seed=seed, steps=step, train_seconds=train_s, step_ms=1000 * train_s / max(step, 1),
               result_version=RESULT_VERSION,
               flops={t: task_flops(model, t) for t in model.task_names},
               params=sum(p.numel() for p in model.parameters()))
    return res


def load_data(S: MultiTaskSettings, data_dir: str | None = None, download: bool = False):
    return load_subsets(S.dataset, S.train_subset, S.test_subset, data_dir, download)


def run_multitask(S: MultiTaskSettings, *, out: Path | None = None, work: Path | None = None,
                  data_dir: str | None = None, download: bool = False, progress: bool = True) -> dict[str, Any]:
    """Every row x seed (finished runs kept as JSON in ``work`` and not recomputed); writes ``out``
    (Markdown) and ``out`` with .json when given; returns the aggregated results."""
    S.validate()
    data = load_data(S, data_dir, download)

    def compute(row, seed, cache):
        return train_one(row, seed, S, data, progress=progress)

    def refresh(row, seed, res, cache):  # versions 2 and 3 added pruning and fine-tuning: those rows are retrained
        if res.get("result_version", 1) < ROW_VERSION.get(row, 3) and row in PRUNED_ROWS:
            return compute(row, seed, cache)
        return None

    results = run_grid(S, work, compute, lambda row, seed, res: _one_line(res), refresh)
    return write_report(S, results, out, markdown)


def _one_line(r: dict) -> str:
    parts = [f"acc {100 * r['accuracy']:.2f}%", f"patch R² {r['patch_r2']:.4f}", f"{r['step_ms']:.0f} ms/step"]
    if "specialisation" in r:
        parts.append(f"specialisation {r['specialisation']:.3f}")
    return ", ".join(parts)


_ms = mean_std


def markdown(report: dict) -> str:
    S, res = report["settings"], report["results"]
    n = S["seeds"]
    lines = [
        "# Multi-task MoE ViT with task-dependent routing (M³ViT, vision_moe.md §10)", "",
        f"{S['dataset']}, {S['train_subset']} training / {S['test_subset']} test images, {S['epochs']} epochs, "
        f"batch {S['batch_size']}, AdamW lr {S['lr']}. Two tasks on the same images: **classify** (10 classes, "
        "CLS head) and **patch_stats** (per patch, regress the standardised mean and standard deviation "
        "of its pixels with a linear per-token head; R² = 1 - MSE / variance). Backbone: ViT (patch 4 on 28x28), "
        f"D={S['embed_dim']}, {S['depth']} blocks; MoE rows put E={S['num_experts']} experts, top-{S['top_k']}, "
        f"expert hidden {S['expert_hidden_ratio']}·D on the odd blocks (the dense FFN is {S['mlp_ratio']}·D, so "
        "active FFN FLOPs per token match). Each task is evaluated alone, as at inference. "
        f"Mean ± std over {n} seed(s). Made by `moevision multitask`.", "",
        "| configuration | accuracy (%) | patch R² | single-task GFLOPs/img (classify / patch) | train ms/step | "
        "task-expert specialisation | I(T;E) (nats) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, runs in res.items():
        if not runs:
            continue
        fl = runs[0]["flops"]
        spec = _ms([r["specialisation"] for r in runs], digits=3) if "specialisation" in runs[0] else "-"
        mis = [r.get("mutual_information", None if "usage" not in r else
                     sum(mutual_information_from_usage(m) for m in r["usage"]) / len(r["usage"])) for r in runs]
        mi = _ms(mis, digits=3) if all(v is not None for v in mis) else "-"
        lines.append(f"| {ROWS[row]} | {_ms([r['accuracy'] for r in runs], 100)} | "
                     f"{_ms([r['patch_r2'] for r in runs], digits=4)} | "
                     f"{fl['classify'] / 1e9:.4f} / {fl['patch_stats'] / 1e9:.4f} | "
                     f"{_ms([r['step_ms'] for r in runs], digits=0)} | {spec} | {mi} |")
    lines += ["", "Specialisation: the total-variation distance between the two tasks' expert-usage "
              "distributions, averaged over the MoE layers (0: both tasks use the experts alike; 1: disjoint "
              "experts). A task-agnostic router routes a token the same way whatever the task, so its value "
              "is 0 by construction. I(T;E): the mutual information between task and chosen expert (hard "
              "routing, tasks weighted equally), averaged over the MoE layers; at most log 2 = 0.693 nats for "
              "two tasks.", ""]
    for row, runs in res.items():  # the table covers the MLP experts; MoA attention experts separately
        if runs and all("moa_usage" in r for r in runs):
            lines += [f"MoA attention experts of {ROWS[row]}: specialisation "
                      f"{_ms([specialisation(r['moa_usage']) for r in runs], digits=3)}, I(T;E) "
                      f"{_ms([r['moa_mutual_information'] for r in runs], digits=3)} nats (averaged over the MoA "
                      "layers; usage = share of each task's head choices).", ""]
    pruned_rows = [(row, runs) for row, runs in res.items() if runs and "pruning" in runs[0]]
    if pruned_rows:
        ths = list(pruned_rows[0][1][0]["pruning"])
        E = S["num_experts"]
        lines += ["Mod-Squad expert pruning for the classify task (multi-gate rows): per MoE layer keep the "
                  "experts whose classify usage is above θ/k (at least k), then evaluate the classify-only model; "
                  f"cells: experts kept of {E} / accuracy (%), mean over seeds; with MoA, the attention experts "
                  f"kept per MoA layer (of {2 * S['num_heads']}, k = {S['num_heads']}) in brackets. Unpruned "
                  "accuracy is in the table above.", "",
                  "| configuration | " + " | ".join(f"θ = {t}" for t in ths) + " |", "|---|" + "---|" * len(ths)]
        def prune_rows(rows, key):
            for row, runs in rows:
                cells = []
                for t in ths:
                    kept = statistics.fmean(r["pruning"][t]["experts_kept"] for r in runs)
                    moa = "" if "moa_experts_kept" not in runs[0]["pruning"][t] else \
                        f" (MoA {statistics.fmean(r['pruning'][t]['moa_experts_kept'] for r in runs):.1f})"
                    cells.append(f"{kept:.1f}{moa} / {_ms([r['pruning'][t][key] for r in runs], 100)}")
                lines.append(f"| {ROWS[row]} | " + " | ".join(cells) + " |")
            lines.append("")

        prune_rows(pruned_rows, "accuracy")
        tuned = [(row, runs) for row, runs in pruned_rows if all("accuracy_finetuned" in r["pruning"][ths[0]]
                                                                 for r in runs)]
        if tuned:
            lines += [f"The same pruned models after {S.get('prune_finetune_epochs', 1)} epoch(s) of classify-only "
                      f"fine-tuning (lr {S['lr'] * S.get('prune_finetune_lr', 0.1):g}, every remaining parameter): "
                      "experts kept / accuracy (%).", "",
                      "| configuration | " + " | ".join(f"θ = {t}" for t in ths) + " |", "|---|" + "---|" * len(ths)]
            prune_rows(tuned, "accuracy_finetuned")
    for row, runs in res.items():
        if runs and "usage" in runs[0]:
            lines += [f"Usage matrix, {ROWS[row]}, seed 0 (rows: tasks, columns: experts; % of the task's "
                      "routing choices):", ""]
            for li, mat in enumerate(runs[0]["usage"]):
                E = len(mat[0])
                lines += [f"MoE layer {li}:", "", "| task | " + " | ".join(f"e{e}" for e in range(E)) + " |",
                          "|---|" + "---|" * E]
                for t, name in enumerate(TASKS):
                    lines.append(f"| {name} | " + " | ".join(f"{100 * v:.0f}" for v in mat[t]) + " |")
                lines.append("")
    return "\n".join(lines) + "\n"
