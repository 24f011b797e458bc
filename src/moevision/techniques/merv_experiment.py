"""The MERV CPU miniature of multimodal_compression_systems.md §7.4 (tests 6-8; ``moevision merv``).

Data: ShapeWorld videos from ``imp_experiment.moving_videos`` (8 frames, 32x32: an 8x8 sprite moves
``step_px`` pixels per frame, 1 as in spec §0.4, in one of 4 directions over a static distractor sprite). Each
video asks the *combined* question "what colour is the moving object and which way does it move ?": the answer
is one of 7 colours x 4 directions = 28 classes (chance 3.6 %). The colour of the moving sprite is read back from the pixels (``mover_colours``).

Two encoders, each first pre-trained alone on its own data and objective, then frozen (MERV's stage 1
trains projectors + mixer with the encoders frozen):
- ``vit``: a per-frame TinyViT (patch 4, width 32, 2 blocks) on all 8 frames, pre-trained as an image tagger
  on still ShapeWorld scenes (multi-hot colours and shapes present, BCE): spatially detailed, frame by frame;
- ``c3d``: ``Tiny3DConv`` (two 3x3x3 convs, width 32) on 4 frames (stride 2), pre-trained to classify the
  direction of motion on other moving-sprite videos: a motion encoder.

Both are aligned by ``pool_3d`` to T' = 4, s = 4 (L = 64 tokens), projected to D = 64 and mixed; a small
readout stands in for the language model: per-token LayerNorm, flatten, MLP -> 28 answers. Projectors, mixer
and readout are trained (AdamW, warmup + cosine); the encoders stay frozen, so their pooled features are
computed once per seed and reused by every row.

Rows (``ROWS``): each encoder alone, MERV's cross-attention mixer, and the ablation mixers (sequence concat,
channel concat + linear, channel concat + LayerNorm + linear, learned global softmax scalars).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..train.optim import set_lr, warmup_cosine
from ._experiment import check_grid_settings, mean_std, run_grid, write_report
from ._loop import adamw, optimizer_step
from .imp_experiment import DIRECTIONS, moving_videos
from .merv import EncoderSpec, MERVConfig, MERVEncoder, PerFrame, Tiny3DConv

ROWS = {
    "vit": "TinyViT per frame (8 frames) alone",
    "c3d": "Tiny3DConv (4 frames) alone",
    "merv": "MERV: both, cross-attention mixer (cross_attention_avg_lq)",
    "concat_sequence": "both, sequence concat (2L tokens)",
    "concat_channel": "both, channel concat + linear",
    "concat_channel_ln": "both, channel concat + LayerNorm + linear",
    "scalar": "both, learned global softmax scalars",
}
ENCODERS_OF = {"vit": ("vit",), "c3d": ("c3d",)}  # every other row uses both
MIXER_OF = {"vit": "concat_sequence", "c3d": "concat_sequence", "merv": "cross_attention_avg_lq"}
RESULT_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# data
def mover_colours(videos: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The ShapeWorld colour index (into ``COLOURS``) of the moving sprite of each video ``[n, T, 3, H, W]``.

    ``moving_videos`` paints a sprite by setting its colour's non-zero channels, so where the mover overlaps the
    distractor the pixel holds both colours' channels. A pixel that changes over time is covered by the mover in
    some frame, and then holds at least the mover's channels; a colour with that property at every changing
    pixel is contained in the mover's colour (the path leaves the distractor's cell, where the only values are
    black and the mover's colour). So the mover's colour is the one such colour with the most channels."""
    from ..data.shapeworld import COLOURS

    cols = torch.tensor(list(COLOURS.values()), dtype=videos.dtype)
    n_channels = cols.sum(1)
    out = []
    for s in range(0, len(videos), chunk):
        v = videos[s:s + chunk]
        varying = (v != v[:, :1]).any(2).any(1)  # [n, H, W]
        covers = (v.unsqueeze(2) >= cols.view(1, 1, -1, 3, 1, 1)).all(3).any(1)  # [n, colours, H, W]
        ok = (covers | ~varying.unsqueeze(1)).flatten(2).all(2) & varying.flatten(1).any(1, keepdim=True)
        score = torch.where(ok, n_channels, torch.zeros_like(n_channels))  # [n, colours]
        top = score.max(1).values
        bad = ((score == top.unsqueeze(1)).sum(1) != 1) | (top == 0)
        if bad.any():
            raise ValueError(f"mover_colours: video {s + int(bad.nonzero()[0])} has no unique moving colour")
        out.append(score.argmax(1))
    return torch.cat(out)


