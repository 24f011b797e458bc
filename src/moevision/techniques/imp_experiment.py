"""The IMP CPU miniature of multimodal_compression_systems.md §11(d) (``moevision imp``).

Three heterogeneous tasks on procedurally generated ShapeWorld data, each from its own scenes:
- ``nce``: image <-> caption contrastive (symmetric InfoNCE); evaluated as image -> caption retrieval
  R@1 over the test captions (a hit when the retrieved caption's text equals the image's own);
- ``video``: the direction (left, right, up, down) of an object moving across 8 frames, with a static
  distractor; the number of frames is re-sampled each step from {4, 8} (4 = every other frame), IMP's
  multi-resolution input; evaluated at 8 and at 4 frames;
- ``count``: the number of objects (1-4) in a ShapeWorld image (stands in for the spec's glyph task).

Rows: ``dense_agd`` (the dense twin, AGD), ``moe_agd`` (MoE with 8 experts in layers 1 and 3, token choice
top-1, AGD), ``moe_sum`` (the same MoE, every task's loss summed into each update: the multi-task
baseline AGD replaces; it does three forward passes per step, so it gets the same number of steps and
3x the compute) and ``moe_ec_agd`` (expert-choice routing, [R] IMP's).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ._experiment import check_grid_settings, mean_std, run_grid, write_report
from .imp import AGDTask, IMPConfig, IMPEncoder, agd_train

DIRECTIONS = ("right", "left", "down", "up")
ROWS = {
    "dense_agd": "dense encoder, AGD",
    "moe_agd": "MoE encoder (8 experts in layers 1, 3, top-1), AGD",
    "moe_sum": "MoE encoder, summed task losses each step (multi-task baseline)",
    "moe_ec_agd": "MoE encoder, expert-choice routing, AGD",
}


# ---------------------------------------------------------------------------------------------------
# data
def moving_videos(n: int, seed: int, frames: int = 8, step_px: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(videos (n, frames, 3, 32, 32) in [0, 1], direction labels (n,)): an 8x8 ShapeWorld sprite moves
    ``step_px`` pixels per frame in one of ``DIRECTIONS`` over a static distractor sprite."""
    from ..data.shapeworld import COLOURS, MASKS, SHAPES

    rng = np.random.default_rng(seed)
    span = step_px * (frames - 1)
    vids = np.zeros((n, frames, 3, 32, 32), dtype=np.float32)
    labels = rng.integers(0, 4, size=n)
    cols = list(COLOURS.values())

    def sprite(img, r, c, shape, colour):
        m = MASKS[shape]
        for ch, val in enumerate(colour):
            if val:
                img[ch, r:r + 8, c:c + 8][m] = val

    for i in range(n):
        d = int(labels[i])
        shape, colour = SHAPES[rng.integers(4)], cols[rng.integers(len(cols))]
        dshape, dcolour = SHAPES[rng.integers(4)], cols[rng.integers(len(cols))]
        dr, dc = int(rng.integers(0, 25)), int(rng.integers(0, 25))
        # start so that the whole path stays inside the canvas
        free = 32 - 8 - span
        r0, c0 = int(rng.integers(0, 25)), int(rng.integers(0, 25))
        if d in (0, 1):
            c0 = int(rng.integers(0, free + 1)) + (0 if d == 0 else span)
        else:
            r0 = int(rng.integers(0, free + 1)) + (0 if d == 2 else span)
        dv = {0: (0, 1), 1: (0, -1), 2: (1, 0), 3: (-1, 0)}[d]
        for t in range(frames):
            sprite(vids[i, t], dr, dc, dshape, dcolour)
            sprite(vids[i, t], r0 + dv[0] * step_px * t, c0 + dv[1] * step_px * t, shape, colour)
    return torch.from_numpy(vids), torch.from_numpy(labels).long()


@dataclass
class IMPData:
    """Train and test sets of the three tasks, and the caption tokenizer."""

    nce_images: torch.Tensor
    nce_tokens: torch.Tensor
    nce_captions: list[str]
    count_images: torch.Tensor
    count_labels: torch.Tensor
    videos: torch.Tensor
    video_labels: torch.Tensor
    test: dict[str, Any]
    vocab_size: int
    max_len: int


