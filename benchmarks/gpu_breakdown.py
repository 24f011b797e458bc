"""Where the ``fused`` MoE layer's forward+backward time goes on a GPU, from CUDA-graph replays (no launch
overhead): the whole layer, the router alone, the dispatch + experts + combine alone (a fixed plan), and the
dense FFN on T*k tokens, at the V-MoE-B and ViT-S target shapes (bf16). Each ``kernels`` switch named in
--ab is timed off and on, side by side in one interleaved run; then one profiler table of the layer's
kernels (eager: per-kernel device time, which a graph replay adds up without the gaps).
Usage: python benchmarks/gpu_breakdown.py [--ab SWITCH ...] [--sweep-bias] [--compile] [--noise 1.0] [--rows 40]
[--repeats 30] [--no-profile]. ``--noise`` times the layer in V-MoE's training form (router noise std / E, the
load loss). Switches: lowp_router (16-bit router GEMM), triton_router (router kernels), gather_sum (the
permutation's backward), rowbias (bias rows in the bias+activation kernels), triton (all Triton kernels),
lean_routing (session 16: lazy plan fields, fp32 gates in the combine, the plan kernel, the folded loss weights),
x_grad (session 17: x's two gradients summed in the router's logits node by one Triton kernel)."""
import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from moevision import MoE, kernels
from moevision.bench import cuda_graph
from moevision.kernels.fused import dispatch_fused

from moevision.kernels import ops as _ops
from moevision.moe import router as _router

try:
    from moevision.kernels.triton import bias_act as _BA
    from moevision.kernels.triton.combine import gather_sum as _gather_sum
except Exception:  # noqa: BLE001 - no Triton
    _BA = _gather_sum = None


def _set_gather_sum(on):
    _ops._triton_gather_sum = _gather_sum if on else None


def _set_rowbias(on):
    _BA.ROWBIAS = bool(on)


SWITCHES = {"lowp_router": kernels.use_lowp_router_gemm, "triton": kernels.use_triton,
            "triton_router": kernels.use_triton_router, "gather_sum": _set_gather_sum, "rowbias": _set_rowbias,
            "lean_routing": kernels.use_lean_routing, "x_grad": kernels.use_fused_x_grad}
p = argparse.ArgumentParser()
p.add_argument("--ab", nargs="*", default=["x_grad", "lean_routing", "lowp_router", "triton_router", "gather_sum", "rowbias"],
               choices=sorted(SWITCHES))
p.add_argument("--rows", type=int, default=40)
p.add_argument("--repeats", type=int, default=30)
p.add_argument("--no-profile", action="store_true")
p.add_argument("--noise", type=float, default=0.0, help="the layers' router noise_std (V-MoE trains with 1.0: "
               "noisy top-k and the load loss); 0 = the noise-free router (default)")
p.add_argument("--sweep-bias", action="store_true", help="time the bias+activation kernels' tile shapes alone "
               "(CUDA graphs of 10 launches) and run the layer with the best pair as switch 'bias_best'")
p.add_argument("--tiles2", action="store_true", help="sweep the second, smaller tile list (BIAS_TILES_2)")
p.add_argument("--compile", action="store_true", help="also torch.compile the layer (CUDA graph replay), "
               "with the 16-bit router GEMM under compile off and on")
args = p.parse_args()
BIAS_TILES = [(64, 128, 4), (32, 256, 4), (64, 256, 8), (16, 512, 4), (128, 128, 8), (64, 64, 4), (32, 128, 4),
              (128, 64, 4), (32, 512, 8), (128, 256, 8)]
BIAS_TILES_2 = [(32, 128, 4), (64, 64, 4), (32, 64, 4), (64, 32, 4), (128, 32, 4), (16, 128, 4), (32, 64, 2),
                (64, 64, 8), (16, 256, 4), (32, 128, 2), (128, 64, 8), (16, 64, 2)]  # session 13's second sweep
dev, dt = torch.device("cuda"), torch.bfloat16
print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", kernels.TRITON_AVAILABLE, flush=True)


DEFAULTS = {"lowp_router": True, "triton": True, "triton_router": True, "gather_sum": True, "lean_routing": True,
            "x_grad": True,
            "rowbias": bool(_BA.ROWBIAS) if _BA is not None else False, "bias_best": False}


@contextlib.contextmanager
def switched(name, on):
    if name is None:
        yield
        return
    SWITCHES[name](on)
    try:
        yield
    finally:
        SWITCHES[name](DEFAULTS[name])


