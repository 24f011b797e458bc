"""The kernel registry and the fused fast path: equal to the references forward and backward, no host
sync when dropless, the Triton kernels equal their PyTorch references (in Triton's CPU interpreter
when Triton is installed)."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moevision import MoE, kernels
from moevision.errors import ConfigError
from moevision.kernels import ops

CONFIGS = [
    dict(top_k=1), dict(top_k=2), dict(top_k=3, activation="gelu_tanh"), dict(top_k=2, activation="relu"),
    dict(top_k=2, activation="silu", normalize_topk=True),
    dict(top_k=2, activation="swiglu", bias=False, normalize_topk=True),
    dict(top_k=2, capacity_factor=0.5), dict(top_k=1, capacity_factor=0.75, batch_priority=True),
    dict(top_k=2, capacity_factor=1.0, group_size=25),
    dict(top_k=1, router="expert_choice", capacity_factor=1.0),
]


def _pair(cfg, dtype, impl="fused"):
    cfg = dict(cfg)
    k = cfg.pop("top_k")
    torch.manual_seed(0)
    ref = MoE(16, 32, 4, k, impl="loop", noise_std=0.0, **cfg).to(dtype)
    fast = MoE(16, 32, 4, k, impl=impl, noise_std=0.0, **cfg).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run(m, x):
    xr = x.clone().requires_grad_()
    o = m(xr)
    (o.out.square().sum() + o.aux_loss).backward()
    return o.out.detach(), xr.grad, {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("impl", ["fused", "cpu_fused"])
def test_fused_equals_loop_reference(cfg, dtype, impl):
    ref, fast = _pair(cfg, dtype, impl)
    x = torch.randn(100, 16, dtype=dtype)
    (o1, gx1, gp1), (o2, gx2, gp2) = _run(ref, x), _run(fast, x)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.allclose(o1, o2, atol=tol, rtol=tol)
    assert torch.allclose(gx1, gx2, atol=tol, rtol=tol)
    for n in gp1:
        if gp1[n] is None:
            assert gp2[n] is None or not gp2[n].any()
        else:
            assert torch.allclose(gp1[n], gp2[n], atol=tol * 10, rtol=tol * 10), n


@pytest.mark.parametrize("frozen", ["experts", "input", "experts_and_input"])
def test_cpu_fused_skips_unneeded_gradients_and_still_matches(frozen):
    """Router-only training (frozen experts) and an input that needs no gradient: the hand-written
    backward computes only what is asked, and that part equals the loop reference."""
    ref, fast = _pair(dict(top_k=2), torch.float64, "cpu_fused")
    grads = []
    for m in (ref, fast):
        if "experts" in frozen:
            m.experts.requires_grad_(False)
        x = torch.randn(60, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        if "input" not in frozen:
            x.requires_grad_()
        o = m(x)
        (o.out.square().sum() + o.aux_loss).backward()
        grads.append(({n: p.grad for n, p in m.named_parameters()}, x.grad))
    (p1, x1), (p2, x2) = grads
    assert (x1 is None) == (x2 is None) and (x1 is None or torch.allclose(x1, x2, atol=1e-10))
    for n in p1:
        assert (p1[n] is None) == (p2[n] is None), n
        assert p1[n] is None or torch.allclose(p1[n], p2[n], atol=1e-10), n
    assert all(p2[n] is None for n in p2 if n.startswith("experts.")) == ("experts" in frozen)


def test_cpu_fused_expert_with_no_tokens_gets_zero_gradient():
    ref, fast = _pair(dict(top_k=1), torch.float64, "cpu_fused")
    for m in (ref, fast):
        with torch.no_grad():
            m.router.weight.zero_()
            m.router.weight[2, 0] = 1.0  # logit of expert 2 = x[:, 0] > 0, the others 0: all to expert 2
    x = torch.randn(40, 16, dtype=torch.float64)
    x[:, 0] = x[:, 0].abs() + 1.0
    (_, _, g1), (_, _, g2) = _run(ref, x), _run(fast, x)
    for e in (0, 1, 3):
        assert torch.equal(g2["experts.w1"][e], torch.zeros_like(g2["experts.w1"][e]))
    assert g2["experts.w1"][2].abs().sum() > 0
    for n in g1:
        if g1[n] is not None:
            assert torch.allclose(g1[n], g2[n], atol=1e-10), n


def test_auto_picks_cpu_fused_on_cpu_in_any_dtype():
    m = MoE(16, 32, 4, 2)
    assert kernels.resolve_impl("auto", torch.zeros(1, 16), m.experts) == "cpu_fused"
    m64 = m.double()
    assert kernels.resolve_impl("auto", torch.zeros(1, 16, dtype=torch.float64), m64.experts) == "cpu_fused"
    assert kernels.resolve_impl("padded", torch.zeros(1, 16), m.experts) == "padded"


def test_set_impl_chooses_for_auto_layers_and_validates():
    m = MoE(16, 32, 4, 2)
    try:
        kernels.set_impl("padded")
        assert kernels.get_impl() == "padded"
        assert kernels.resolve_impl(m.impl, torch.zeros(1, 16), m.experts) == "padded"
        m(torch.randn(8, 16))
    finally:
        kernels.set_impl(None)
    assert kernels.get_impl() == "auto"
    with pytest.raises(ConfigError, match="unknown dispatch impl 'nope'"):
        kernels.set_impl("nope")
    with pytest.raises(ConfigError, match="unknown dispatch impl"):
        MoE(16, 32, 4, 2, impl="nope")
    assert {"loop", "einsum", "sorted", "padded", "grouped", "fused"} <= set(kernels.list_impls())


class _SyncSpy(TorchDispatchMode):
    """Counts the ops that read a device value on the host (.item(), .tolist(), bool(tensor))."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cfg", [dict(top_k=2), dict(top_k=1, capacity_factor=1.0)])
