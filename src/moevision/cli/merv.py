"""``moevision merv``: the MERV miniature (multimodal_compression_systems.md §7.4) -> docs/results/merv.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._experiment import grid_rows

DESCRIPTION = """MERV (multi-encoder representation of videos) on ShapeWorld moving-sprite videos: the question is the
colour of the moving sprite and its direction (28 answers). Two frozen encoders, each pre-trained alone first:
a per-frame TinyViT on 8 frames (an image tagger: spatial detail) and a Tiny3DConv on 4 frames (a direction
classifier: motion). Their tokens are pooled in space and time to the same length (T'=4, s=4), projected to one
width and mixed; a small readout answers. Rows: each encoder alone, MERV's cross-attention mixer, and the
ablation mixers (sequence concat, channel concat +/- LayerNorm, learned global scalars). Writes a Markdown table
(mean ± std over seeds) and its .json. Finished runs are kept in --work-dir and reused."""

EXAMPLES = """examples:
  moevision merv                                        # 7 configurations x 3 seeds, ~9 min on one thread
  moevision merv --rows vit,c3d,merv --seeds 1 --steps 300 --train-size 2000 --out runs/merv/quick.md
"""


def register(subparsers) -> dict:
    from ..techniques.merv_experiment import ROWS

    p = subparsers.add_parser("merv", help="MERV: fuse a per-frame image encoder and a 3-D video encoder with a "
                              "cross-attentive mixer -> docs/results/merv.md", description=DESCRIPTION,
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3); a seed re-trains "
                                                       "the encoders too")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps for projectors + mixer + readout "
                                                          "(default 1500)")
    p.add_argument("--pretrain-steps", type=int, default=300, help="pre-training steps of each encoder "
                                                                  "(default 300)")
    p.add_argument("--pretrain-size", type=int, default=3000, help="pre-training items per encoder (default 3000)")
    p.add_argument("--train-size", type=int, default=10000, help="training videos (default 10000)")
    p.add_argument("--test-size", type=int, default=1000, help="test videos (default 1000)")
    p.add_argument("--projector", default="linear", choices=("linear", "gelu-mlp"),
                   help="per-encoder projector (default linear, as MERV)")
    p.add_argument("--rows", default=",".join(ROWS),
                   help="comma-separated subset of " + ", ".join(f"{k} ({v})" for k, v in ROWS.items()))
    p.add_argument("--work-dir", default="runs/merv", help="per-run results (resumable)")
    p.add_argument("--out", default="docs/results/merv.md", help="the Markdown file to write (and .json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return {"merv": _cmd}


def _cmd(args) -> int:
    from ..techniques.merv_experiment import ROWS, MERVSettings, run_merv

    rows = grid_rows(args, ROWS, counts=("seeds", "steps", "pretrain_steps", "pretrain_size", "train_size",
                                             "test_size"))
    S = MERVSettings(train_size=args.train_size, test_size=args.test_size, steps=args.steps,
                     pretrain_steps=args.pretrain_steps, pretrain_size=args.pretrain_size, projector=args.projector,
                     seeds=args.seeds, rows=rows)
    key = f"n{S.train_size}_t{S.test_size}_s{S.steps}_p{S.pretrain_steps}x{S.pretrain_size}_{S.projector}"
    run_merv(S, out=Path(args.out), work=Path(args.work_dir) / key, progress=not args.no_progress)
    print(f"\nwritten to {args.out}")
    return 0
