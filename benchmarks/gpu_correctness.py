"""GPU correctness: every dispatch path on CUDA equals the fp32 per-expert-loop reference."""
import sys

import torch

from moevision import MoE

assert torch.cuda.is_available(), "needs a CUDA device"
dev = torch.device("cuda")
print("device:", torch.cuda.get_device_name(dev), "torch", torch.__version__)
failures = 0
for cfg in (dict(top_k=2), dict(top_k=2, capacity_factor=1.0), dict(top_k=1, batch_priority=True, capacity_factor=0.5),
            dict(top_k=1, router="expert_choice", capacity_factor=1.0),
            dict(top_k=2, activation="swiglu", bias=False, normalize_topk=True)):
    cfg = dict(cfg)
    k = cfg.pop("top_k")
    torch.manual_seed(0)
    ref = MoE(256, 512, 8, k, noise_std=0.0, impl="loop", **cfg).to(dev)
    x = torch.randn(4096, 256, device=dev)
    y_ref = ref(x).out
    for impl in ("einsum", "sorted", "padded", "grouped"):
        for dtype in (torch.float32, torch.bfloat16):
            m = MoE(256, 512, 8, k, noise_std=0.0, impl=impl, **cfg).to(dev, dtype)
            m.load_state_dict({n: t.to(dtype) for n, t in ref.state_dict().items()})
            xx = x.to(dtype).requires_grad_()
            y = m(xx).out
            y.float().square().mean().backward()
            err = ((y.float() - y_ref).norm() / y_ref.norm()).item()
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            ok = err < tol and torch.isfinite(xx.grad).all().item()
            failures += not ok
            print(f"{str(cfg):<70} {impl:<8} {str(dtype):<15} rel err {err:.2e} {'ok' if ok else 'FAIL'}")
print("FAILURES:", failures)
sys.exit(1 if failures else 0)