def sweep_bias(A, Fh, E):
    """Each tile shape of the bias+activation kernels alone, forward and backward, on expert-sorted rows;
    returns the best (fwd, bwd) and prints them beside a copy of the same bytes (the bandwidth floor)."""
    torch.manual_seed(0)
    h = torch.randn(A, Fh, device=dev, dtype=dt)
    b = torch.randn(E, Fh, device=dev, dtype=dt) * 0.1
    e = torch.sort(torch.randint(0, E, (A,), device=dev)).values
    g = torch.randn(A, Fh, device=dev, dtype=dt)
    out = torch.empty_like(h)
    fn_f = _BA._TritonBiasAct.forward
    ctx = type("C", (), {"save_for_backward": lambda self, *t: setattr(self, "saved_tensors", t)})()

    def fwd():
        fn_f(ctx, h, b, e, "gelu")

    def bwd():
        _BA._TritonBiasAct.backward(ctx, g)

    def copy():
        out.copy_(h)

    def gelu_ref():
        torch.ops.aten.gelu_backward(g, h)

    res = {}
    base = interleaved_ms([capture_n(copy).replay, capture_n(gelu_ref).replay], 10)
    print(f"bias_act sweep A={A} F={Fh}: copy {base[0] * 100:.1f} us, torch gelu_backward (2 reads, 1 write, no bias) "
          f"{base[1] * 100:.1f} us")
    saved = dict(_BA.BLOCKS)
    fwd()
    for kind, fn in (("fwd", fwd), ("bwd", bwd)):
        times = []  # (ms per 10 launches, tile)
        for t in (BIAS_TILES_2 if args.tiles2 else BIAS_TILES):
            _BA.BLOCKS[kind] = t
            try:
                fn()
                torch.cuda.synchronize()
                times.append((interleaved_ms([capture_n(fn).replay], 10)[0], t))
            except Exception as ex:  # noqa: BLE001 - a shape that does not compile
                print(f"  {kind} {t}: failed {type(ex).__name__}: {str(ex)[:80]}")
        _BA.BLOCKS.update(saved)
        for ms, t in times:
            print(f"  {kind} {t}: {ms * 100:.1f} us")
        res[kind] = min(times)[1]
    print(f"  best: {res}", flush=True)
    return res


def capture_n(fn, n=10):
    return capture(lambda: [fn() for _ in range(n)])


def capture(fn):
    return cuda_graph(fn, warmup=3)