def make_data(n_train: int, n_test: int, seed: int = 0) -> IMPData:
    """Disjoint scene sets per task (heterogeneous datasets); test sets from other seeds."""
    from ..data.shapeworld import ShapeWorld
    from ..models.tokenizer import WordTokenizer

    def scenes(s, n):
        return ShapeWorld(s).scenes(n)

    def caps(sc):
        sw = ShapeWorld(0)
        return [sw.caption(x)["answer"] for x in sc]

    nce_tr, nce_te = scenes(seed * 10 + 1, n_train), scenes(seed * 10 + 2, n_test)
    cnt_tr, cnt_te = scenes(seed * 10 + 3, n_train), scenes(seed * 10 + 4, n_test)
    cap_tr, cap_te = caps(nce_tr), caps(nce_te)
    tok = WordTokenizer.build(cap_tr + cap_te)  # a closed template vocabulary: the test words are the same
    max_len = max(len(tok.encode(c)) for c in cap_tr + cap_te)

    def encode(cs):
        out = torch.zeros(len(cs), max_len, dtype=torch.long)
        for i, c in enumerate(cs):
            ids = tok.encode(c)
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def stack(sc):
        return torch.stack([x["image"] for x in sc])

    def counts(sc):
        return torch.tensor([len(x["objects"]) - 1 for x in sc])

    v_tr, l_tr = moving_videos(n_train, seed * 10 + 5)
    v_te, l_te = moving_videos(n_test, seed * 10 + 6)
    test = {"nce_images": stack(nce_te), "nce_tokens": encode(cap_te), "nce_captions": cap_te,
            "count_images": stack(cnt_te), "count_labels": counts(cnt_te), "videos": v_te, "video_labels": l_te}
    return IMPData(stack(nce_tr), encode(cap_tr), cap_tr, stack(cnt_tr), counts(cnt_tr), v_tr, l_tr, test,
                   len(tok), max_len)


# ---------------------------------------------------------------------------------------------------
# tasks
def build_tasks(data: IMPData, batch_size: int, weights: dict[str, float], drop_rate: float = 0.0) -> list[AGDTask]:
    n_nce, n_cnt, n_vid = len(data.nce_images), len(data.count_images), len(data.videos)

    def pick(n, g):
        return torch.randint(0, n, (batch_size,), generator=g)

    def nce_sample(step, g):
        i = pick(n_nce, g)
        return data.nce_images[i], data.nce_tokens[i]

    def nce_loss(model, batch):
        img, txt = batch
        a, aux_a = model.encode("image", img, drop_rate=drop_rate)
        b, aux_b = model.encode("text", txt)
        return model.contrastive(a, b) + aux_a + aux_b

    def count_sample(step, g):
        i = pick(n_cnt, g)
        return data.count_images[i], data.count_labels[i]

    def count_loss(model, batch):
        x, y = batch
        f, aux = model.encode("image", x, drop_rate=drop_rate)
        return F.cross_entropy(model.heads["count"](f), y) + aux

    def video_sample(step, g):
        i = pick(n_vid, g)
        frames = 8 if torch.randint(0, 2, (1,), generator=g).item() else 4  # multi-res: re-sampled each step
        v = data.videos[i]
        return (v if frames == 8 else v[:, ::2]), data.video_labels[i]

    def video_loss(model, batch):
        v, y = batch
        f, aux = model.encode("video", v, drop_rate=drop_rate)
        return F.cross_entropy(model.heads["video"](f), y) + aux

    return [AGDTask("nce", nce_sample, nce_loss, weights.get("nce", 1.0)),
            AGDTask("video", video_sample, video_loss, weights.get("video", 1.0)),
            AGDTask("count", count_sample, count_loss, weights.get("count", 1.0))]


@torch.no_grad()
def evaluate(model: IMPEncoder, test: dict[str, Any], batch_size: int = 250) -> dict[str, float]:
    model.eval()

    def feats(mod, x):
        return torch.cat([model.encode(mod, x[s:s + batch_size])[0] for s in range(0, len(x), batch_size)])

    img = F.normalize(model.proj["image"](feats("image", test["nce_images"])), dim=-1)
    txt = F.normalize(model.proj["text"](feats("text", test["nce_tokens"])), dim=-1)
    best = (img @ txt.T).argmax(1).tolist()
    caps = test["nce_captions"]
    r1 = statistics.fmean(caps[j] == caps[i] for i, j in enumerate(best))
    cnt = (model.heads["count"](feats("image", test["count_images"])).argmax(1) == test["count_labels"]).float().mean()
    v8 = (model.heads["video"](feats("video", test["videos"])).argmax(1) == test["video_labels"]).float().mean()
    v4 = (model.heads["video"](feats("video", test["videos"][:, ::2])).argmax(1) == test["video_labels"]).float().mean()
    return {"retrieval_r1": r1, "count_accuracy": float(cnt), "video_accuracy_8": float(v8),
            "video_accuracy_4": float(v4)}


# ---------------------------------------------------------------------------------------------------
# the experiment
@dataclass
class IMPSettings:
    """Sized for 2 CPU cores (defaults: ~1-2 min per run)."""

    train_size: int = 3000
    test_size: int = 500
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    drop_rate: float = 0.0
    weights: dict = field(default_factory=lambda: {"nce": 1.0, "video": 1.0, "count": 1.0})
    seeds: int = 3
    rows: tuple[str, ...] = tuple(ROWS)

    def validate(self) -> None:
        check_grid_settings(self, ("train_size", "test_size", "steps", "batch_size", "seeds"), ROWS)
        if not 0 <= self.drop_rate < 1:
            raise ConfigError(f"drop_rate must be in [0, 1), got {self.drop_rate}")


