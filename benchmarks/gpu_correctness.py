"""GPU correctness: every dispatch path on CUDA equals the fp32 per-expert-loop reference (forward and
input/weight gradients), with and without the Triton kernel, and under bf16 autocast; the Triton
bias+activation kernel equals its PyTorch reference."""
import sys

import torch

from moevision import MoE, kernels
from moevision.kernels.ops import bias_act_torch

assert torch.cuda.is_available(), "needs a CUDA device"
dev = torch.device("cuda")
print("device:", torch.cuda.get_device_name(dev), "torch", torch.__version__, "triton", kernels.TRITON_AVAILABLE,
      kernels.triton.REASON)
failures = 0


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def off_vs_on(m, x, switch, extra):
    """[out, aux loss, x's gradient] + ``extra(o)`` of the layer ``m`` on ``x`` with ``switch(False)``, then with
    ``switch(True)`` (the same router noise both ways); the switch is left on."""
    res = []
    for on in (False, True):
        switch(on)
        m.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        torch.manual_seed(1)
        o = m(xr)
        (o.out.float().square().mean() + o.aux_loss).backward()
        res.append([o.out, o.aux_loss, xr.grad] + extra(o))
    switch(True)
    return res


if kernels.TRITON_AVAILABLE:
    from moevision.kernels.triton.bias_act import bias_act_triton
    for act in ("gelu", "gelu_tanh", "relu", "silu"):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            A, F, E = 5000, 768, 8
            e = torch.randint(0, E, (A,), device=dev).sort().values
            h = torch.randn(A, F, device=dev, dtype=dtype, requires_grad=True)
            b = torch.randn(E, F, device=dev, dtype=dtype, requires_grad=True)
            h2, b2 = h.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
            g = torch.randn(A, F, device=dev, dtype=dtype)
            y1, y2 = bias_act_torch(h, b, e, act), bias_act_triton(h2, b2, e, act)
            (y1 * g).sum().backward()
            (y2 * g).sum().backward()
            errs = (rel(y2, y1), rel(h2.grad, h.grad), rel(b2.grad, b.grad))
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            ok = max(errs) < tol
            failures += not ok
            print(f"triton bias_act {act:<10} {str(dtype):<15} rel err out/dh/db {errs[0]:.1e} {errs[1]:.1e} "
                  f"{errs[2]:.1e} {'ok' if ok else 'FAIL'}")

if kernels.TRITON_AVAILABLE:
    from moevision.kernels.ops import combine_rows
    from moevision.kernels.triton.combine import combine_triton
    for K in (1, 2, 4):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            T, D, E = 3000, 768, 8
            exp = torch.randint(0, E, (T * K,), device=dev)
            order = torch.argsort(exp, stable=True)
            pos = torch.empty_like(order).scatter_(0, order, torch.arange(T * K, device=dev))
            y = torch.randn(T * K, D, device=dev, dtype=dtype, requires_grad=True)
            g = torch.rand(T, K, device=dev, dtype=dtype, requires_grad=True)
            b = torch.randn(E, D, device=dev, dtype=dtype, requires_grad=True)
            y2, g2, b2 = (t.detach().clone().requires_grad_() for t in (y, g, b))
            go = torch.randn(T, D, device=dev, dtype=dtype)
            (combine_rows(y, g, pos, order, b, exp) * go).sum().backward()
            (combine_triton(y2, g2, pos, order, b2, exp, exp[order]) * go).sum().backward()
            o1, o2 = combine_rows(y, g, pos, order, b, exp), combine_triton(y2, g2, pos, order, b2, exp, exp[order])
            errs = (rel(o2, o1), rel(y2.grad, y.grad), rel(g2.grad, g.grad), rel(b2.grad, b.grad))
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            ok = max(errs) < tol
            failures += not ok
            print(f"triton combine K={K} {str(dtype):<15} rel err out/dy/dg/db " + " ".join(f"{e:.1e}" for e in errs)
                  + (" ok" if ok else " FAIL"))

