"""Benchmarks, run side by side in one process (ratios, never absolute targets).

``moe-layer``: forward and forward+backward time of an MoE FFN layer over a dense FFN doing the same
active FLOPs (the FFN applied to T*k tokens: the limit), for each moevision dispatch implementation.
``loop`` is the per-expert loop (HF Mixtral style) and ``einsum`` the GShard one-hot dispatch, the two
baselines of ../shared/anchors. ``model``: one training step (AdamW) of an MoE ViT over its dense twin.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import MoEVisionError
from .utils import malloc_state as _malloc_state


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


LAYER_IMPLS = ("loop", "einsum", "sorted", "padded", "grouped", "fused", "triton", "cpu_fused")


def bench_layer(shape: LayerShape, device, dtype, repeats: int, impls=LAYER_IMPLS, compile: bool = False):
    """One shape: a row per implementation (ms and ratio to the dense FFN, eager; on CUDA also replayed
    from a CUDA graph). ``compile``: also time the dense FFN and the ``fused`` layer under
    ``torch.compile`` (each to its own compiled dense baseline; on CUDA also the compiled code replayed
    from a CUDA graph), in the ``compiled_*`` fields of those two rows."""
    from . import kernels
    from .moe import MoE

    torch.manual_seed(0)
    T, D, Fh, E, K = shape.tokens, shape.dim, shape.hidden, shape.experts, shape.top_k
    x = torch.randn(T, D, device=device, dtype=dtype)
    xk = torch.randn(T * K, D, device=device, dtype=dtype, requires_grad=True)  # in a network dgrad is needed
    w1 = (torch.randn(Fh, D, device=device, dtype=dtype) * D**-0.5).requires_grad_()
    w2 = (torch.randn(D, Fh, device=device, dtype=dtype) * Fh**-0.5).requires_grad_()
    b1 = torch.zeros(Fh, device=device, dtype=dtype, requires_grad=True)
    b2 = torch.zeros(D, device=device, dtype=dtype, requires_grad=True)

    def dense(inp):  # F.linear: the bias is fused into the GEMM (addmm / cuBLASLt epilogue)
        return F.linear(F.gelu(F.linear(inp, w1, b1)), w2, b2)

    def dense_fwd():
        with torch.no_grad():
            return dense(xk)

    def dense_fb():  # as in a training step: gradients reset to None first (optimizer.zero_grad()),
        for t in (xk, w1, w2, b1, b2):  # so backward writes them instead of adding into old ones
            t.grad = None
        dense(xk).sum().backward()

    cases = [("dense (T*k tokens)", dense_fwd, dense_fb)]
    base = None
    fused_moe = None
    for impl in impls:
        if impl == "cpu_fused" and device.type == "cuda":
            continue  # reads the segment sizes on the host: a CPU path
        if impl == "triton" and (device.type != "cuda" or not kernels.TRITON_AVAILABLE):
            continue  # Triton kernels: a GPU path (on CPU only in Triton's interpreter, far too slow to time)
        if impl == "einsum" and T * T * K > 7e8:
            continue  # the (T, E, C) one-hot tensors (T*T*K elements) would not fit in memory
        moe = MoE(D, Fh, E, K, impl=impl, noise_std=0.0).to(device=device, dtype=dtype)
        if base is None:
            base = moe
        else:
            moe.load_state_dict(base.state_dict())
        cases.append((impl, *_moe_fns(moe, x)))
        if impl == "fused":
            fused_moe = moe
        if impl == "fused" and device.type == "cuda" and kernels.TRITON_AVAILABLE:
            cases.append(("fused (no triton)", *_moe_fns(moe, x, triton=False)))
        if impl == "cpu_fused" and kernels.native_ops() is not None:
            # the same layer on its Python per-expert loop: the A/B of the native C++ op
            cases.append(("cpu_fused (python loop)", *_moe_fns(moe, x, native=False)))
            # the router as its own module and autograd nodes (before it was folded into the op): the A/B
            cases.append(("cpu_fused (router apart)", *_moe_fns(moe, x, fold=False)))
            # the native op with ATen's activation in place of its own fp32 kernels: the A/B of those
            cases.append(("cpu_fused (aten act)", *_moe_fns(moe, x, act=False)))
    mem = [_memory(fb, device) for _, _, fb in cases]
    fwd, fb = _interleaved([c[1] for c in cases], device, repeats), _interleaved([c[2] for c in cases], device, repeats)
    graph = [_graph_ms(c[2], device, repeats) for c in cases] if device.type == "cuda" else [None] * len(cases)
    rows = [dict(impl=name, fwd_ms=f, fwdbwd_ms=b, fwd_ratio=f / fwd[0], fwdbwd_ratio=b / fb[0],
                 saved_mib=m[0], peak_mib=m[1], graph_fwdbwd_ms=g,
                 graph_ratio=None if g is None or graph[0] is None else g / graph[0],
                 compiled_fwdbwd_ms=None, compiled_ratio=None, compiled_graph_ms=None, compiled_graph_ratio=None)
            for (name, _, _), f, b, m, g in zip(cases, fwd, fb, mem, graph)]
    if compile and fused_moe is not None:
        cdense = torch.compile(dense)

        def cdense_fb():
            for t in (xk, w1, w2, b1, b2):
                t.grad = None
            cdense(xk).sum().backward()

        _, cmoe_fb = _moe_fns(torch.compile(fused_moe), x)
        cfb = _interleaved([cdense_fb, cmoe_fb], device, repeats)
        cg = [_graph_ms(f, device, repeats) for f in (cdense_fb, cmoe_fb)] if device.type == "cuda" else [None, None]
        for row, ms, g in zip((rows[0], next(r for r in rows if r["impl"] == "fused")), cfb, cg):
            row.update(compiled_fwdbwd_ms=ms, compiled_ratio=ms / cfb[0], compiled_graph_ms=g,
                       compiled_graph_ratio=None if g is None or cg[0] is None else g / cg[0])
    return rows


def cuda_graph(fn, device=None, warmup: int = 2):
    """``fn`` captured in a ``torch.cuda.CUDAGraph`` (replay it with ``.replay()``), after ``warmup`` calls
    on a side stream (what capture needs: allocator pools and lazy initialisation settled)."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def _graph_ms(fn, device, repeats: int) -> float | None:
    """Median ms of ``fn`` replayed from a CUDA graph (no launch overhead), or None when it cannot be
    captured (an implementation that synchronises with the host)."""
    try:
        g = cuda_graph(fn, device)
    except Exception:  # noqa: BLE001 - any capture failure means "not capturable"
        torch.cuda.synchronize(device)
        return None
    return _interleaved([g.replay], device, repeats)[0]


