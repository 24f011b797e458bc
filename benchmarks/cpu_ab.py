"""Paired A/B of the CPU layer's switches: each step of the ``cpu_fused`` layer with a switch on and off
(the two in alternating order) and the dense FFN, interleaved, and the median of the per-step ratios
on/off (with its quartiles) - a difference of 1% shows here where whole-benchmark runs move by 2-3% from
run to run.

Switches (``--switch``):
- ``fold``: the router folded into the expert op's autograd node (``kernels.use_folded_router``);
- ``whole``: whole experts per thread in the native op (``kernels.use_whole_expert_split``), against equal
  row blocks;
- ``native``: the native C++ op against the Python per-expert loop (``kernels.use_native``).

Run: ``OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/cpu_ab.py --switch fold [--shape all] [--repeats 60]``.
Results: docs/performance.md (session 11).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (T, D, F, E, K), the `moevision bench moe-layer` CPU shapes
    "vit-ti-k1": (6400, 192, 768, 8, 1),
    "vit-ti-k2": (3200, 192, 768, 8, 2),
    "vit-s-k2": (1600, 384, 1536, 8, 2),
}
SWITCHES = ("fold", "whole", "native")


def _switch(name: str):
    from moevision import kernels

    return {"fold": kernels.use_folded_router, "whole": kernels.use_whole_expert_split,
            "native": kernels.use_native}[name]


def run(shape: str, switch: str, repeats: int = 60, seed: int = 0) -> dict:
    from moevision import MoE, kernels

    if switch not in SWITCHES:
        raise ValueError(f"switch must be one of {SWITCHES}, got {switch!r}")
    T, D, Fh, E, K = SHAPES[shape]
    torch.manual_seed(seed)
    x = torch.randn(T, D)
    moe = MoE(D, Fh, E, K, impl="cpu_fused", noise_std=0.0)
    xr = x.clone().requires_grad_()
    xk = torch.randn(T * K, D, requires_grad=True)
    w1 = (torch.randn(Fh, D) * D**-0.5).requires_grad_()
    w2 = (torch.randn(D, Fh) * Fh**-0.5).requires_grad_()
    b1 = torch.zeros(Fh, requires_grad=True)
    b2 = torch.zeros(D, requires_grad=True)
    set_switch = _switch(switch)

    def dense():
        for t in (xk, w1, w2, b1, b2):
            t.grad = None
        F.linear(F.gelu(F.linear(xk, w1, b1)), w2, b2).sum().backward()

    def layer(on: bool):
        def step():
            set_switch(on)
            try:
                moe.zero_grad(set_to_none=True)
                xr.grad = None
                o = moe(xr)
                (o.out.sum() + o.aux_loss).backward()
            finally:
                set_switch(True)
        return step

    # the same function both ways, checked before timing
    grads = []
    for on in (True, False):
        layer(on)()
        grads.append(xr.grad.clone())
    if not torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3):
        raise AssertionError(f"switch {switch!r}: the two paths disagree (max diff {(grads[0] - grads[1]).abs().max():.3g})")
    fns = {"on": layer(True), "off": layer(False), "dense": dense}
    for f in fns.values():
        for _ in range(2):
            f()
    ts = {k: [] for k in fns}
    for i in range(repeats):  # the order alternates: on, off, dense / off, on, dense (what runs first pays
        order = ("on", "off", "dense") if i % 2 == 0 else ("off", "on", "dense")  # for the previous step's heap)
        for k in order:
            f = fns[k]
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
    pr = sorted(a / b for a, b in zip(ts["on"], ts["off"]))
    q = lambda f: pr[min(len(pr) - 1, int(f * len(pr)))]  # noqa: E731
    return dict(shape=shape, switch=switch, ms=med, ratio_to_dense={k: v / med["dense"] for k, v in med.items()},
                paired_on_over_off=dict(median=q(0.5), q25=q(0.25), q75=q(0.75)), repeats=repeats,
                threads=torch.get_num_threads(), native=kernels.native_status())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--switch", choices=SWITCHES, default="fold")
    p.add_argument("--shape", default="all", help=f"one of {sorted(SHAPES)} or all")
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    from moevision.utils import tune_malloc

    tune_malloc()
    names = sorted(SHAPES) if a.shape == "all" else [a.shape]
    bad = [n for n in names if n not in SHAPES]
    if bad:
        p.error(f"unknown shape {bad[0]!r}; choose from {sorted(SHAPES)} or all")
    out = []
    for n in names:
        r = run(n, a.switch, a.repeats)
        pq = r["paired_on_over_off"]
        print(f"{n:10s} {a.switch}: on {r['ms']['on']:.2f} ms ({r['ratio_to_dense']['on']:.3f}x dense)  "
              f"off {r['ms']['off']:.2f} ms ({r['ratio_to_dense']['off']:.3f}x)  dense {r['ms']['dense']:.2f} ms  "
              f"paired on/off {pq['median']:.4f} [{pq['q25']:.4f}, {pq['q75']:.4f}]", flush=True)
        out.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
