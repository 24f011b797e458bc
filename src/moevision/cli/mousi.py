"""``moevision mousi``: the MouSi miniature (multimodal_compression_systems.md §6(d)) over seeds ->
docs/results/mousi.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MoEVisionError

DESCRIPTION = """MouSi's poly-visual-expert fusion on a CPU miniature: does an LM fed by two frozen vision
experts answer better than with either expert alone?

The experts are pre-trained on narrow tasks and then frozen: a tiny ViT names each grid cell's colour
(an 8x8 token grid, grouped 2x2 into one token per cell by multi-patch-one-token), and a CNN on the
grey-level image names each cell's shape (colour-blind). MouSi's MLP fusion projects each expert's tokens
into the LM's width and concatenates them. A 2-layer LM, first taught to answer from the caption as text,
then trains with its fusion network on existence, counting and colour questions about noisy ShapeWorld
images: with the colour expert, the shape expert, or both (same steps and start).

The command reports the accuracy per question type (mean ± std over seeds), as Markdown and JSON.
Finished seeds are kept in --work-dir."""

EXAMPLES = """examples:
  moevision mousi                                    # 3 seeds, ~5 min a seed on 2 cores
  moevision mousi --seeds 1 --scale 0.25 --out runs/mousi/quick.md
"""


def register(subparsers) -> dict:
    p = subparsers.add_parser("mousi", help="MouSi miniature: two frozen vision experts fused vs each alone, over "
                              "seeds -> docs/results/mousi.md", description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every stage's steps and the number of training scenes (default 1.0)")
    p.add_argument("--image-noise", type=float, default=None, help="std of the pixel noise on the scenes, in [0, 1] "
                   "(default 0.1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--work-dir", default="runs/mousi", help="per-seed results (resumable)")
    p.add_argument("--out", default="docs/results/mousi.md", help="the Markdown file to write (and .json)")
    return {"mousi": _cmd}


def _cmd(args) -> int:
    from ..techniques.mousi_experiment import ROWS, MouSiSettings, run_mousi

    if args.seeds < 1:
        raise MoEVisionError(f"--seeds must be >= 1, got {args.seeds}")
    if not args.scale > 0:
        raise MoEVisionError(f"--scale must be > 0, got {args.scale}")
    if args.threads < 0:
        raise MoEVisionError(f"--threads must be >= 0, got {args.threads}")
    S = MouSiSettings(seeds=args.seeds, threads=args.threads)
    if args.scale != 1.0:
        for k in ("train_scenes", "expert_steps", "lm_steps", "vlm_steps"):
            setattr(S, k, max(1, round(getattr(S, k) * args.scale)))
    if args.image_noise is not None:
        S.image_noise = args.image_noise
    rep = run_mousi(S, out=Path(args.out), work=Path(args.work_dir))
    s = rep["summary"]
    for row in ROWS:
        print(f"{row:7s} " + ", ".join(f"{q} {v}" for q, v in s[row].items()))
    print(f"both >= best single, per seed: {s['both_at_least_best_single']}")
    print(f"written: {args.out} (+ .json)")
    return 0