def _memory(fb, device) -> tuple[float, float | None]:
    """(MiB of tensors saved for backward, CUDA peak MiB above the baseline or None on CPU) of one
    forward+backward. Saved tensors are counted once per storage."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except RuntimeError:
            pass
        return t

    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fb()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return sum(seen.values()) / 2**20, peak


def _moe_fns(moe, x, triton: bool = True, native: bool = True, fold: bool = True, act: bool = True):
    from . import kernels

    xr = x.clone().requires_grad_()

    def fwd():
        with torch.no_grad(), _switched(kernels.use_triton, triton, kernels.TRITON_AVAILABLE), \
                _switched(kernels.use_native, native, True), _switched(kernels.use_folded_router, fold, True), \
                _switched(kernels.use_fast_activations, act, True):
            return moe(x).out

    def fb():
        moe.zero_grad(set_to_none=True)
        xr.grad = None
        with _switched(kernels.use_triton, triton, kernels.TRITON_AVAILABLE), \
                _switched(kernels.use_native, native, True), _switched(kernels.use_folded_router, fold, True), \
                _switched(kernels.use_fast_activations, act, True):
            o = moe(xr)
            (o.out.sum() + o.aux_loss).backward()

    return fwd, fb


@contextlib.contextmanager
def _switched(switch, on: bool, restore: bool):
    """Context: run with a kernels switch (``use_triton`` / ``use_native`` / ...) off unless ``on``; afterwards set
    it back to ``restore``."""
    if on:
        yield
        return
    switch(False)
    try:
        yield
    finally:
        switch(restore)


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


def bench_model(device, dtype, repeats: int, batch: int = 64, compile: bool | str = False, impls=None):
    """Training step (AdamW) of MoE ViTs over their dense twin. CPU: the Fashion-MNIST hybrid pair of
    the main job (28x28). CUDA: ViT-B/16 at 224 px vs V-MoE-B/16 (E=8 top-2 in every other block,
    dropless), the shape of ../shared/anchors/vit_step_h100.txt. ``compile``: True or a torch.compile
    mode (``"reduce-overhead"`` adds CUDA graphs) for every model."""
    from .models import create_model
    from .models.vit import ViTConfig, VisionTransformer

    if device.type == "cuda":
        vit_b = dict(img_size=224, in_chans=3, num_classes=1000, patch_size=16, embed_dim=768, depth=12,
                     num_heads=12, mlp_ratio=4.0)
        moe_b = dict(vit_b, moe_layers="every_2", num_experts=8, top_k=2, capacity_factor=None)

        def make(kw):
            return VisionTransformer(ViTConfig(**kw))

        pairs = [("vit-b/16", lambda: make(vit_b))]
        for impl in impls or ("fused", "grouped"):
            pairs.append((f"v-moe-b/16 E8 k2 ({impl})", lambda impl=impl: make(dict(moe_b, moe_impl=impl))))
        x = torch.randn(batch, 3, 224, 224, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
    else:
        pairs = [("vit_fmnist_hybrid", lambda: create_model("vit_fmnist_hybrid"))]
        for impl in impls or ("grouped", "cpu_fused", "fused", "sorted", "padded", "loop"):
            pairs.append((f"moe_vit_fmnist_hybrid ({impl})",
                          lambda impl=impl: create_model("moe_vit_fmnist_hybrid", moe_impl=impl)))
        from . import kernels
        if (impls is None or "cpu_fused" in impls) and kernels.native_ops() is not None:
            # the A/B of the native C++ kernels: the same model with them switched off
            pairs.append((NO_NATIVE + "moe_vit_fmnist_hybrid (cpu_fused, python)",
                          lambda: create_model("moe_vit_fmnist_hybrid", moe_impl="cpu_fused")))
        x = torch.randn(batch, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
    steps, labels, params, peaks = [], [], [], []
    for label, make_model in pairs:
        torch.manual_seed(0)
        model = make_model().to(device)
        mode = compile if isinstance(compile, str) else None  # e.g. "reduce-overhead": CUDA graphs
        step = _train_step(torch.compile(model, mode=mode) if compile else model, x, y, dtype,
                           params=model.parameters())
        if label.startswith(NO_NATIVE):
            label, step = label[len(NO_NATIVE):], _without_native(step)
        peaks.append(_memory(step, device)[1])
        steps.append(step)
        labels.append(label)
        params.append(sum(p.numel() for p in model.parameters()))
    ms = _interleaved(steps, device, repeats)
    return [dict(model=label, step_ms=m, ratio=m / ms[0], images_per_s=batch / m * 1e3, params=p, peak_mib=pk)
            for label, m, p, pk in zip(labels, ms, params, peaks)]


NO_NATIVE = "\0no-native\0"  # label prefix: run this model with the native CPU kernels switched off


def _without_native(step):
    from . import kernels

    def run():
        with _switched(kernels.use_native, False, True):
            return step()

    return run


def _train_step(model, x, y, dtype, params=None):
    opt = torch.optim.AdamW(model.parameters() if params is None else params, lr=1e-3,
                            fused=x.device.type == "cuda")

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
    repeats = args.repeats if args.repeats is not None else (20 if device.type == "cuda" else 5)
    if repeats < 1:  # the CLI's argparse refuses these already; other callers of run_bench too
        raise MoEVisionError(f"--repeats must be >= 1, got {repeats}")
    if getattr(args, "batch", None) is not None and args.batch < 1:
        raise MoEVisionError(f"--batch must be >= 1, got {args.batch}")
    result = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                            or platform.machine()), "torch": torch.__version__, "dtype": dtype_name,
              "threads": torch.get_num_threads(), "what": args.what,
              "malloc": getattr(args, "malloc_state", None) or _malloc_state()}
    if args.what == "moe-layer":
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
        if args.shapes:
            wanted = {s.strip() for s in args.shapes.split(",")}
            pool = {s.name: s for s in GPU_SHAPES + CPU_SHAPES + TEST_SHAPES}.values()
            shapes = [s for s in pool if s.name in wanted or s.name.split(" ")[0] in wanted]
            unknown = sorted(w for w in wanted if not any(w in (s.name, s.name.split(" ")[0]) for s in pool))
            if unknown:  # every name must match: a typo would otherwise drop a shape silently
                known = ", ".join(dict.fromkeys(s.name.split(" ")[0] for s in pool))
                raise MoEVisionError(f"--shapes: no shape named {', '.join(map(repr, unknown))}; known: {known} "
                                     f"(or a full name, see moevision bench --help)")
        result["shapes"] = []
        for s in shapes:
            rows = bench_layer(s, device, dtype, repeats, compile=getattr(args, "compile", False))
            result["shapes"].append({"shape": s.__dict__, "rows": rows})
            print(f"\n## {s.name}: T={s.tokens} D={s.dim} F={s.hidden} E={s.experts} k={s.top_k} "
                  f"({dtype_name}, {result['threads']} threads)")
            graphs = device.type == "cuda"
            print(f"{'impl':<24}{'fwd ms':>9}{'x dense':>9}{'fwd+bwd ms':>12}{'x dense':>9}{'saved MiB':>11}"
                  f"{'peak MiB':>10}" + (f"{'graph f+b ms':>14}{'x dense':>9}" if graphs else ""))
            for r in rows:
                peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
                line = (f"{r['impl']:<24}{r['fwd_ms']:>9.3f}{r['fwd_ratio']:>9.2f}{r['fwdbwd_ms']:>12.3f}"
                        f"{r['fwdbwd_ratio']:>9.2f}{r['saved_mib']:>11.1f}{peak:>10}")
                if graphs:
                    g, gr = r["graph_fwdbwd_ms"], r["graph_ratio"]
                    line += f"{'-' if g is None else f'{g:.3f}':>14}{'-' if gr is None else f'{gr:.2f}':>9}"
                print(line)
            moe_rows = [r for r in rows[1:] if r["impl"] not in ("loop", "einsum")]
            if moe_rows:
                best = min(moe_rows, key=lambda r: r["fwdbwd_ratio"])
                base = {r["impl"]: r["fwdbwd_ratio"] for r in rows if r["impl"] in ("loop", "einsum")}
                print(f"best fwd+bwd: {best['impl']} {best['fwdbwd_ratio']:.2f}x dense"
                      + "".join(f", {k} {v:.2f}x" for k, v in base.items()))
            if getattr(args, "compile", False):
                for r in rows:
                    if r["compiled_fwdbwd_ms"] is not None:
                        g, gr = r["compiled_graph_ms"], r["compiled_graph_ratio"]
                        extra = "" if g is None else f"; replayed from a CUDA graph {g:.3f} ms = {gr:.2f}x"
                        print(f"torch.compile {r['impl']:<20} fwd+bwd {r['compiled_fwdbwd_ms']:.3f} ms = "
                              f"{r['compiled_ratio']:.2f}x compiled dense{extra}")
    else:
        batch = args.batch if args.batch is not None else 64
        rows = bench_model(device, dtype, repeats, batch=batch, compile=getattr(args, "compile", False))
        result["rows"], result["batch"], result["compiled"] = rows, batch, bool(getattr(args, "compile", False))
        size = "224x224" if device.type == "cuda" else "28x28"
        print(f"training step, batch {batch}, {size} ({dtype_name}, {result['threads']} threads"
              f"{', every model under torch.compile' if result['compiled'] else ''})")
        print(f"{'model':<36}{'step ms':>9}{'x dense':>9}{'img/s':>8}{'params':>10}{'peak MiB':>10}")
        for r in rows:
            peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            print(f"{r['model']:<36}{r['step_ms']:>9.1f}{r['ratio']:>9.2f}{r['images_per_s']:>8.0f}"
                  f"{r['params'] / 1e6:>9.2f}M{peak:>10}")
    if device.type == "cpu":
        from . import kernels
        result["native"] = kernels.native_status()
        print(result["native"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwritten to {args.json}")
    return 0
