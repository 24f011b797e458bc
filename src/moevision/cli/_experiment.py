"""Arguments and checks shared by the seeded comparison commands (``multitask``, ``advmoe``)
and by the seeded miniatures (``unimoe``, ``moai``, ``mousi``)."""

from __future__ import annotations

from ..errors import MoEVisionError


def add_grid_args(p, *, name: str, epochs: int, test_subset: int, test_help: str, rows_default: str,
                  rows_help: str, dataset_help: str) -> None:
    """--seeds, --epochs, --train-subset, --test-subset, --rows, --dataset, --data-dir, --download,
    --work-dir runs/NAME, --out docs/results/NAME.md, --no-progress."""
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    p.add_argument("--train-subset", type=int, default=10000, help="training images (default 10000)")
    p.add_argument("--test-subset", type=int, default=test_subset, help=f"{test_help} (default {test_subset})")
    p.add_argument("--rows", default=rows_default, help=rows_help)
    p.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "digits"), help=dataset_help)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: the usual places)")
    p.add_argument("--download", action="store_true", help="download Fashion-MNIST if it is not found")
    p.add_argument("--work-dir", default=f"runs/{name}", help="per-run results (resumable)")
    p.add_argument("--out", default=f"docs/results/{name}.md", help="the Markdown file to write (and .json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def grid_rows(args, known, counts: tuple[str, ...] = ("seeds", "epochs", "train_subset", "test_subset")
              ) -> tuple[str, ...]:
    """The --rows list, checked against ``known``; also checks the ``counts`` arguments are >= 1."""
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    bad = sorted(set(rows) - set(known))
    if bad or not rows:
        raise MoEVisionError(f"--rows: unknown {bad}; choose from {', '.join(known)}")
    for name in counts:
        if getattr(args, name) < 1:
            raise MoEVisionError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return rows


def add_miniature_args(p, name: str) -> None:
    """--seeds, --scale, --threads, --work-dir runs/NAME, --out docs/results/NAME.md."""
    p.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every stage's steps and the number of training scenes (default 1.0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--work-dir", default=f"runs/{name}", help="per-seed results (resumable)")
    p.add_argument("--out", default=f"docs/results/{name}.md", help="the Markdown file to write (and .json)")


def miniature_settings(args, settings_cls, scaled: tuple[str, ...]):
    """``settings_cls(seeds=, threads=)`` from the checked arguments of ``add_miniature_args``, with the
    ``scaled`` fields (step counts, scene counts) multiplied by --scale (at least 1 each)."""
    if args.seeds < 1:
        raise MoEVisionError(f"--seeds must be >= 1, got {args.seeds}")
    if not args.scale > 0:
        raise MoEVisionError(f"--scale must be > 0, got {args.scale}")
    if args.threads < 0:
        raise MoEVisionError(f"--threads must be >= 0, got {args.threads}")
    S = settings_cls(seeds=args.seeds, threads=args.threads)
    if args.scale != 1.0:
        for k in scaled:
            setattr(S, k, max(1, round(getattr(S, k) * args.scale)))
    return S
