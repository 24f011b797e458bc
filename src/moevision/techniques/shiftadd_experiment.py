"""The ShiftAddViT CPU experiment of vision_moe.md §12(e) (``moevision shiftadd``).

Per seed a dense ViT is trained on Fashion-MNIST (kept in the work directory as safetensors), then
reparameterised and fine-tuned the same number of epochs four or five ways: all-multiplication (the dense
model fine-tuned on), all-shift (every MLP linear converted to ``ShiftLinear``), and the MoE{mult, shift}
of every MLP linear with α = (1, 1) (standard balance loss) or the LL-loss at α = (6, 4), the latter also
with the straight-through gate weight. Reported: test accuracy right after the conversion and after
fine-tuning, the shift expert's token share per layer, and the modelled latency per token
(``modelled_latency``) relative to all-multiplication.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..models.vit import ViTConfig, VisionTransformer
from ._experiment import check_grid_settings, load_subsets, mean_std, run_grid, write_report
from .shiftadd import moe_linears, modelled_latency, shift_parameters, shiftadd_reparameterize

ROWS = {
    "mult": "all multiplication (the dense ViT, fine-tuned on)",
    "shift": "all shift (MLP linears -> ShiftLinear)",
    "moe_balanced": "MoE{mult, shift}, balance loss α = (1, 1)",
    "moe_ll": "MoE{mult, shift}, LL-loss α = (6, 4)",
    "moe_ll_st": "MoE{mult, shift}, LL-loss α = (6, 4), straight-through gate (ours)",
    "moe_ll_fanin": "MoE{mult, shift}, LL-loss α = (6, 4), noisy gate with fan-in-D init (not the code's)",
}
ROW_OPTIONS: dict[str, dict[str, Any]] = {
    "mult": {"mode": "mult"},
    "shift": {"mode": "shift"},
    "moe_balanced": {"mode": "moe", "alpha": (1.0, 1.0)},
    "moe_ll": {"mode": "moe", "alpha": (6.0, 4.0)},
    "moe_ll_st": {"mode": "moe", "alpha": (6.0, 4.0), "gate_weight": "straight_through"},
    "moe_ll_fanin": {"mode": "moe", "alpha": (6.0, 4.0), "router_init": "fan_in"},
}
PAPER_ALPHA = (6.0, 4.0)  # the code's per-token costs (mult, shift): the latency model of every row


@dataclass
class ShiftAddSettings:
    """Sized for 2 CPU cores (defaults: ~1 min per fine-tuning run, ~1 min per dense pre-training)."""

    dataset: str = "fashion_mnist"
    train_subset: int = 10000
    test_subset: int = 5000
    pretrain_epochs: int = 10
    epochs: int = 5  # fine-tuning epochs after the reparameterisation (the spec: 10; 5 fit the CPU budget)
    batch_size: int = 128
    pretrain_lr: float = 1e-3
    lr: float = 2e-4
    shift_lr_scale: float = 1.0  # lr of the shift/sign parameters over lr ([R]: the paper states one lr)
    weight_decay: float = 0.05
    warmup_steps: int = 50
    loss_weight: float = 0.01  # the paper's 0.01 · Σ_layers L_LL
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    attention: bool = False  # also reparameterise qkv / proj (the code's --moe_attn)
    seeds: int = 3
    rows: tuple[str, ...] = tuple(ROWS)

    def validate(self) -> None:
        check_grid_settings(self, ("train_subset", "test_subset", "pretrain_epochs", "epochs", "batch_size", "seeds"),
                            ROWS)
        for k in ("lr", "pretrain_lr", "shift_lr_scale"):
            if not getattr(self, k) > 0:
                raise ConfigError(f"{k} must be > 0, got {getattr(self, k)}")


def _dense(S: ShiftAddSettings, image_shape, num_classes: int) -> VisionTransformer:
    C_, H, _ = image_shape
    patch = 4 if H >= 16 and H % 4 == 0 else 2
    return VisionTransformer(ViTConfig.from_dict(dict(
        img_size=H, in_chans=C_, num_classes=num_classes, patch_size=patch, embed_dim=S.embed_dim, depth=S.depth,
        num_heads=S.num_heads, mlp_ratio=S.mlp_ratio)))


def _fit(model, train, S: ShiftAddSettings, *, epochs: int, lr: float, seed: int, desc: str, progress: bool) -> float:
    """AdamW (no decay on biases, norms, shifts and signs) with warmup + cosine; returns ms per step."""
    from tqdm.auto import tqdm

    from ..data import iterate_batches, normalize
    from ..train.optim import set_lr, warmup_cosine
    from ._loop import adamw, optimizer_step

    shift = {id(p) for p in shift_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw([p for p in params if id(p) not in shift], lr, S.weight_decay)
    shift_params = [p for p in params if id(p) in shift]
    if shift_params:  # shifts and signs: no decay (it would pull signs to 0), their own lr scale
        opt.add_param_group({"params": shift_params, "weight_decay": 0.0, "scale": S.shift_lr_scale})
    total = (len(train) // S.batch_size) * epochs
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False, dynamic_ncols=True,
               mininterval=1.0)
    step, t0 = 0, time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for images, labels in iterate_batches(train, S.batch_size, shuffle=True, seed=seed, epoch=epoch,
                                              drop_last=True):
            cur = warmup_cosine(step, total_steps=total, warmup_steps=S.warmup_steps, lr=lr, min_lr=lr * 0.01)
            set_lr(opt, cur)
            for g in opt.param_groups:
                g["lr"] = cur * g.get("scale", 1.0)
            out = model(normalize(images, train.mean, train.std))
            loss = torch.nn.functional.cross_entropy(out.logits, labels) + out.aux_loss
            optimizer_step(opt, loss, params, 1.0, f"{desc}, step {step}")
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    return 1000 * (time.perf_counter() - t0) / max(step, 1)


@torch.no_grad()
def evaluate(model, test, batch_size: int = 500) -> dict[str, Any]:
    """Accuracy and, for MoE layers, the shift expert's share of the top-1 choices per layer."""
    from ..data import normalize

    model.eval()
    layers = moe_linears(model)
    counts = {n: torch.zeros(m.num_experts) for n, m in layers}
    correct = 0
    images = test.float_images()
    for s in range(0, len(test), batch_size):
        logits = model(normalize(images[s:s + batch_size], test.mean, test.std)).logits
        correct += int((logits.argmax(-1) == test.labels[s:s + batch_size]).sum())
        for n, m in layers:
            counts[n] += m.tokens_per_expert.cpu()
    return {"accuracy": correct / len(test),
            "shift_share": {n: float(c[1] / c.sum()) for n, c in counts.items()}}