def test_fused_dropless_and_capacity_need_no_host_sync(cfg):
    _, fast = _pair(cfg, torch.float32)
    x = torch.randn(64, 16, requires_grad=True)
    spy = _SyncSpy()
    with spy:
        o = fast(x)
        (o.out.sum() + o.aux_loss).backward()
    assert spy.syncs == []
    _, loop = _pair(cfg, torch.float32, impl="loop")  # the spy does see a sync where there is one
    spy2 = _SyncSpy()
    with spy2:
        loop(x)
    assert spy2.syncs


def test_permute_rows_backward_sums_the_k_copies():
    torch.manual_seed(0)
    T, K, D = 30, 3, 5
    exp = torch.randint(0, 4, (T * K,))
    order = torch.argsort(exp, stable=True)
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(T * K))
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(T * K, D, dtype=torch.float64)
    (ops.permute_rows(x, order, pos, K) * g).sum().backward()
    (x2.index_select(0, order // K) * g).sum().backward()  # autograd's index_add backward: the oracle
    assert torch.allclose(x.grad, x2.grad)


def test_combine_rows_matches_a_plain_formula():
    torch.manual_seed(0)
    T, K, D, E = 20, 2, 6, 3
    exp = torch.randint(0, E, (T * K,))
    order = torch.argsort(exp, stable=True)
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(T * K))
    y = torch.randn(T * K, D, dtype=torch.float64, requires_grad=True)
    g = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, D, dtype=torch.float64, requires_grad=True)
    out = ops.combine_rows(y, g, pos, order, b, exp)
    expect = torch.stack([sum(g[t, j] * (y[pos[t * K + j]] + b[exp[t * K + j]]) for j in range(K)) for t in range(T)])
    assert torch.allclose(out, expect)
    torch.autograd.gradcheck(lambda y, g, b: ops.combine_rows(y, g, pos, order, b, exp), (y, g, b))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu"])
def test_bias_act_gradients(act):
    torch.manual_seed(0)
    e = torch.randint(0, 3, (12,)).sort().values
    h = torch.randn(12, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda h, b: ops.bias_act_torch(h, b, e, act), (h, b))
    ref = ops.act_forward(act, h + b[e])
    assert torch.allclose(ops.bias_act_torch(h, b, e, act), ref)


def test_routing_stats_are_computed_only_when_read(monkeypatch):
    m = MoE(16, 32, 4, 2, capacity_factor=1.0)
    calls = []
    orig = MoE._compute_stats
    monkeypatch.setattr(MoE, "_compute_stats", lambda self, *a: calls.append(1) or orig(self, *a))
    torch.manual_seed(0)
    x = torch.randn(40, 16)
    o = m(x)
    assert calls == []
    tpe = o.stats.tokens_per_expert
    assert calls == [1] and float(tpe.sum()) == pytest.approx(80 * (1 - float(o.stats.dropped_fraction)))
    o.stats.importance
    assert calls == [1]


def _run_interpreted(code: str, marker: str) -> None:
    """Run ``code`` in a fresh Python with Triton's CPU interpreter on (TRITON_INTERPRET is read at import,
    hence the subprocess) and this checkout's ``src`` first on the path; it must print ``marker``."""
    paths = [str(Path(__file__).resolve().parents[1] / "src")] + [p for p in sys.path if p]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(paths))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert marker in r.stdout, r.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (optional extra)")
def test_triton_kernels_equal_references_in_interpreter():
    code = textwrap.dedent("""
        import torch
        from moevision.kernels.ops import bias_act_torch, combine_rows
        from moevision.kernels.triton.bias_act import bias_act_triton
        from moevision.kernels.triton.combine import combine_triton, segment_sum
        torch.manual_seed(0)
        for act in ("gelu", "gelu_tanh", "relu", "silu"):
            e = torch.randint(0, 5, (70,))
            h = torch.randn(70, 150, requires_grad=True); b = torch.randn(5, 150, requires_grad=True)
            h2, b2 = h.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
            g = torch.randn(70, 150)
            (bias_act_torch(h, b, e, act) * g).sum().backward(); (bias_act_triton(h2, b2, e, act) * g).sum().backward()
            assert torch.allclose(h.grad, h2.grad, atol=1e-4) and torch.allclose(b.grad, b2.grad, atol=1e-4), act
        for K in (1, 2, 3):
            T, D, E = 40, 150, 5
            exp = torch.randint(0, E, (T * K,)); order = torch.argsort(exp, stable=True)
            pos = torch.empty_like(order).scatter_(0, order, torch.arange(T * K))
            y = torch.randn(T * K, D, requires_grad=True); gt = torch.rand(T, K, requires_grad=True)
            b = torch.randn(E, D, requires_grad=True)
            y2, g2, b2 = (t.detach().clone().requires_grad_() for t in (y, gt, b))
            go = torch.randn(T, D)
            o1 = combine_rows(y, gt, pos, order, b, exp); o2 = combine_triton(y2, g2, pos, order, b2, exp, exp[order])
            (o1 * go).sum().backward(); (o2 * go).sum().backward()
            assert torch.allclose(o1, o2, atol=1e-5)
            for a, c in ((y.grad, y2.grad), (gt.grad, g2.grad), (b.grad, b2.grad)):
                assert torch.allclose(a, c, atol=1e-3, rtol=1e-4), K
        v = torch.randn(90, 40); e = torch.randint(0, 4, (90,))
        assert torch.allclose(segment_sum(v, e, 4), torch.zeros(4, 40).index_add_(0, e, v), atol=1e-5)
        # bias_act on expert-sorted rows (a 64-row tile meets 1 or 2 experts: two rows of b, not a gather;
        # a 3-row expert makes some tile meet 3: the gather), with and without the two-row path
        import moevision.kernels.triton.bias_act as BA
        e = torch.sort(torch.cat([torch.full((n,), i) for i, n in enumerate((50, 3, 80, 1, 66))])).values
        for rowbias in (True, False):
            BA.ROWBIAS = rowbias
            h = torch.randn(200, 150, requires_grad=True); b = torch.randn(5, 150, requires_grad=True)
            h2, b2 = h.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
            g = torch.randn(200, 150)
            o1, o2 = bias_act_torch(h, b, e, "gelu"), bias_act_triton(h2, b2, e, "gelu")
            (o1 * g).sum().backward(); (o2 * g).sum().backward()
            assert torch.allclose(o1, o2, atol=1e-5), rowbias
            assert torch.allclose(h.grad, h2.grad, atol=1e-4) and torch.allclose(b.grad, b2.grad, atol=1e-4), rowbias
        BA.ROWBIAS = True
        # the permutation's backward: one gather-sum kernel against index_select + sum
        from moevision.kernels.triton.combine import gather_sum
        for K in (1, 2, 3):
            A = 37 * K
            pos = torch.randperm(A); gA = torch.randn(A, 150)
            ref = gA.index_select(0, pos).view(37, K, 150).sum(1)
            assert torch.allclose(gather_sum(gA, pos, K), ref, atol=1e-5), K
        print("TRITON-INTERPRETER-OK")
    """)
    _run_interpreted(code, "TRITON-INTERPRETER-OK")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (optional extra)")
