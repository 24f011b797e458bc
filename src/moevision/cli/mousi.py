"""``moevision mousi``: the MouSi miniature (multimodal_compression_systems.md §6(d)) over seeds ->
docs/results/mousi.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._experiment import add_miniature_args, miniature_settings

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
    add_miniature_args(p, "mousi")
    p.add_argument("--image-noise", type=float, default=None, help="std of the pixel noise on the scenes, in [0, 1] "
                   "(default 0.1)")
    return {"mousi": _cmd}


def _cmd(args) -> int:
    from ..techniques.mousi_experiment import ROWS, MouSiSettings, run_mousi

    S = miniature_settings(args, MouSiSettings, ("train_scenes", "expert_steps", "lm_steps", "vlm_steps"))
    if args.image_noise is not None:
        S.image_noise = args.image_noise
    rep = run_mousi(S, out=Path(args.out), work=Path(args.work_dir))
    s = rep["summary"]
    for row in ROWS:
        print(f"{row:7s} " + ", ".join(f"{q} {v}" for q, v in s[row].items()))
    print(f"both >= best single, per seed: {s['both_at_least_best_single']}")
    print(f"written: {args.out} (+ .json)")
    return 0
