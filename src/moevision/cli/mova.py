"""``moevision mova``: the MoVA miniature (multimodal_compression_systems.md §7.1, §7.4) over seeds ->
docs/results/mova.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._experiment import grid_rows

DESCRIPTION = """MoVA (coarse-to-fine mixture of vision experts) on ShapeWorld question answering. A frozen base tiny
ViT is always used; three frozen tiny conv experts (colour per cell on a 4x4 grid, shape per cell on 8x8,
layout and count on 16x16), each pre-trained briefly on its own sub-task, are fused into the base tokens by
the MoV-Adapter (feature_align to the 8x8 base grid, gated per-expert cross-attention with 2-D RoPE, self-
attention, SwiGLU, RegStage downsampler) for a small FiLM answer reader. Rows differ in the coarse routing,
written as expert letters and read back by the routing parser: no expert, all experts, a question-type rule,
a classifier trained on measured "expert helps" labels, and random experts. Writes a Markdown table (mean ±
std over seeds) with per-question-type accuracy and routing statistics. Finished runs are kept in
--work-dir and reused."""

EXAMPLES = """examples:
  moevision mova                                        # 5 configurations x 3 seeds, ~10-15 min on 1 thread
  moevision mova --rows base_only,rule_routing --seeds 1 --steps 100 --out runs/mova/quick.md
"""

COUNTS = ("seeds", "steps", "train_scenes", "test_scenes", "pretrain_steps", "measure_steps", "measure_records",
          "router_steps")


def register(subparsers) -> dict:
    from ..techniques.mova_experiment import ROWS, MoVASettings

    d = MoVASettings()
    p = subparsers.add_parser("mova", help="MoVA: coarse expert routing + MoV-Adapter fusion of vision experts on "
                              "ShapeWorld VQA -> docs/results/mova.md", description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"adapter training steps (default {d.steps})")
    p.add_argument("--train-scenes", type=int, default=d.train_scenes,
                   help=f"training scenes, ~4.6 questions each (default {d.train_scenes})")
    p.add_argument("--test-scenes", type=int, default=d.test_scenes, help=f"test scenes (default {d.test_scenes})")
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps,
                   help=f"pre-training steps of the base and the experts (default {d.pretrain_steps})")
    p.add_argument("--measure-steps", type=int, default=d.measure_steps,
                   help="learned_routing: steps of the all-experts model whose ablations label which experts help "
                        f"(default {d.measure_steps})")
    p.add_argument("--measure-records", type=int, default=d.measure_records,
                   help=f"learned_routing: training questions labelled (default {d.measure_records})")
    p.add_argument("--router-steps", type=int, default=d.router_steps,
                   help=f"learned_routing: router classifier steps (default {d.router_steps})")
    p.add_argument("--rows", default=",".join(ROWS),
                   help="comma-separated subset of " + ", ".join(f"{k} ({v})" for k, v in ROWS.items()))
    p.add_argument("--work-dir", default="runs/mova", help="per-run results (resumable)")
    p.add_argument("--out", default="docs/results/mova.md", help="the Markdown file to write (and .json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return {"mova": _cmd}


def _cmd(args) -> int:
    from ..techniques.mova_experiment import ROWS, MoVASettings, run_mova

    rows = grid_rows(args, ROWS, counts=COUNTS)
    S = MoVASettings(train_scenes=args.train_scenes, test_scenes=args.test_scenes, steps=args.steps,
                     pretrain_steps=args.pretrain_steps, measure_steps=args.measure_steps,
                     measure_records=args.measure_records, router_steps=args.router_steps, seeds=args.seeds, rows=rows)
    key = (f"n{S.train_scenes}_t{S.test_scenes}_s{S.steps}_p{S.pretrain_steps}_m{S.measure_steps}"
           f"_{S.measure_records}_r{S.router_steps}")
    run_mova(S, out=Path(args.out), work=Path(args.work_dir) / key, progress=not args.no_progress)
    print(f"\nwritten to {args.out}")
    return 0
