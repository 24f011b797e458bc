"""Where the CPU MoE layer's time over the dense FFN goes: the same native expert op run with every expert
holding the dense FFN's weights, so the arithmetic is exactly the dense FFN's and only the cut into
expert segments changes.

Rows (forward+backward, median ms, ratio to the dense FFN on the same T*k rows, measured interleaved):
- ``dense``: F.linear -> GELU -> F.linear (the issue's limit; MKL splits each GEMM over the threads);
- ``native E=1``: the native expert op with one expert (gather, per-thread single-threaded GEMMs, the
  combine and the gradient rows; one segment per thread): what the op's structure costs;
- ``native E=N, equal``: N experts, all with the dense weights, equal segments (T*k/N rows each): what
  cutting the GEMMs into expert-sized pieces costs on this GEMM library;
- ``native E=N, routed``: the same with a real router's (unbalanced) assignment;
- ``layer``: the whole ``cpu_fused`` MoE layer (router, losses, autograd glue) on the routed assignment.

Plus the single-threaded MKL GEMM time per row at the expert segment's size and at one thread's share
of the whole (the first projection), which is where the segment cost comes from.

Run: ``OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/cpu_floor.py [--shape vit-ti-k1] [--repeats 30]``.
Results: docs/performance.md (session 9).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (T, D, F, E, K), the `moevision bench moe-layer` CPU shapes
    "vit-ti-k1": (6400, 192, 768, 8, 1),
    "vit-ti-k2": (3200, 192, 768, 8, 2),
    "vit-s-k2": (1600, 384, 1536, 8, 2),
}


def _median_ms(fns: dict, repeats: int) -> dict:
    for f in fns.values():
        for _ in range(2):
            f()
    ts: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            ts[k].append((time.perf_counter() - t) * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in ts.items()}


def gemm_per_row(D: int, Fh: int, rows: list[int], repeats: int = 60) -> dict:
    """Single-threaded ``x @ W1`` (rows x D @ D x F): microseconds per row at each row count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, w, h = torch.randn(max(rows), D), torch.randn(D, Fh), torch.empty(max(rows), Fh)
        out = {}
        for m in rows:
            ms = _median_ms({m: lambda m=m: torch.mm(x[:m], w, out=h[:m])}, repeats)[m]
            out[m] = ms * 1e3 / m
        return out
    finally:
        torch.set_num_threads(n)


def run(shape: str, repeats: int) -> dict:
    from moevision import kernels
    from moevision.kernels import cpu as kc
    from moevision.moe import MoE

    ops = kernels.native_ops()
    if ops is None:
        raise SystemExit(f"the native kernels are not available: {kernels.native_status()}")
    torch.manual_seed(0)
    T, D, Fh, E, K = SHAPES[shape]
    A = T * K
    w1 = (torch.randn(Fh, D) * D**-0.5).requires_grad_()
    w2 = (torch.randn(D, Fh) * Fh**-0.5).requires_grad_()
    b1, b2 = torch.zeros(Fh, requires_grad=True), torch.zeros(D, requires_grad=True)
    xk = torch.randn(A, D, requires_grad=True)

    def dense():
        for t in (xk, w1, w2, b1, b2):
            t.grad = None
        F.linear(F.gelu(F.linear(xk, w1, b1)), w2, b2).sum().backward()

    def expert_case(n_exp: int, expert_of_row: torch.Tensor):
        """The native op on A = T*k rows of one token each (K=1 over xk), every expert = the dense FFN."""
        ew1 = w1.detach().t().contiguous().expand(n_exp, D, Fh).contiguous().requires_grad_()
        ew2 = w2.detach().t().contiguous().expand(n_exp, Fh, D).contiguous().requires_grad_()
        eb1, eb2 = torch.zeros(n_exp, Fh, requires_grad=True), torch.zeros(n_exp, D, requires_grad=True)
        order, pos, offs = ops.sort_by_expert(expert_of_row, n_exp)
        o = offs.tolist()
        counts = [b - a for a, b in zip(o, o[1:])]
        gates = torch.ones(A, requires_grad=True)

        def fb(check: bool = False):
            for t in (xk, ew1, ew2, eb1, eb2, gates):
                t.grad = None
            out = kc._ExpertMLP.apply(xk, gates, ew1, eb1, ew2, eb2, None, order, pos, counts, 1, "gelu", offs)
            out.sum().backward()
            if check:  # the same function as the dense FFN: same output and the same grad of x
                ref = F.linear(F.gelu(F.linear(xk, w1, b1)), w2, b2)
                gx = torch.autograd.grad(ref.sum(), xk)[0]
                for name, got, want in (("output", out, ref), ("grad x", xk.grad, gx)):
                    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                        raise AssertionError(f"native E={n_exp}: {name} differs from the dense FFN by "
                                             f"{(got - want).abs().max().item():.3g}")
        return fb, counts

    moe = MoE(D, Fh, E, K, impl="cpu_fused", noise_std=0.0)
    x = torch.randn(T, D, requires_grad=True)
    with torch.no_grad():
        routed = moe.router(x.view(1, T, D)).expert_idx  # (A,) token-major, a real router's split

    def layer():
        moe.zero_grad(set_to_none=True)
        x.grad = None
        o = moe(x)
        (o.out.sum() + o.aux_loss).backward()

    one, _ = expert_case(1, torch.zeros(A, dtype=torch.long))
    equal, eq_counts = expert_case(E, torch.arange(A) * E // A)
    rout, r_counts = expert_case(E, routed)
    for case in (one, equal, rout):
        case(check=True)
    fns = {"dense": dense, "native E=1": one, f"native E={E}, equal": equal, f"native E={E}, routed": rout,
           "layer (cpu_fused)": layer}
    ms = _median_ms(fns, repeats)
    nt = torch.get_num_threads()
    per_row = gemm_per_row(D, Fh, sorted({A // E, A // nt}))
    return dict(shape=shape, T=T, D=D, F=Fh, E=E, K=K, threads=nt, repeats=repeats,
                ms=ms, ratio={k: v / ms["dense"] for k, v in ms.items()},
                routed_counts=r_counts, equal_counts=eq_counts,
                gemm_us_per_row_1thread=per_row)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="vit-ti-k1", help=f"one of {', '.join(SHAPES)}, or 'all'")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    names = list(SHAPES) if a.shape == "all" else [a.shape]
    for n in names:
        if n not in SHAPES:
            raise SystemExit(f"--shape: unknown shape {n!r}; known: {', '.join(SHAPES)}, all")
    from moevision.utils import tune_malloc

    tune_malloc()
    results = []
    for n in names:
        r = run(n, a.repeats)
        results.append(r)
        print(f"{n} (T={r['T']}, D={r['D']}, F={r['F']}, E={r['E']}, k={r['K']}, {r['threads']} threads), "
              "forward+backward:")
        for k, v in r["ms"].items():
            print(f"  {k:24s} {v:8.2f} ms  {r['ratio'][k]:.3f}x")
        print("  routed segment sizes:", r["routed_counts"])
        print("  1-thread GEMM x@W1, us per row at", ", ".join(
            f"{m} rows: {us:.3f}" for m, us in r["gemm_us_per_row_1thread"].items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