def build_encoder(row: str, data: IMPData) -> IMPEncoder:
    cfg = IMPConfig(vocab_size=data.vocab_size, max_text_len=data.max_len, heads=(("count", 4), ("video", 4)),
                    moe_layers=() if row.startswith("dense") else (1, 3),
                    router="expert_choice" if row == "moe_ec_agd" else "topk")
    return IMPEncoder(cfg)


def run_row(row: str, seed: int, S: IMPSettings, data: IMPData, progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = build_encoder(row, data)
    tasks = build_tasks(data, S.batch_size, S.weights, S.drop_rate)
    bar = tqdm(total=S.steps, desc=f"{row} seed {seed}", unit="step", disable=not progress, leave=False,
               dynamic_ncols=True, mininterval=1.0)

    def tick(step, name, loss):
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(task=name, loss=f"{loss:.3f}")

    t0 = time.perf_counter()
    hist = agd_train(model, tasks, steps=S.steps, lr=S.lr, warmup_steps=S.warmup_steps,
                     mode="sum" if row == "moe_sum" else "agd", seed=seed, progress=tick)
    bar.close()
    secs = time.perf_counter() - t0
    res = evaluate(model, data.test)
    freq = {t.name: sum(1 for n, _ in hist if n == t.name) / len(hist) for t in tasks}
    res.update(row=row, seed=seed, steps=S.steps, train_seconds=secs, task_frequency=freq,
               ffn_flops_per_token=model.active_ffn_flops_per_token(),
               params=sum(p.numel() for p in model.parameters()))
    return res


def run_imp(S: IMPSettings, *, out: Path | None = None, work: Path | None = None, progress: bool = True
            ) -> dict[str, Any]:
    """Every row x seed (finished runs cached in ``work``); writes ``out`` (Markdown) and its .json."""
    S.validate()
    data = make_data(S.train_size, S.test_size)

    def describe(row, seed, r):
        return (f"R@1 {100 * r['retrieval_r1']:.1f}%, video {100 * r['video_accuracy_8']:.1f}% (8 frames) / "
                f"{100 * r['video_accuracy_4']:.1f}% (4), count {100 * r['count_accuracy']:.1f}%, "
                f"{r['train_seconds']:.0f} s")

    results = run_grid(S, work, lambda row, seed, cache: run_row(row, seed, S, data, progress), describe)
    return write_report(S, results, out, markdown)


def markdown(report: dict) -> str:
    S, res = report["settings"], report["results"]
    ms = mean_std
    lines = [
        "# IMP: alternating gradient descent over heterogeneous tasks, dense vs MoE (spec §11)", "",
        f"Procedural ShapeWorld data, {S['train_size']} training and {S['test_size']} test items per task, each "
        "task from its own scenes. Tasks: **nce** (image <-> caption InfoNCE; image -> caption retrieval R@1 "
        "over the test captions), **video** (direction of a moving object, 8 frames, with the frame count "
        "re-sampled from {4, 8} every step), **count** (1-4 objects). Encoder: width 64, 4 layers, 4 heads, "
        "MLP 128; MoE rows put 8 experts in layers 1 and 3 (token choice top-1, experts of the dense hidden "
        "width, so the active FFN FLOPs per token equal the dense twin's plus the router). "
        f"{S['steps']} optimiser steps, batch {S['batch_size']}, AdamW lr {S['lr']}, task weights "
        f"{S['weights']}. Mean ± std over {S['seeds']} seed(s). Made by `moevision imp`.", "",
        "| configuration | retrieval R@1 (%) | video acc, 8 frames (%) | video acc, 4 frames (%) | count acc (%) | "
        "mean of the four (%) | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, runs in res.items():
        if not runs:
            continue
        keys = ("retrieval_r1", "video_accuracy_8", "video_accuracy_4", "count_accuracy")
        mean4 = [statistics.fmean(r[k] for k in keys) for r in runs]
        lines.append(f"| {ROWS[row]} | " + " | ".join(ms([r[k] for r in runs], 100, 1) for k in keys)
                     + f" | {ms(mean4, 100, 1)} | {ms([r['train_seconds'] for r in runs], digits=0)} |")
    lines += ["", "AGD rows update on one task per step, drawn from the task weights (the realised frequencies "
              "are in the JSON); the summed-loss row runs every task each step, so it does three times the "
              "forward/backward work of an AGD row for the same number of steps.", ""]
    return "\n".join(lines) + "\n"
