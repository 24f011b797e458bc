"""``moevision multitask``: the M³ViT experiment (vision_moe.md §10(e)) over seeds -> docs/results/multitask.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._experiment import add_grid_args, grid_rows

DESCRIPTION = """Train a two-task ViT on Fashion-MNIST (classify the image; regress each 4x4 patch's pixel
mean and standard deviation) seven ways: a dense multi-task ViT, an MoE with a task-agnostic router, and
the two M³ViT task-dependent routers (multi-gate: a router per task; task-conditioned: one router that
also sees the task id), and per-task routers trained with Mod-Squad's task-expert mutual-information loss
at weights 0, 0.005 and 0.05, and with Mod-Squad's mixture of attention-head experts (MoA) on the even
blocks, and heterogeneously (each task on its own half of the images, as Mod-Squad trains on
different datasets per task) (then pruned to the experts the classify task uses, Mod-Squad style); each
task evaluated alone as at inference. Writes a Markdown table (mean ± std
over seeds: accuracy, patch R², single-task FLOPs, step time, task-expert specialisation) and the
usage matrices. Finished runs are kept in --work-dir and skipped when the command is run again."""

EXAMPLES = """examples:
  moevision multitask                                   # 9 configurations x 3 seeds, ~30 min on 2 cores
  moevision multitask --rows dense,multi_gate --seeds 1 --epochs 1 --out runs/mt/quick.md
"""


ROW_NAMES = ("dense", "moe", "multi_gate", "task_conditioned", "modsquad_nomi", "modsquad", "modsquad_strong",
             "modsquad_moa", "modsquad_hetero")


def register(subparsers) -> dict:
    p = subparsers.add_parser("multitask", help="M³ViT task-dependent routing vs dense / task-agnostic MoE over "
                              "seeds -> docs/results/multitask.md", description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_args(p, name="multitask", epochs=3, test_subset=2000, test_help="test images",
                  rows_default=",".join(ROW_NAMES),
                  rows_help="comma-separated subset of dense, moe, multi_gate, task_conditioned, modsquad_nomi "
                            "(Mod-Squad's zero-init per-task routers), modsquad (+ mutual-information loss, "
                            "w=0.005), modsquad_strong (w=0.05), modsquad_moa (modsquad + MoA attention "
                            "experts on the even blocks), modsquad_hetero (modsquad trained heterogeneously: "
                            "each task on its own half of the images) (default: all)",
                  dataset_help="image set (default fashion_mnist; digits: sklearn's 8x8 digits, patch 2)")
    return {"multitask": _cmd}


def _cmd(args) -> int:
    from ..techniques.multitask import ROWS, MultiTaskSettings, run_multitask

    rows = grid_rows(args, ROWS)
    S = MultiTaskSettings(dataset=args.dataset, seeds=args.seeds, epochs=args.epochs, train_subset=args.train_subset,
                          test_subset=args.test_subset, rows=rows)
    run_multitask(S, out=Path(args.out), work=Path(args.work_dir) / _key(S), data_dir=args.data_dir,
                  download=args.download, progress=not args.no_progress)
    print(f"\nwritten to {args.out}")
    return 0


def _key(S) -> str:
    """A work sub-directory per settings, so runs made with other settings are never reused."""
    return f"{S.dataset}_n{S.train_subset}_t{S.test_subset}_e{S.epochs}"
