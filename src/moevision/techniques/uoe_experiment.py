"""The CPU experiment of vision_moe.md §13(e) for Union of Experts (``moevision uoe``): on a Fashion-MNIST
10k training subset (patch 4: 49 tokens + CLS), a dense small ViT against

- ``moe``: a standard top-2-of-4 MoE in every block, experts of hidden h/4 (so its FFN FLOPs equal UoME's
  expert selection alone, k/n = 1/2 of the dense FFN);
- ``uome``: UoME in every block, n = 4 hidden slices, ES top-2, DS top-4 of m = 7 token patches (a patch is
  one row of the 7x7 token grid; c = 4 = ceil(m/2), so an expert runs on 4/7 of the patch tokens), routers
  as in the released code (selection only, no gradient);
- ``uome_st``: the same with the straight-through option (same forward pass; the routers learn);
- ``uome_wp``: the same with ``weight_by_prob`` (outputs weighted by the routing weights; the routers learn);
- ``smha``: SMHA in every block, 4 heads as experts, top-2 per token (dense MLP);
- ``uoe``: UoME + SMHA (UoE with both).

All rows train from the same seeded random init of the dense ViT (the UoE rows are ``uoe_vit`` conversions
of it), AdamW + warmup/cosine. Reports test accuracy (mean ± std over seeds) and FLOPs per image (measured
from the routing on the test images for the UoE layers, analytic for the rest).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.vit import ViTConfig, VisionTransformer
from ..moe import MoE
from ._experiment import check_grid_settings, load_subsets, mean_std, run_grid, write_report
from .uoe import SMHA, UoME, uoe_vit

ROWS = {
    "dense": "dense ViT",
    "moe": "MoE, top-2 of 4 experts of hidden h/4 (every block)",
    "uome": "UoME: n=4 slices, ES top-2, DS 4 of 7 patches (code parity: routers get no gradient)",
    "uome_st": "UoME as above, straight-through router gradients (forward unchanged)",
    "uome_wp": "UoME as above, outputs weighted by the routing probabilities (weight_by_prob)",
    "smha": "SMHA: 4 heads as experts, top-2 per token (dense MLP)",
    "uoe": "UoE: UoME + SMHA (code parity)",
}
RESULT_VERSION = 1


@dataclass
class UoESettings:
    """The §13(e) experiment, sized for 2 CPU cores."""

    dataset: str = "fashion_mnist"
    train_subset: int = 10000
    test_subset: int = 10000
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    # the ViT: patch 4 on 28x28 (49 tokens + CLS)
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    # UoE
    mlp_experts: int = 4
    top_k: int = 2
    n_patches: int = 7
    patch_capacity: int = 4
    attn_top_k: int = 2
    seeds: int = 3
    rows: tuple[str, ...] = tuple(ROWS)

    def validate(self) -> None:
        check_grid_settings(self, ("train_subset", "test_subset", "epochs", "batch_size", "seeds", "mlp_experts",
                                   "top_k", "n_patches", "patch_capacity", "attn_top_k"), ROWS)
        if self.patch_capacity > self.n_patches:
            raise ConfigError(f"patch_capacity={self.patch_capacity} must be <= n_patches={self.n_patches}")
        if self.top_k > self.mlp_experts:
            raise ConfigError(f"top_k={self.top_k} must be <= mlp_experts={self.mlp_experts}")


def build_model(row: str, S: UoESettings, image_shape=(1, 28, 28), num_classes: int = 10) -> VisionTransformer:
    """Configuration ``row`` of ``ROWS`` (the dense ViT drawn from the current RNG state, then converted)."""
    C_, H, W = image_shape
    patch = 4 if H % 4 == 0 and H >= 16 else 2
    base: dict[str, Any] = dict(img_size=H, in_chans=C_, num_classes=num_classes, patch_size=patch,
                                embed_dim=S.embed_dim, depth=S.depth, num_heads=S.num_heads, mlp_ratio=S.mlp_ratio)
    if row == "moe":
        base.update(moe_layers="all", num_experts=S.mlp_experts, top_k=S.top_k, capacity_factor=None,
                    eval_capacity_factor=None, expert_hidden_ratio=S.mlp_ratio / S.mlp_experts)
    dense = VisionTransformer(ViTConfig.from_dict(base))
    if row in ("dense", "moe"):
        return dense
    uome = row in ("uome", "uome_st", "uome_wp", "uoe")
    return uoe_vit(dense, mlp_experts=S.mlp_experts if uome else None, top_k=S.top_k, n_patches=S.n_patches,
                   patch_capacity=S.patch_capacity, attn_experts=S.num_heads if row in ("smha", "uoe") else None,
                   attn_top_k=S.attn_top_k, straight_through=row == "uome_st", weight_by_prob=row == "uome_wp")


class _LayerFlops:
    """Collects ``UoEStats.flops`` of every UoME / SMHA layer of ``model`` during forward passes."""

    def __init__(self, model):
        self.seen: dict[int, float] = {}
        self.hooks = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, (UoME, SMHA))]

    def _hook(self, mod, inp, out):
        self.seen[id(mod)] = float(out.stats.flops)

    def close(self):
        for h in self.hooks:
            h.remove()


def _flops_per_image(model: VisionTransformer, seen: dict[int, float], batch: int) -> float:
    cfg = model.config
    D, N = cfg.embed_dim, model.pos_embed.shape[1]
    n_patch = N - model.num_prefix_tokens
    flops = 2.0 * (n_patch * cfg.in_chans * cfg.patch_size ** 2 * D + D * cfg.num_classes)
    for blk in model.blocks:
        a, mlp = blk.attn, blk.mlp
        flops += seen[id(a)] / batch if id(a) in seen else 2.0 * (4 * N * D * D + 2 * N * N * D)
        if id(mlp) in seen:
            flops += seen[id(mlp)] / batch
        elif isinstance(mlp, MoE):
            E, _, Fe = mlp.experts.w1.shape
            flops += 2.0 * N * (D * E + mlp.top_k * 2 * D * Fe)
        else:
            flops += 2.0 * N * 2 * D * mlp.fc1.out_features
    return flops


@torch.no_grad()
def vit_flops(model: VisionTransformer, x: torch.Tensor) -> float:
    """FLOPs per image of ``model`` on the batch ``x`` (2 x multiply-adds; norms, softmaxes, activations left
    out): UoME and SMHA layers as routed on ``x`` (their ``UoEStats.flops``), the rest analytic."""
    hooks, was = _LayerFlops(model), model.training
    model.eval()
    try:
        model(x)
    finally:
        hooks.close()
        model.train(was)
    return _flops_per_image(model, hooks.seen, x.shape[0])


@torch.no_grad()
def evaluate(model: VisionTransformer, data, batch_size: int = 500) -> dict[str, float]:
    """Test accuracy, FLOPs per image (as routed) and the share of token positions UoME skipped."""
    from ..data import normalize

    model.eval()
    correct, flops, skipped, n = 0, 0.0, 0.0, 0
    has_uome = any(isinstance(m, UoME) for m in model.modules())
    hooks = _LayerFlops(model)
    try:
        for s in range(0, len(data), batch_size):
            x = normalize(data.float_images(slice(s, s + batch_size)), data.mean, data.std)
            y = data.labels[s:s + batch_size]
            out = model(x)
            correct += int((out.logits.argmax(-1) == y).sum())
            flops += _flops_per_image(model, hooks.seen, len(y)) * len(y)
            if has_uome:
                skipped += float(torch.stack([r.dropped_token_fraction for r in out.routing]).mean()) * len(y)
            n += len(y)
    finally:
        hooks.close()
    return {"accuracy": correct / n, "flops": flops / n, "skipped_tokens": skipped / n}


def train_one(row: str, seed: int, S: UoESettings, data, *, progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from ..train.optim import set_lr, warmup_cosine
    from ._loop import adamw, optimizer_step, shuffled_batches

    train, test = data
    torch.manual_seed(seed)
    model = build_model(row, S, train.image_shape, train.num_classes)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, S.lr, S.weight_decay)
    total = (len(train) // S.batch_size) * S.epochs
    bar = tqdm(total=total, desc=f"{row} seed {seed}", unit="step", disable=not progress, leave=False,
               dynamic_ncols=True, mininterval=1.0)
    step, t0 = 0, time.perf_counter()
    model.train()
    for epoch in range(S.epochs):
        for x, y in shuffled_batches(train, S.batch_size, seed=seed, epoch=epoch):
            set_lr(opt, warmup_cosine(step, total_steps=total, warmup_steps=S.warmup_steps, lr=S.lr,
                                      min_lr=S.lr * 0.01))
            out = model(x)
            loss = F.cross_entropy(out.logits, y) + out.aux_loss
            optimizer_step(opt, loss, params, 1.0, f"{row} seed {seed}, step {step}")
            step += 1
            bar.update(1)
    bar.close()
    train_s = time.perf_counter() - t0
    routers_moved = _routers_have_grad(model)
    res = evaluate(model, test)
    res.update(row=row, seed=seed, steps=step, train_seconds=train_s, step_ms=1000 * train_s / max(step, 1),
               params=sum(p.numel() for p in model.parameters()), routers_trained=routers_moved,
               result_version=RESULT_VERSION)
    return res


def _routers_have_grad(model) -> bool | None:
    """Whether the UoE routers received a gradient in the last step (None: the model has none)."""
    mods = [m for m in model.modules() if isinstance(m, (UoME, SMHA))]
    if not mods:
        return None
    ps = [p for m in mods for p in (m.router.weight if isinstance(m, UoME) else m.gate.weight,)]
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in ps)


def run_uoe(S: UoESettings, *, out: Path | None = None, work: Path | None = None, data_dir: str | None = None,
            download: bool = False, progress: bool = True) -> dict[str, Any]:
    """Every row x seed (finished runs cached as JSON in ``work``); writes ``out`` (Markdown) and .json."""
    S.validate()
    data = load_subsets(S.dataset, S.train_subset, S.test_subset, data_dir, download)

    def compute(row, seed, cache):
        return train_one(row, seed, S, data, progress=progress)

    def describe(row, seed, r):
        return f"acc {100 * r['accuracy']:.2f}%, {r['flops'] / 1e6:.2f} MFLOPs/img, {r['step_ms']:.0f} ms/step"

    results = run_grid(S, work, compute, describe)
    return write_report(S, results, out, markdown)


def markdown(report: dict) -> str:
    S, res = report["settings"], report["results"]
    dense_flops = res["dense"][0]["flops"] if res.get("dense") else None
    lines = [
        "# Union of Experts (UoE) on Fashion-MNIST (vision_moe.md §13(e))", "",
        f"{S['dataset']}, {S['train_subset']} training / {S['test_subset']} test images, {S['epochs']} epochs, "
        f"batch {S['batch_size']}, AdamW lr {S['lr']} (warmup {S['warmup_steps']} steps, cosine), wd "
        f"{S['weight_decay']}. ViT: patch 4 on 28x28 (49 tokens + CLS), D={S['embed_dim']}, {S['depth']} blocks, "
        f"{S['num_heads']} heads, MLP hidden {S['mlp_ratio']}·D. Every block of a sparse row is sparse. UoME: "
        f"n={S['mlp_experts']} hidden slices, ES top-{S['top_k']} (sequence router), DS top-{S['patch_capacity']} "
        f"of m={S['n_patches']} token patches (a patch = one row of the 7x7 token grid; the CLS token always goes "
        f"to the selected experts). SMHA: {S['num_heads']} heads as experts, top-{S['attn_top_k']} per token. "
        f"Mean ± std over {S['seeds']} seed(s). Made by `moevision uoe`.", "",
        "| configuration | test accuracy (%) | MFLOPs / image | vs dense | token positions skipped by UoME (%) | "
        "routers trained | train ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, runs in res.items():
        if not runs:
            continue
        fl = sum(r["flops"] for r in runs) / len(runs)
        rel = f"{fl / dense_flops:.2f}x" if dense_flops else "-"
        uome = row in ("uome", "uome_st", "uome_wp", "uoe")
        skip = mean_std([r["skipped_tokens"] for r in runs], 100, 1) if uome else "-"
        rt = runs[0]["routers_trained"]
        rt = "-" if rt is None else ("yes" if rt else "no (as in the code)")
        lines.append(f"| {ROWS[row]} | {mean_std([r['accuracy'] for r in runs], 100)} | {fl / 1e6:.2f} | {rel} | "
                     f"{skip} | {rt} | {mean_std([r['step_ms'] for r in runs], digits=0)} |")
    lines += ["", "FLOPs: 2 x multiply-adds per image over the whole model (patch embedding, attention, MLP, "
              "head; norms, softmaxes and activations left out). UoME and SMHA layers are counted from their "
              "routing on the test images (SMHA: each head's attention among its routed tokens, so an uneven "
              "head load costs more), routers included; the MoE row counts its router and top-2 experts. "
              "'Skipped': the share of (image, token) positions that no selected UoME expert processed (they get "
              "only the residual), mean over layers. Training time is the reference (masked) implementation on "
              "2 shared CPU cores, not the sparse speed.", ""]
    return "\n".join(lines) + "\n"