def test_triton_plan_indices_equal_torch_in_interpreter():
    """``pos`` (the inverse permutation), the segment ends and the sorted rows' tokens from the one-launch plan
    kernel against ``scatter_``, ``searchsorted`` and ``order // K``: experts empty at either end and in the middle, one expert, the narrow
    key dtypes, many blocks, no rows."""
    code = textwrap.dedent("""
        import torch
        from moevision.kernels.triton.plan import plan_indices
        from moevision.kernels.ops import plan_indices_torch
        from moevision.moe.dispatch import sort_by_expert
        g = torch.Generator().manual_seed(0)
        n = 0
        for E, A, used in ((1, 5, None), (8, 0, None), (8, 1, [5]), (8, 300, [2, 3, 6]), (8, 3000, None),
                           (5, 1200, [0, 4]), (64, 2100, None), (255, 700, [1, 254]), (300, 900, [7, 299]),
                           (40000, 500, [0, 39999, 12345])):
            if used is None:
                ids = torch.randint(0, E, (A,), generator=g)
            else:
                ids = torch.tensor(used)[torch.randint(0, len(used), (A,), generator=g)]
            order, e_sorted, _ = sort_by_expert(ids, E, with_keys=True)
            K = 1 + n % 3
            pos, offs, tok = plan_indices(order, e_sorted, E, K)
            assert torch.equal(tok.long(), order // K) and (tok is order if K == 1 else tok.dtype == torch.int32), K
            ref_pos = torch.empty(A, dtype=torch.int32).scatter_(0, order, torch.arange(A, dtype=torch.int32))
            ref_offs = torch.searchsorted(ids.sort().values, torch.arange(E), right=True).to(torch.int32)
            # the PyTorch reference the fused path runs without Triton agrees with these oracles too
            t_pos, t_offs, t_tok = plan_indices_torch(order, e_sorted, E, K)
            assert torch.equal(t_pos, ref_pos) and torch.equal(t_offs, ref_offs) and torch.equal(t_tok.long(), order // K)
            assert pos.dtype == offs.dtype == torch.int32 and offs.shape == (E,), (pos.dtype, offs.shape)
            assert torch.equal(pos, ref_pos), (E, A)
            assert torch.equal(offs, ref_offs), (E, A, offs, ref_offs)
            n += 1
        for bad in ((torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.uint8), 2),
                    (torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.uint8), 0),
                    (torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.uint8), 2, 0)):
            try:
                plan_indices(*bad)
                raise AssertionError(f"no error for {bad}")
            except ValueError:
                pass
        print("TRITON-PLAN-OK", n)
    """)
    _run_interpreted(code, "TRITON-PLAN-OK 10")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (optional extra)")