for cfg in (dict(top_k=2), dict(top_k=1), dict(top_k=2, capacity_factor=1.0),
            dict(top_k=1, batch_priority=True, capacity_factor=0.5),
            dict(top_k=1, router="expert_choice", capacity_factor=1.0),
            dict(top_k=2, activation="swiglu", bias=False, normalize_topk=True)):
    cfg = dict(cfg)
    k = cfg.pop("top_k")
    torch.manual_seed(0)
    ref = MoE(256, 512, 8, k, noise_std=0.0, impl="loop", **cfg).to(dev)
    x = torch.randn(4096, 256, device=dev)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr).out
    y_ref.square().mean().backward()
    g_ref = {n: p.grad for n, p in ref.named_parameters()}
    runs = [(i, d, True, False, False) for i in ("einsum", "sorted", "padded", "grouped", "fused", "cpu_fused")
            for d in (torch.float32, torch.bfloat16)]
    runs += [("fused", torch.bfloat16, False, False, False), ("fused", torch.float32, True, True, False)]
    if kernels.TRITON_AVAILABLE:  # the gather/scatter-fused Triton grouped GEMMs (impl="triton")
        runs += [("triton", torch.float32, True, False, False), ("triton", torch.bfloat16, True, False, False),
                 ("triton", torch.float32, True, True, False)]
    if k == 2 and not set(cfg) - {"capacity_factor"}:  # torch.compile of fused (one graph): dropless, capacity
        runs += [("fused", torch.bfloat16, True, False, True)]
    refs = {}  # bf16 runs are checked against the loop reference run in bf16 (same routing decisions)
    for impl, dtype, triton, autocast, compiled in runs:
        kernels.use_triton(triton and kernels.TRITON_AVAILABLE)
        m = MoE(256, 512, 8, k, noise_std=0.0, impl=impl, **cfg).to(dev, dtype)
        m.load_state_dict({n: t.to(dtype) for n, t in ref.state_dict().items()})
        xx = x.detach().to(dtype).clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = (torch.compile(m) if compiled else m)(xx).out
        y.float().square().mean().backward()
        low = dtype == torch.bfloat16  # autocast: fp32 routing, bf16 experts -> the fp32 reference
        if low and "bf16" not in refs:
            rb = MoE(256, 512, 8, k, noise_std=0.0, impl="loop", **cfg).to(dev, torch.bfloat16)
            rb.load_state_dict({n: t.to(torch.bfloat16) for n, t in ref.state_dict().items()})
            xb = x.detach().to(torch.bfloat16).clone().requires_grad_()
            yb = rb(xb).out
            yb.float().square().mean().backward()
            refs["bf16"] = (yb.detach(), xb.grad, {n: p.grad for n, p in rb.named_parameters()})
        yr, xg, gr = refs["bf16"] if low else (y_ref, xr.grad, g_ref)
        err = rel(y, yr)
        gerr = max(rel(p.grad, gr[n]) for n, p in m.named_parameters() if gr[n] is not None and gr[n].abs().sum() > 0)
        xerr = rel(xx.grad, xg)
        tol = 3e-2 if low else (5e-2 if autocast else 1e-5)
        ok = err < tol and gerr < 10 * tol and xerr < 10 * tol and torch.isfinite(xx.grad).all().item()
        failures += not ok
        tag = f"{impl}{'' if triton else ' (no triton)'}{' (autocast)' if autocast else ''}{' (compiled)' if compiled else ''}"
        print(f"{str(cfg):<66} {tag:<22} {str(dtype):<15} rel err out {err:.1e} grads {gerr:.1e} dx {xerr:.1e} "
              f"{'ok' if ok else 'FAIL'}")
kernels.use_triton(kernels.TRITON_AVAILABLE)

# the Triton router kernels against the eager router ops, noise-free and in V-MoE's training form (noisy
# top-k, the load loss; the same draws both ways), fp32 and bf16
if kernels.TRITON_AVAILABLE:
    for noise, dtype in ((0.0, torch.float32), (1.0, torch.float32), (1.0, torch.bfloat16)):
        torch.manual_seed(0)
        m = MoE(256, 512, 8, 2, impl="fused", noise_std=noise).to(dev, dtype)
        x = torch.randn(4096, 256, device=dev, dtype=dtype)
        res = off_vs_on(m, x, kernels.use_triton_router,
                        lambda o: [m.router.weight.grad] + [o.stats.aux_losses[k] for k in sorted(o.stats.aux_losses)])
        errs = [rel(a, b) for a, b in zip(*res)]
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        ok = max(errs) < tol and len(res[0]) == len(res[1]) == 4 + 1 + (noise > 0)
        failures += not ok
        print(f"triton router noise_std={noise} {str(dtype):<15} rel err out/aux/dx/d router w/losses "
              + " ".join(f"{e:.1e}" for e in errs) + (" ok" if ok else " FAIL"))

# x's gradient summed in the router's logits node (session 17: kernels.use_fused_x_grad): its Triton kernel against
# the fp64 sum at the ViT-S shape, and the bf16 layer (K = 1, 2, training noise) with the switch off vs on
if kernels.TRITON_AVAILABLE:
    from moevision.kernels.triton.router import router_dx_triton
    torch.manual_seed(0)
    g, w = torch.randn(25216, 8, device=dev), torch.randn(8, 384, device=dev, dtype=torch.bfloat16)
    gp = torch.randn(25216, 384, device=dev, dtype=torch.bfloat16)
    ref = g.double() @ w.double() + gp.double()
    err = rel(router_dx_triton(g, w, gp), ref)
    ok = err < 4e-3
    failures += not ok
    print(f"triton router dx (25216 x 384, E=8, bf16) rel err {err:.1e} {'ok' if ok else 'FAIL'}")
    for K in (1, 2):
        torch.manual_seed(0)
        m = MoE(384, 1536, 8, K, impl="fused", noise_std=1.0).to(dev, torch.bfloat16)
        x = torch.randn(8192, 384, device=dev, dtype=torch.bfloat16)
        res = off_vs_on(m, x, kernels.use_fused_x_grad, lambda o: [p.grad for p in m.parameters()])
        errs = [rel(a, b) for a, b in zip(*res)]
        ok = max(errs) < 1e-2
        failures += not ok
        print(f"fused x-grad in the router node K={K} bf16, off vs on: rel err out/aux/dx/params "
              + " ".join(f"{e:.1e}" for e in errs) + (" ok" if ok else " FAIL"))

# torch.compile sees the fused layer as one graph on CUDA too (no host sync, no graph break)
torch._dynamo.reset()
mc = MoE(256, 512, 8, 2, noise_std=1.0).to(dev)
with torch.autocast("cuda", dtype=torch.bfloat16):
    ex = torch._dynamo.explain(lambda t: mc(t).out)(torch.randn(1024, 256, device=dev))
ok = (ex.graph_count, ex.graph_break_count) == (1, 0)
failures += not ok
print(f"dynamo: fused layer (bf16 autocast, training noise) graphs {ex.graph_count} breaks {ex.graph_break_count} "
      f"{'ok' if ok else 'FAIL ' + str(ex.break_reasons)[:500]}")
print("FAILURES:", failures)
sys.exit(1 if failures else 0)
