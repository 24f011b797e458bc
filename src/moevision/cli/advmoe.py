"""``moevision advmoe``: AdvMoE vs adversarial training of dense and MoE CNNs (vision_moe.md §11(e)) over
seeds -> docs/results/advmoe.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MoEVisionError
from ._experiment import add_grid_args, grid_rows

DESCRIPTION = """Train small CNNs on Fashion-MNIST with TRADES adversarial training and compare: a dense CNN at
full width and at half width, an MoE-CNN (E=2 channel-group experts of half width, one global router
CNN, one expert per image) trained with joint TRADES, and the same MoE-CNN trained with AdvMoE's
alternating expert / router TRADES steps. Reports clean accuracy (SA), robust accuracy under PGD (RA),
the router's accuracy clean and under a router-only attack, and inference FLOPs per image; mean ± std
over seeds. MoE models are attacked both through the straight-through surrogate and with each image's
routing held fixed (the surrogate alone masks gradients); RA counts an image only if it survives both.
More rows: moe_joint_fixed / advmoe_fixed (training attacks with routing held fixed) and advmoe_through
(the router trained through the MoE's TRADES loss). Trained weights (safetensors) and results are kept
in --work-dir; finished runs are skipped when the command is run again."""

EXAMPLES = """examples:
  moevision advmoe                                          # 4 configurations x 3 seeds
  moevision advmoe --rows dense_half,advmoe --seeds 1 --epochs 1 --out runs/adv/quick.md
  moevision advmoe --rows advmoe,advmoe_through             # the router trained through the MoE's loss [R]
"""


def register(subparsers) -> dict:
    from ..techniques.advmoe import ROWS

    p = subparsers.add_parser("advmoe", help="AdvMoE robust MoE-CNN vs adversarially trained dense CNNs over "
                              "seeds -> docs/results/advmoe.md", description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_args(p, name="advmoe", epochs=5, test_subset=1000, test_help="test images attacked",
                  rows_default="dense_full,dense_half,moe_joint,advmoe",
                  rows_help=f"comma-separated subset of {', '.join(ROWS)} (default: the first four)",
                  dataset_help="image set (default fashion_mnist)")
    p.add_argument("--eps", type=float, default=0.1, help="L-inf attack radius on [0, 1] pixels (default 0.1)")
    p.add_argument("--autoattack", type=int, default=0, metavar="N",
                   help="also attack the first N test images with AutoAttack's attacks (needs pyautoattack, the "
                        "[robust] extra); default 0: off")
    p.add_argument("--autoattack-attacks", default="apgd-ce,apgd-dlr",
                   help="which (default apgd-ce,apgd-dlr; the standard set is apgd-ce,apgd-t,fab-t,square, "
                        "~15 min per model on 2 cores)")
    return {"advmoe": _cmd}


def _cmd(args) -> int:
    from ..techniques.advmoe import ROWS, AdvMoESettings, run_advmoe

    rows = grid_rows(args, ROWS)
    if args.autoattack < 0:
        raise MoEVisionError(f"--autoattack must be >= 0, got {args.autoattack}")
    if not 0 < args.eps <= 1:
        raise MoEVisionError(f"--eps must be in (0, 1] (pixels are in [0, 1]), got {args.eps}")
    # the attack steps scale with eps as in the reference code (5/255 and 2/255 for eps = 8/255)
    S = AdvMoESettings(dataset=args.dataset, seeds=args.seeds, epochs=args.epochs, train_subset=args.train_subset,
                       test_subset=args.test_subset, eps=args.eps, train_step=args.eps * 5 / 8,
                       test_step=args.eps / 4, rows=rows, autoattack=args.autoattack,
                       autoattack_attacks=tuple(a.strip() for a in args.autoattack_attacks.split(",") if a.strip()))
    key = (f"{S.dataset}_n{S.train_subset}_t{S.test_subset}_e{S.epochs}_eps{S.eps:g}_aa{S.autoattack}"
           f"{'-' + '-'.join(S.autoattack_attacks) if S.autoattack else ''}")
    run_advmoe(S, out=Path(args.out), work=Path(args.work_dir) / key, data_dir=args.data_dir,
               download=args.download, progress=not args.no_progress)
    print(f"\nwritten to {args.out}")
    return 0