def test_triton_router_core_equals_eager_router_in_interpreter():
    """The Triton router kernels (softmax, top-k, importance sums; their backward) against the eager ops,
    alone and inside TopKRouter (plan, aux loss and every gradient), in Triton's CPU interpreter."""
    code = textwrap.dedent("""
        import torch
        from moevision.kernels.triton.router import router_core_triton
        from moevision.moe import router as R
        from moevision.moe import losses as L
        from moevision import MoE, kernels
        kernels.use_native(False)  # else the native CPU router core is taken first
        calls = []
        core = R._triton_router_core
        R._triton_router_core = lambda *a: calls.append(1) or core(*a)
        torch.manual_seed(0)
        for G, S, E, K in ((1, 70, 8, 2), (3, 37, 5, 1), (2, 45, 12, 3), (1, 20, 64, 4)):
            lg = torch.randn(G, S, E, requires_grad=True)
            lg2 = lg.detach().clone().requires_grad_()
            p1 = lg.softmax(-1); v1, i1 = p1.topk(K, dim=-1); imp1 = L.importance_cv2(p1)
            wi, wl = 0.7, 0.3  # the loss weights: the core's weighted sum is wi * importance + wl * load
            p2, v2, i2, imp2, load2, aux2 = router_core_triton(lg2, K, weights=(wi, wl))
            assert torch.equal(i1, i2) and torch.allclose(v1, v2, atol=1e-6) and torch.allclose(p1, p2, atol=1e-6)
            assert torch.allclose(imp1, imp2, rtol=1e-5, atol=1e-9), (imp1, imp2)
            assert float(load2) == 0.0 and torch.allclose(aux2, wi * imp1, rtol=1e-5, atol=1e-9), (aux2, imp1)
            aux1 = wi * imp1
            gp, gv, gi, ga = torch.randn_like(p1), torch.randn_like(v1), torch.randn_like(imp1) * 100, torch.randn(()) * 100
            for use in ((1, 1, 1, 1), (0, 1, 0, 0), (0, 0, 1, 0), (1, 0, 0, 0), (0, 1, 1, 0), (0, 0, 0, 1), (0, 0, 1, 1)):
                l1 = sum(((a * g).sum() for a, g, u in zip((p1, v1, imp1, aux1), (gp, gv, gi, ga), use) if u), torch.zeros(()))
                l2 = sum(((a * g).sum() for a, g, u in zip((p2, v2, imp2, aux2), (gp, gv, gi, ga), use) if u), torch.zeros(()))
                d1, = torch.autograd.grad(l1, lg, retain_graph=True); d2, = torch.autograd.grad(l2, lg2, retain_graph=True)
                assert torch.allclose(d1, d2, atol=1e-5), (G, S, E, K, use)
            # training noise: gates and top-k of softmax(l + sigma n), clean probs and importance, the smooth load
            sigma = 1.0 / E
            n = torch.randn(G, S, E)
            nz = lg + sigma * n
            pn1 = nz.softmax(-1); v1, i1 = pn1.topk(K, dim=-1); load1 = L.load_cv2(lg, nz, sigma, K)
            p2, v2, i2, imp2, load2, aux2 = router_core_triton(lg2, K, n, sigma, weights=(wi, wl))
            aux1 = wi * imp1 + wl * load1
            assert torch.equal(i1, i2) and torch.allclose(v1, v2, atol=1e-6) and torch.allclose(p1, p2, atol=1e-6)
            assert torch.allclose(imp1, imp2, rtol=1e-5, atol=1e-9) and torch.allclose(load1, load2, rtol=1e-5), (load1, load2)
            assert torch.allclose(aux1, aux2, rtol=1e-5), (aux1, aux2)
            gl = torch.randn_like(load1) * 100
            for use in ((1, 1, 1, 1, 1), (0, 1, 0, 0, 0), (0, 0, 0, 1, 0), (1, 0, 1, 0, 0), (0, 1, 1, 1, 0), (0, 0, 0, 0, 1),
                        (0, 1, 0, 1, 1)):
                l1 = sum(((a * g).sum() for a, g, u in zip((p1, v1, imp1, load1, aux1), (gp, gv, gi, gl, ga), use) if u), torch.zeros(()))
                l2 = sum(((a * g).sum() for a, g, u in zip((p2, v2, imp2, load2, aux2), (gp, gv, gi, gl, ga), use) if u), torch.zeros(()))
                d1, = torch.autograd.grad(l1, lg, retain_graph=True); d2, = torch.autograd.grad(l2, lg2, retain_graph=True)
                assert torch.allclose(d1, d2, atol=1e-5), ("noisy", G, S, E, K, use, (d1 - d2).abs().max())
        for bad in (dict(noise_GSE=torch.randn(1, 4, 3), sigma=0.1), dict(noise_GSE=torch.randn(1, 4, 4), sigma=0.0),
                    dict(weights=(float("nan"), 0.0))):
            try:
                router_core_triton(torch.randn(1, 4, 4), 1, **bad)
                raise AssertionError(f"no error for {bad}")
            except ValueError:
                pass
        # inside the router and the layer: capacity, renormalised gates, switch and z losses, groups
        # and in training with noise (the same draws: the RNG is reseeded for each run), load loss included
        for kw in (dict(), dict(capacity_factor=1.0), dict(normalize_topk=True, switch_loss_weight=0.01, z_loss_weight=1e-3),
                   dict(group_size=30), dict(noise_std=1.0, group_size=30), dict(noise_std=1.0, capacity_factor=1.0),
                   dict(noise_std=1.0, importance_on="gates"), dict(noise_std=1.0, importance_loss_weight=0.0),
                   dict(noise_std=1.0, load_loss_weight=0.0, z_loss_weight=1e-3)):
            torch.manual_seed(1)
            kw = dict(dict(noise_std=0.0), **kw)
            m = MoE(16, 32, 6, 2, impl="fused", **kw)
            x = torch.randn(90, 16)
            res = []
            for on in (False, True):
                R._TRITON_ROUTER_CPU["on"] = on
                m.zero_grad(set_to_none=True)
                xr = x.clone().requires_grad_()
                torch.manual_seed(2)
                o = m(xr)
                assert ("load" in o.stats.aux_losses) == bool(kw["noise_std"] and kw.get("load_loss_weight") != 0.0), kw
                (o.out.square().mean() + o.aux_loss).backward()
                res.append([o.out, o.aux_loss, xr.grad] + [p.grad for p in m.parameters()]
                           + [o.stats.aux_losses[k] for k in sorted(o.stats.aux_losses)])
            R._TRITON_ROUTER_CPU["on"] = False
            for a, b in zip(*res):
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), kw
        assert len(calls) == 9, calls  # the Triton core ran once per configuration (and only when switched on)
        print("TRITON-ROUTER-OK")
    """)
    _run_interpreted(code, "TRITON-ROUTER-OK")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (optional extra)")
