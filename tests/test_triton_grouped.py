"""``impl="triton"`` (kernels/triton/grouped.py): the Triton grouped GEMMs that gather the tokens in their
loads and scatter the gate-weighted rows in their epilogue equal the per-expert ``loop`` reference,
forward and every gradient, in Triton's CPU interpreter (fp32; the interpreter's bf16 ``tl.dot`` is not
usable, so bf16 is checked on a GPU: the ``gpu`` test here and benchmarks/gpu_correctness.py); the tile
table covers every row exactly once; off a GPU and outside the interpreter the impl says what to use."""

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