def interleaved_ms(replays, repeats):
    for r in replays:
        r()
    ts = [[] for _ in replays]
    for _ in range(repeats):
        for i, r in enumerate(replays):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5):
                r()
            torch.cuda.synchronize()
            ts[i].append((time.perf_counter() - t) / 5 * 1e3)
    return [sorted(v)[len(v) // 2] for v in ts]


def case(T, D, Fh, E, K):
    torch.manual_seed(0)
    xk = torch.randn(T * K, D, device=dev, dtype=dt, requires_grad=True)
    w1 = (torch.randn(Fh, D, device=dev, dtype=dt) * D**-0.5).requires_grad_()
    w2 = (torch.randn(D, Fh, device=dev, dtype=dt) * Fh**-0.5).requires_grad_()
    b1 = torch.zeros(Fh, device=dev, dtype=dt, requires_grad=True)
    b2 = torch.zeros(D, device=dev, dtype=dt, requires_grad=True)

    def dense():
        for t in (xk, w1, w2, b1, b2):
            t.grad = None
        F.linear(F.gelu(F.linear(xk, w1, b1)), w2, b2).sum().backward()

    m = MoE(D, Fh, E, K, impl="fused", noise_std=args.noise).to(dev, dt)
    xr = torch.randn(T, D, device=dev, dtype=dt).requires_grad_()

    def layer():
        m.zero_grad(set_to_none=True)
        xr.grad = None
        o = m(xr)
        (o.out.sum() + o.aux_loss).backward()

    def router():
        m.zero_grad(set_to_none=True)
        xr.grad = None
        plan = m.router(xr.view(1, T, D))
        (plan.gates.float().sum() + plan.aux_loss).backward()

    with torch.no_grad():
        plan0 = m.router(xr.detach().view(1, T, D))
    plan0.gates = plan0.gates.detach().requires_grad_()

    def experts():
        m.zero_grad(set_to_none=True)
        xr.grad = None
        plan0.gates.grad = None
        dispatch_fused(xr, plan0, m.experts).sum().backward()

    return dense, layer, router, experts, m, xr


def check_switch(m, xr, name):
    """The layer's output, aux loss and gradients with a switch off and on (bf16): they must agree."""
    res = []
    for on in (False, True):
        with switched(name, on):
            m.zero_grad(set_to_none=True)
            xr.grad = None
            torch.manual_seed(3)  # the same router noise both ways (with --noise)
            o = m(xr)
            (o.out.float().square().mean() + o.aux_loss).backward()
            res.append([o.out.float(), o.aux_loss.float(), xr.grad.float(), m.router.weight.grad.float(),
                        m.experts.w1.grad.float(), m.experts.b1.grad.float(), m.experts.b2.grad.float()])
    errs = [((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(*res)]
    print(f"{name} off vs on, rel err (out, aux, dx, d router w, d w1, d b1, d b2): "
          + " ".join(f"{e:.1e}" for e in errs), "ok" if max(errs) < 2e-2 else "FAIL", flush=True)


def check_vs_loop():
    """The fused layer with every default on, against impl='loop' (bf16, small shapes, k = 1, 2)."""
    for k in (1, 2):
        torch.manual_seed(k)
        ref = MoE(256, 512, 8, k, impl="loop", noise_std=0.0).to(dev, dt)
        m = MoE(256, 512, 8, k, impl="fused", noise_std=0.0).to(dev, dt)
        m.load_state_dict(ref.state_dict())
        x = torch.randn(4096, 256, device=dev, dtype=dt)
        res = []
        for mod in (ref, m):
            xr = x.clone().requires_grad_()
            o = mod(xr)
            (o.out.float().square().mean() + o.aux_loss).backward()
            res.append([o.out.float(), o.aux_loss.float(), xr.grad.float()] + [q.grad.float() for q in mod.parameters()])
        err = max(((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(*res))
        print(f"fused (all defaults) vs loop, bf16, k={k}: max rel err {err:.1e}", "ok" if err < 3e-2 else "FAIL",
              flush=True)


def compile_ab(m, xr, dense_ms):
    """The layer under torch.compile, replayed from a CUDA graph, with the 16-bit router GEMM kept out of
    the compiled graph (the default) and inside it; and that its output and gradients match eager."""
    import torch._dynamo

    ref = []
    m.zero_grad(set_to_none=True)
    xr.grad = None
    o = m(xr)
    (o.out.float().square().mean() + o.aux_loss).backward()
    ref = [o.out.float(), xr.grad.float(), m.router.weight.grad.float(), m.experts.w1.grad.float()]
    for flag in (False, True):
        _router._LOWP_ROUTER["compile"] = flag
        torch._dynamo.reset()
        cm = torch.compile(m)
        try:
            m.zero_grad(set_to_none=True)
            xr.grad = None
            o = cm(xr)
            (o.out.float().square().mean() + o.aux_loss).backward()
            got = [o.out.float(), xr.grad.float(), m.router.weight.grad.float(), m.experts.w1.grad.float()]
            errs = [((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(ref, got)]

            def fb():
                m.zero_grad(set_to_none=True)
                xr.grad = None
                oo = cm(xr)
                (oo.out.sum() + oo.aux_loss).backward()
            g = capture(fb)
            t = interleaved_ms([g.replay], args.repeats)[0]
            print(f"compiled layer, lowp router in graph={flag}: {t:.3f} ms  x{t / dense_ms:.3f} of (eager) dense; "
                  f"rel err vs eager (out, dx, d router w, d w1) " + " ".join(f"{e:.1e}" for e in errs), flush=True)
            del g
        except Exception as ex:  # noqa: BLE001
            print(f"compiled layer, lowp router in graph={flag}: FAILED {type(ex).__name__}: {str(ex)[:300]}")
    _router._LOWP_ROUTER["compile"] = False
    torch._dynamo.reset()


check_vs_loop()
for name, shape in (("vit-b/16 E8 k2", (12608, 768, 3072, 8, 2)), ("vit-s/16 E8 k1", (25216, 384, 1536, 8, 1))):
    print(f"\n######## {name} {shape}" + (f", router noise_std {args.noise}" if args.noise else ""), flush=True)
    dense, layer, router, experts, m, xr = case(*shape)
    for sw in args.ab:
        check_switch(m, xr, sw)
    ab = list(args.ab)
    if args.sweep_bias and _BA is not None:
        best = sweep_bias(shape[0] * shape[4], shape[2], shape[3])
        default = dict(_BA.BLOCKS)

        def _set_best(on, best=best, default=default):
            _BA.BLOCKS.update(best if on else default)
        SWITCHES["bias_best"] = _set_best
        ab.append("bias_best")
    labels, replays = ["dense FFN (T*k tokens)"], [capture(dense).replay]
    graphs = []  # keep the graphs alive
    for sw in [None] + ab:
        for on in ((True,) if sw is None else (not DEFAULTS[sw],)):
            tag = "default" if sw is None else (f"{sw}=on" if on else f"{sw}=off")
            with switched(sw, on):
                for part, fn in (("layer", layer), ("router", router), ("experts+dispatch", experts)):
                    try:
                        g = capture(fn)
                    except Exception as e:  # noqa: BLE001
                        print(f"{part} [{tag}] capture failed: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    graphs.append(g)
                    labels.append(f"{part} [{tag}]")
                    replays.append(g.replay)
    ms = interleaved_ms(replays, args.repeats)
    for lab, v in zip(labels, ms):
        print(f"{lab:<40} {v:8.3f} ms   x{v / ms[0]:.3f} of dense", flush=True)
    del graphs
    if args.compile:
        compile_ab(m, xr, ms[0])
    if args.no_profile:
        continue
    for _ in range(3):
        layer()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            layer()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    kern = [e for e in ka if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    tot = sum(getattr(e, "self_device_time_total", 0) for e in kern) / 5
    print(f"--- layer kernels per fwd+bwd: {sum(e.count for e in kern) / 5:.0f} kernels, {tot / 1e3:.3f} ms of device time")
    kern.sort(key=lambda e: -getattr(e, "self_device_time_total", 0))
    for e in kern[: args.rows]:
        us = getattr(e, "self_device_time_total", 0) / 5
        print(f"{us:8.1f} us  {e.count / 5:4.0f}x  {e.key[:110]}")