def test_fused_layer_on_its_cuda_code_path_equals_loop_in_interpreter():
    """The whole ``fused`` layer as it runs on a GPU - the Triton router (with training noise and the load
    loss), bias + activation, combine and gather-sum kernels, fed the narrow (uint8) sort keys and int32
    positions - against the ``loop`` reference, forward and every gradient: CPU tensors take the CUDA code
    path (``is_cuda`` patched) and the kernels run in Triton's interpreter."""
    code = textwrap.dedent("""
        import torch
        torch.Tensor.is_cuda = property(lambda t: True)  # the CUDA code path on CPU tensors
        torch.cuda.get_device_capability = lambda *a: (9, 0)
        from moevision import MoE, kernels
        from moevision.moe import router as R
        from moevision.kernels import fused as FU, ops as OPS
        kernels.use_native(False)
        R._TRITON_ROUTER_CPU["on"] = True
        calls = {"router": 0, "bias_act": 0, "combine": 0, "gather_sum": 0, "plan": 0}
        def wrap(mod, name, key):
            f = getattr(mod, name)
            def g(*a, **k):
                calls[key] += 1
                return f(*a, **k)
            setattr(mod, name, g)
        wrap(R, "_triton_router_core", "router"); wrap(FU, "_triton_bias_act", "bias_act")
        wrap(FU, "_triton_combine", "combine"); wrap(OPS, "_triton_gather_sum", "gather_sum")
        wrap(FU, "_triton_plan", "plan")
        core = R._triton_router_core
        cases = ((1, 0.0, None, True), (2, 1.0, None, True), (2, 0.0, 1.0, True), (3, 1.0, None, True), (2, 1.0, None, False))
        for K, noise, cf, bias in cases:
            torch.manual_seed(K)
            ref = MoE(16, 32, 6, K, impl="loop", noise_std=noise, capacity_factor=cf, bias=bias)
            m = MoE(16, 32, 6, K, impl="fused", noise_std=noise, capacity_factor=cf, bias=bias)
            m.load_state_dict(ref.state_dict())
            x = torch.randn(90, 16)
            res = []
            for mod in (ref, m):
                R._triton_router_core = core if mod is m else None  # the reference routes with the eager ops
                xr = x.clone().requires_grad_()
                torch.manual_seed(5)  # the same router noise
                o = mod(xr)
                (o.out.square().mean() + o.aux_loss).backward()
                res.append([o.out, o.aux_loss, xr.grad] + [p.grad for p in mod.parameters()])
            for a, b in zip(*res):
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (K, noise, cf, bias, (a - b).abs().max())
        assert calls == {"router": 5, "bias_act": 4, "combine": 5, "gather_sum": 4, "plan": 5}, calls
        # bf16 (the GPU dtype): the combine takes the router's fp32 gates (RoutingPlan.fp32_gates), and x's gradient
        # is summed in the router's logits node (RoutingPlan.dispatch_x, the Triton x-gradient kernel) with
        # kernels.use_fused_x_grad on, by autograd's add with it off. Both match the same layer in fp32 (the loop,
        # eager router: the oracle) within bf16 rounding, and each other within one bf16 ulp or so
        seen, dx_calls = [], []
        comb = FU._triton_combine
        FU._triton_combine = lambda y, g, *a: seen.append(g.dtype) or comb(y, g, *a)
        rdx = R._triton_router_dx
        R._triton_router_dx = lambda *a, **k: dx_calls.append(1) or rdx(*a, **k)
        torch.manual_seed(0)
        m = MoE(16, 32, 6, 2, impl="fused", noise_std=1.0).to(torch.bfloat16)
        ref = MoE(16, 32, 6, 2, impl="loop", noise_std=1.0)
        ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
        x = torch.randn(96, 16, dtype=torch.bfloat16)
        res = []
        for mod, xgrad in ((ref, False), (m, True), (m, False)):
            kernels.use_fused_x_grad(xgrad)
            R._triton_router_core = core if mod is m else None
            for p in mod.parameters():
                p.grad = None
            xr = (x.float() if mod is ref else x).clone().requires_grad_()
            torch.manual_seed(5)
            o = mod(xr)
            (o.out.float().square().mean() + o.aux_loss).backward()
            res.append([o.out, o.aux_loss, xr.grad] + [p.grad for p in mod.parameters()])
        kernels.use_fused_x_grad(True)
        assert seen == [torch.float32, torch.float32], seen
        assert len(dx_calls) == 1, dx_calls  # fused with the switch on
        for other in res[1:]:
            for i, (a, b) in enumerate(zip(res[0], other)):
                a, b = a.float(), b.float()
                assert (a - b).abs().max() <= 2e-2 * a.abs().max() + 1e-6, ("bf16", i, (a - b).abs().max(), a.abs().max())
        for i, (a, b) in enumerate(zip(res[1], res[2])):
            a, b = a.float(), b.float()
            assert (a - b).abs().max() <= 8e-3 * a.abs().max() + 1e-6, ("xgrad", i, (a - b).abs().max(), a.abs().max())
        print("CUDA-PATH-OK")
    """)
    _run_interpreted(code, "CUDA-PATH-OK")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (optional extra)")
def test_router_dx_kernel_equals_reference_in_interpreter():
    """``router_dx_triton``: x's gradient gp + g @ w (fp32 sums, one rounding) against the same sum in fp64 - E from
    1 to its limit, with and without gp, a strided gp, ragged T and D, no rows - and its shape errors."""
    code = textwrap.dedent("""
        import torch, pytest
        from moevision.kernels.triton.router import router_dx_triton, ROUTER_DX_MAX_E
        torch.manual_seed(0)
        for T, D, E, dt, with_gp in ((1, 1, 1, torch.float32, True), (45, 70, 8, torch.bfloat16, True),
                                     (33, 129, 13, torch.float32, False), (64, 256, ROUTER_DX_MAX_E, torch.bfloat16, True),
                                     (0, 16, 4, torch.float32, True)):
            g = torch.randn(T, E)
            w = torch.randn(E, D, dtype=dt)
            gp = torch.randn(D, T, dtype=dt).t() if with_gp else None  # strided rows
            out = router_dx_triton(g, w, gp)
            out2, gl = router_dx_triton(g, w, gp, with_lowp_g=True)  # + the logit gradient rounded to w's dtype
            assert torch.equal(out2, out) and gl.dtype == dt and gl.shape == (T, E)
            assert bool(((gl.double() - g.double()).abs() <= 8e-3 * g.double().abs()).all())  # <= 1 ulp (bf16)
            ref = g.double() @ w.double() + (gp.double() if with_gp else 0)
            assert out.dtype == dt and out.shape == (T, D)
            # fp32 sums (error ~E * 2^-24 of the terms' magnitude), then for bf16 one rounding, under 1 ulp (2^-7
            # relative): the interpreter truncates where a GPU rounds to nearest
            scale = g.double().abs() @ w.double().abs() + (gp.double().abs() if with_gp else 0)
            tol = 1e-6 * scale + (8e-3 * ref.abs() if dt == torch.bfloat16 else 0)
            assert bool(((out.double() - ref).abs() <= tol).all()), (T, D, E, dt, (out.double() - ref).abs().max())
        with pytest.raises(ValueError, match="1 <= E"):
            router_dx_triton(torch.randn(4, ROUTER_DX_MAX_E + 1), torch.randn(ROUTER_DX_MAX_E + 1, 8))
        with pytest.raises(ValueError, match="gp must be"):
            router_dx_triton(torch.randn(4, 2), torch.randn(2, 8), torch.randn(4, 7))
        print("ROUTER-DX-OK")
    """)
    _run_interpreted(code, "ROUTER-DX-OK")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (optional extra)")