def _pretrained(S: ShiftAddSettings, seed: int, data, work: Path | None, progress: bool) -> VisionTransformer:
    """The seed's dense ViT: trained once, kept as ``work/dense_seed{seed}.safetensors``."""
    from safetensors.torch import load_file, save_file

    from ..utils import atomic_write

    train, _ = data
    torch.manual_seed(seed)
    model = _dense(S, train.image_shape, train.num_classes)
    path = None if work is None else Path(work) / f"dense_seed{seed}.safetensors"
    if path is not None and path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model
    _fit(model, train, S, epochs=S.pretrain_epochs, lr=S.pretrain_lr, seed=seed, desc=f"dense seed {seed}",
         progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda p: save_file(state, str(p)))
    return model


def run_row(row: str, seed: int, S: ShiftAddSettings, data, dense: VisionTransformer, *, progress: bool = True
            ) -> dict[str, Any]:
    """Reparameterise a copy of ``dense`` as ``row``, measure, fine-tune, measure again."""
    import copy

    train, test = data
    model = copy.deepcopy(dense)
    torch.manual_seed(seed + 1000)  # router init and noise
    opts = dict(ROW_OPTIONS[row])
    shiftadd_reparameterize(model, opts.pop("mode"), attention=S.attention, loss_weight=S.loss_weight, **opts)
    before = evaluate(model, test)
    step_ms = _fit(model, train, S, epochs=S.epochs, lr=S.lr, seed=seed, desc=f"{row} seed {seed}",
                   progress=progress)
    after = evaluate(model, test)
    if row == "mult":
        shares = [0.0]
    elif row == "shift":
        shares = [1.0]
    else:
        shares = list(after["shift_share"].values())
    lat = [modelled_latency([1 - s, s], PAPER_ALPHA) for s in shares]
    return {"row": row, "seed": seed, "accuracy_converted": before["accuracy"], "accuracy": after["accuracy"],
            "shift_share": after["shift_share"], "mean_shift_share": statistics.fmean(shares),
            "latency_parallel": statistics.fmean(d["parallel"] for d in lat),
            "latency_sequential": statistics.fmean(d["sequential"] for d in lat), "step_ms": step_ms}


