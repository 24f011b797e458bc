"""MoE-LLaVA's MoE-tuning for the small VLM (spec multimodal_compression_systems.md §3), end to end.

Stages (each trains exactly ``models.vlm.stage_parameters(model, stage)``; the vision tower is frozen
from stage 1 on, as in MoE-LLaVA):
- ``vision`` (stand-in for a pre-trained CLIP): the ViT learns image attributes (easy-VQA shape and
  colour implied by the training questions; the ShapeWorld object in each grid cell) with linear heads
  that are thrown away afterwards.
- ``lm`` (stand-in for a pre-trained LLM): the LM alone learns the text (captions and questions, no
  answers, no images). Its weights are kept as the "LLM base" for MMStar's S_t.
- I (``1``): projector only, image -> caption.   II (``2``): projector + LM on the VQA mixture.
- III (``3``): if the run's model has MoE layers, upcycle (every expert = the stage-II FFN, new router)
  and train the FFNs/experts + routers on the same mixture (``stage3_trainable``); otherwise the dense
  twin continues training the same parameter set for the same steps.
PILL (``model.adapter="pill"``, spec §9): after ``lm`` the dense model gets PILL's adapters
(``models.vlm.add_pill``); I trains the projector + vision adapters with MAG off (image values not
gated), II the projector + every adapter + the MAG gates, the LM frozen throughout; there is no III.
Deviations: the paper's stages use different data (LLaVA-PT, Hybrid-FT, LLaVA-FT) and lr 1e-3/2e-5/2e-5
on a pre-trained LLM; here all stages use the run's own data and lrs suited to training from scratch.
Resume restarts the first unfinished stage (every finished stage is saved, atomically, under stages/).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import __version__
from .. import config as C
from ..models import from_pretrained
from ..models.tokenizer import WordTokenizer
from ..models.vlm import IGNORE, VisionLanguageModel, VLMConfig, add_pill, set_stage, upcycle, vlm_moe_layers
from ..utils import atomic_write

STAGES = ("vision", "lm", "1", "2", "3")


@dataclass
class VLMDataConfig:
    easy_vqa: bool = True
    easy_vqa_train_subset: int | None = None  # questions (all 4,000 images are kept)
    easy_vqa_test_subset: int | None = 2000
    shapeworld_train_images: int = 2000
    shapeworld_eval_images: int = 500
    shapeworld_seed: int = 1234  # the data are the same for every training seed
    batch_size: int = 64
    eval_batch_size: int = 256

    def validate(self) -> None:
        for k in ("easy_vqa_train_subset", "easy_vqa_test_subset"):
            v = getattr(self, k)
            C.check(v is None or v >= 1, f"data.{k}", v, "must be >= 1 or none")
        C.check(self.shapeworld_train_images >= 0, "data.shapeworld_train_images", self.shapeworld_train_images, ">= 0")
        C.check(self.shapeworld_eval_images >= 0, "data.shapeworld_eval_images", self.shapeworld_eval_images, ">= 0")
        C.check(self.easy_vqa or self.shapeworld_train_images > 0, "data.easy_vqa", self.easy_vqa,
                "with shapeworld_train_images=0 there is no training data")
        for k in ("batch_size", "eval_batch_size"):
            C.check(getattr(self, k) >= 1, f"data.{k}", getattr(self, k), "must be >= 1")


@dataclass
class VLMTrainConfig:
    seed: int = 0
    device: str = "cpu"
    num_threads: int | None = None
    # epochs (fractions allowed) and peak learning rate per stage
    vision_epochs: float = 6.0
    vision_lr: float = 2e-3
    lm_epochs: float = 2.0
    lm_lr: float = 2e-3
    stage1_epochs: float = 1.0
    stage1_lr: float = 1e-3
    stage2_epochs: float = 0.5
    stage2_lr: float = 1e-3
    stage3_epochs: float = 0.5
    stage3_lr: float = 5e-4
    stage3_trainable: str = "all_ffn"  # all_ffn (MoE-LLaVA code) | moe_only (the paper's wording)
    weight_decay: float = 0.0
    warmup_fraction: float = 0.03
    grad_clip: float | None = 1.0
    log_every: int = 50

    def validate(self) -> None:
        for k in ("vision", "lm", "stage1", "stage2", "stage3"):
            C.check(getattr(self, f"{k}_epochs") >= 0, f"train.{k}_epochs", getattr(self, f"{k}_epochs"), ">= 0")
            C.check(getattr(self, f"{k}_lr") > 0, f"train.{k}_lr", getattr(self, f"{k}_lr"), "must be > 0")
        C.check(self.stage3_trainable in ("all_ffn", "moe_only"), "train.stage3_trainable", self.stage3_trainable,
                "all_ffn | moe_only")
        C.check(0 <= self.warmup_fraction < 1, "train.warmup_fraction", self.warmup_fraction, "in [0, 1)")
        C.check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "train.device",
                self.device, "auto, cpu, cuda or cuda:N")
        C.check(self.num_threads is None or self.num_threads >= 1, "train.num_threads", self.num_threads, ">= 1")


@dataclass
class VLMEvalConfig:
    pope_images: int = 100  # ShapeWorld eval scenes with >= 3 objects probed per POPE split
    mcq_items: int = 100  # ShapeWorld colour questions scored by CircularEval and MMStar MG/ML
    max_new_tokens: int = 3


@dataclass
class VLMRunConfig:
    kind: str = "vlm"
    recipe: str = "custom"
    model_name: str = "moe_vlm_easyvqa"
    model: VLMConfig = field(default_factory=VLMConfig)
    data: VLMDataConfig = field(default_factory=VLMDataConfig)
    train: VLMTrainConfig = field(default_factory=VLMTrainConfig)
    eval: VLMEvalConfig = field(default_factory=VLMEvalConfig)

    def validate(self) -> None:
        C.check(self.kind == "vlm", "kind", self.kind, "must be 'vlm'")

    def to_dict(self) -> dict[str, Any]:
        import dataclasses
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VLMRunConfig":
        cfg = C.from_dict(cls, d)
        C.validate_config(cfg)
        return cfg


# ---- data -----------------------------------------------------------------------------------------
@dataclass
class Samples:
    """Tokenised (image row, input ids, index of the first supervised token) over one image tensor."""

    images: torch.Tensor  # (I, 3, H, W) uint8
    rows: list[int]
    ids: list[list[int]]
    start: list[int]  # labels are ids[start:]; 0 = every token (text LM pre-training)
    name: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def prep_images(images_u8: torch.Tensor, size: int) -> torch.Tensor:
    x = images_u8.float().div(255.0)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "nearest")
    return (x - 0.5) / 0.5


def qa_samples(tok: WordTokenizer, images, questions, answers, rows, name="") -> Samples:
    ids, start = [], []
    for q, a in zip(questions, answers):
        p = tok.encode(q) + [tok.sep_id]
        ids.append(p + tok.encode(a) + [tok.eos_id])
        start.append(len(p))
    return Samples(images, [int(r) for r in rows], ids, start, name)


def collate(s: Samples, idx: list[int], pad_id: int):
    seqs = [s.ids[i] for i in idx]
    L = max(len(q) for q in seqs)
    tokens = torch.full((len(idx), L), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), L), IGNORE, dtype=torch.long)
    for j, (q, i) in enumerate(zip(seqs, idx)):
        tokens[j, :len(q)] = torch.tensor(q)
        labels[j, s.start[i]:len(q)] = tokens[j, s.start[i]:len(q)]
    return tokens, torch.tensor([len(q) for q in seqs]), labels, torch.tensor([s.rows[i] for i in idx])


def mix_batches(sets: list[Samples], batch_size: int, epochs: float, seed: int) -> list[tuple[int, list[int]]]:
    """(set index, sample indices) batches: each set shuffled per epoch and cut into batches, then all
    batches shuffled together (a batch holds one set, so it shares one image tensor)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for ep in range(math.ceil(epochs)):
        ep_batches = []
        for k, s in enumerate(sets):
            n = len(s) if ep < int(epochs) else int(len(s) * (epochs - int(epochs)))
            perm = torch.randperm(len(s), generator=g)[:n].tolist()
            ep_batches += [(k, perm[i:i + batch_size]) for i in range(0, n, batch_size)]
        order = torch.randperm(len(ep_batches), generator=g).tolist()
        out += [ep_batches[i] for i in order]
    return out


