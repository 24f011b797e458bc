"""CLIP-MoE: Diversified Multiplet Upcycling (DMU; Zhang et al., "CLIP-MoE: Towards Building Mixture of
Experts for CLIP with Diversified Multiplet Upcycling", 2024 / EMNLP 2025; vision_moe.md §9), adapted to an
image classifier.

Procedure ([V] OpenSparseLLMs/CLIP-MoE), N experts = N - 1 Multistage Contrastive Learning (MCL) stages:
1. Expert 0 = the base model's FFNs.
2. Stage s = 1..N-1: embed the training set with the stage-(s-1) model; k-means separately on the image
   features and on the "text" features (k = 3 each); joint cluster ``c = k_image * c_text + c_image``;
   accumulated pseudo-label ``P_s = P_{s-1} * (k_text * k_image) + c`` (two samples share P_s iff they fell
   in the same joint cluster at every stage so far). Fine-tune a copy of the base model (``start_from="base"``,
   as the code does; ``"previous"`` is the [R] alternative) with only the FFN (MLP) parameters trainable
   (``lock_except_mlp``; ``unlocked_from=L0`` also freezes the FFNs below block L0), on mini-batches drawn
   from a single pseudo-label cluster (clusters smaller than a batch are skipped), 1 epoch. Its FFNs are
   expert s.
3. CLIP-MoE: the FFN of every block (``moe_layers="all"``) becomes an MoE whose experts are the N stage
   FFNs; all other weights come from the base model. Router ``nn.Linear(D, N, bias=False)`` with PyTorch's
   default init; softmax, top-2, gates renormalised, no capacity.
4. Only the routers are trained (``lock_except_gate``): task loss + 0.01 * balance loss.
The paper's baseline ("upcycling") is the same MoE with every expert a copy of the base FFN and the same
router training; with renormalised gates it computes exactly the base model whatever the routers learn.

Adaptation to an image classifier and other deviations:
- No text tower. A sample's "text" embedding is its class embedding (the frozen classifier-head row of its
  label), so the text clusters group classes.
- Contrastive loss: CLIP's image-to-text InfoNCE with in-batch negatives becomes cross-entropy over the
  classes present in the batch (the others masked; ``mcl_loss="batch_classes"``), so a single-cluster batch
  supplies hard negatives as the captions of one cluster do. The text-to-image half is dropped (several
  images share a class) and the head's logits replace the frozen logit scale of 100.
  ``mcl_loss="ce"`` (all classes) is the ablation without in-batch negatives.
- k-means: Lloyd's algorithm with k-means++ seeding in torch (the paper: sklearn MiniBatchKMeans).
- The experts have no internal dropout (the paper: expert dropout 0.1 after the activation).
- Balance loss: moevision's per-layer Switch loss with all top-k choices counted (Σ f_e = 1 per layer),
  weighted ``balance_weight * k / L`` over L MoE layers, which approximates the paper's single loss over
  all layers' router logits concatenated (Σ f_e = k there). Learning rates are options (the paper's 1e-5
  and 1e-6 are for a pretrained ViT-L/14 and far too small for the small models here).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..data import ImageDataset
from ..errors import ConfigError
from ..models.vit import VisionTransformer
from ..moe.router import TopKRouter
from ._loop import epochs_of, freeze_all_but, freeze_norm_stats, index_batches, run_steps, shuffled_batches, steps_per_epoch
from .upcycling import init_router, upcycle_named_tensors, upcycled_config

MCL_LOSSES = ("batch_classes", "ce")


# ---- clustering and pseudo-labels ------------------------------------------------------------------
def kmeans(x_ND: torch.Tensor, k: int, *, iters: int = 100, seed: int = 0, tol: float = 1e-5) -> torch.Tensor:
    """Cluster ids (N,) from Lloyd's k-means with k-means++ seeding (deterministic given ``seed``)."""
    x = x_ND.double()
    N = x.shape[0]
    if not 1 <= k <= N:
        raise ConfigError(f"k-means: k={k} must be in [1, {N}] (number of points)")
    g = torch.Generator().manual_seed(int(seed))
    centers = [x[torch.randint(N, (1,), generator=g)].squeeze(0)]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / N)
        c = x[torch.multinomial(probs, 1, generator=g)].squeeze(0)
        centers.append(c)
        d2 = torch.minimum(d2, ((x - c) ** 2).sum(1))
    C = torch.stack(centers)
    labels = torch.cdist(x, C).argmin(1)
    for _ in range(iters):
        new = torch.stack([x[labels == j].mean(0) if (labels == j).any() else C[j] for j in range(k)])
        shift = (new - C).norm(dim=1).max()
        C = new
        labels = torch.cdist(x, C).argmin(1)
        if shift <= tol:
            break
    return labels