@dataclass
class MERVData:
    videos: torch.Tensor  # [n, 8, 3, 32, 32]
    colours: torch.Tensor  # [n]
    directions: torch.Tensor  # [n]

    @property
    def labels(self) -> torch.Tensor:
        """The combined answer: colour * 4 + direction."""
        return self.colours * len(DIRECTIONS) + self.directions


def make_data(n: int, seed: int, step_px: int = 1) -> MERVData:
    v, d = moving_videos(n, seed, frames=8, step_px=step_px)
    return MERVData(v, mover_colours(v), d)


def tag_targets(scenes: list[dict]) -> torch.Tensor:
    """Multi-hot (7 colours, 4 shapes) present in each ShapeWorld scene: the image encoder's pre-training."""
    from ..data.shapeworld import COLOURS, SHAPES

    cols, shapes = list(COLOURS), list(SHAPES)
    y = torch.zeros(len(scenes), len(cols) + len(shapes))
    for i, sc in enumerate(scenes):
        for o in sc["objects"]:
            y[i, cols.index(o["colour"])] = 1
            y[i, len(cols) + shapes.index(o["shape"])] = 1
    return y


# ---------------------------------------------------------------------------------------------------
# settings
@dataclass
class MERVSettings:
    """Sized for one CPU thread: the default grid (7 rows x 3 seeds) took 8 min 32 s (2-core machine shared with
    other jobs, OMP_NUM_THREADS=1)."""

    train_size: int = 10000
    test_size: int = 1000
    step_px: int = 1  # spec §0.4: 1 px per frame
    pretrain_size: int = 3000
    pretrain_steps: int = 300
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    pretrain_lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    dim: int = 64  # D, the "LLM" width
    out_size: int = 4  # s
    out_frames: int = 4  # T' for both encoders
    encoder_width: int = 32
    head_hidden: int = 128
    projector: str = "linear"
    seeds: int = 3
    rows: tuple[str, ...] = tuple(ROWS)

    def validate(self) -> None:
        check_grid_settings(self, ("train_size", "test_size", "pretrain_size", "pretrain_steps", "steps", "step_px",
                                   "batch_size", "dim", "out_size", "out_frames", "encoder_width", "head_hidden",
                                   "seeds"), ROWS)
        if self.warmup_steps < 0 or not isinstance(self.warmup_steps, int):
            raise ConfigError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        for k in ("lr", "pretrain_lr"):
            if not getattr(self, k) > 0:
                raise ConfigError(f"{k} must be > 0, got {getattr(self, k)!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.step_px > 3:
            raise ConfigError(f"step_px must be <= 3 (the path must fit the 32-px frame), got {self.step_px}")
        if self.out_size > 8:
            raise ConfigError(f"out_size must be <= 8 (the encoders' 8x8 token grids), got {self.out_size}")
        if self.out_frames > 4:
            raise ConfigError(f"out_frames must be <= 4 (the 3-D encoder sees 4 frames), got {self.out_frames}")
        if self.encoder_width % 2:
            raise ConfigError(f"encoder_width must be even (2 attention heads), got {self.encoder_width}")
        if self.projector not in ("linear", "gelu-mlp"):
            raise ConfigError(f"projector must be 'linear' or 'gelu-mlp', got {self.projector!r}")


# ---------------------------------------------------------------------------------------------------
# training helpers
def train_steps(params: list[nn.Parameter], loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int, *, steps: int,
                batch_size: int, lr: float, weight_decay: float, warmup_steps: int, seed: int,
                tick: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW + warmup/cosine on ``loss_fn(index batch)``; batches drawn with replacement from a seeded generator."""
    opt = adamw(params, lr, weight_decay)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        set_lr(opt, warmup_cosine(step, total_steps=steps, warmup_steps=min(warmup_steps, steps - 1), lr=lr,
                                  min_lr=lr * 0.01))
        loss = loss_fn(torch.randint(0, n, (min(batch_size, n),), generator=g))
        optimizer_step(opt, loss, params, 1.0, f"step {step}")
        losses.append(float(loss.detach()))
        if tick is not None:
            tick(step, losses[-1])
    return losses


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
    return torch.cat([fn(x[s:s + batch]) for s in range(0, len(x), batch)])


def build_vit(width: int):
    from ..models.vit import ViTConfig, VisionTransformer

    return VisionTransformer(ViTConfig(img_size=32, in_chans=3, num_classes=11, patch_size=4, embed_dim=width,
                                       depth=2, num_heads=2, mlp_ratio=2.0, class_token=False, global_pool="avg"))


def pretrain_encoders(S: MERVSettings, seed: int) -> tuple[nn.Module, nn.Module, dict[str, float]]:
    """(per-frame TinyViT, Tiny3DConv, their held-out pre-training metrics), each trained alone."""
    from ..data.shapeworld import ShapeWorld

    torch.manual_seed(seed)
    # image tagger on still scenes
    scenes = ShapeWorld(1000 + seed).scenes(S.pretrain_size + 500)
    imgs, tags = torch.stack([s["image"] for s in scenes]), tag_targets(scenes)
    vit = build_vit(S.encoder_width)
    n = S.pretrain_size
    train_steps(list(vit.parameters()),
                lambda i: F.binary_cross_entropy_with_logits(vit(imgs[i]).logits, tags[i]), n,
                steps=S.pretrain_steps, batch_size=S.batch_size, lr=S.pretrain_lr, weight_decay=S.weight_decay,
                warmup_steps=S.warmup_steps, seed=seed)
    vit.eval()
    pred = _batched(lambda x: vit(x).logits, imgs[n:]) > 0
    tag_acc = float((pred == tags[n:].bool()).all(1).float().mean())
    # direction classifier on other moving-sprite videos, 4 frames
    vids, dirs = moving_videos(S.pretrain_size + 500, 2000 + seed, frames=8, step_px=S.step_px)
    vids = vids[:, ::2]
    c3d = Tiny3DConv(S.encoder_width)
    head = nn.Linear(S.encoder_width, len(DIRECTIONS))
    train_steps(list(c3d.parameters()) + list(head.parameters()),
                lambda i: F.cross_entropy(head(c3d(vids[i]).mean(1)), dirs[i]), n,
                steps=S.pretrain_steps, batch_size=S.batch_size, lr=S.pretrain_lr, weight_decay=S.weight_decay,
                warmup_steps=S.warmup_steps, seed=seed + 1)
    c3d.eval()
    dir_acc = float((_batched(lambda x: head(c3d(x).mean(1)), vids[n:]).argmax(1) == dirs[n:]).float().mean())
    return vit, c3d, {"vit_tag_exact_match": tag_acc, "c3d_direction_accuracy": dir_acc}


def encoder_specs(S: MERVSettings) -> dict[str, EncoderSpec]:
    return {"vit": EncoderSpec("vit", S.encoder_width, frames=8, grid=(8, 8, 8)),
            "c3d": EncoderSpec("c3d", S.encoder_width, frames=4, grid=(4, 8, 8))}


def build_model(row: str, S: MERVSettings, vit: nn.Module, c3d: nn.Module) -> MERVEncoder:
    specs, mods = encoder_specs(S), {"vit": PerFrame(vit), "c3d": c3d}
    names = ENCODERS_OF.get(row, ("vit", "c3d"))
    cfg = MERVConfig(dim=S.dim, out_size=S.out_size, out_frames={k: S.out_frames for k in names},
                     projector=S.projector, mixer=MIXER_OF.get(row, row))
    return MERVEncoder([(specs[k], mods[k]) for k in names], cfg)


class Readout(nn.Module):
    """The language-model stand-in: per-token LayerNorm, flatten, Linear -> GELU -> Linear to the answers."""

    def __init__(self, tokens: int, dim: int, hidden: int, answers: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(tokens * dim, hidden), nn.GELU(), nn.Linear(hidden, answers))

    def forward(self, tokens_BLD: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(tokens_BLD).flatten(1))


# ---------------------------------------------------------------------------------------------------
# the experiment
class SeedCache:
    """Per seed: the frozen encoders' pooled features of the train and test videos (shared by every row)."""

    def __init__(self, S: MERVSettings, train: MERVData, test: MERVData, progress: bool):
        self.S, self.train, self.test, self.progress = S, train, test, progress
        self.store: dict[int, dict[str, Any]] = {}

    def get(self, seed: int) -> dict[str, Any]:
        if seed not in self.store:
            t0 = time.perf_counter()
            vit, c3d, metrics = pretrain_encoders(self.S, seed)
            full = build_model("concat_sequence", self.S, vit, c3d)  # pools both; the projectors are unused

            def pooled(v):
                return _batched(lambda x: torch.cat(full.pooled(x), -1), v)

            self.store[seed] = {"train": pooled(self.train.videos), "test": pooled(self.test.videos),
                                "encoders": (vit, c3d), "pretrain": metrics,
                                "pretrain_seconds": time.perf_counter() - t0}
            if self.progress:
                print(f"  encoders for seed {seed}: {metrics} ({self.store[seed]['pretrain_seconds']:.0f} s)",
                      flush=True)
        return self.store[seed]


def _split(feats: torch.Tensor, names: tuple[str, ...], width: int) -> list[torch.Tensor]:
    """The cached [n, L, C_vit + C_c3d] features -> the pooled list for ``names``."""
    parts = {"vit": feats[..., :width], "c3d": feats[..., width:]}
    return [parts[k] for k in names]


def run_row(row: str, seed: int, S: MERVSettings, cache: SeedCache, progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    enc = cache.get(seed)
    torch.manual_seed(seed)
    model = build_model(row, S, *enc["encoders"])
    names = tuple(s.name for s in model.specs)
    L_out = model.token_length * (len(names) if model.config.mixer == "concat_sequence" else 1)
    readout = Readout(L_out, S.dim, S.head_hidden, 7 * len(DIRECTIONS))
    params = [p for p in list(model.parameters()) + list(readout.parameters()) if p.requires_grad]
    tr, y = enc["train"], cache.train.labels
    model.train()
    readout.train()
    bar = tqdm(total=S.steps, desc=f"{row} seed {seed}", unit="step", disable=not progress, leave=False,
               dynamic_ncols=True, mininterval=1.0)

    def loss_fn(i):
        return F.cross_entropy(readout(model.fuse(_split(tr[i], names, S.encoder_width)).tokens), y[i])

    def tick(step, loss):
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    t0 = time.perf_counter()
    losses = train_steps(params, loss_fn, len(tr), steps=S.steps, batch_size=S.batch_size, lr=S.lr,
                         weight_decay=S.weight_decay, warmup_steps=S.warmup_steps, seed=seed + 10, tick=tick)
    bar.close()
    secs = time.perf_counter() - t0
    res = evaluate(model, readout, enc["test"], cache.test, names, S.encoder_width)
    res.update(row=row, seed=seed, version=RESULT_VERSION, steps=S.steps, train_seconds=secs,
               final_train_loss=statistics.fmean(losses[-20:]), trainable_params=sum(p.numel() for p in params),
               encoders=list(names), pretrain=enc["pretrain"], pretrain_seconds=enc["pretrain_seconds"])
    return res


@torch.no_grad()
def evaluate(model: MERVEncoder, readout: Readout, feats: torch.Tensor, data: MERVData, names: tuple[str, ...],
             width: int) -> dict[str, Any]:
    model.eval()
    readout.eval()
    outs = [model.fuse(_split(feats[s:s + 250], names, width)) for s in range(0, len(feats), 250)]
    pred = torch.cat([readout(o.tokens) for o in outs]).argmax(1)
    nd = len(DIRECTIONS)
    res: dict[str, Any] = {
        "accuracy": float((pred == data.labels).float().mean()),
        "colour_accuracy": float((pred // nd == data.colours).float().mean()),
        "direction_accuracy": float((pred % nd == data.directions).float().mean()),
    }
    if outs[0].weights is not None:
        w = torch.cat([o.weights for o in outs])  # [n, E]
        res["mixer_weights"] = {k: {"mean": float(w[:, e].mean()), "std": float(w[:, e].std()),
                                    "min": float(w[:, e].min()), "max": float(w[:, e].max()),
                                    "by_direction": [float(w[data.directions == d, e].mean()) for d in range(nd)]}
                                for e, k in enumerate(names)}
        res["mixer_weight_sum_max_error"] = float((w.sum(1) - 1).abs().max())
    return res


def run_merv(S: MERVSettings, *, out: Path | None = None, work: Path | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Every row x seed (finished runs cached in ``work``); writes ``out`` (Markdown) and its .json."""
    S.validate()
    cache = SeedCache(S, make_data(S.train_size, 11, S.step_px), make_data(S.test_size, 12, S.step_px), progress)

    def describe(row, seed, r):
        w = r.get("mixer_weights")
        ws = "" if w is None else ", weights " + " / ".join(f"{k} {v['mean']:.2f}" for k, v in w.items())
        return (f"acc {100 * r['accuracy']:.1f}% (colour {100 * r['colour_accuracy']:.1f}%, direction "
                f"{100 * r['direction_accuracy']:.1f}%){ws}, {r['train_seconds']:.0f} s")

    def refresh(row, seed, cached, path):
        return None if cached.get("version") == RESULT_VERSION else run_row(row, seed, S, cache, progress)

    results = run_grid(S, work, lambda row, seed, c: run_row(row, seed, S, cache, progress), describe, refresh)
    return write_report(S, results, out, markdown)


def markdown(report: dict) -> str:
    S, res = report["settings"], report["results"]
    ms = mean_std
    lines = [
        "# MERV: fusing a per-frame image encoder and a 3-D video encoder (spec §7.2, §7.4)", "",
        f"ShapeWorld moving-sprite videos (8 frames, 32x32, a static distractor), {S['train_size']} training and "
        f"{S['test_size']} test videos. Question: the colour of the moving sprite *and* its direction (7 x 4 = "
        "28 answers, chance 3.6 %). Frozen encoders, each pre-trained alone for "
        f"{S['pretrain_steps']} steps on {S['pretrain_size']} items: a per-frame TinyViT (8 frames, image "
        "tagging on still scenes) and a Tiny3DConv (4 frames, direction of motion on other videos). Both are "
        f"pooled to T'={S['out_frames']}, s={S['out_size']} (L={S['out_frames'] * S['out_size'] ** 2} tokens), "
        f"projected ({S['projector']}) to D={S['dim']} and mixed; a per-token LayerNorm + flatten + MLP "
        f"(hidden {S['head_hidden']}) readout answers. Projectors, mixer and readout train for {S['steps']} "
        f"steps, batch {S['batch_size']}, AdamW lr {S['lr']}. Mean ± std over {S['seeds']} seed(s) "
        "(a seed re-trains the encoders too). Made by `moevision merv`.", "",
        "| configuration | accuracy (%) | colour (%) | direction (%) | mixer weight on vit / c3d | trainable "
        "params | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, runs in res.items():
        if not runs:
            continue
        w = runs[0].get("mixer_weights")
        wcell = "-" if w is None else " / ".join(
            ms([r["mixer_weights"][k]["mean"] for r in runs], 1, 2) for k in w)
        lines.append(f"| {ROWS[row]} | " + " | ".join(ms([r[k] for r in runs], 100, 1) for k in
                                                        ("accuracy", "colour_accuracy", "direction_accuracy"))
                     + f" | {wcell} | {runs[0]['trainable_params']:,} | "
                     f"{ms([r['train_seconds'] for r in runs], digits=0)} |")
    pre = {}
    for runs in res.values():
        for r in runs:
            pre[r["seed"]] = r["pretrain"]
    if pre:
        lines += ["", "Encoder pre-training (held-out, per seed): "
                  + "; ".join(f"seed {s}: TinyViT tag exact-match {100 * p['vit_tag_exact_match']:.1f} %, "
                              f"Tiny3DConv direction {100 * p['c3d_direction_accuracy']:.1f} %"
                              for s, p in sorted(pre.items())) + "."]
    for row in ("merv", "scalar"):
        runs = res.get(row) or []
        if not runs:
            continue
        lines += ["", f"Mixer weights of **{row}** on the test videos (mean over seeds of each statistic):", "",
                  "| encoder | mean | per-video std | min | max | mean by direction (" + ", ".join(DIRECTIONS)
                  + ") |", "|---|---|---|---|---|---|"]
        for k in runs[0]["mixer_weights"]:
            w = [r["mixer_weights"][k] for r in runs]
            by_dir = [statistics.fmean(x["by_direction"][d] for x in w) for d in range(len(DIRECTIONS))]
            lines.append(f"| {k} | " + " | ".join(f"{statistics.fmean(x[s] for x in w):.3f}"
                                                   for s in ("mean", "std", "min", "max"))
                         + " | " + ", ".join(f"{v:.3f}" for v in by_dir) + " |")
    singles = [r for r in ("vit", "c3d") if res.get(r)]
    if "merv" in res and res["merv"] and singles:
        wins = [all(m["accuracy"] > res[s][i]["accuracy"] for s in singles if i < len(res[s]))
                for i, m in enumerate(res["merv"])]
        lines += ["", f"Spec §7.4 test 8 (soft: the fused model beats each single encoder): MERV beats "
                  f"{' and '.join(singles)} in {sum(wins)} of {len(wins)} seed(s)."]
    return "\n".join(lines) + "\n"
