"""``moevision analyze RUN_DIR``: routing analytics of a trained model (plots + a self-contained HTML report)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Run the model once over a data split with per-token routing recorded, then write PNG plots, a
self-contained report.html (images embedded), report.md and routing_summary.json: expert load and router
entropy, dropped tokens (overall, per patch position, on sample images), class x expert affinity and
I(class; expert) in bits, per-patch expert maps over sample images, dead experts, cosine similarity of the
experts' weights, and the training curves of metrics.jsonl. Each section has a short interpretation
computed from the numbers. Needs matplotlib (pip install 'moevision[plots]')."""

EXAMPLES = """examples:
  moevision analyze runs/demo                           # writes runs/demo/analysis/report.html
  moevision analyze runs/demo --max-images 2000 --out /tmp/routing
  moevision analyze my_model --dataset fashion_mnist    # a save_pretrained directory
"""


def register(subparsers) -> dict:
    a = subparsers.add_parser("analyze", help="routing analytics: plots and an HTML report of a trained model",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("run_dir", help="a run directory (moevision train) or a save_pretrained model directory")
    a.add_argument("--split", default="test", choices=["train", "test"], help="data split to route (default test)")
    a.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="analyse a fixed random subset of N images (default: the whole split)")
    a.add_argument("--out", default=None, metavar="DIR", help="output directory (default RUN_DIR/analysis)")
    a.add_argument("--dataset", default=None,
                   help="data set for a model directory (default fashion_mnist); run directories use their own")
    a.add_argument("--data-dir", default=None, help="directory holding the data set files")
    a.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    a.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass = per routing group (default: the run's eval batch size, so drops "
                        "match `moevision eval`)")
    a.add_argument("--samples", type=int, default=6, help="sample images in the expert maps (default 6)")
    a.add_argument("--dead-threshold", type=float, default=0.05,
                   help="an expert is dead below this fraction of the uniform share 1/E (default 0.05)")
    a.add_argument("--eval-capacity-factor", type=float, default=None, metavar="C",
                   help="override every MoE layer's evaluation capacity factor for the pass (e.g. the training one, "
                        "to see where tokens drop)")
    a.add_argument("--markdown", default=None, metavar="PATH",
                   help="also write the Markdown report to PATH (image links point into --out)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    return {"analyze": _cmd_analyze}


def _cmd_analyze(args) -> int:
    from ..analytics.report import analyze

    path = analyze(args.run_dir, split=args.split, max_images=args.max_images, out_dir=args.out,
                   dataset=args.dataset, data_dir=args.data_dir, device=args.device, batch_size=args.batch_size,
                   num_samples=args.samples, dead_threshold=args.dead_threshold, progress=not args.no_progress,
                   markdown=args.markdown, eval_capacity_factor=args.eval_capacity_factor)
    print(f"routing report: {path.resolve()}")
    return 0
