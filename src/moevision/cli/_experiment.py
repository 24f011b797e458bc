"""Arguments and checks shared by the seeded comparison commands (``multitask``, ``advmoe``)."""

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
