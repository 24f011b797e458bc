"""QMoE run-time decoding cost: decode every expert of a layer, and a ``CompressedExperts`` forward
(decode + GEMMs) against ordinary ``Experts`` holding the same dequantised weights, on random ternary
experts with P(zero) = 0.885 at QMoE's switch-base shapes and at the default model's shapes.

    python benchmarks/qmoe_decode.py [--device cuda] [--json PATH]

Also checks, on the device, that the fast decoder equals the CPU decode and that the compressed forward
equals the dense forward on the decoded weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from moevision.moe.experts import Experts
from moevision.techniques.qmoe import CompressedExperts
from moevision.techniques.qmoe.gptq import make_grid

SHAPES = {"switch-base (E=8, 768x3072)": (8, 768, 3072), "fmnist default (E=4, 128x256)": (4, 128, 256)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats=20):
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def bench(name, E, D, F, tokens, device, layout="row"):
    g = torch.Generator().manual_seed(0)
    ex = Experts(E, D, F)
    codes, grids = {}, {}
    for p, (R, C) in {"w1": (F, D), "w2": (D, F)}.items():
        t = torch.multinomial(torch.tensor([0.885, 0.0575, 0.0575]), E * R * C, replacement=True, generator=g)
        codes[p] = t.view(E, R, C)
        grids[p] = make_grid(torch.randn(E, R, C, generator=g) * 0.02, "ternary")
    t0 = time.perf_counter()
    comp = CompressedExperts.from_codes(ex, codes, grids, "ternary", layout=layout)
    encode_s = time.perf_counter() - t0
    dense = comp.dequantized_experts()  # decoded on the CPU
    comp, dense = comp.to(device), dense.to(device)
    ids = list(range(E))
    ok_decode = all(torch.equal(comp.decoded(ids, torch.float32)[p].transpose(1, 2).cpu(), getattr(dense, p).detach().cpu())
                    for p in ("w1", "w2"))
    counts = [tokens // E] * E
    x = torch.randn(sum(counts), D, device=device)
    with torch.no_grad():
        y_c, y_d = comp.forward_sorted(x, counts), dense.forward_sorted(x, counts)
        max_err = float((y_c - y_d).abs().max())
        row = {
            "shape": name, "E": E, "D": D, "F": F, "tokens": sum(counts), "layout": layout,
            "bits_per_weight": 8 * sum(b.numel() * b.element_size() for k, b in comp.named_buffers()
                                       if k.endswith(("codes", "offsets"))) / (E * 2 * D * F),
            "encode_s_cpu": round(encode_s, 3), "decode_matches_cpu": ok_decode, "forward_max_abs_err": max_err,
            "decode_all_ms": _time(lambda: (comp._cache.clear(), comp.decoded(ids, torch.float32)), device),
            "forward_dense_ms": _time(lambda: dense.forward_sorted(x, counts), device),
            "forward_compressed_ms": _time(lambda: comp.forward_sorted(x, counts), device),
        }
    row["overhead"] = row["forward_compressed_ms"] / row["forward_dense_ms"] - 1
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", default=None)
    ap.add_argument("--small", action="store_true", help="only the default model's shapes (quick, for CPUs)")
    a = ap.parse_args()
    device = torch.device(a.device)
    shapes = {n: s for n, s in SHAPES.items() if not a.small or s[1] < 512}
    rows = [bench(n, *s, a.tokens, device) for n, s in shapes.items()]
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__}
    for r in rows:
        print(json.dumps(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    assert all(r["decode_matches_cpu"] and r["forward_max_abs_err"] < 1e-3 for r in rows), rows


if __name__ == "__main__":
    main()
