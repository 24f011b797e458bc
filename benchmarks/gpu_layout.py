"""Which operand layout of the expert weights runs ``torch._grouped_mm`` faster on this GPU, and what
that is worth to the ``fused`` layer: (1) the grouped GEMMs alone, forward and forward+backward, with
the (E, K, N) weights N-major (as stored: an "NN" GEMM) or K-major ("TN", F.linear's forward layout),
beside the dense GEMM of the same FLOPs; (2) the fused layer with ``kernels.use_k_major_weights`` off
and on against the fp32 loop reference (bf16 tolerance); (3) ``bench_layer`` at the two issue-4 shapes
with the switch off and on (eager and CUDA-graph ratios to dense). DIAG_DEVICE=cpu: a small dry run."""
import os
import sys
import time

import torch
import torch.nn.functional as F

from moevision import MoE, kernels
from moevision.bench import GPU_SHAPES, LayerShape, bench_layer

dev = torch.device(os.environ.get("DIAG_DEVICE", "cuda"))
cuda = dev.type == "cuda"
print("device:", torch.cuda.get_device_name(dev) if cuda else "cpu", "torch", torch.__version__, flush=True)
t0 = time.time()
bf = dict(device=dev, dtype=torch.bfloat16)


def timed(fn, repeats=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            s = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - s) * 1e3)
    return sorted(ts)[len(ts) // 2]


shapes = GPU_SHAPES[:3:2] if cuda else [LayerShape("tiny", 512, 64, 128, 4, 2)]
for s in shapes:
    A, D, Fh, E = s.tokens * s.top_k, s.dim, s.hidden, s.experts
    offs = (torch.arange(1, E + 1, device=dev) * (A // E)).to(torch.int32)
    offs[-1] = A
    for name, (k, n) in (("w1", (D, Fh)), ("w2", (Fh, D))):
        x = torch.randn(A, k, **bf, requires_grad=True)
        w_n = torch.randn(E, k, n, **bf, requires_grad=True)
        w_k = w_n.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        w_dense = torch.randn(n, k, **bf, requires_grad=True)
        g = torch.randn(A, n, **bf)
        row = {}
        for tag, f in (("dense", lambda: F.linear(x, w_dense)),
                       ("grouped N-major", lambda: torch._grouped_mm(x, w_n, offs=offs)),
                       ("grouped K-major", lambda: torch._grouped_mm(x, w_k, offs=offs))):
            with torch.no_grad():
                fwd = timed(f)
            fb = timed(lambda: f().backward(g))
            row[tag] = (fwd, fb)
        d = row["dense"]
        print(f"{s.name} {name} ({A}x{k} @ {k}x{n}): " + "  ".join(
            f"{t} fwd {v[0]:.3f} ms ({v[0] / d[0]:.2f}x) fwd+bwd {v[1]:.3f} ms ({v[1] / d[1]:.2f}x)"
            for t, v in row.items()) + f"  [{time.time() - t0:.0f}s]", flush=True)

# router crumbs: top-1 by topk vs max, and the stable expert sort vs a counting sort (E small)
T = shapes[-1].tokens
p = torch.rand(T, 8, device=dev).softmax(-1)
e = torch.randint(0, 8, (T * 2,), device=dev)


def counting_pos(e, E=8):  # pos[a] = rank of assignment a in the stable expert sort
    c = (e.unsqueeze(1) == torch.arange(E, device=e.device)).to(torch.int32).cumsum(0)
    cnt = c[-1]
    return (c.gather(1, e.unsqueeze(1)).squeeze(1) - 1) + (cnt.cumsum(0) - cnt)[e]


with torch.no_grad():
    print(f"router T={T}: topk(1) {timed(lambda: p.topk(1, dim=-1)):.4f} ms  max {timed(lambda: p.max(-1)):.4f} ms  "
          f"topk(2) {timed(lambda: p.topk(2, dim=-1)):.4f} ms  argsort(stable, {2 * T}) "
          f"{timed(lambda: torch.argsort(e, stable=True)):.4f} ms  counting sort "
          f"{timed(lambda: counting_pos(e)):.4f} ms", flush=True)

failures = 0
torch.manual_seed(0)
ref = MoE(256, 512, 8, 2, noise_std=0.0, impl="loop").to(dev, torch.bfloat16)
x = torch.randn(4096, 256, **bf)


def grads(m):
    xx = x.clone().requires_grad_()
    y = m(xx).out
    y.float().square().mean().backward()
    out = [y.detach().float(), xx.grad.float()] + [p.grad.float() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    return out


r = grads(ref)
for k_major in (False, True):
    kernels.use_k_major_weights(k_major)
    m = MoE(256, 512, 8, 2, noise_std=0.0, impl="fused").to(dev, torch.bfloat16)
    m.load_state_dict(ref.state_dict())
    errs = [((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(grads(m), r)]
    ok = max(errs) < 5e-2
    failures += not ok
    print(f"fused k_major={k_major}: max rel err {max(errs):.1e} {'ok' if ok else 'FAIL'}", flush=True)

for s in (GPU_SHAPES[:3:2] if cuda else [LayerShape("tiny", 512, 64, 128, 4, 2)]):
    for k_major in (False, True):
        kernels.use_k_major_weights(k_major)
        rows = bench_layer(s, dev, torch.bfloat16, 20, impls=("fused",))
        f = lambda v: "-" if v is None else f"{v:.2f}"
        print(f"{s.name} k_major={k_major}: " + "  ".join(
            f"{r['impl']} {r['fwdbwd_ms']:.3f} ms x{r['fwdbwd_ratio']:.2f} graph {f(r['graph_fwdbwd_ms'])} ms "
            f"x{f(r['graph_ratio'])}" for r in rows) + f"  [{time.time() - t0:.0f}s]", flush=True)
kernels.use_k_major_weights(False)
print("FAILURES:", failures)
sys.exit(1 if failures else 0)