def test_router_x_grad_fork_double_backward_and_lifetime_in_interpreter():
    """With x's gradient summed in the router's node (CUDA code path, bf16): a gradient penalty (create_graph) through
    a differentiable dispatcher gives what it gives without the fork (the router's part a constant, as before), and
    the layer's output (its lazy stats hold the plan) does not keep the layer's input alive after backward."""
    code = textwrap.dedent("""
        import gc, weakref, torch
        torch.Tensor.is_cuda = property(lambda t: True)
        torch.cuda.get_device_capability = lambda *a: (9, 0)
        from moevision import MoE, kernels
        from moevision.moe import router as R
        kernels.use_native(False)
        R._TRITON_ROUTER_CPU["on"] = True
        res, alive = [], []
        for on in (False, True):
            kernels.use_fused_x_grad(on)
            torch.manual_seed(0)
            m = MoE(16, 32, 6, 2, impl="loop", noise_std=0.0).to(torch.bfloat16)
            x = torch.randn(4, 24, 16, dtype=torch.bfloat16).requires_grad_()
            g, = torch.autograd.grad(m(x).out.float().sum(), x, create_graph=True)
            g.float().square().sum().backward()
            res.append([p.grad.float() for p in m.parameters() if p.grad is not None])
            h = torch.nn.functional.layer_norm(x, (16,))
            ref = weakref.ref(h)
            out = m(h)
            (out.out.float().square().mean() + out.aux_loss).backward()
            del h
            gc.collect()
            alive.append(ref() is not None)
        kernels.use_fused_x_grad(True)
        assert len(res[0]) == len(res[1]) > 0
        for a, b in zip(*res):
            assert (a - b).abs().max() <= 2e-2 * a.abs().max() + 1e-6, (a - b).abs().max()
        assert alive == [False, False], alive
        print("FORK-OK")
    """)
    _run_interpreted(code, "FORK-OK")


def test_router_logits_fork_passes_x_on_and_sums_its_gradients():
    """``_LowpLogitsFork`` (16-bit router logits that pass x on): the same logits as ``_LowpLogits``, x passed on
    unchanged (an alias, no copy), and x's gradient the sum of both paths' - here through its ``addmm`` form (no
    Triton kernel on CPU tensors) - against autograd's own sum over ``_LowpLogits`` and a use of x; the weight's
    gradient the same; with no logit gradient, x's is the passed-on one alone. Taken by the router only for CUDA
    16-bit x that requires a gradient, with ``kernels.use_fused_x_grad`` on."""
    from moevision.moe import router as R

    torch.manual_seed(0)
    T, D, E = 37, 24, 6
    x0 = torch.randn(T, D, dtype=torch.bfloat16)
    w0 = torch.randn(E, D, dtype=torch.bfloat16)
    gl, gx = torch.randn(T, E), torch.randn(T, D, dtype=torch.bfloat16)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    logits, xp = R._LowpLogitsFork.apply(x, w)
    assert xp.data_ptr() == x.data_ptr() and torch.equal(xp, x)
    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = R._LowpLogits.apply(xr, wr)
    assert torch.equal(logits, ref)
    torch.autograd.backward([logits, xp * 1], [gl, gx])
    torch.autograd.backward([ref, xr * 1], [gl, gx])
    assert (x.grad.float() - xr.grad.float()).abs().max() <= 1e-2 * xr.grad.float().abs().max()
    exact = (gl.to(torch.bfloat16).double() @ w0.double() + gx.double())  # addmm: one rounding of the exact sum
    assert (x.grad.double() - exact).abs().max() <= 2 ** -7 * exact.abs().max()
    assert torch.equal(w.grad, wr.grad)
    x2 = x0.clone().requires_grad_()
    logits2, xp2 = R._LowpLogitsFork.apply(x2, w0)
    (xp2 * 3).sum().backward()  # only the passed-on path: x's gradient is that one alone
    assert torch.equal(x2.grad, torch.full_like(x0, 3))
    # taken for CUDA 16-bit x that requires a gradient, with the switch on (CPU x: the upcast router, no fork)
    m = MoE(D, 32, E, 2, impl="fused").to(torch.bfloat16)
    plan = m.router(x0.clone().requires_grad_().view(1, T, D))
    assert plan.dispatch_x is None


