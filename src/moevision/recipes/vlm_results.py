"""``moevision vlm-results``: the MoE VLM, its dense twin, the MoMa variant and PILL over seeds -> a
Markdown table (docs/results/vlm.md). Per seed, the stages up to II run once (they are the same for the
MoE-LLaVA models) and stage III branches from the saved stage-II model, so those models differ only in
stage III; PILL branches after the LM stage (its LM stays frozen: its own stages I and II, no III)."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from .. import config as C
from ..train.engine import write_run_config
from ..train.vlm import STAGES, fit_vlm
from . import get_recipe

VARIANTS = [("dense twin (stage III: dense FFNs)", "vlm_dense_easyvqa"),
            ("MoE-LLaVA (stage III: upcycled top-2 of 4)", "vlm_moe_easyvqa"),
            ("MoMa groups (2 image + 2 text experts, top-2 in group)", "vlm_moma_easyvqa"),
            ("PILL (frozen LM + MAG + modality adapters, rank 32)", "vlm_pill_easyvqa"),
            ("PILL without MAG (ablation)", "vlm_pill_nomag_easyvqa")]
DEFAULT_RECIPES = ("vlm_dense_easyvqa", "vlm_moe_easyvqa")  # MoMa on request (--recipes), to save CPU


def _get(r: dict, *keys) -> float:
    try:
        for k in keys:
            r = r[k]
        return float(r)
    except (KeyError, TypeError):
        return float("nan")


def _ms(xs: list[float], nd: int = 1) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{nd}f} ± {sd:.{nd}f}"


def _majority_baselines(overrides) -> dict[str, float]:
    """Accuracy of always giving the most frequent answer of each ShapeWorld eval question type (and of
    the easy-VQA test subset), from the same data the runs were evaluated on."""
    from collections import Counter

    from ..data.easy_vqa import load_easy_vqa
    from ..train.vlm_data import build_data

    cfg = get_recipe("vlm_dense_easyvqa")
    for k, v in overrides:
        C.set_by_path(cfg, k, v)
    want_ev = cfg.data.easy_vqa
    cfg.data.easy_vqa = False
    sw = build_data(cfg).sw_eval
    out = {}
    for qt in set(sw.qtypes):
        ans = [a for a, t in zip(sw.answers, sw.qtypes) if t == qt]
        out[qt] = 100.0 * Counter(ans).most_common(1)[0][1] / len(ans)
    if want_ev:
        t = load_easy_vqa("test")
        if cfg.data.easy_vqa_test_subset:
            t = t.subset(cfg.data.easy_vqa_test_subset, seed=cfg.data.shapeworld_seed)
        out["easy_vqa"] = 100.0 * Counter(t.answers).most_common(1)[0][1] / len(t.answers)
    return out


def run_vlm_results(*, seeds: int = 3, out_dir: str = "docs/results", runs_dir: str = "runs/vlm_results",
                    overrides: list[tuple[str, str]] = (), recipes: list[str] | None = None,
                    progress: bool = True, first_seed: int = 0) -> Path:
    variants = [v for v in VARIANTS if v[1] in (recipes or DEFAULT_RECIPES)]
    runs = Path(runs_dir)
    results: dict[str, list[dict[str, Any]]] = {name: [] for _, name in variants}
    t0 = time.perf_counter()
    for seed in range(first_seed, first_seed + seeds):
        shared = runs / f"seed{seed}" / "shared"
        base = None
        if all((runs / f"seed{seed}" / name / "summary.json").is_file() for _, name in variants):
            base = True  # every run of this seed is finished: nothing to train
        for _, name in variants:
            cfg = get_recipe(name)
            for k, v in overrides:
                C.set_by_path(cfg, k, v)
            cfg.train.seed = seed
            C.validate_config(cfg)
            if base is None:
                base = cfg
                done = shared / "stages" / "progress.json"
                if not (done.is_file() and "2" in json.loads(done.read_text())):
                    print(f"== seed {seed}: stages vision, lm, I, II (shared)", flush=True)
                    write_run_config(cfg, shared)
                    fit_vlm(cfg, shared, resume=done.is_file(), progress=progress, stop_after="2")
            run = runs / f"seed{seed}" / name
            if not (run / "summary.json").is_file():
                what = "stages I, II on the frozen LM" if cfg.model.adapter == "pill" else "stage III"
                print(f"== seed {seed}: {name} {what} + evaluation", flush=True)
                if run.exists():
                    shutil.rmtree(run)
                (run / "stages").mkdir(parents=True)
                branch = STAGES[:2] if cfg.model.adapter == "pill" else STAGES[:4]  # PILL: after the LM stage
                for st in branch:
                    shutil.copytree(shared / "stages" / st, run / "stages" / st)
                prog = json.loads((shared / "stages" / "progress.json").read_text())
                (run / "stages" / "progress.json").write_text(json.dumps({k: prog[k] for k in branch}))
                write_run_config(cfg, run)
                fit_vlm(cfg, run, resume=True, progress=progress)
            results[name].append(json.loads((run / "summary.json").read_text()))
    path = Path(out_dir) / "vlm.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_markdown(variants, results, seeds, overrides, time.perf_counter() - t0))
    return path


def _markdown(variants, results, seeds, overrides, seconds) -> str:
    cmd = "moevision vlm-results --seeds " + str(seeds) + "".join(f" --set {k}={v}" for k, v in overrides)
    if [n for _, n in variants] != list(DEFAULT_RECIPES):
        cmd += " --recipes " + ",".join(n for _, n in variants)
    any_run = next(iter(results.values()))[0]
    # compute spent: the shared stages once per seed, stage III and the evaluation once per run
    ref = next((name for _, name in variants if "pill" not in name), variants[0][1])
    shared = sum(sum(v["seconds"] for k, v in r["stages"].items() if k != "3") for r in results[ref])
    own = sum(r["wall_seconds"] for rs in results.values() for r in rs)
    L = [
        "# Small MoE vision-language model: MoE-tuning on easy-VQA + ShapeWorld",
        "",
        f"Written by `{cmd}` (MoE-LLaVA §3, MoMa §5, protocols §12 of "
        "shared/specs/multimodal_compression_systems.md). Mean ± std over "
        f"{seeds} seeds; per seed the MoE-LLaVA models share stages vision, LM, I and II and differ only in "
        "stage III (PILL shares vision and LM, then trains its own I and II on the frozen LM). torch "
        + any_run["torch"] + f", {any_run['threads']} thread(s), {any_run['device']}; about "
        f"{(shared + own) / 60:.0f} min of training and evaluation in all (shared stages once per seed).",
        "",
        "## Accuracy and protocols",
        "",
        "| model | active params | easy-VQA test acc | shape / colour / yes-no | ShapeWorld count | spatial | exist "
        "| POPE F1 random / popular / adversarial | POPE yes % (adv.) | CircularEval | vanilla MCQ | MG | ML |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, name in variants:
        rs = results[name]
        if not rs:
            continue
        def m(*keys, nd=1):
            return _ms([_get(r, *keys) for r in rs], nd)

        ev = " / ".join(m("easy_vqa", "per_type", k) for k in ("shape", "colour", "yes/no"))
        pope = " / ".join(m("pope", s, "f1") for s in ("random", "popular", "adversarial"))
        L.append(f"| {label} | {rs[0]['params_active'] / 1e6:.2f}M | **{m('easy_vqa', 'accuracy', nd=2)}** | {ev} "
                 f"| {m('shapeworld', 'per_type', 'count')} | {m('shapeworld', 'per_type', 'spatial')} "
                 f"| {m('shapeworld', 'per_type', 'exist')} | {pope} | {m('pope', 'adversarial', 'yes_ratio')} "
                 f"| {m('mmbench', 'circular')} | {m('mmbench', 'vanilla')} | {m('mmstar', 'mg')} | {m('mmstar', 'ml')} |")
    base = _majority_baselines(overrides)
    L.append(f"| majority answer / chance (no model) | - | {base.get('easy_vqa', float('nan')):.1f} | - "
             f"| {base['count']:.1f} | {base['spatial']:.1f} | {base['exist']:.1f} | 66.7 (always yes) | - | 0.0 "
             f"| 25.0 | - | - |")
    at_prior = [qt for qt in ("count", "spatial", "exist")
                if all(abs(_get(r, "shapeworld", "per_type", qt) - base[qt]) <= 2.0 for rs in results.values() for r in rs)]
    if at_prior:
        L += ["", f"Every model is within 2 points of the majority answer on ShapeWorld {', '.join(at_prior)}: at this "
              "training length the models have not learned to ground these questions in the image, so the POPE, "
              "CircularEval and MG/ML columns exercise the protocols (a constant letter scores 0 circular; a "
              "yes/no bias shows in the yes ratio) rather than compare the models."]
    if "vlm_dense_easyvqa" in results and len(results) > 1:
        dense = results["vlm_dense_easyvqa"]
        L += ["", "Paired by seed (same stages up to II), each model minus the dense twin, in points:", ""]
        for label, name in variants:
            if name == "vlm_dense_easyvqa" or not results[name]:
                continue
            parts = []
            for what, keys in (("easy-VQA", ("easy_vqa", "accuracy")), ("POPE F1 (mean of splits)", ("pope_f1_mean",)),
                               ("CircularEval", ("mmbench", "circular")), ("ShapeWorld count", ("shapeworld", "per_type", "count"))):
                d = [_get(r, *keys) - _get(b, *keys) for r, b in zip(results[name], dense)]
                wins = sum(x > 0 for x in d)
                parts.append(f"{what} {_ms(d, 2)} ({wins}/{len(d)} seeds better)")
            L.append(f"- {label}: " + "; ".join(parts))
    if any("pill" in name and results[name] for _, name in variants):
        L += ["", "PILL trains about a quarter of stage II's parameters and keeps the LM frozen. Its premise is "
              "an LLM that already answers questions; this miniature's frozen LM was pre-trained on captions "
              "and questions only, never on answers, so the adapters must steer a frozen LM head to words "
              "it never produced (stage-II loss ~0.9 against ~0.2 when the LM trains). Read the PILL rows as "
              "the cost of freezing a weak LM, and the MAG ablation as MAG's own effect: the same run with "
              "the image values never gated."]
    L += ["", "Stage-III training time per run (s): " + ", ".join(
        f"{name} {_ms([r['stages']['3']['seconds'] for r in results[name]], 0)}" for _, name in variants
        if results[name] and "3" in results[name][0]["stages"]),
        "", "Parameters trained per stage (I / II / III): " + "; ".join(
        f"{name} " + " / ".join(f"{results[name][0]['stages'][st]['trainable_params'] / 1e3:.1f}k"
                                if st in results[name][0]["stages"] else "-" for st in ("1", "2", "3"))
        for _, name in variants if results[name] and "trainable_params" in results[name][0]["stages"].get("1", {})),
        "", "## Which experts do image and text tokens use?", "",
        "Share of each modality's kept top-2 assignments per expert (easy-VQA test + ShapeWorld eval, "
        "teacher-forced), mean over seeds; TV = total-variation distance between the image and the text "
        "distributions (0: the same experts, 1: disjoint experts).", "",
        "| model | MoE layer | image tokens: experts 0-3 | text tokens: experts 0-3 | TV distance | dropped % |",
        "|---|---|---|---|---|---|"]
    for label, name in variants:
        rs = results[name]
        if not rs or not rs[0]["modality_load"]:
            continue
        for j, row in enumerate(rs[0]["modality_load"]):
            img = [statistics.mean(r["modality_load"][j]["image"][e] for r in rs) for e in range(len(row["image"]))]
            txt = [statistics.mean(r["modality_load"][j]["text"][e] for r in rs) for e in range(len(row["text"]))]
            L.append(f"| {label} | {row['layer']} | {' '.join(f'{x:.2f}' for x in img)} | "
                     f"{' '.join(f'{x:.2f}' for x in txt)} | {_ms([r['modality_load'][j]['tv_distance'] for r in rs], 2)} "
                     f"| {_ms([100 * r['modality_load'][j]['dropped_fraction'] for r in rs], 2)} |")
    L += ["", "## Setup and caveats", "", SETUP, ""]
    return "\n".join(L)


SETUP = """\
- Data: easy-VQA train (4,000 images, 38,575 questions) from the PyPI package, and 2,000 of its 9,673
  test questions (a fixed random subset: `data.easy_vqa_test_subset`); ShapeWorld (spec §0.4, 64x64
  rendering) 2,000 train scenes (~9k questions: existence, colour MCQ, counting, spatial) and 500 eval
  scenes; POPE on 100 separate scenes with 3-4 objects (3 + 3 questions per scene and split);
  CircularEval and MMStar MG/ML on 100 colour MCQs.