def joint_cluster(c_text: torch.Tensor, c_image: torch.Tensor, k_image: int) -> torch.Tensor:
    """``c = k_image * c_text + c_image`` (the paper: 3 * t + i)."""
    return k_image * c_text + c_image


def accumulate_pseudo_labels(prev: torch.Tensor, joint: torch.Tensor, clusters_per_stage: int) -> torch.Tensor:
    """``P_s = P_{s-1} * clusters_per_stage + c`` (the paper: P * 9 + c)."""
    return prev * clusters_per_stage + joint


def cluster_batches(pseudo_labels: torch.Tensor, batch_size: int, *, seed: int = 0, epoch: int = 0) -> list[torch.Tensor]:
    """Index batches that each hold samples of a single pseudo-label, every sample at most once per epoch.

    Each cluster is shuffled and cut into full batches (its remainder is dropped; clusters smaller than a
    batch are skipped); the batches of all clusters are then shuffled together.
    """
    g = torch.Generator().manual_seed(int(seed) * 7919 + int(epoch))
    batches = []
    for lab in torch.unique(pseudo_labels):
        idx = torch.nonzero(pseudo_labels == lab).squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        for b in range(idx.numel() // batch_size):
            batches.append(idx[b * batch_size:(b + 1) * batch_size])
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


# ---- freezing and losses ---------------------------------------------------------------------------
def _block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 2 else None


def lock_except_mlp(model: torch.nn.Module, unlocked_from: int = 0) -> list[str]:
    """Only the FFN (``blocks.i.mlp.*``) parameters of blocks >= ``unlocked_from`` stay trainable."""
    return freeze_all_but(model, lambda n: ".mlp." in n and (_block_of(n) or 0) >= unlocked_from)


def lock_except_gate(model: torch.nn.Module) -> list[str]:
    """Only the MoE routers stay trainable."""
    return freeze_all_but(model, lambda n: ".mlp.router." in n)


def unlock_all(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def mcl_loss(logits: torch.Tensor, labels: torch.Tensor, mode: str = "batch_classes") -> torch.Tensor:
    """Cross-entropy over the classes present in the batch (in-batch negatives) or over all classes."""
    if mode == "ce":
        return F.cross_entropy(logits, labels)
    if mode != "batch_classes":
        raise ConfigError(f"mcl_loss={mode!r} must be one of {MCL_LOSSES}")
    present = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    present[labels] = True
    return F.cross_entropy(logits.masked_fill(~present, float("-inf")), labels)


@torch.no_grad()
def image_features(model: VisionTransformer, dataset: ImageDataset, batch_size: int = 500) -> torch.Tensor:
    """Pre-logit features (the pooled token after the final norm) of every image, (N, D)."""
    was = model.training
    model.eval()
    out = []
    for x, _ in index_batches(dataset, torch.arange(len(dataset)).split(batch_size)):
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).float())
    model.train(was)
    return torch.cat(out)