# ---- training -------------------------------------------------------------------------------------
def _lr_at(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    warm = max(1, int(total * warmup_fraction))
    if step < warm:
        return peak * (step + 1) / warm
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def run_steps(model: nn.Module, params: list[nn.Parameter], batches: list, step_fn: Callable, *, lr: float,
              tc: VLMTrainConfig, desc: str, progress: bool, log: Callable[[str], None]) -> dict[str, float]:
    """AdamW with warmup + cosine over ``batches``; ``step_fn(batch) -> (loss, aux)``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=tc.weight_decay)
    model.train()
    total, t0, run, n = len(batches), time.perf_counter(), 0.0, 0
    bar = tqdm(batches, desc=desc, disable=not progress, dynamic_ncols=True, mininterval=1.0, leave=False)
    last = float("nan")
    for step, b in enumerate(bar):
        for gr in opt.param_groups:
            gr["lr"] = _lr_at(step, total, lr, tc.warmup_fraction)
        loss = step_fn(b)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {float(loss)} at step {step}; lower its learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        run, n = run + float(loss.detach()), n + 1
        if (step + 1) % tc.log_every == 0 or step + 1 == total:
            last, run, n = run / n, 0.0, 0
            bar.set_postfix(loss=f"{last:.3f}")
    bar.close()
    secs = time.perf_counter() - t0
    log(f"  stage {desc}: {total} steps, final loss {last:.4f}, {secs:.1f} s")
    return {"steps": total, "final_loss": last, "seconds": round(secs, 2)}


@torch.no_grad()
def image_features(model: VisionLanguageModel, images_u8: torch.Tensor, bs: int = 256) -> torch.Tensor:
    model.eval()
    size = model.vision.config.img_size
    dev = model.lm_head.weight.device
    return torch.cat([model.encode_images(prep_images(images_u8[i:i + bs], size).to(dev))
                      for i in range(0, len(images_u8), bs)])


def train_vision(model: VisionLanguageModel, ev_images, ev_attrs, sw_images, sw_cells, tc, bs, progress, log):
    """Stand-in for CLIP: attribute heads on the pooled patch tokens (mean for easy-VQA's single object;
    a 4x4 grid of cells for ShapeWorld, class 0 = empty cell)."""
    set_stage(model, "vision")
    dv, dev = model.vision.config.embed_dim, model.lm_head.weight.device
    heads = nn.ModuleDict({"shape": nn.Linear(dv, 3), "colour": nn.Linear(dv, 8), "cell": nn.Linear(dv, 29)}).to(dev)
    size = model.vision.config.img_size
    sets = [s for s in (("ev", ev_images), ("sw", sw_images)) if s[1] is not None and len(s[1])]
    g = torch.Generator().manual_seed(tc.seed + 17)
    batches = []
    for ep in range(math.ceil(tc.vision_epochs)):
        frac = 1.0 if ep < int(tc.vision_epochs) else tc.vision_epochs - int(tc.vision_epochs)
        for k, imgs in sets:
            perm = torch.randperm(len(imgs), generator=g)[:int(len(imgs) * frac)].tolist()
            batches += [(k, perm[i:i + bs]) for i in range(0, len(perm), bs)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def step(b):
        k, idx = b
        imgs = ev_images if k == "ev" else sw_images
        feats = model.encode_images(prep_images(imgs[idx], size).to(dev))  # (B, Ni, Dv)
        if k == "ev":
            pooled = feats.mean(1)
            return (F.cross_entropy(heads["shape"](pooled), ev_attrs[0][idx].to(dev), ignore_index=-1)
                    + F.cross_entropy(heads["colour"](pooled), ev_attrs[1][idx].to(dev), ignore_index=-1))
        B, N, D = feats.shape
        grid = F.adaptive_avg_pool2d(feats.transpose(1, 2).reshape(B, D, int(N ** 0.5), int(N ** 0.5)), 4)
        return F.cross_entropy(heads["cell"](grid.flatten(2).transpose(1, 2)).flatten(0, 1), sw_cells[idx].flatten().to(dev))

    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    return run_steps(model, params, batches, step, lr=tc.vision_lr, tc=tc, desc="vision", progress=progress, log=log)


def train_text(model: VisionLanguageModel, stage: str, sets: list[Samples], feats: list[torch.Tensor | None], *,
               epochs: float, lr: float, tc: VLMTrainConfig, bs: int, progress: bool, log, seed_offset: int,
               **stage_kw) -> dict[str, float]:
    """One language stage: ``set_stage`` then the answer-token LM loss (+ MoE aux) over the mixture."""
    set_stage(model, stage, **stage_kw)
    dev = model.lm_head.weight.device
    pad = model.tokenizer.pad_id
    batches = mix_batches(sets, bs, epochs, tc.seed * 1000 + seed_offset)

    def step(b):
        k, idx = b
        tokens, lengths, labels, rows = collate(sets[k], idx, pad)
        f = None if feats[k] is None else feats[k][rows].to(dev)
        return model(tokens.to(dev), lengths.to(dev), labels.to(dev), image_feats=f).loss

    params = [p for p in model.parameters() if p.requires_grad]
    return run_steps(model, params, batches, step, lr=lr, tc=tc, desc=stage, progress=progress, log=log)


def save_stage(model: VisionLanguageModel, run_dir: Path, stage: str, info: dict) -> None:
    model.save_pretrained(run_dir / "stages" / stage)
    path = run_dir / "stages" / "progress.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    done[stage] = info
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(done, indent=2) + "\n"))


def resolve_device(name: str) -> torch.device:
    from .engine import resolve_device as rd
    return rd(name)


def fit_vlm(cfg: VLMRunConfig, run_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
            log: Callable[[str], None] = print, stop_after: str | None = None) -> dict[str, Any] | None:
    """Run every stage into ``run_dir`` (config.json, stages/, model/, summary.json); return the summary.
    ``stop_after`` (a stage name) ends the run once that stage is saved (returns None): the results
    command trains stages up to II once per seed and branches stage III from there."""
    from ..eval.suite import evaluate_vlm
    from .vlm_data import build_data

    wall = time.perf_counter()
    run_dir = Path(run_dir)
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    dev = resolve_device(tc.device)
    data = build_data(cfg)  # deterministic in the data config, so the vocabulary is too
    cfg.model.vocab = data.tokenizer.vocab
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        from .engine import write_run_config
        write_run_config(cfg, run_dir)
    prog_path = run_dir / "stages" / "progress.json"
    done = json.loads(prog_path.read_text()) if (resume and prog_path.is_file()) else {}
    final_moe = bool(vlm_moe_layers(cfg.model.moe_layers, cfg.model.depth))
    torch.manual_seed(tc.seed)
    pill = cfg.model.adapter == "pill"
    dense_cfg = {**cfg.model.to_dict(), "moe_layers": "none", "adapter": "none"}  # MoE / adapters come later
    model = VisionLanguageModel(VLMConfig.from_dict(dense_cfg)).to(dev)
    model.model_name = cfg.model_name
    last = [s for s in STAGES if s in done]
    if last:
        model = from_pretrained(run_dir / "stages" / last[-1]).to(dev)
        model.model_name = cfg.model_name
        log(f"resumed {run_dir} after stage {last[-1]}")
    bs, info = cfg.data.batch_size, dict(done)
    common = dict(tc=tc, bs=bs, progress=progress, log=log)
    for stage in STAGES:
        if stage in done or (pill and stage == "3"):
            continue
        torch.manual_seed(tc.seed * 100 + STAGES.index(stage))
        if pill and stage in ("1", "2") and model.config.adapter != "pill":
            model = add_pill(model, adapter_rank=cfg.model.adapter_rank, pill_mag=cfg.model.pill_mag)
            model.model_name = cfg.model_name
        if stage == "vision":
            r = train_vision(model, data.ev_train.images if data.ev_train else None, data.ev_attrs,
                             data.sw_train_images, data.sw_cells, tc, bs, progress, log)
        elif stage == "lm":
            r = train_text(model, "lm", data.text_sets, [None] * len(data.text_sets), epochs=tc.lm_epochs,
                           lr=tc.lm_lr, seed_offset=1, **common)
        else:
            feats = [image_features(model, s.images) for s in data.caption_sets + data.vqa_sets]
            if stage == "1":
                model.mag_enabled = not pill  # PILL's stage I: MAG off (the image values are not gated)
                r = train_text(model, "1", data.caption_sets, feats[:len(data.caption_sets)], epochs=tc.stage1_epochs,
                               lr=tc.stage1_lr, seed_offset=2, **common)
                model.mag_enabled = True
            elif stage == "2":
                r = train_text(model, "2", data.vqa_sets, feats[len(data.caption_sets):], epochs=tc.stage2_epochs,
                               lr=tc.stage2_lr, seed_offset=3, **common)
            else:
                if final_moe:
                    m = cfg.model
                    model = upcycle(model, moe_layers=m.moe_layers, num_experts=m.num_experts, top_k=m.top_k,
                                    image_experts=m.image_experts)
                    model.model_name = cfg.model_name
                r = train_text(model, "3", data.vqa_sets, feats[len(data.caption_sets):], epochs=tc.stage3_epochs,
                               lr=tc.stage3_lr, seed_offset=4, stage3_trainable=tc.stage3_trainable, **common)
        r["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info[stage] = r
        save_stage(model, run_dir, stage, r)
        if stage == stop_after:
            return None
    for p in model.parameters():
        p.requires_grad_(True)
    model.save_pretrained(run_dir / "model")
    base = from_pretrained(run_dir / "stages" / "lm").to(dev)
    ev = evaluate_vlm(model, data, cfg, base_lm=base, progress=progress)
    summary = {"kind": "vlm", "recipe": cfg.recipe, "model_name": cfg.model_name, "seed": tc.seed, **ev,
               "stages": info, "params_total": model.num_params(), "params_active": model.num_active_params(),
               "train_seconds": round(sum(v.get("seconds", 0.0) for v in info.values()), 2),
               "wall_seconds": round(time.perf_counter() - wall, 2), "device": str(dev), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "machine": platform.machine(), "moevision": __version__}
    atomic_write(run_dir / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2) + "\n"))
    return summary


def format_vlm_summary(s: dict[str, Any]) -> str:
    lines = [f"{'model':<24}{s['model_name']}  (recipe {s['recipe']}, seed {s['seed']})",
             f"{'parameters':<24}{s['params_total'] / 1e6:.3f}M total, {s['params_active'] / 1e6:.3f}M active per "
             f"text token (vision tower excluded)"]
    if "easy_vqa" in s:
        e = s["easy_vqa"]
        lines.append(f"{'easy-VQA test':<24}{e['accuracy']:.2f}%  ({e['n']} questions; "
                     + ", ".join(f"{k} {v:.1f}%" for k, v in e.get("per_type", {}).items()) + ")")
    if "shapeworld" in s:
        sw = s["shapeworld"]
        lines.append(f"{'ShapeWorld eval':<24}" + ", ".join(f"{k} {v:.1f}%" for k, v in sw["per_type"].items()))
    if "pope" in s:
        lines.append(f"{'POPE (F1 / acc / yes%)':<24}" + "; ".join(
            f"{k} {v['f1']:.1f} / {v['accuracy']:.1f} / {v['yes_ratio']:.0f}" for k, v in s["pope"].items()))
    if "mmbench" in s:
        m = s["mmbench"]
        lines.append(f"{'CircularEval (colour)':<24}circular {m['circular']:.1f}%, vanilla {m['vanilla']:.1f}% "
                     f"({m['groups']} items)")
    if "mmstar" in s:
        m = s["mmstar"]
        lines.append(f"{'MMStar-style':<24}S_v {m['s_v']:.1f}, S_wv {m['s_wv']:.1f}, S_t {m['s_t']:.1f} -> "
                     f"MG {m['mg']:.1f}, ML {m['ml']:.1f}")
    for r in s.get("modality_load", []):
        img = " ".join(f"{x:.2f}" for x in r["image"])
        txt = " ".join(f"{x:.2f}" for x in r["text"])
        lines.append(f"  MoE layer {r['layer']}: image tokens [{img}]  text tokens [{txt}]  "
                     f"TV distance {r['tv_distance']:.2f}, dropped {100 * r['dropped_fraction']:.2f}%")
    lines.append(f"{'time':<24}{s['train_seconds']:.0f} s training, {s['wall_seconds']:.0f} s wall "
                 f"({s['threads']} threads, {s['device']})")
    return "\n".join(lines)