- Model (CPU-sized): ViT tower (patch 8, d=64, 3 blocks; 64 patch tokens average-pooled 2x2 to 16 image
  tokens), mlp2x_gelu projector, LM d=128, 2 layers, 4 heads, SwiGLU 256, RMSNorm, RoPE; "sparse" MoE
  placement = layer 0 (E=4 SwiGLU experts, top-2, capacity 1.5 train / 2.0 eval, Switch loss 0.01).
- Stages (each trains exactly `stage_parameters`): vision attribute pre-training (stand-in for CLIP,
  6 epochs), text-only LM pre-training (stand-in for the LLM, 2 epochs), I projector (captions, 1 epoch),
  II projector + LM (VQA mixture, 0.5 epoch), III FFNs/experts + routers (`all_ffn`, 0.5 epoch). The
  paper's stage-III data differ from stage II's; here both use the same mixture.
- MMStar: S_v = with the image, S_wv = the same model without it, S_t = the LM after text-only
  pre-training; MG = S_v - S_wv, ML = max(0, S_wv - S_t). These are ShapeWorld MCQs, not MMStar items.
- Compute: one thread (niced) of a 2-core machine shared with other jobs, so the times are not
  benchmarks. Sizes are CPU-budget choices, not the paper's; the absolute numbers say nothing about
  MoE-LLaVA at scale."""
