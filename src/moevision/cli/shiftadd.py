"""``moevision shiftadd``: the ShiftAddViT experiment (vision_moe.md §12(e)) over seeds -> docs/results/shiftadd.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._experiment import add_grid_args, grid_rows

DESCRIPTION = """ShiftAddViT's mixture of multiplication primitives on Fashion-MNIST. Per seed a dense ViT is
trained, then its MLP linears are reparameterised and fine-tuned six ways: all multiplication (the dense
model), all shift (power-of-two weights, ShiftLinear), and a 2-expert MoE{multiplication, shift} per linear
with the standard balance loss (alpha = 1, 1) or ShiftAddViT's latency-aware loss (alpha = 6, 4: the faster
shift expert should get 60% of the tokens), the last also with a straight-through gate so the router learns
from the task, and with a smaller (fan-in D) router init than the code's. Writes a Markdown table (mean ± std over seeds): accuracy after the conversion and after
fine-tuning, the shift expert's token share, and the modelled latency per token. Finished runs (and the
dense models) are kept in --work-dir and reused when the command is run again."""

EXAMPLES = """examples:
  moevision shiftadd                                      # 6 configurations x 3 seeds, ~20 min on 2 cores
  moevision shiftadd --rows mult,moe_ll --seeds 1 --epochs 2 --out runs/sa/quick.md
  moevision shiftadd --attention                          # also qkv and proj (the code's --moe_attn)
"""


def register(subparsers) -> dict:
    from ..techniques.shiftadd_experiment import ROWS

    p = subparsers.add_parser("shiftadd", help="ShiftAddViT: MoE of multiplication and shift experts with the "
                              "latency-aware loss, over seeds -> docs/results/shiftadd.md", description=DESCRIPTION,
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_args(p, name="shiftadd", epochs=5, test_subset=5000, test_help="test images",
                  rows_default=",".join(ROWS),
                  rows_help="comma-separated subset of " + ", ".join(f"{k} ({v})" for k, v in ROWS.items())
                            + " (default: all)",
                  dataset_help="image set (default fashion_mnist; digits: sklearn's 8x8 digits, patch 2)")
    p.add_argument("--pretrain-epochs", type=int, default=10, help="epochs of the dense ViT (default 10)")
    p.add_argument("--lr", type=float, default=2e-4, help="fine-tuning learning rate (default 2e-4)")
    p.add_argument("--attention", action="store_true", help="also reparameterise the attention's qkv and proj")
    return {"shiftadd": _cmd}


def _cmd(args) -> int:
    from ..errors import MoEVisionError
    from ..techniques.shiftadd_experiment import ROWS, ShiftAddSettings, run_shiftadd

    rows = grid_rows(args, ROWS)
    if args.pretrain_epochs < 1:
        raise MoEVisionError(f"--pretrain-epochs must be >= 1, got {args.pretrain_epochs}")
    if not args.lr > 0:
        raise MoEVisionError(f"--lr must be > 0, got {args.lr}")
    S = ShiftAddSettings(dataset=args.dataset, seeds=args.seeds, epochs=args.epochs, train_subset=args.train_subset,
                         test_subset=args.test_subset, rows=rows, pretrain_epochs=args.pretrain_epochs, lr=args.lr,
                         attention=args.attention)
    run_shiftadd(S, out=Path(args.out), work=Path(args.work_dir) / _key(S), data_dir=args.data_dir,
                 download=args.download, progress=not args.no_progress)
    print(f"\nwritten to {args.out}")
    return 0


def _key(S) -> str:
    """A work sub-directory per settings: runs made with other settings are never reused."""
    att = "_attn" if S.attention else ""
    return f"{S.dataset}_n{S.train_subset}_t{S.test_subset}_p{S.pretrain_epochs}_e{S.epochs}_lr{S.lr:g}{att}"
