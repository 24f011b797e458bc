"""``impl="triton"`` (kernels/triton/grouped.py): the Triton grouped GEMMs that gather the tokens in their
loads and scatter the gate-weighted rows in their epilogue equal the per-expert ``loop`` reference,
forward and every gradient, in Triton's CPU interpreter (fp32; the interpreter's bf16 ``tl.dot`` is not
usable, so bf16 is checked on a GPU: the ``gpu`` test here and benchmarks/gpu_correctness.py); the tile
table covers every row exactly once; every launch compiles ahead of time for an H100 (sm_90) to tensor-core
(wgmma) GEMMs with pipelined asynchronous loads, within its shared memory; off a GPU and outside the
interpreter the impl says what to use."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moevision import MoE
from moevision.errors import ConfigError

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_triton_impl_on_cpu_tensors_says_what_to_use(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = MoE(16, 32, 4, 1, impl="triton", noise_std=0.0)
    with pytest.raises(ConfigError, match="cpu_fused" if HAS_TRITON else "needs Triton"):
        m(torch.randn(8, 16))


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (optional extra)")
def test_triton_grouped_gemms_equal_the_loop_reference_in_interpreter():
    code = textwrap.dedent("""
        import torch
        from moevision import MoE
        from moevision.kernels.triton import grouped as g

        # the tile table: every row of every expert in exactly one live tile, tiles inside their segment
        for counts in ([0, 5, 0, 33, 16], [16, 16], [0, 0, 1], [40]):
            offs = torch.tensor([0] + counts).cumsum(0)
            A = int(offs[-1])
            te, tr = g._tile_table(offs, A, 16)
            seen = torch.zeros(A, dtype=torch.int64)
            for e, r in zip(te.tolist(), tr.tolist()):
                if e < 0:
                    continue
                lo, hi = int(offs[e]), int(offs[e + 1])
                assert lo <= r < hi, (counts, e, r)
                seen[r:min(r + 16, hi)] += 1
            assert seen.eq(1).all(), counts

        def check(K, act="gelu", bias=True, E=4, T=40, D=32, F=48, frozen=False, empty=False, **kw):
            torch.manual_seed(10 * K + len(act))
            ref = MoE(D, F, E, K, impl="loop", noise_std=0.0, activation=act, bias=bias, **kw)
            m = MoE(D, F, E, K, impl="triton", noise_std=0.0, activation=act, bias=bias, **kw)
            m.load_state_dict(ref.state_dict())
            if empty:  # the last expert gets no token
                with torch.no_grad():
                    for mod in (ref, m):
                        mod.router.weight[E - 1] -= 100
            if frozen:
                for mod in (ref, m):
                    mod.experts.requires_grad_(False)
            x = torch.randn(T, D)
            go = torch.randn(T, D)
            res = []
            for mod in (ref, m):
                xr = x.clone().requires_grad_()
                o = mod(xr)
                ((o.out * go).sum() + o.aux_loss).backward()
                res.append([o.out.detach(), xr.grad] + [p.grad for p in mod.parameters() if p.requires_grad])
            for a, b in zip(*res):
                assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (K, act, bias, kw, (a - b).abs().max())
            return res

        for K in (1, 2, 3):
            check(K, "gelu")
        for act in ("gelu_tanh", "relu", "silu"):
            check(2 if act == "relu" else 1, act)
        check(1, bias=False)
        check(2, bias=False, E=6)
        check(2, capacity_factor=0.5)        # dropped assignments: gate 0, their gate gradient still exact
        r = check(1, empty=True)
        check(2, empty=True, E=6)
        check(2, frozen=True)                # only x, the gates and the router get gradients
        assert not g.ROWDOT_IN_KERNEL        # the default: the gate gradient's row dot in PyTorch (a bf16 GPU
        g.ROWDOT_IN_KERNEL = True            # miscompile, see grouped.py); the in-kernel one, still a switch:
        check(2, capacity_factor=0.5)
        check(1, empty=True)
        g.ROWDOT_IN_KERNEL = False
        # float64 and SwiGLU take the fused path (same function)
        check(2, "swiglu", bias=False)
        x = torch.randn(24, 16, dtype=torch.float64)
        m = MoE(16, 32, 4, 2, impl="triton", noise_std=0.0).double()
        ref = MoE(16, 32, 4, 2, impl="loop", noise_std=0.0).double()
        ref.load_state_dict(m.state_dict())
        assert torch.allclose(m(x).out, ref(x).out, atol=1e-12)
        # inside torch.func transforms (no functorch rule for the kernels' autograd.Function) it takes grouped
        from torch.func import functional_call, grad
        m = MoE(16, 32, 4, 2, impl="triton", noise_std=0.0)
        ref = MoE(16, 32, 4, 2, impl="loop", noise_std=0.0)
        ref.load_state_dict(m.state_dict())
        x = torch.randn(8, 16)
        gx = grad(lambda xx: functional_call(m, dict(m.named_parameters()), (xx,)).out.sum())(x)
        xr = x.clone().requires_grad_()
        ref(xr).out.sum().backward()
        assert torch.allclose(gx, xr.grad, atol=1e-5)
        print("TRITON-GROUPED-OK")
    """)
    paths = [str(Path(__file__).resolve().parents[1] / "src")] + [p for p in sys.path if p]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(paths))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "TRITON-GROUPED-OK" in r.stdout, r.stderr[-3000:]


_TT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64",
       torch.uint8: "u8", torch.int16: "i16"}


def _recorder(calls: list):
    """A stand-in for a Triton kernel: ``kernel[grid](*args, **kw)`` appends (kernel, args, kw) to calls
    instead of launching."""
    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((self.fn, args, kw))
    return Recorder


def _aot_compile(fn, args, kw, target):
    """Compile one recorded launch of a Triton kernel ahead of time for a GPU target, specialised the way a
    launch specialises (16-aligned pointers and ints divisible by 16 get the divisibility hint; ints equal to 1
    become constants), with no GPU: Triton's own AOT path (``triton.tools.compile``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    vals = dict(zip(names, args))
    vals.update({k: v for k, v in kw.items() if k in names})
    opts = {k: v for k, v in kw.items() if k not in names}
    sig, consts, attrs = {}, {}, {}
    for i, (n, p) in enumerate(zip(names, fn.params)):
        v = vals[n]
        if p.is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[n], consts[n] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[n], attrs[(i,)] = "*" + _TT[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        else:
            sig[n] = "i32" if abs(v) < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", *target),
                          options=opts)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (optional extra)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_launch_compiles_for_hopper_with_tensor_cores_and_pipelined_loads(monkeypatch, dtype):
    """No GPU here, but the kernels can still be compiled for one: the launches of a forward+backward
    (recorded, not run) at a ViT-B-like width are compiled for sm_90 as a launch would specialise them.
    Every GEMM must use Hopper's tensor-core instruction (wgmma) and asynchronous, pipelined loads
    (cp.async): without them the kernels would be correct and several times slower."""
    from moevision.kernels.triton import grouped as g

    calls = []
    Recorder = _recorder(calls)

    monkeypatch.setattr(g, "_gmm_kernel", Recorder(g._gmm_kernel))
    monkeypatch.setattr(g, "_wgrad_kernel", Recorder(g._wgrad_kernel))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # the GPU block sizes
    T, D, F, E = 512, 768, 3072, 8
    torch.manual_seed(0)
    for k in (1, 2):
        x = torch.randn(T, D, dtype=dtype, requires_grad=True)
        gates = torch.rand(T * k, requires_grad=True)
        w1 = torch.randn(E, D, F, dtype=dtype, requires_grad=True)
        w2 = torch.randn(E, F, D, dtype=dtype, requires_grad=True)
        b1 = torch.zeros(E, F, dtype=dtype, requires_grad=True)
        b2 = torch.zeros(E, D, dtype=dtype, requires_grad=True)
        exp = torch.randint(0, E, (T * k,))
        order = torch.argsort(exp, stable=True)
        offs = torch.zeros(E + 1, dtype=torch.int64)
        offs[1:] = torch.bincount(exp, minlength=E).cumsum(0)
        tok = torch.div(order, k, rounding_mode="floor")
        out = g.expert_mlp_triton(x, gates, w1, b1, w2, b2, tok, order, offs, k, "gelu")
        out.float().sum().backward()
    seen = {}
    for fn, args, kw in calls:  # one compile per distinct specialisation
        key = (fn.fn.__name__ if hasattr(fn, "fn") else str(fn), tuple(sorted((n, v) for n, v in kw.items())),
               tuple(a.dtype if isinstance(a, torch.Tensor) else a % 16 == 0 for a in args))
        seen.setdefault(key, (fn, args, kw))
    assert len(seen) >= 5  # first GEMM, second GEMM, backward GEMMs, the weight gradients
    for fn, args, kw in seen.values():
        compiled = _aot_compile(fn, args, kw, (90, 32))
        ptx = compiled.asm["ptx"]
        name = fn.__name__ if hasattr(fn, "__name__") else fn.fn.__name__
        assert compiled.metadata.shared <= 227 * 1024, (name, compiled.metadata.shared)  # an H100 block's limit
        if dtype == torch.bfloat16:
            assert "wgmma" in ptx, name
        assert "cp.async" in ptx, name


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("k", [1, 2])
def test_triton_grouped_on_gpu_bf16_close_to_the_loop(k):
    torch.manual_seed(0)
    ref = MoE(256, 512, 8, k, impl="loop", noise_std=0.0).cuda().bfloat16()
    m = MoE(256, 512, 8, k, impl="triton", noise_std=0.0).cuda().bfloat16()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2048, 256, device="cuda", dtype=torch.bfloat16)
    outs = []
    for mod in (ref, m):
        xr = x.clone().requires_grad_()
        o = mod(xr).out
        o.float().square().mean().backward()
        outs.append([o.float(), xr.grad.float()] + [p.grad.float() for p in mod.parameters()])
    for a, b in zip(*outs):
        assert ((a - b).norm() / a.norm().clamp_min(1e-12)).item() < 3e-2


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (optional extra)")
def test_router_kernels_compile_for_hopper(monkeypatch):
    """The router kernels' launches (recorded, not run: forward and backward, with and without training
    noise) compile ahead of time for an H100 (sm_90): the interpreter that tests their values does not
    check what only the GPU compiler sees (constexpr branches, libdevice calls such as erf)."""
    from moevision.kernels.triton import router as r

    calls = []
    Recorder = _recorder(calls)

    for name in ("_router_fwd_kernel", "_cv2_mean_kernel", "_router_bwd_kernel"):
        monkeypatch.setattr(r, name, Recorder(getattr(r, name)))
    G, S, E, K = 4, 197, 8, 2
    for noisy in (False, True):
        lg = torch.randn(G, S, E, requires_grad=True)
        n = torch.randn(G, S, E) if noisy else None
        probs, top_v, _, imp, load, aux = r.router_core_triton(lg, K, n, 0.125 if noisy else 0.0, weights=(0.01, 0.02))
        (probs.sum() + top_v.sum() + imp + load + aux).backward()
    names = sorted(fn.fn.__name__ for fn, _, _ in calls)
    assert names == sorted(["_router_fwd_kernel", "_cv2_mean_kernel", "_router_bwd_kernel"] * 2), names
    # x's gradient from the logit gradient (+ the experts' gradient): bf16 and fp32, with and without it, E = 8, 64
    monkeypatch.setattr(r, "_router_dx_kernel", Recorder(r._router_dx_kernel))
    for dt, E in ((torch.bfloat16, 8), (torch.float32, 64)):
        w = torch.randn(E, 768, dtype=dt)
        r.router_dx_triton(torch.randn(G * S, E), w, torch.randn(G * S, 768, dtype=dt))
        r.router_dx_triton(torch.randn(G * S, E), w, with_lowp_g=True)
    assert len(calls) == 10
    for fn, args, kw in calls:
        compiled = _aot_compile(fn, args, kw, (90, 32))
        assert compiled.asm["ptx"], fn.fn.__name__


def test_plan_index_kernel_compiles_for_hopper(monkeypatch):
    """The plan kernel (``pos`` and the segment ends in one launch) compiles ahead of time for an H100 (sm_90)
    with the sort's narrow keys (uint8, int16) and with int64 ids."""
    from moevision.kernels.triton import plan as pl
    from moevision.moe.dispatch import sort_by_expert

    calls = []
    monkeypatch.setattr(pl, "_plan_index_kernel", _recorder(calls)(pl._plan_index_kernel))
    for E in (8, 300, 1024):
        ids = torch.randint(0, E, (4096,))
        order, e_sorted, _ = sort_by_expert(ids, E, with_keys=True)
        pl.plan_indices(order, e_sorted, E, 1)
        pl.plan_indices(order, e_sorted.long(), E, 2)
    assert len(calls) == 6
    assert {args[1].dtype for _, args, _ in calls} == {torch.uint8, torch.int16, torch.int64}
    for fn, args, kw in calls:
        assert _aot_compile(fn, args, kw, (90, 32)).asm["ptx"], (fn.fn.__name__, args[1].dtype)
