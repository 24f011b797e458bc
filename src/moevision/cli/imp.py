"""``moevision imp``: the IMP miniature (multimodal_compression_systems.md §11(d)) over seeds -> docs/results/imp.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._experiment import grid_rows

DESCRIPTION = """IMP's alternating gradient descent (AGD) on three heterogeneous tasks generated from ShapeWorld:
image <-> caption contrastive learning, the direction of a moving object in a video whose frame count is
re-sampled every step (4 or 8), and counting objects. One shared encoder (width 64, 4 layers) with per-
modality embedders; each AGD step samples one task by weight and updates on it alone. Rows: the dense
encoder, the MoE encoder (8 experts in layers 1 and 3), the MoE encoder trained on the summed losses of
all tasks each step (the multi-task baseline), and expert-choice routing. Writes a Markdown table (mean ±
std over seeds). Finished runs are kept in --work-dir and reused."""

EXAMPLES = """examples:
  moevision imp                                        # 4 configurations x 3 seeds, ~25 min on 2 cores
  moevision imp --rows dense_agd,moe_agd --seeds 1 --steps 100 --out runs/imp/quick.md
"""


def register(subparsers) -> dict:
    from ..techniques.imp_experiment import ROWS

    p = subparsers.add_parser("imp", help="IMP: alternating gradient descent over image/video/text tasks, dense "
                              "vs MoE encoder -> docs/results/imp.md", description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps per run (default 600)")
    p.add_argument("--train-size", type=int, default=3000, help="training items per task (default 3000)")
    p.add_argument("--test-size", type=int, default=500, help="test items per task (default 500)")
    p.add_argument("--drop-rate", type=float, default=0.0, help="DropToken rate for image and video inputs "
                                                                "(default 0)")
    p.add_argument("--rows", default=",".join(ROWS),
                   help="comma-separated subset of " + ", ".join(f"{k} ({v})" for k, v in ROWS.items()))
    p.add_argument("--work-dir", default="runs/imp", help="per-run results (resumable)")
    p.add_argument("--out", default="docs/results/imp.md", help="the Markdown file to write (and .json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return {"imp": _cmd}


def _cmd(args) -> int:
    from ..errors import MoEVisionError
    from ..techniques.imp_experiment import ROWS, IMPSettings, run_imp

    rows = grid_rows(args, ROWS, counts=("seeds", "steps", "train_size", "test_size"))
    if not 0 <= args.drop_rate < 1:
        raise MoEVisionError(f"--drop-rate must be in [0, 1), got {args.drop_rate}")
    S = IMPSettings(train_size=args.train_size, test_size=args.test_size, steps=args.steps, seeds=args.seeds,
                    drop_rate=args.drop_rate, rows=rows)
    key = f"n{S.train_size}_t{S.test_size}_s{S.steps}_d{S.drop_rate:g}"
    run_imp(S, out=Path(args.out), work=Path(args.work_dir) / key, progress=not args.no_progress)
    print(f"\nwritten to {args.out}")
    return 0
