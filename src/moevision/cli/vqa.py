"""``moevision vqa RUN_DIR --image PATH --question "..."`` (ask a trained VLM) and ``moevision
vlm-results`` (the MoE VLM, its dense twin, the MoMa variant and PILL over seeds -> docs/results/vlm.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import MoEVisionError


def register(sub) -> dict:
    q = sub.add_parser("vqa", help="answer a question about an image with a trained vision-language model",
                       description="Load the VLM of a run directory (its model/ or, for an unfinished run, the "
                                   "last finished stage) or of a model directory, and answer greedily.")
    q.add_argument("run_dir", help="a run directory of `moevision train --recipe vlm_*`, or a VLM model directory")
    q.add_argument("--image", required=True, help="image file (PNG/JPEG...); resized to the vision tower's input")
    q.add_argument("--question", required=True, action="append",
                   help='the question, e.g. "what color is the shape?" (repeatable)')
    q.add_argument("--max-new-tokens", type=int, default=8, help="longest answer in tokens (default 8)")
    q.add_argument("--json", action="store_true", help="print the answers as JSON")

    r = sub.add_parser("vlm-results", help="MoE VLM vs its dense twin (and MoMa, PILL) over seeds -> "
                       "docs/results/vlm.md",
                       description="Per seed: stages vision, LM, I and II once, then stage III of each model "
                                   "(vlm_dense_easyvqa and vlm_moe_easyvqa; add vlm_moma_easyvqa or vlm_pill_easyvqa "
                                   "with --recipes; PILL branches after the LM stage and trains its own I and II on "
                                   "the frozen LM) and the full evaluation. "
                                   "Finished runs under --runs-dir are reused, so an interrupted command resumes.")
    r.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    r.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed+seeds-1 "
                   "(to spread seeds over processes; a later call over all seeds reuses finished runs)")
    r.add_argument("--out", default="docs/results", help="directory for vlm.md")
    r.add_argument("--runs-dir", default="runs/vlm_results", help="where the runs are kept")
    r.add_argument("--recipes", default=None, help="comma-separated recipes among vlm_dense_easyvqa, vlm_moe_easyvqa, "
                   "vlm_moma_easyvqa, vlm_pill_easyvqa, vlm_pill_nomag_easyvqa (default: the first two)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of every run, e.g. train.stage3_epochs=1 (repeatable)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    return {"vqa": _cmd_vqa, "vlm-results": _cmd_results}


def _load_vlm(path: Path):
    from ..models import from_pretrained
    from ..models._builder import read_model_config

    if not path.exists():
        raise MoEVisionError(f"{path} does not exist")
    candidates = [path, path / "model"]
    prog = path / "stages" / "progress.json"
    if prog.is_file():
        done = json.loads(prog.read_text())
        candidates += [path / "stages" / s for s in ("3", "2", "1") if s in done]
    for c in candidates:
        if (c / "config.json").is_file() and "architecture" in json.loads((c / "config.json").read_text()):
            if read_model_config(c)[2].get("architecture") != "vlm":
                raise MoEVisionError(f"{c} holds a {read_model_config(c)[2].get('architecture')!r} model, not a "
                                     f"vision-language model")
            return from_pretrained(c), c
    raise MoEVisionError(f"{path} is neither a VLM run directory (model/ or stages/) nor a model directory")


def _cmd_vqa(args) -> int:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from ..train.vlm import prep_images

    if args.max_new_tokens < 1:
        raise MoEVisionError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    questions = [q.strip() for q in args.question]
    if any(not q for q in questions):
        raise MoEVisionError("--question is empty")
    model, src = _load_vlm(Path(args.run_dir))
    img_path = Path(args.image)
    if not img_path.is_file():
        raise MoEVisionError(f"--image {img_path} does not exist")
    try:
        with Image.open(img_path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise MoEVisionError(f"--image {img_path} is not a readable image ({e})") from None
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)
    x = prep_images(x, model.vision.config.img_size).expand(len(questions), -1, -1, -1)
    answers = model.answer(questions, images=x, max_new_tokens=args.max_new_tokens)
    unknown = sorted({w for q in questions for w in model.tokenizer.unknown_words(q)})
    if args.json:
        print(json.dumps({"model": str(src), "answers": [{"question": q, "answer": a} for q, a in zip(questions, answers)],
                          "unknown_words": unknown}))
        return 0
    for q, a in zip(questions, answers):
        print(f"Q: {q}\nA: {a}")
    if unknown:
        print(f"(words outside the model's vocabulary, read as <unk>: {', '.join(unknown)})")
    return 0


def _cmd_results(args) -> int:
    from .. import config as C
    from ..recipes.vlm_results import VARIANTS, run_vlm_results

    if args.seeds < 1:
        raise MoEVisionError(f"--seeds must be >= 1, got {args.seeds}")
    recipes = None
    if args.recipes:
        recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
        bad = [r for r in recipes if r not in [v[1] for v in VARIANTS]]
        if bad:
            raise MoEVisionError(f"--recipes: unknown {bad}; choose from {[v[1] for v in VARIANTS]}")
    path = run_vlm_results(seeds=args.seeds, out_dir=args.out, runs_dir=args.runs_dir,
                           overrides=C.parse_overrides(args.overrides), recipes=recipes, progress=not args.no_progress,
                           first_seed=args.first_seed)
    print(f"\nwritten to {path}")
    return 0
