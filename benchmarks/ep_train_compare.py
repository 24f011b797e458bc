"""Fashion-MNIST: the fmnist_moe recipe shortened (a training subset, few epochs) on 1 process and on
W torchrun ranks with expert parallelism (parallel.ep=W), over seeds; writes a Markdown table.

    python benchmarks/ep_train_compare.py --seeds 0 1 --world 2 --subset 6000 --epochs 2 --cores 1

Threads: ``--cores`` split over the processes (at least 1 each); the test set is evaluated once, at
the end. The
global batch (64), the schedule and the data order are the same, so the runs differ only in where
the experts live, in the routing groups (a rank routes its 32 images; capacity is per group) and in
the ranks' random streams (router noise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(world: int, seed: int, args, work: Path) -> dict:
    out = work / f"w{world}_s{seed}"
    sets = ["--set", f"data.train_subset={args.subset}", "--set", f"train.epochs={args.epochs}",
            "--set", f"train.seed={seed}", "--set", f"train.num_threads={max(1, args.cores // world)}",
            "--set", "train.device=cpu", "--set", f"train.eval_every={args.epochs}", "--no-progress",
            "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.cores // world)), "PYTHONPATH": str(ROOT / "src")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    py = sys.executable
    if world == 1:
        cmd = [py, "-m", "moevision", "train", *sets]
    else:
        cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), "-m", "moevision",
               "train", *sets, "--set", f"parallel.ep={world}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    s = json.loads((out / "summary.json").read_text())
    s["wall"] = time.perf_counter() - t0
    print(f"world {world} seed {seed}: test accuracy {s['test_accuracy']:.4f}, {s['images_per_s']:.0f} images/s, "
          f"{s['wall']:.0f} s", flush=True)
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs/results/distributed_fmnist.md"))
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, args.world):
            rows[world] = [run(world, s, args, Path(tmp)) for s in args.seeds]
    cmd = ("python benchmarks/ep_train_compare.py --seeds " + " ".join(map(str, args.seeds))
           + f" --world {args.world} --subset {args.subset} --epochs {args.epochs} --cores {args.cores}")

    def ms(xs, fmt):
        return fmt.format(statistics.mean(xs)) + (" ± " + fmt.format(statistics.stdev(xs)) if len(xs) > 1 else "")

    lines = [
        "# Expert-parallel training on Fashion-MNIST: 1 process vs torchrun ranks", "",
        f"Written by `{cmd}`.", "",
        f"Recipe `fmnist_moe` (MoE hybrid ViT, E=4 top-1, capacity 1.25 / eval 2.0) shortened to {args.subset} "
        f"training images and {args.epochs} epochs, global batch 64, evaluated on the 10k test images; "
        f"seeds {', '.join(map(str, args.seeds))} (mean ± std). {args.world} ranks run `torchrun --nproc-per-node "
        f"{args.world} -m moevision train ... --set parallel.ep={args.world}` on gloo: each rank holds "
        f"{4 // args.world} of the 4 experts of each MoE layer and routes its 32 images.", "",
        "| processes | test accuracy | test loss | images/s (training steps) | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for world, ss in rows.items():
        label = "1 (single process)" if world == 1 else f"{world} (torchrun, gloo, ep={world})"
        lines.append(f"| {label} | {ms([100 * s['test_accuracy'] for s in ss], '{:.2f}')}% | "
                     f"{ms([s['test_loss'] for s in ss], '{:.4f}')} | {ms([s['images_per_s'] for s in ss], '{:.0f}')} | "
                     f"{ms([s['wall'] for s in ss], '{:.0f}')} |")
    lines += ["", f"Threads: {args.cores} in total for 1 process, max(1, {args.cores} / W) per rank, on a 2-core machine "
              "shared with other jobs (load average above 10 during these runs): the timings are indicative only. "
              "torch " + __import__("torch").__version__ + ".", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
