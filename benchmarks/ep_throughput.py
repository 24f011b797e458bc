"""Tokens/s of one MoE layer (forward + backward) on 1, 2 and 4 gloo ranks, expert-parallel, on CPU.

    python benchmarks/ep_throughput.py --out docs/results/distributed_throughput.md

Weak scaling: every rank routes ``--tokens`` tokens (a local batch), the layer has E=8 experts, top-2,
D=128, F=512 (ViT-S-like widths at a CPU size); throughput = all ranks' tokens / step time. Rows:
the local ``sorted`` dispatcher on one process (1 and 2 threads), the expert-parallel path on a
1-rank gloo group (its communication overhead alone), and 2 and 4 ranks with 1 thread each, for the
ragged (dropless) and padded (capacity 1.25) layouts. Timing: median of ``--repeats`` timed blocks
of ``--iters`` steps after warm-up, every rank synchronised by a barrier.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

D, F, E, K = 128, 512, 8, 2


def _layer(capacity_factor):
    from moevision.moe import MoE

    torch.manual_seed(0)
    return MoE(D, F, E, K, capacity_factor=capacity_factor, noise_std=0.0, impl="sorted")


def _time(step, iters: int, repeats: int, barrier=lambda: None) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        barrier()
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def _make_step(layer, tokens: int, rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, D, generator=g).requires_grad_()

    def step():
        out = layer(x)
        (out.out.square().mean() + out.aux_loss).backward()
    return step


def _ep_worker(rank: int, world: int, tokens: int, layout: str, cf, iters: int, repeats: int, out: str) -> None:
    import torch.distributed as dist

    from moevision import distributed as mvd

    mesh = mvd.build_mesh(world)
    layer = mvd.shard_experts(_layer(cf), mesh, layout=layout, force=True)
    t = _time(_make_step(layer, tokens, rank), iters, repeats, barrier=dist.barrier)
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": t}))


def measure(args) -> list[dict]:
    from moevision.distributed.testing import spawn

    rows = []
    for cf, layout in ((None, "ragged"), (1.25, "padded")):
        mode = "dropless" if cf is None else f"capacity {cf}"
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t = _time(_make_step(_layer(cf), args.tokens, 0), args.iters, args.repeats)
            rows.append({"mode": mode, "ranks": 1, "threads": threads, "path": "local sorted", "seconds": t,
                         "tokens_per_s": args.tokens / t})
        for world in (1, 2, 4):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                spawn(_ep_worker, world, args.tokens, layout, cf, args.iters, args.repeats, f.name, threads=1)
                t = json.loads(Path(f.name).read_text())["seconds"]
            rows.append({"mode": mode, "ranks": world, "threads": 1, "path": f"expert parallel ({layout})",
                         "seconds": t, "tokens_per_s": world * args.tokens / t})
        for r in rows[-5:]:
            print(r, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "docs/results/distributed_throughput.md"))
    args = p.parse_args()
    load0 = os.getloadavg()[0]
    rows = measure(args)
    load1 = os.getloadavg()[0]
    cmd = f"python benchmarks/ep_throughput.py --tokens {args.tokens} --iters {args.iters} --repeats {args.repeats}"
    lines = [
        "# Expert-parallel MoE layer throughput on gloo (CPU)", "",
        f"Written by `{cmd}`.", "",
        f"One MoE layer, E={E}, top-{K}, D={D}, F={F}, GELU experts, forward + backward, {args.tokens} tokens per "
        "rank (weak scaling); tokens/s counts every rank's tokens. Median of "
        f"{args.repeats} blocks of {args.iters} steps.", "",
        "| routing | processes x threads | path | ms / step | tokens/s | vs 1 process, 1 thread |",
        "|---|---|---|---|---|---|",
    ]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        base = next(r for r in rows if r["mode"] == mode and r["ranks"] == 1 and r["threads"] == 1)
        for r in (r for r in rows if r["mode"] == mode):
            lines.append(f"| {mode} | {r['ranks']} x {r['threads']} | {r['path']} | {1000 * r['seconds']:.1f} | "
                         f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
    lines += ["", f"The machine has {os.cpu_count()} CPU cores, shared with other jobs (1-minute load average "
              f"{load0:.1f} before and {load1:.1f} after this run): 2 ranks can at best double the 1-thread "
              "throughput of an idle machine, and 4 ranks oversubscribe the cores (every rank also spins in gloo's "
              "collectives), so on this machine these numbers measure overhead, not scaling. torch "
              + torch.__version__ + ".", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