def test_routing_plan_lazy_fields_equal_eager_and_fp32_gates_never_stale():
    """The router's plan makes ``token_idx``, an all-kept ``kept`` and the rounded ``gates`` on first read: the
    same values as the eager tensors. ``fp32_gates()`` gives the router's fp32 gates only while ``plan.gates``
    is their unchanged rounding (a replaced or in-place-changed ``plan.gates`` must never feed the fused
    combine stale gates)."""
    import dataclasses

    from moevision.moe.types import LowpGates, RoutingPlan

    torch.manual_seed(0)
    for K in (1, 2, 3):
        m = MoE(8, 16, 4, K, impl="fused", noise_std=0.0).to(torch.bfloat16)
        x = torch.randn(1, 10, 8, dtype=torch.bfloat16)
        plan = m.router(x)
        g32 = plan.fp32_gates()
        assert g32 is not None and g32.dtype == torch.float32 and "_gates" in plan.__dict__
        assert plan.__dict__["_gates"] is None and plan.__dict__["_token_idx"] is None  # nothing made yet
        assert torch.equal(plan.token_idx, torch.arange(10 * K) // K)
        assert plan.kept.dtype == torch.bool and plan.kept.shape == (10 * K,) and bool(plan.kept.all())
        assert plan.gates.dtype == torch.bfloat16 and torch.equal(plan.gates, g32.to(torch.bfloat16))
        assert plan.fp32_gates() is g32  # read, unchanged: still linked
        assert plan.gates is plan.gates  # made once
        with torch.no_grad():
            plan.gates.mul_(0.5)  # changed in place: the fp32 source is stale now
        assert plan.fp32_gates() is None
        plan2 = m.router(x)
        other = dataclasses.replace(plan2, gates=plan2.gates * 2)  # a caller's new gates: no link
        assert other.fp32_gates() is None and plan2.fp32_gates() is not None
        plan2.gates = plan2.gates.clone()  # assigned: no link
        assert plan2.fp32_gates() is None
        # with a capacity, kept is a real mask; fp32 models keep plain fp32 gates (nothing to round)
        m32 = MoE(8, 16, 4, K, impl="fused", noise_std=0.0, capacity_factor=0.5)
        p32 = m32.router(torch.randn(1, 10, 8))
        assert p32.fp32_gates() is None and p32.gates.dtype == torch.float32 and not bool(p32.kept.all())
    kernels.use_lean_routing(False)  # the A/B switch: eager tensors, no fp32 link
    try:
        m = MoE(8, 16, 4, 2, impl="fused", noise_std=0.0).to(torch.bfloat16)
        plan = m.router(torch.randn(1, 10, 8, dtype=torch.bfloat16))
        assert plan.fp32_gates() is None and plan.__dict__["_token_idx"] is not None
        assert plan.__dict__["_kept"] is not None and plan.__dict__["_gates"].dtype == torch.bfloat16
    finally:
        kernels.use_lean_routing(True)
    ec = RoutingPlan(token_idx=None, expert_idx=torch.zeros(4, dtype=torch.long), gates=torch.ones(4), kept=None,
                     slot=None, probs_GSE=torch.ones(1, 4, 1), logits_GSE=torch.ones(1, 4, 1), capacity=None,
                     aux_losses={}, aux_loss=torch.zeros(()), top_k=0)
    with pytest.raises(ValueError, match="token_idx"):
        ec.token_idx
    with pytest.raises(ValueError, match="fp32"):
        RoutingPlan(token_idx=None, expert_idx=torch.zeros(2, dtype=torch.long),
                    gates=LowpGates(torch.ones(2, dtype=torch.float64), torch.bfloat16), kept=None, slot=None,
                    probs_GSE=None, logits_GSE=None, capacity=None, aux_losses={}, aux_loss=None)


@pytest.mark.skipif(not __import__("shutil").which(os.environ.get("CXX", "g++")),
                    reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_fused_layer_compiles_to_one_graph_and_matches_eager():
    """Under torch.compile the fused layer is one graph (no host sync, no graph break: what lets a GPU
    step be captured whole), and compiled forward+backward equals eager. bf16: the dtype of the GPU
    path (``torch._grouped_mm``'s compile-time shape function accepts bf16 only)."""
    torch.manual_seed(0)
    m = MoE(32, 64, 4, 2, impl="fused", noise_std=0.0).to(torch.bfloat16)
    x = torch.randn(128, 32, dtype=torch.bfloat16)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda t: m(t).out)(x)
    assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons

    def run(f):
        xr = x.clone().requires_grad_()
        o = f(xr)
        (o.out.float().square().sum() + o.aux_loss).backward()
        res = [o.out.float(), xr.grad.float()] + [p.grad.float() for p in m.parameters()]
        m.zero_grad(set_to_none=True)
        return res, o

    eager, _ = run(m)
    compiled, out = run(torch.compile(m))
    for a, b in zip(eager, compiled):
        assert (a - b).abs().max() <= 2e-2 * a.abs().max() + 1e-3
    assert out.stats.tokens_per_expert.sum() == 128 * 2  # statistics are computed inside the graph


@pytest.mark.parametrize("block", ["permute", "bias_act", "combine_bias", "combine"])
def test_fused_building_blocks_traced_by_dynamo_keep_their_gradients(block):
    """Each autograd building block of ``fused`` traced by dynamo + AOTAutograd (``aot_eager``: no
    inductor, so any difference is the tracing) gives eager's output and gradients. The regression
    guard of a bug seen on torch 2.11 (H200): dynamo traced the in-place combine into a backward fed a
    zero output gradient, so every gradient of the compiled layer was 0."""
    torch.manual_seed(0)
    T, K, D, F, E = 48, 2, 16, 24, 4
    exp = torch.randint(0, E, (T * K,))
    order = torch.argsort(exp, stable=True)
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(T * K))
    fns = {
        "permute": (lambda x: ops.permute_rows(x, order, pos, K), [torch.randn(T, D)]),
        "bias_act": (lambda h, b: ops.bias_act_torch(h, b, exp[order], "gelu"),
                     [torch.randn(T * K, F), torch.randn(E, F)]),
        "combine_bias": (lambda y, g, b: ops.combine_rows(y, g, pos, order, b, exp),
                         [torch.randn(T * K, D), torch.rand(T, K), torch.randn(E, D)]),
        "combine": (lambda y, g: ops.combine_rows(y, g, pos, order), [torch.randn(T * K, D), torch.rand(T, K)]),
    }
    fn, inputs = fns[block]

    def run(f):
        ins = [t.clone().requires_grad_() for t in inputs]
        out = f(*ins)
        (out.square().sum() + out.sum()).backward()
        return [out.detach()] + [t.grad for t in ins]

    torch._dynamo.reset()
    eager, traced = run(fn), run(torch.compile(fn, backend="aot_eager", fullgraph=True))
    for a, b in zip(eager, traced):
        assert b.abs().sum() > 0 and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_cpu_default_path_supports_create_graph_and_torch_func():
    """First-order gradients with create_graph=True (as gradient-penalty code calls them) and
    torch.func.grad both work on the CPU default path and equal plain autograd."""
    torch.manual_seed(0)
    m = MoE(16, 32, 4, 2, noise_std=0.0).double()
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)

    def loss(params, inp):
        o = torch.func.functional_call(m, params, (inp,))
        return o.out.square().sum() + o.aux_loss

    params = dict(m.named_parameters())
    g_plain = torch.autograd.grad(loss(params, x), x)[0]
    g_graph = torch.autograd.grad(loss(params, x), x, create_graph=True)[0]
    g_func = torch.func.grad(loss, argnums=1)({k: v.detach() for k, v in params.items()}, x.detach())
    assert torch.allclose(g_plain, g_graph, atol=1e-12) and torch.allclose(g_plain, g_func, atol=1e-10)


