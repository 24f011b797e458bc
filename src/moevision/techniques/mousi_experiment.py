"""The MouSi CPU miniature (multimodal_compression_systems.md §6(d)): does an LM fed by two frozen vision
experts through MouSi's poly-expert fusion answer better than with either expert alone?

Data: ShapeWorld scenes (1-4 coloured shapes on a 4x4 grid, pixel noise std 0.1) and their existence,
counting and colour multiple-choice questions. Existence and colour questions need colour and shape;
counting needs shape.

The frozen experts, each pre-trained on its own narrow task and then frozen:
- **colour**: a tiny ViT on 4x4-pixel patches (an 8x8 token grid), trained to name each grid cell's colour;
- **shape**: a small CNN on the grey-level image (colour-blind by construction, a 4x4 token grid), trained to
  name each cell's shape.
The spec's third expert (a glyph reader) needs glyph objects, which ShapeWorld does not draw; it is left out.

Fusion (§6(b), MLP option): one 2-layer GELU MLP per expert into the LM's width, the experts' tokens
concatenated along the sequence (colour, then shape). The colour expert's 64 tokens go through
multi-patch-one-token grouping (g = 4 neighbouring patches, 2x2, per token: one token per grid cell).

The LM (2 layers, width 64) is first taught, as a stand-in for a pre-trained LLM, to answer from the
scene's caption given as text. Then, per row, a copy of it and the row's fusion network train on the image
questions, the experts frozen: rows ``colour`` (that expert only), ``shape`` (that expert only) and
``both``. Same steps, data and LM start for every row.

Reported per seed, on held-out scenes: exact-match accuracy per question type and overall. Spec test 4 (a
soft test: the multi-expert model at least as good as the best single-expert one) is reported per seed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.vit import VisionTransformer, ViTConfig
from ..models.vlm import VisionLanguageModel, VLMConfig, _vision
from . import mousi as MS
from ._experiment import ExactMatch, mean_std, run_seeds, write_report
from .moai_experiment import make_split
from .unimoe_experiment import Split, _encode, _train, build_vocab

QTYPES = ("exist", "count", "colour_mcq")
ROWS = ("colour", "shape", "both")
EXPERTS = {"colour": ("colour",), "shape": ("shape",), "both": ("colour", "shape")}


@dataclass
class MouSiSettings:
    seeds: int = 3
    train_scenes: int = 10000
    test_scenes: int = 300
    image_noise: float = 0.1
    dim: int = 64
    depth: int = 2
    heads: int = 2
    ffn_hidden: int = 128
    expert_dim: int = 32
    colour_group: int = 4  # multi-patch-one-token on the colour expert's 8x8 grid (2x2 -> one cell)
    batch_size: int = 64
    expert_steps: int = 300
    lm_steps: int = 1500
    vlm_steps: int = 800
    lr: float = 2e-3
    threads: int = 0

    def validate(self) -> None:
        for k in ("seeds", "train_scenes", "test_scenes", "dim", "depth", "heads", "ffn_hidden", "expert_dim",
                  "colour_group", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{k} must be a positive integer, got {v!r}")
        for k in ("expert_steps", "lm_steps", "vlm_steps", "threads"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{k} must be an integer >= 0, got {v!r}")
        if self.dim % (2 * self.heads):
            raise ConfigError(f"dim={self.dim} must be divisible by 2*heads={2 * self.heads}")
        if not 0.0 <= self.image_noise <= 1.0:
            raise ConfigError(f"image_noise must be in [0, 1], got {self.image_noise!r}")
        MS.grouped_grid(8, 8, self.colour_group, "square", "colour_group")


# ---- the frozen experts -------------------------------------------------------------------------------
class ColourExpert(nn.Module):
    """A tiny ViT on 4x4-pixel patches: (B, 3, 32, 32) -> (B, 64, dim), an 8x8 grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.vit = VisionTransformer(ViTConfig.from_dict(_vision(img_size=32, patch_size=4, embed_dim=dim, depth=2,
                                                                 num_heads=2)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)[:, self.vit.num_prefix_tokens:]


class ShapeExpert(nn.Module):
    """A small CNN on the grey-level image (the channel mean: colour-blind): (B, 3, 32, 32) -> (B, 16, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, dim, 3, stride=2, padding=1),
                                 nn.GELU(), nn.Conv2d(dim, dim, 3, stride=2, padding=1), nn.GELU(),
                                 nn.Conv2d(dim, dim, 2, stride=2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.mean(1, keepdim=True)).flatten(2).transpose(1, 2)


def cell_targets(cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, 16) object classes (0 empty, else 1 + OBJECTS index, shape-major) -> colour (0 empty, 1-7) and shape
    (0 empty, 1-4) per cell."""
    k = (cells - 1).clamp_min(0)
    full = cells > 0
    return torch.where(full, k % 7 + 1, 0), torch.where(full, k // 7 + 1, 0)


def pretrain_experts(S: MouSiSettings, data: Split, seed: int) -> tuple[ColourExpert, ShapeExpert, dict]:
    torch.manual_seed(500 + seed)
    colour, shape = ColourExpert(S.expert_dim), ShapeExpert(S.expert_dim)
    heads = {"colour": nn.Linear(S.expert_dim, 8), "shape": nn.Linear(S.expert_dim, 5)}
    ct, st = cell_targets(data.cells)
    g = torch.Generator().manual_seed(seed + 7)
    losses = {}
    for name, enc, target in (("colour", colour, ct), ("shape", shape, st)):
        model = nn.ModuleDict({"enc": enc, "head": heads[name]})

        def batch(_, enc=enc, name=name, target=target):
            idx = torch.randint(len(data.images), (S.batch_size,), generator=g)
            f = enc(data.images[idx])
            if name == "colour":  # 8x8 patches -> the 4x4 cells (mean of each 2x2 block)
                B, _, D = f.shape
                f = f.view(B, 4, 2, 4, 2, D).mean((2, 4)).reshape(B, 16, D)
            return F.cross_entropy(heads[name](f).flatten(0, 1), target[idx].flatten())

        losses[name] = _train(model, S.expert_steps, batch, S.lr)
        for p in enc.parameters():
            p.requires_grad_(False)
        enc.eval()
    return colour, shape, losses


@torch.no_grad()
def expert_features(colour: ColourExpert, shape: ShapeExpert, images: torch.Tensor, bs: int = 500) -> dict:
    """The frozen experts' tokens for every image (computed once: the experts never change)."""
    out: dict[str, list] = {"colour": [], "shape": []}
    for i in range(0, len(images), bs):
        out["colour"].append(colour(images[i:i + bs]))
        out["shape"].append(shape(images[i:i + bs]))
    return {k: torch.cat(v) for k, v in out.items()}


def fusion_config(S: MouSiSettings, row: str) -> MS.MouSiConfig:
    specs = {"colour": MS.ExpertSpec("colour", S.expert_dim, 8, 8, group=S.colour_group, group_shape="square"),
             "shape": MS.ExpertSpec("shape", S.expert_dim, 4, 4)}
    return MS.MouSiConfig(experts=[specs[e] for e in EXPERTS[row]], llm_dim=S.dim, fusion="mlp")


class PolyExpertVLM(nn.Module):
    """The LM with MouSi's fusion network in front: the fused expert tokens are the LM's prefix."""

    def __init__(self, lm: VisionLanguageModel, fusion: MS.PolyExpertFusion, experts: tuple[str, ...]):
        super().__init__()
        self.lm, self.fusion, self.experts = lm, fusion, experts

    def prefix(self, feats: dict, idx) -> torch.Tensor:
        return self.fusion([feats[e][idx] for e in self.experts])


def new_lm(S: MouSiSettings, vocab: list[str]) -> VisionLanguageModel:
    vision = _vision(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)  # unused: prefixes only
    cfg = VLMConfig.from_dict(dict(vocab=vocab, vision=vision, dim=S.dim, depth=S.depth, num_heads=S.heads,
                                   ffn_hidden=S.ffn_hidden, max_len=96, moe_impl="auto"))
    lm = VisionLanguageModel(cfg)
    for p in lm.vision.parameters():
        p.requires_grad_(False)
    return lm


def pretrain_lm(S: MouSiSettings, lm: VisionLanguageModel, data: Split, seed: int) -> float:
    """Stand-in for a pre-trained LLM: answer from the scene's caption given as text in the prompt."""
    g = torch.Generator().manual_seed(seed + 11)

    def batch(_):
        idx = torch.randint(len(data.questions), (S.batch_size,), generator=g).tolist()
        prompts = [data.captions[data.scene[i]] + " . " + data.questions[i] for i in idx]
        t, lens, lab = _encode(lm.tokenizer, prompts, [data.answers[i] for i in idx])
        return lm(t, lens, lab).loss

    return _train(lm, S.lm_steps, batch, S.lr)


def train_row(S: MouSiSettings, lm: VisionLanguageModel, row: str, data: Split, feats: dict, seed: int
              ) -> tuple[PolyExpertVLM, float]:
    torch.manual_seed(900 + seed)
    model = PolyExpertVLM(copy.deepcopy(lm), MS.PolyExpertFusion(fusion_config(S, row)), EXPERTS[row])
    g = torch.Generator().manual_seed(seed + 13)  # the same batches for every row

    def batch(_):
        idx = torch.randint(len(data.questions), (S.batch_size,), generator=g).tolist()
        scenes = [data.scene[i] for i in idx]
        t, lens, lab = _encode(model.lm.tokenizer, [data.questions[i] for i in idx], [data.answers[i] for i in idx])
        return model.lm(t, lens, lab, prefix=model.prefix(feats, scenes)).loss

    return model, _train(model, S.vlm_steps, batch, S.lr)


@torch.no_grad()
def evaluate(model: PolyExpertVLM, data: Split, feats: dict, bs: int = 128) -> dict[str, float]:
    model.eval()
    score = ExactMatch(QTYPES)
    n = len(data.questions)
    for i in range(0, n, bs):
        idx = list(range(i, min(n, i + bs)))
        pre = model.prefix(feats, [data.scene[j] for j in idx])
        pred = model.lm.answer([data.questions[j] for j in idx], prefix=pre, max_new_tokens=3)
        score.add(pred, [data.answers[j] for j in idx], [data.qtypes[j] for j in idx])
    out = score.result()
    return out


def run_seed(S: MouSiSettings, seed: int, log: Callable[[str], None] = print) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    train = make_split(seed, S.train_scenes, "train", S.image_noise, QTYPES)
    test = make_split(seed, S.test_scenes, "test", S.image_noise, QTYPES)
    colour, shape, losses = pretrain_experts(S, train, seed)
    ftrain, ftest = expert_features(colour, shape, train.images), expert_features(colour, shape, test.images)
    lm = new_lm(S, build_vocab(train, test))
    losses["lm"] = pretrain_lm(S, lm, train, seed)
    log(f"  seed {seed}: experts and LM pre-trained ({time.perf_counter() - t0:.0f} s)")
    rows: dict[str, dict] = {}
    for row in ROWS:
        model, losses[row] = train_row(S, lm, row, train, ftrain, seed)
        rows[row] = evaluate(model, test, ftest)
        rows[row]["prefix_tokens"] = sum(model.fusion.tokens_per_expert())
        log(f"  seed {seed}: {row:6s} accuracy {rows[row]['all']:.3f} (" +
            ", ".join(f"{q} {rows[row][q]:.3f}" for q in QTYPES) + ")")
    return {"seed": seed, "rows": rows, "losses": losses, "seconds": round(time.perf_counter() - t0, 1)}


def run_mousi(S: MouSiSettings, out: Path | None = None, work: Path | None = None,
              log: Callable[[str], None] = print) -> dict:
    results = run_seeds(S, work, run_seed, log)
    return write_report(S, results, out, markdown, extra={"summary": summarise(results)})


def summarise(results: list[dict]) -> dict:
    s: dict[str, Any] = {row: {q: mean_std([x["rows"][row][q] for x in results], 100, 1) for q in QTYPES + ("all",)}
                         for row in ROWS}
    s["both_at_least_best_single"] = [x["rows"]["both"]["all"] >= max(x["rows"]["colour"]["all"],
                                                                      x["rows"]["shape"]["all"]) for x in results]
    return s


def markdown(report: dict) -> str:
    S, s = report["settings"], report["summary"]
    n = len(report["results"])
    names = {"colour": "colour expert only (ViT, 8x8 grid, grouped by 4)",
             "shape": "shape expert only (grey-level CNN, 4x4)",
             "both": "both experts (MouSi MLP fusion)"}
    lines = [f"# MouSi miniature ({n} seed{'s' if n != 1 else ''})", "",
             "Generated by `moevision mousi` (see `moevision.techniques.mousi_experiment`). Exact-match accuracy (%) "
             "on held-out ShapeWorld questions, mean ± std over seeds. Every row starts from the same pre-trained LM "
             "and trains its fusion network and the LM for the same steps; the experts are frozen.", "",
             "| row | " + " | ".join(QTYPES) + " | all |", "|---|" + "---|" * (len(QTYPES) + 1)]
    for row in ROWS:
        lines.append(f"| {names[row]} | " + " | ".join(s[row][q] for q in QTYPES + ("all",)) + " |")
    lines += ["", f"Both experts at least as good as the best single expert, per seed: "
              f"{s['both_at_least_best_single']} (spec test 4, a soft test).", "",
              "Settings: " + ", ".join(f"{k}={v}" for k, v in S.items()), ""]
    return "\n".join(lines)


__all__ = ["MouSiSettings", "run_mousi", "run_seed", "cell_targets", "ColourExpert", "ShapeExpert", "fusion_config"]
