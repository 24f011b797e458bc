"""Where the MoE layer's time goes on a GPU: torch.profiler tables (top kernels by device time, CPU vs
device totals) for dense and the fused/grouped MoE at the V-MoE-B and ViT-S shapes, and the same
forward+backward replayed from a CUDA graph (what is left when launch overhead is removed).
Usage: python benchmarks/gpu_profile.py [--rows 18]"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from moevision import MoE, kernels
from moevision.bench import cuda_graph

p = argparse.ArgumentParser()
p.add_argument("--rows", type=int, default=18)
args = p.parse_args()
dev = torch.device("cuda")
dt = torch.bfloat16
print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", kernels.TRITON_AVAILABLE)


def case_fns(T, D, Fh, E, K):
    torch.manual_seed(0)
    x = torch.randn(T, D, device=dev, dtype=dt)
    xk = torch.randn(T * K, D, device=dev, dtype=dt, requires_grad=True)
    w1 = (torch.randn(Fh, D, device=dev, dtype=dt) * D**-0.5).requires_grad_()
    w2 = (torch.randn(D, Fh, device=dev, dtype=dt) * Fh**-0.5).requires_grad_()
    b1 = torch.zeros(Fh, device=dev, dtype=dt, requires_grad=True)
    b2 = torch.zeros(D, device=dev, dtype=dt, requires_grad=True)

    def dense():
        F.linear(F.gelu(F.linear(xk, w1, b1)), w2, b2).sum().backward()

    out = {"dense": dense}
    for impl in ("fused", "grouped"):
        m = MoE(D, Fh, E, K, impl=impl, noise_std=0.0).to(dev, dt)
        xr = x.clone().requires_grad_()

        def fb(m=m, xr=xr):
            o = m(xr)
            (o.out.sum() + o.aux_loss).backward()
        out[impl] = fb
    return out


def time_ms(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def graphed(fn):
    return cuda_graph(fn, warmup=3).replay


for name, shape in (("vit-b/16 E8 k2", (12608, 768, 3072, 8, 2)), ("vit-s/16 E8 k1", (25216, 384, 1536, 8, 1))):
    fns = case_fns(*shape)
    print(f"\n######## {name} {shape}")
    for impl, fn in fns.items():
        eager = time_ms(fn)
        try:
            g = graphed(fn)
            gms = f"{time_ms(g):.3f}"
        except Exception as e:  # capture needs no host sync
            gms = f"capture failed: {type(e).__name__}: {str(e)[:100]}"
        print(f"{impl:<8} fwd+bwd eager {eager:.3f} ms   cuda-graph replay {gms}")
    for impl in ("fused",):
        fn = fns[impl]
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        dev_total = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in ka) / 5
        cpu_total = sum(e.self_cpu_time_total for e in ka) / 5
        n_kernels = sum(e.count for e in ka if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) / 5
        print(f"\n--- {impl}: per iteration: device {dev_total / 1e3:.3f} ms, CPU {cpu_total / 1e3:.3f} ms, "
              f"{n_kernels:.0f} kernels")
        try:
            print(ka.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
        except Exception:
            print(ka.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