def test_relu_backward_in_place_matches_autograd_on_non_finite_grads():
    x = torch.tensor([-1.0, 0.0, 2.0, -3.0])
    g = torch.tensor([float("inf"), float("nan"), 1.5, float("-inf")])
    out = g.clone()
    ops.act_backward("relu", out, x, out=out)
    ref = torch.ops.aten.threshold_backward(g, torch.relu(x), 0)
    assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0)) and out[0] == 0 and out[3] == 0


def test_router_runs_on_the_meta_device():
    m = MoE(16, 32, 4, 2).to("meta")
    assert m.router.logits(torch.empty(1, 8, 16, device="meta")).shape == (1, 8, 4)


@pytest.mark.skipif(not __import__("shutil").which(os.environ.get("CXX", "g++")),
                    reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_cpu_fp32_layer_does_not_recompile_per_routing_pattern():
    """On CPU in fp32 the layer's experts run through cpu_fused, kept out of the graph: a new pattern
    of empty experts (12 tokens, 8 experts) must not trigger a recompile, and results equal eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    m = MoE(32, 64, 8, 1, noise_std=0.0)
    cm = torch.compile(m)
    frames = []
    for _ in range(6):
        x = torch.randn(12, 32, requires_grad=True)
        o = cm(x)
        (o.out.square().sum() + o.aux_loss).backward()
        gx, x.grad = x.grad, None
        ref = m(x)
        (ref.out.square().sum() + ref.aux_loss).backward()
        assert torch.allclose(o.out, ref.out, atol=1e-6) and torch.allclose(gx, x.grad, atol=1e-6)
        frames.append(counters["frames"]["total"])
    assert frames[2:] == [frames[2]] * 4, frames  # no new frames after warm-up


def test_import_is_light():
    """moevision must not import torch._dynamo at import time (~0.9 s for every CLI call)."""
    r = subprocess.run([sys.executable, "-c", "import sys, moevision; print('torch._dynamo' in sys.modules)"],
                       capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert r.stdout.strip() == "False"


@pytest.mark.skipif(not __import__("shutil").which(os.environ.get("CXX", "g++")),
                    reason="torch.compile on CPU needs a C++ compiler (g++)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_layer_compiles_whole_on_cpu_in_fp32_and_fp64(dtype):
    """Under torch.compile ``auto`` runs ``fused`` with its expert GEMMs as the opaque
    ``moevision::segment_mm`` operator: one graph, no break, equal to the loop reference."""
    torch._dynamo.reset()
    ref, m = _pair(dict(top_k=2), dtype, impl="auto")
    x = torch.randn(64, 16, dtype=dtype)
    explain = torch._dynamo.explain(lambda t: m(t).out)(x)
    assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons
    (o1, gx1, gp1), (o2, gx2, _) = _run(ref, x), _run(torch.compile(m), x)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert torch.allclose(o1, o2, atol=tol) and torch.allclose(gx1, gx2, atol=tol)
    assert all(torch.allclose(gp1[n], m.get_parameter(n).grad, atol=10 * tol) for n in gp1)


def test_segment_mm_equals_per_expert_products_and_gradchecks():
    from moevision.kernels.segment_mm import segment_mm

    torch.manual_seed(0)
    a = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor([7, 7, 20])  # expert 1 has no rows
    assert torch.equal(segment_mm(a, w, offs), torch.cat([a[:7] @ w[0], a[7:] @ w[2]]))
    assert torch.autograd.gradcheck(lambda a_, w_: segment_mm(a_, w_, offs), (a, w))
    segment_mm(a, w, offs).sum().backward()
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))


def test_k_major_expert_weights_give_the_same_layer():
    """``use_k_major_weights`` only changes the operand layout fed to ``torch._grouped_mm``: output and
    every gradient equal the default layout's (fp32 on CPU, where the op runs in eager mode)."""
    torch.manual_seed(0)
    m = MoE(32, 64, 4, 2, impl="fused", noise_std=0.0)
    x = torch.randn(96, 32)
    assert m.experts.grouped_mm_ok(x)

    def run():
        xr = x.clone().requires_grad_()
        o = m(xr).out
        (o.square().sum()).backward()
        res = [o.detach(), xr.grad] + [p.grad.clone() for p in m.parameters()]
        m.zero_grad(set_to_none=True)
        return res

    base = run()
    try:
        kernels.use_k_major_weights(True)
        from moevision.kernels.fused import _gemm_layout
        w = _gemm_layout(m.experts.w1)
        assert w.stride(-2) == 1 and torch.equal(w, m.experts.w1)  # really K-major, same values
        k_major = run()
    finally:
        kernels.use_k_major_weights(False)
    for a, b in zip(base, k_major):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_experts", [8, 255, 300, 40000])
def test_sort_by_expert_is_the_stable_argsort_of_the_ids(num_experts):
    """The narrow-key sort gives exactly the stable int64 argsort, small and large (radix path) inputs."""
    from moevision.moe.dispatch import sort_by_expert
    g = torch.Generator().manual_seed(num_experts)
    for n in (37, 20000):
        e = torch.randint(0, num_experts, (n,), generator=g)
        e[:3] = num_experts - 1  # the largest id is representable
        assert torch.equal(sort_by_expert(e, num_experts), torch.argsort(e, stable=True))
