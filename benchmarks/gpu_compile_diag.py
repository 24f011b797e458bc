"""Where compiled ``fused`` gradients go wrong on CUDA (bf16): the layer compiled with the dynamo-only,
AOTAutograd-only and inductor backends, the GEMMs as ``torch._grouped_mm`` or ``moevision::segment_mm``,
and each autograd building block compiled alone, all against eager. Prints one line per check with the
relative error of the output, the input gradient and every parameter gradient (and their norms, so a
zero gradient shows as such). Usage: python benchmarks/gpu_compile_diag.py [--logs]  (--logs: AOT
graphs and inductor output code of the failing case to stderr)."""
import os
import sys
import time

import torch

from moevision import MoE, kernels
from moevision.kernels import ops
from moevision.moe.experts import Experts

dev = torch.device(os.environ.get("DIAG_DEVICE", "cuda"))  # DIAG_DEVICE=cpu: a dry run of the script
assert dev.type != "cuda" or torch.cuda.is_available(), "needs a CUDA device"
print("device:", torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch", torch.__version__,
      flush=True)
t0 = time.time()
failures = 0


def rel(a, b):
    if a is None or b is None:
        return float("nan") if (a is None) != (b is None) else 0.0
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


torch.manual_seed(0)
T, D, F, E, K = 4096, 256, 512, 8, 2
layer = MoE(D, F, E, K, noise_std=0.0, impl="fused").to(dev, torch.bfloat16)
x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)


def run(fn, autocast=False):
    layer.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        o = fn(xx)
    o.out.float().square().mean().backward()
    grads = {n: None if p.grad is None else p.grad.detach().float().clone() for n, p in layer.named_parameters()}
    return o.out.detach().float(), xx.grad.detach().float(), grads


def report(name, res, ref, tol=3e-2):
    global failures
    errs = {"out": rel(res[0], ref[0]), "dx": rel(res[1], ref[1])}
    errs.update({n: rel(res[2][n], ref[2][n]) for n in ref[2]})
    bad = [k for k, v in errs.items() if not v < tol]
    failures += bool(bad)
    norms = " ".join(f"{n}:{(0.0 if g is None else g.norm().item()):.3g}/{ref[2][n].norm().item():.3g}"
                     for n, g in res[2].items())
    print(f"{name:<44} " + " ".join(f"{k} {v:.1e}" for k, v in errs.items())
          + f"  {'ok' if not bad else 'FAIL ' + ','.join(bad)}  [{time.time() - t0:.0f}s]", flush=True)
    if bad:
        dx = f"dx {res[1].norm().item():.3g}/{ref[1].norm().item():.3g}"
        print(f"   grad norms (got/eager): {dx} {norms}", flush=True)


for autocast in (False, True):
    ref = run(layer, autocast)
    for backend in ("eager", "aot_eager", "inductor"):
        torch._dynamo.reset()
        if backend == "inductor" and autocast and "--logs" in sys.argv:
            torch._logging.set_logs(aot_graphs=True, output_code=True)
        report(f"layer {'autocast ' if autocast else ''}compiled backend={backend}",
               run(torch.compile(layer, backend=backend), autocast), ref)
        torch._logging.set_logs()

# the GEMMs as moevision::segment_mm instead of torch._grouped_mm
orig = Experts.grouped_mm_ok
Experts.grouped_mm_ok = lambda self, x, dtype=None: False
ref = run(layer)
for backend in ("aot_eager", "inductor"):
    torch._dynamo.reset()
    report(f"layer segment_mm compiled backend={backend}", run(torch.compile(layer, backend=backend)), ref)
Experts.grouped_mm_ok = orig

# each building block alone, compiled with inductor, against eager
torch.manual_seed(1)
A = T * K
exp = torch.randint(0, E, (A,), device=dev)
order = torch.argsort(exp, stable=True)
pos = torch.empty_like(order).scatter_(0, order, torch.arange(A, device=dev))
e_sorted = exp[order]
offs = torch.searchsorted(e_sorted, torch.arange(E, device=dev), right=True).to(torch.int32)


def block(name, fn, *inputs):
    global failures
    ins = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    cins = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*ins)
    out.float().square().mean().backward()
    torch._dynamo.reset()
    cout = torch.compile(fn)(*cins)
    cout.float().square().mean().backward()
    errs = [rel(cout, out)] + [rel(c.grad, i.grad) for c, i in zip(cins, ins) if i.requires_grad]
    ok = max(errs) < 3e-2
    failures += not ok
    print(f"block {name:<38} " + " ".join(f"{e:.1e}" for e in errs) + f"  {'ok' if ok else 'FAIL'}"
          f"  [{time.time() - t0:.0f}s]", flush=True)


bf = dict(device=dev, dtype=torch.bfloat16)
xs = torch.randn(A, D, **bf)
w1 = torch.randn(E, D, F, **bf) * D ** -0.5
block("_grouped_mm 2d x 3d", lambda a, w: torch._grouped_mm(a, w, offs=offs), xs, w1)
block("permute_rows", lambda t: ops.permute_rows(t, order, pos, K), torch.randn(T, D, **bf))
block("bias_act_torch gelu", lambda h, b: ops.bias_act_torch(h, b, e_sorted, "gelu"),
      torch.randn(A, F, **bf), torch.randn(E, F, **bf))
block("combine_rows (bias)", lambda y, g, b: ops.combine_rows(y, g, pos, order, b, exp),
      torch.randn(A, D, **bf), torch.rand(T, K, device=dev), torch.randn(E, D, **bf))
block("combine_rows (no bias)", lambda y, g: ops.combine_rows(y, g, pos, order),
      torch.randn(A, D, **bf), torch.rand(T, K, device=dev))


def combine_plain(y, g):  # the same combine in plain differentiable ops (autograd derives the backward)
    return (y.index_select(0, pos).view(T, K, -1) * g.to(y.dtype).unsqueeze(-1)).sum(1)


block("combine in plain ops", combine_plain, torch.randn(A, D, **bf), torch.rand(T, K, device=dev))

torch._dynamo.reset()
with torch.autocast(dev.type, dtype=torch.bfloat16):
    ex = torch._dynamo.explain(lambda t: layer(t).out)(torch.randn(1024, D, device=dev))
print(f"dynamo explain (autocast): graphs {ex.graph_count} breaks {ex.graph_break_count} "
      f"{str(ex.break_reasons)[:400]}", flush=True)
failures += (ex.graph_count, ex.graph_break_count) != (1, 0)
print("TRITON", kernels.TRITON_AVAILABLE, "FAILURES:", failures, f"[{time.time() - t0:.0f}s]")
sys.exit(1 if failures else 0)
