"""``moevision uoe``: the Union of Experts experiment (vision_moe.md §13(e)) over seeds -> docs/results/uoe.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MoEVisionError
from ._experiment import add_grid_args, grid_rows

DESCRIPTION = """Train a small ViT (patch 4 on Fashion-MNIST: 49 tokens + CLS, D=64, 4 blocks, 4 heads) seven
ways and compare test accuracy and FLOPs per image: dense; a standard top-2-of-4 MoE with experts of
hidden h/4; Union of Experts' UoME (the dense MLP cut exactly into 4 hidden-slice experts; each image
selects 2 of them, each selected expert processes its 4 best of 7 token patches, outputs index-added
back) three ways: routers without gradient as in the released code, straight-through router gradients,
outputs weighted by the routing probabilities; SMHA (the 4 heads as experts, 2 per token, each head
attending only among its tokens); and UoME + SMHA. Every block of a sparse row is sparse. Writes a
Markdown table (mean ± std over seeds) and JSON. Finished runs are kept in --work-dir and skipped when the
command is run again."""

EXAMPLES = """examples:
  moevision uoe                                          # 7 configurations x 3 seeds, ~15 min on 2 cores
  moevision uoe --rows dense,uome --seeds 1 --epochs 1 --out runs/uoe/quick.md
  moevision uoe --threads 1                              # when another job shares the cores
"""


def register(subparsers) -> dict:
    from ..techniques.uoe_experiment import ROWS

    p = subparsers.add_parser("uoe", help="Union of Experts (UoME / SMHA) vs dense and MoE ViTs over seeds -> "
                              "docs/results/uoe.md", description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_args(p, name="uoe", epochs=3, test_subset=10000, test_help="test images",
                  rows_default=",".join(ROWS),
                  rows_help="comma-separated subset of " + ", ".join(ROWS) + " (default: all)",
                  dataset_help="image set (default fashion_mnist; digits: sklearn's 8x8 digits, patch 2)")
    p.add_argument("--patch-capacity", type=int, default=None,
                   help="UoME data selection: token patches each selected expert keeps (default 4 of 7; digits: "
                        "2 of 4)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    return {"uoe": _cmd}


def _cmd(args) -> int:
    import torch

    from ..techniques.uoe_experiment import ROWS, UoESettings, run_uoe

    rows = grid_rows(args, ROWS)
    if args.threads < 0:
        raise MoEVisionError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    S = UoESettings(dataset=args.dataset, seeds=args.seeds, epochs=args.epochs, train_subset=args.train_subset,
                    test_subset=args.test_subset, rows=rows)
    if args.dataset == "digits":  # 16 patch tokens (patch 2 on 8x8): 4 token patches of one row each
        S.n_patches, S.patch_capacity = 4, 2
    if args.patch_capacity is not None:
        S.patch_capacity = args.patch_capacity
    run_uoe(S, out=Path(args.out), work=Path(args.work_dir) / _key(S), data_dir=args.data_dir,
            download=args.download, progress=not args.no_progress)
    print(f"\nwritten to {args.out}")
    return 0


def _key(S) -> str:
    """A work sub-directory per settings, so runs made with other settings are never reused."""
    return f"{S.dataset}_n{S.train_subset}_t{S.test_subset}_e{S.epochs}_c{S.patch_capacity}"