def mlp_state(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The FFN tensors of every block (``blocks.i.mlp.fc1.weight`` ...), detached copies."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".mlp." in k}


# ---- MCL stages ------------------------------------------------------------------------------------
def mcl_stages(base: VisionTransformer, train: ImageDataset, *, num_experts: int, k_image: int = 3,
               k_text: int = 3, epochs: int = 1, lr: float = 1e-4, weight_decay: float = 0.2, batch_size: int = 64,
               warmup_steps: int = 20, start_from: str = "base", unlocked_from: int = 0,
               loss: str = "batch_classes", random_batches: bool = False, seed: int = 0, kmeans_iters: int = 100,
               log: Callable[[str], None] = lambda s: None) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    """Run the N - 1 MCL stages; return the N FFN sets (expert 0 = base) and per-stage statistics.

    ``random_batches=True`` is an ablation: ordinary shuffled batches instead of single-cluster ones (the
    stages then differ only by their seeds)."""
    if base.config.moe_block_indices:
        raise ConfigError("CLIP-MoE starts from a dense model")
    if start_from not in ("base", "previous"):
        raise ConfigError(f"start_from={start_from!r} must be 'base' or 'previous'")
    if loss not in MCL_LOSSES:
        raise ConfigError(f"loss={loss!r} must be one of {MCL_LOSSES}")
    if num_experts < 2:
        raise ConfigError(f"num_experts={num_experts} must be >= 2 (one base expert + at least one MCL stage)")
    if k_text > base.config.num_classes:
        raise ConfigError(f"k_text={k_text} exceeds the {base.config.num_classes} classes (the text clusters "
                          f"group class embeddings)")
    base = base.cpu()
    ffns = [mlp_state(base)]
    prev_model, pseudo = base, torch.zeros(len(train), dtype=torch.long)
    stats = []
    for s in range(1, num_experts):
        feats = image_features(prev_model, train)
        c_img = kmeans(feats, k_image, iters=kmeans_iters, seed=seed * 1000 + s)
        class_emb = prev_model.head.weight.detach().float()
        c_cls = kmeans(class_emb, k_text, iters=kmeans_iters, seed=seed * 1000 + 500 + s)
        c = joint_cluster(c_cls[train.labels], c_img, k_image)
        pseudo = accumulate_pseudo_labels(pseudo, c, k_text * k_image)
        model = copy.deepcopy(base if start_from == "base" else prev_model)
        model.train()
        names = lock_except_mlp(model, unlocked_from)
        freeze_norm_stats(model)
        params = [p for n, p in model.named_parameters() if n in set(names)]
        if random_batches:
            per_epoch = steps_per_epoch(len(train), batch_size)
            batches = epochs_of(lambda e: shuffled_batches(train, batch_size, seed=seed * 100 + s, epoch=e), epochs)
        else:
            lists = [cluster_batches(pseudo, batch_size, seed=seed * 100 + s, epoch=e) for e in range(epochs)]
            per_epoch = len(lists[0])
            batches = index_batches(train, [b for lst in lists for b in lst])
        total = per_epoch * epochs

        def step_loss(x, y, model=model):
            return mcl_loss(model(x).logits, y, loss)

        losses = run_steps(params, batches, step_loss, total_steps=total, lr=lr, weight_decay=weight_decay,
                           warmup_steps=min(warmup_steps, total // 2))
        unlock_all(model)
        model.eval()
        n_clusters = int(torch.unique(pseudo).numel())
        covered = per_epoch * batch_size
        stats.append({"stage": s, "clusters": n_clusters, "batches": per_epoch, "samples_used": covered,
                      "mean_loss": sum(losses) / len(losses)})
        log(f"MCL stage {s}: {n_clusters} pseudo-label clusters, {per_epoch} single-cluster batches "
            f"({covered}/{len(train)} samples), mean loss {stats[-1]['mean_loss']:.4f}")
        ffns.append(mlp_state(model))
        prev_model = model
    return ffns, stats


# ---- the MoE and its router training ---------------------------------------------------------------
def build_clip_moe(base: VisionTransformer, expert_ffns: list[dict[str, torch.Tensor]], *, top_k: int = 2,
                   moe_layers: Any = "all", router_init: str = "linear", balance_weight: float = 0.01,
                   seed: int = 0) -> VisionTransformer:
    """The MoE whose expert e in each MoE block is ``expert_ffns[e]``'s FFN of that block; all other weights
    from ``base``, in ``base``'s dtype (copied bit for bit; on CPU). With all FFN sets equal this is plain
    upcycling (and equals ``base``)."""
    E = len(expert_ffns)
    blocks = upcycled_config(base.config, num_experts=E, top_k=top_k, moe_layers=moe_layers).moe_block_indices
    cfg = upcycled_config(base.config, num_experts=E, top_k=top_k, moe_layers=moe_layers, router="topk",
                          normalize_topk=True, capacity_factor=None, eval_capacity_factor=None, noise_std=0.0,
                          importance_loss_weight=0.0, load_loss_weight=0.0,
                          switch_loss_weight=balance_weight * top_k / len(blocks))
    state = upcycle_named_tensors({k: v.detach().cpu() for k, v in base.state_dict().items()}, cfg)
    for e, ffn in enumerate(expert_ffns):
        mapped = upcycle_named_tensors({k: v for k, v in ffn.items() if _block_of(k) in blocks}, cfg)
        for k, v in mapped.items():
            state[k][e] = v[e]
    model = VisionTransformer(cfg).to(next(base.parameters()).dtype)  # base's dtype: exact copies (fp64 too)
    gen = torch.Generator().manual_seed(int(seed))
    for i in blocks:
        layer = model.blocks[i].mlp
        init_router(layer, router_init, generator=gen)
        if isinstance(layer.router, TopKRouter):
            layer.router.switch_use_all_k = True  # f_e counts every top-k assignment, as CLIP-MoE does
        state[f"blocks.{i}.mlp.router.weight"] = layer.router.weight.detach().clone()
    model.load_state_dict(state)
    model.model_name = f"{getattr(base, 'model_name', None) or 'vit'}_clip_moe"
    return model


def train_routers(model: VisionTransformer, train: ImageDataset, *, epochs: int = 1, lr: float = 1e-3,
                  weight_decay: float = 0.01, batch_size: int = 64, warmup_steps: int = 20, seed: int = 0,
                  augment: str = "none") -> list[float]:
    """Router-only training (everything else frozen): cross-entropy + the layers' balance losses."""
    model.train()
    names = set(lock_except_gate(model))
    freeze_norm_stats(model)
    params = [p for n, p in model.named_parameters() if n in names]
    total = steps_per_epoch(len(train), batch_size) * epochs
    batches = epochs_of(lambda e: shuffled_batches(train, batch_size, seed=seed, epoch=e, augment=augment), epochs)

    def step_loss(x, y):
        out = model(x)
        return F.cross_entropy(out.logits, y) + out.aux_loss

    losses = run_steps(params, batches, step_loss, total_steps=total, lr=lr, weight_decay=weight_decay,
                       warmup_steps=min(warmup_steps, total // 2))
    unlock_all(model)
    model.eval()
    return losses


@torch.no_grad()
def expert_diversity(model: VisionTransformer) -> float:
    """Mean over MoE layers and expert pairs of ||w1_e - w1_f|| / ||w1_e|| (0 for identical experts)."""
    vals = []
    for i in model.moe_layers:
        w = model.blocks[i].mlp.experts.w1.flatten(1).float()
        E = w.shape[0]
        for a in range(E):
            for b in range(a + 1, E):
                vals.append(float((w[a] - w[b]).norm() / w[a].norm().clamp_min(1e-12)))
    return sum(vals) / max(len(vals), 1)


__all__ = ["kmeans", "joint_cluster", "accumulate_pseudo_labels", "cluster_batches", "lock_except_mlp",
           "lock_except_gate", "unlock_all", "mcl_loss", "image_features", "mlp_state", "mcl_stages",
           "build_clip_moe", "train_routers", "expert_diversity", "MCL_LOSSES"]