def run_shiftadd(S: ShiftAddSettings, *, out: Path | None = None, work: Path | None = None,
                 data_dir: str | None = None, download: bool = False, progress: bool = True) -> dict[str, Any]:
    """Every row x seed (finished runs cached in ``work``); writes ``out`` (Markdown) and its .json."""
    S.validate()
    data = load_subsets(S.dataset, S.train_subset, S.test_subset, data_dir, download)
    dense_cache: dict[int, VisionTransformer] = {}

    def compute(row, seed, cache):
        if seed not in dense_cache:
            dense_cache[seed] = _pretrained(S, seed, data, work, progress)
        return run_row(row, seed, S, data, dense_cache[seed], progress=progress)

    def describe(row, seed, r):
        return (f"acc {100 * r['accuracy_converted']:.2f}% -> {100 * r['accuracy']:.2f}%, "
                f"shift share {100 * r['mean_shift_share']:.1f}%, latency {r['latency_parallel']:.3f}")

    results = run_grid(S, work, compute, describe)
    return write_report(S, results, out, markdown)


def markdown(report: dict) -> str:
    S, res = report["settings"], report["results"]
    ms = mean_std
    lines = [
        "# ShiftAddViT: a mixture of multiplication and shift experts (vision_moe.md §12)", "",
        f"{S['dataset']}, {S['train_subset']} training / {S['test_subset']} test images. Per seed a dense ViT "
        f"(patch 4, D={S['embed_dim']}, {S['depth']} blocks, MLP {S['mlp_ratio']}·D) is trained "
        f"{S['pretrain_epochs']} epochs (AdamW lr {S['pretrain_lr']}); every row then reparameterises the MLP "
        f"linears (fc1, fc2 of every block{', and qkv/proj' if S['attention'] else ''}) and fine-tunes "
        f"{S['epochs']} epochs (lr {S['lr']}, LL-loss weight {S['loss_weight']}). Mean ± std over {S['seeds']} "
        "seed(s). Made by `moevision shiftadd`.", "",
        "| configuration | accuracy after conversion (%) | accuracy after fine-tuning (%) | shift token share (%) | "
        "modelled latency, parallel experts | modelled latency, sequential | train ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, runs in res.items():
        if not runs:
            continue
        lines.append(f"| {ROWS[row]} | {ms([r['accuracy_converted'] for r in runs], 100)} | "
                     f"{ms([r['accuracy'] for r in runs], 100)} | {ms([r['mean_shift_share'] for r in runs], 100, 1)} | "
                     f"{ms([r['latency_parallel'] for r in runs], digits=3)} | "
                     f"{ms([r['latency_sequential'] for r in runs], digits=3)} | "
                     f"{ms([r['step_ms'] for r in runs], digits=0)} |")
    lines += ["", "Modelled latency: per token, relative to all-multiplication, from the measured token shares "
              f"n_e and the code's per-token costs α = {PAPER_ALPHA} (mult, shift): max_e α_e n_e / α_mult when "
              "the two experts run side by side, Σ_e α_e n_e / α_mult when they run one after the other. The "
              "LL-loss optimum is a 60 % shift share (α_e n_e equal), parallel latency 0.4 · 6 / 6 = 0.400. "
              "The shift expert here is an fp32 emulation, so measured CPU time (last column) does not fall; "
              "the latency columns are a model, not a measurement.", ""]
    moe_rows = [(row, runs) for row, runs in res.items() if runs and len(runs[0]["shift_share"]) > 0]
    if moe_rows:
        names = list(moe_rows[0][1][0]["shift_share"])
        lines += ["Shift token share per layer (%), mean over seeds:", "",
                  "| configuration | " + " | ".join(n.replace(".inner", "") for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for row, runs in moe_rows:
            cells = [f"{100 * statistics.fmean(r['shift_share'][n] for r in runs):.0f}" for n in names]
            lines.append(f"| {ROWS[row]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"
