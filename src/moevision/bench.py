"""Benchmarks, run side by side in one process (ratios, never absolute targets).

``moe-layer``: forward and forward+backward time of an MoE FFN layer over a dense FFN doing the same
active FLOPs (the FFN applied to T*k tokens: the limit), for each moevision dispatch implementation.
``loop`` is the per-expert loop (HF Mixtral style) and ``einsum`` the GShard one-hot dispatch, the two
baselines of ../shared/anchors. ``model``: one training step (AdamW) of an MoE ViT over its dense twin.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import MoEVisionError


@dataclass
class LayerShape:
    name: str
    tokens: int
    dim: int
    hidden: int
    experts: int
    top_k: int


CPU_SHAPES = [
    LayerShape("vit-ti E8 k1 (T=128x50)", 6400, 192, 768, 8, 1),
    LayerShape("vit-ti E8 k2 (T=64x50)", 3200, 192, 768, 8, 2),
    LayerShape("vit-s E8 k2 (T=32x50)", 1600, 384, 1536, 8, 2),
    LayerShape("fmnist-hybrid E4 k1 (T=128x50)", 6400, 96, 192, 4, 1),
]
TEST_SHAPES = [LayerShape("tiny", 256, 32, 64, 4, 2)]
GPU_SHAPES = [
    LayerShape("vit-b/16 E8 k2", 12608, 768, 3072, 8, 2),
    LayerShape("vit-b/16 E32 k2", 12608, 768, 3072, 32, 2),
    LayerShape("vit-s/16 E8 k1", 25216, 384, 1536, 8, 1),
    LayerShape("mixtral-like E8 k2", 8192, 4096, 14336, 8, 2),
]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_layer(shape: LayerShape, device, dtype, repeats: int,
                impls=("loop", "einsum", "sorted", "padded", "grouped")):
    from .moe import MoE

    torch.manual_seed(0)
    T, D, Fh, E, K = shape.tokens, shape.dim, shape.hidden, shape.experts, shape.top_k
    x = torch.randn(T, D, device=device, dtype=dtype)
    xk = torch.randn(T * K, D, device=device, dtype=dtype, requires_grad=True)  # in a network dgrad is needed
    w1 = (torch.randn(D, Fh, device=device, dtype=dtype) * D**-0.5).requires_grad_()
    w2 = (torch.randn(Fh, D, device=device, dtype=dtype) * Fh**-0.5).requires_grad_()
    b1 = torch.zeros(Fh, device=device, dtype=dtype, requires_grad=True)
    b2 = torch.zeros(D, device=device, dtype=dtype, requires_grad=True)

    def dense_fwd():
        with torch.no_grad():
            return F.gelu(xk @ w1 + b1) @ w2 + b2

    def dense_fb():
        y = F.gelu(xk @ w1 + b1) @ w2 + b2
        y.sum().backward()

    cases = [("dense (T*k tokens)", dense_fwd, dense_fb)]
    base = None
    for impl in impls:
        if impl == "einsum" and T * T * K > 7e8:
            continue  # the (T, E, C) one-hot tensors (T*T*K elements) would not fit in memory
        moe = MoE(D, Fh, E, K, impl=impl, noise_std=0.0).to(device=device, dtype=dtype)
        if base is None:
            base = moe
        else:
            moe.load_state_dict(base.state_dict())
        cases.append((impl, *_moe_fns(moe, x)))
    fwd, fb = _interleaved([c[1] for c in cases], device, repeats), _interleaved([c[2] for c in cases], device, repeats)
    return [dict(impl=name, fwd_ms=f, fwdbwd_ms=b, fwd_ratio=f / fwd[0], fwdbwd_ratio=b / fb[0])
            for (name, _, _), f, b in zip(cases, fwd, fb)]


def _moe_fns(moe, x):
    xr = x.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            return moe(x).out

    def fb():
        o = moe(xr)
        (o.out.sum() + o.aux_loss).backward()

    return fwd, fb


def _interleaved(fns, device, repeats: int, warmup: int = 2) -> list[float]:
    """Median ms of each fn, timed round-robin so machine drift hits every candidate alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[i].append((time.perf_counter() - t) * 1e3)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def bench_model(device, dtype, repeats: int, batch: int = 64):
    from .models import create_model

    pairs = [("vit_fmnist_hybrid", {}), ("moe_vit_fmnist_hybrid", {}),
             ("moe_vit_fmnist_hybrid", {"moe_impl": "padded"}), ("moe_vit_fmnist_hybrid", {"moe_impl": "grouped"}),
             ("moe_vit_fmnist_hybrid", {"moe_impl": "loop"})]
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps, labels, params = [], [], []
    for name, kw in pairs:
        torch.manual_seed(0)
        model = create_model(name, **kw).to(device)
        steps.append(_train_step(model, x, y, dtype))
        labels.append(name + (f" ({kw['moe_impl']})" if kw else ""))
        params.append(sum(p.numel() for p in model.parameters()))
    ms = _interleaved(steps, device, repeats)
    return [dict(model=label, step_ms=m, ratio=m / ms[0], images_per_s=batch / m * 1e3, params=p)
            for label, m, p in zip(labels, ms, params)]


def _train_step(model, x, y, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            o = model(x)
        loss = F.cross_entropy(o.logits.float(), y) + o.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run_bench(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoEVisionError("--device cuda but CUDA is not available")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in ("float32", "bfloat16"):
        raise MoEVisionError(f"--dtype must be float32 or bfloat16, got {dtype_name!r}")
    dtype = getattr(torch, dtype_name)
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    result = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                            or platform.machine()), "torch": torch.__version__, "dtype": dtype_name,
              "threads": torch.get_num_threads(), "what": args.what}
    if args.what == "moe-layer":
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
        if args.shapes:
            wanted = {s.strip() for s in args.shapes.split(",")}
            pool = {s.name: s for s in GPU_SHAPES + CPU_SHAPES + TEST_SHAPES}.values()
            shapes = [s for s in pool if s.name in wanted or s.name.split(" ")[0] in wanted]
            if not shapes:
                raise MoEVisionError(f"--shapes {args.shapes!r} matches no shape")
        result["shapes"] = []
        for s in shapes:
            rows = bench_layer(s, device, dtype, repeats)
            result["shapes"].append({"shape": s.__dict__, "rows": rows})
            print(f"\n## {s.name}: T={s.tokens} D={s.dim} F={s.hidden} E={s.experts} k={s.top_k} "
                  f"({dtype_name}, {result['threads']} threads)")
            print(f"{'impl':<20}{'fwd ms':>9}{'x dense':>9}{'fwd+bwd ms':>12}{'x dense':>9}")
            for r in rows:
                print(f"{r['impl']:<20}{r['fwd_ms']:>9.2f}{r['fwd_ratio']:>9.2f}{r['fwdbwd_ms']:>12.2f}"
                      f"{r['fwdbwd_ratio']:>9.2f}")
    else:
        batch = args.batch or 64
        rows = bench_model(device, dtype, repeats, batch=batch)
        result["rows"], result["batch"] = rows, batch
        print(f"training step, batch {batch}, 28x28 ({dtype_name}, {result['threads']} threads)")
        print(f"{'model':<36}{'step ms':>9}{'x dense':>9}{'img/s':>8}{'params':>10}")
        for r in rows:
            print(f"{r['model']:<36}{r['step_ms']:>9.1f}{r['ratio']:>9.2f}{r['images_per_s']:>8.0f}"
                  f"{r['params'] / 1e6:>9.2f}M")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwritten to {args.json}")
    return 0
