"""The native CPU kernels (``kernels/native``, C++): the grouped expert MLP and the router core equal their
Python references (the per-expert loop of ``kernels/cpu.py`` and the eager router) forward and backward on
random inputs, for every activation, with and without biases, K = 1..3, empty experts, an expert cut
between two thread blocks, 1-3 threads, frozen parameters; bad arguments give clear errors; switched off,
the layer runs the Python path."""

import pytest
import torch

from moevision import MoE, kernels
from moevision.kernels import native

OPS = native.ops()
pytestmark = pytest.mark.skipif(OPS is None, reason=f"native kernels not built here: {native.status()}")


@pytest.fixture
def threads(request):
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


def _layer_grads(m, x, on: bool, seed: int = 1):
    kernels.use_native(on)
    try:
        m.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        torch.manual_seed(seed)  # the same router noise both ways
        o = m(xr)
        w = torch.linspace(-1, 1, o.out.numel(), dtype=x.dtype).view_as(o.out)
        ((o.out * w).sum() + o.out.square().sum() + o.aux_loss).backward()
        return [o.out.detach(), o.aux_loss.detach(), xr.grad] + [p.grad for p in m.parameters()]
    finally:
        kernels.use_native(True)


CASES = [
    dict(top_k=1), dict(top_k=2), dict(top_k=3, activation="gelu_tanh"), dict(top_k=2, activation="relu"),
    dict(top_k=2, activation="silu", bias=False), dict(top_k=2, activation="swiglu", bias=False),
    dict(top_k=2, noise_std=1.0, load_loss_weight=0.01, switch_loss_weight=0.01, z_loss_weight=1e-3),
    dict(top_k=1, capacity_factor=1.0), dict(top_k=2, normalize_topk=True, importance_on="gates"),
]


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("cfg", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_native_layer_equals_python_path(cfg, threads):
    cfg = dict(cfg)
    k = cfg.pop("top_k")
    torch.manual_seed(0)
    m = MoE(12, 20, 5, k, impl="cpu_fused", **cfg).double()
    x = torch.randn(3, 37, 12, dtype=torch.float64)  # 111 tokens: the thread blocks cut through experts
    fast, ref = _layer_grads(m, x, True), _layer_grads(m, x, False)
    assert len(fast) == len(ref)
    for a, b in zip(fast, ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-11, rtol=1e-9), (a - b).abs().max()


def _op_inputs(T, D, Fh, E, K, counts=None, dtype=torch.float64, seed=0, bias=True, glu=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, dtype=dtype, generator=g)
    if counts is None:
        exp = torch.randint(0, E, (T * K,), generator=g)
    else:  # the given number of rows per expert, in a random token-major layout
        exp = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))[torch.randperm(T * K, generator=g)]
    order = torch.sort(exp, stable=True).indices
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(T * K))
    offs = torch.zeros(E + 1, dtype=torch.long)
    offs[1:] = torch.bincount(exp, minlength=E).cumsum(0)
    w1 = torch.randn(E, D, Fh, dtype=dtype, generator=g) / D**0.5
    w2 = torch.randn(E, Fh, D, dtype=dtype, generator=g) / Fh**0.5
    b1 = torch.randn(E, Fh, dtype=dtype, generator=g) if bias else None
    b2 = torch.randn(E, D, dtype=dtype, generator=g) if bias else None
    w3 = torch.randn(E, D, Fh, dtype=dtype, generator=g) / D**0.5 if glu else None
    gates = torch.rand(T * K, dtype=dtype, generator=g)
    return dict(x=x, exp=exp, order=order, pos=pos, offs=offs, w1=w1, w2=w2, b1=b1, b2=b2, w3=w3, gates=gates, K=K)


def _oracle(p, act):
    """Plain per-assignment formula with autograd: out[t] = sum_j g * MLP_e(x[t])."""
    T, K = p["x"].shape[0], p["K"]
    x = p["x"].clone().requires_grad_()
    params = {n: p[n].clone().requires_grad_() for n in ("w1", "w2", "b1", "b2", "w3", "gates") if p[n] is not None}
    e = p["exp"]
    xa = x.repeat_interleave(K, 0)
    h = torch.einsum("ad,adf->af", xa, params["w1"][e]) + (params["b1"][e] if "b1" in params else 0)
    if "w3" in params:
        a = torch.nn.functional.silu(h) * torch.einsum("ad,adf->af", xa, params["w3"][e])
    else:
        a = {0: lambda v: torch.nn.functional.gelu(v), 1: lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
             2: torch.relu, 3: torch.nn.functional.silu}[act](h)
    y = torch.einsum("af,afd->ad", a, params["w2"][e]) + (params["b2"][e] if "b2" in params else 0)
    out = (y * params["gates"].unsqueeze(1)).view(T, K, -1).sum(1)
    return out, x, params


@pytest.fixture
def split(request):
    """The native op's thread split: whole experts where they balance (True, the default) or equal row
    blocks, an expert straddling two blocks computed in two parts (False)."""
    was = OPS.set_whole_experts(request.param)
    yield request.param
    OPS.set_whole_experts(was)


@pytest.mark.parametrize("split", [True, False], indirect=True)
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("case", [
    dict(T=50, K=1, counts=[20, 0, 30, 0], act=0),  # empty experts, one cut by the 2-thread block boundary
    dict(T=41, K=2, counts=None, act=1),
    dict(T=30, K=3, counts=[0, 0, 90, 0], act=2),  # every row to one expert: both blocks inside it
    dict(T=7, K=2, counts=None, act=3),  # fewer rows than one thread's minimum: one block
    dict(T=40, K=2, counts=None, act=3, bias=False, glu=True),
])
def test_native_ops_equal_the_plain_formula(case, threads, split):
    case = dict(case)
    act = case.pop("act")
    bias, glu = case.pop("bias", True), case.pop("glu", False)
    p = _op_inputs(case["T"], 6, 10, 4, case["K"], case["counts"], bias=bias, glu=glu)
    tok = torch.div(p["order"], p["K"], rounding_mode="floor")
    out, xs, h, h3, a, y = OPS.expert_mlp_fwd(p["x"], tok, p["gates"], p["pos"], p["K"], p["w1"], p["b1"], p["w2"],
                                              p["b2"], p["w3"], p["offs"], act)
    ref, x, params = _oracle(p, act)
    assert torch.allclose(out, ref, atol=1e-12)
    gout = torch.randn_like(out)
    ref.backward(gout)
    gx, gg, gw1, gb1, gw2, gb2, gw3 = OPS.expert_mlp_bwd(
        gout, tok, p["order"], p["pos"], p["gates"], p["K"], xs, h, h3, a, y, p["w1"], p["w2"], p["w3"], p["offs"], act,
        True, True, True, bias, True, bias, glu)
    assert torch.allclose(gx, x.grad, atol=1e-12)
    assert torch.allclose(gg, params["gates"].grad, atol=1e-12)
    for got, name in ((gw1, "w1"), (gw2, "w2"), (gb1, "b1"), (gb2, "b2"), (gw3, "w3")):
        if name in params:
            assert torch.allclose(got, params[name].grad, atol=1e-12), name
        else:
            assert got.numel() == 0, name


def test_native_backward_computes_only_what_is_asked():
    p = _op_inputs(30, 6, 10, 4, 2)
    tok = torch.div(p["order"], 2, rounding_mode="floor")
    _, xs, h, h3, a, y = OPS.expert_mlp_fwd(p["x"], tok, p["gates"], p["pos"], 2, p["w1"], p["b1"], p["w2"], p["b2"],
                                            None, p["offs"], 0)
    full = OPS.expert_mlp_bwd(torch.ones(30, 6, dtype=torch.float64), tok, p["order"], p["pos"], p["gates"], 2, xs, h,
                              h3, a, y, p["w1"], p["w2"], None, p["offs"], 0, True, True, True, True, True, True, False)
    only_w2 = OPS.expert_mlp_bwd(torch.ones(30, 6, dtype=torch.float64), tok, p["order"], p["pos"], p["gates"], 2, xs,
                                 h, h3, a, y, p["w1"], p["w2"], None, p["offs"], 0, False, False, False, False, True,
                                 False, False)
    assert [t.numel() for t in only_w2] == [0, 0, 0, 0, p["w2"].numel(), 0, 0]
    assert torch.allclose(only_w2[4], full[4], atol=1e-12)


def test_native_bf16_is_close_to_fp32():
    p = _op_inputs(64, 16, 32, 4, 2, dtype=torch.float32)
    tok = torch.div(p["order"], 2, rounding_mode="floor")
    args = lambda dt: [t.to(dt) if t.is_floating_point() else t for t in (  # noqa: E731
        p["x"], tok, p["gates"], p["pos"])]
    w = lambda dt: [p[n].to(dt) for n in ("w1", "b1", "w2", "b2")]  # noqa: E731
    x, t, g, pos = args(torch.float32)
    w1, b1, w2, b2 = w(torch.float32)
    ref = OPS.expert_mlp_fwd(x, t, g, pos, 2, w1, b1, w2, b2, None, p["offs"], 0)[0]
    x, t, g, pos = args(torch.bfloat16)
    w1, b1, w2, b2 = w(torch.bfloat16)
    out = OPS.expert_mlp_fwd(x, t, g, pos, 2, w1, b1, w2, b2, None, p["offs"], 0)[0]
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.fixture
def fast_act(request):
    """The native op's fp32 activation kernels on (the default) or off (ATen's)."""
    was = OPS.set_fast_act(request.param)
    yield request.param
    OPS.set_fast_act(was)


FP64_ACTS = {0: lambda v: torch.nn.functional.gelu(v), 1: lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
             3: torch.nn.functional.silu}


@pytest.mark.parametrize("act", [0, 1, 3], ids=["gelu", "gelu_tanh", "silu"])
def test_fp32_activation_kernels_match_fp64(act):
    """The native op's fp32 activations (GELU: erf by A&S 7.1.26, or the tanh form; SiLU; exp by a
    polynomial), their backward and the bias gradient summed in the same pass, against fp64 autograd over
    [-12, 12], the tails and exact zeros."""
    g = torch.Generator().manual_seed(0)
    h = torch.cat([torch.linspace(-12, 12, 96_000), torch.randn(96_000, generator=g) * 3,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 90.0, -90.0] * 12)]).view(-1, 96)
    b = torch.randn(96, generator=g) * 0.1
    gout = torch.randn(h.shape, generator=g)
    hb, a, gh, db = OPS.act_fp32(h, act, b, gout)
    assert torch.equal(hb, h + b)  # the bias add is the plain fp32 add
    x = hb.double().requires_grad_()
    ref = FP64_ACTS[act](x)
    ref.backward(gout.double())
    ulp = 2.0**-23  # fp32's own rounding of the result, beside the absolute bound
    assert ((a.double() - ref.detach()).abs() <= 1e-6 + ulp * ref.detach().abs()).all()
    assert ((gh.double() - x.grad).abs() <= 2e-6 + ulp * x.grad.abs()).all()
    assert ((db.double() - x.grad.sum(0)).abs() <= 1e-6 * x.grad.abs().sum(0) + 1e-6).all()
    assert torch.equal(a[hb == 0], torch.zeros_like(a[hb == 0])) and (a[hb < -15] <= 0).all()
    _, a0, g0, db0 = OPS.act_fp32(h, act, None, gout)  # no bias; no grad: the last two are empty
    assert torch.allclose(a0.double(), FP64_ACTS[act](h.double()), atol=1e-6)
    assert OPS.act_fp32(h, act, None, None)[2].numel() == 0
    hn = torch.tensor([[float("nan"), 1.0, -1.0]])  # a NaN stays a NaN (training can notice), the rest is untouched
    _, an, gn, dbn = OPS.act_fp32(hn, act, None, torch.ones_like(hn))
    assert an[0, 0].isnan() and gn[0, 0].isnan() and dbn[0].isnan() and an[0, 1:].isfinite().all()
    with pytest.raises(RuntimeError, match="no fp32 kernel for activation code 2"):
        OPS.act_fp32(h, 2, None, None)  # ReLU stays on ATen's kernels


def test_fp32_swiglu_kernels_match_fp64():
    g = torch.Generator().manual_seed(0)
    h = torch.cat([torch.linspace(-12, 12, 48_000), torch.randn(48_000, generator=g) * 3]).view(-1, 96)
    h3 = torch.randn(h.shape, generator=g) * 2
    gout = torch.randn(h.shape, generator=g)
    _, a, gh, gh3 = OPS.act_fp32(h, 3, None, gout, h3)
    x, x3 = h.double().requires_grad_(), h3.double().requires_grad_()
    ref = torch.nn.functional.silu(x) * x3
    ref.backward(gout.double())
    ulp = 2.0**-23  # products of rounded fp32 factors: a few ulps of the result (ATen's SwiGLU is as far)
    for got, want in ((a, ref.detach()), (gh, x.grad), (gh3, x3.grad)):
        assert ((got.double() - want).abs() <= 1e-6 + 4 * ulp * want.abs()).all()
    with pytest.raises(RuntimeError, match="SwiGLU takes act SILU"):
        OPS.act_fp32(h, 0, None, gout, h3)


@pytest.mark.parametrize("fast_act", [True, False], indirect=True)
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("split", [True, False], indirect=True)
@pytest.mark.parametrize("case", [dict(T=50, K=1, counts=[20, 0, 30, 0], bias=True, act=0),
                                  dict(T=41, K=2, counts=None, bias=False, act=0),
                                  dict(T=41, K=2, counts=None, bias=True, act=1),
                                  dict(T=41, K=2, counts=None, bias=True, act=3),
                                  dict(T=41, K=2, counts=None, bias=False, act=3, glu=True),
                                  dict(T=41, K=2, counts=None, bias=True, act=3, glu=True)],
                         ids=["gelu,k1", "gelu,nobias", "gelu_tanh", "silu", "swiglu", "swiglu,bias"])
def test_native_op_fp32_activations_match_fp64_oracle(case, threads, split, fast_act):
    """The fp32 op with each activation that has kernels of its own (bias fused into the activation pass, the
    bias gradient into the activation backward; SwiGLU in one pass each way), or with ATen's, against the
    plain formula in fp64, forward and every gradient."""
    case = dict(case)
    bias, act, glu = case.pop("bias"), case.pop("act"), case.pop("glu", False)
    p = _op_inputs(case["T"], 6, 40, 4, case["K"], case["counts"], bias=bias, glu=glu)
    ref, x, params = _oracle(p, act)
    gout = torch.randn_like(ref)
    ref.backward(gout)
    f = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in p.items()}
    tok = torch.div(p["order"], p["K"], rounding_mode="floor")
    out, xs, h, h3, a, y = OPS.expert_mlp_fwd(f["x"], tok, f["gates"], p["pos"], p["K"], f["w1"], f["b1"], f["w2"],
                                              f["b2"], f["w3"], p["offs"], act)
    grads = OPS.expert_mlp_bwd(gout.float(), tok, p["order"], p["pos"], f["gates"], p["K"], xs, h, h3, a, y, f["w1"],
                               f["w2"], f["w3"], p["offs"], act, True, True, True, bias, True, bias, glu)
    names = ["out", "x", "gates", "w1", "b1", "w2", "b2", "w3"]
    want = [ref, x.grad] + [params[n].grad if n in params else None for n in names[2:]]
    for got, w, name in zip([out, *grads], want, names, strict=True):
        if w is None:
            assert got.numel() == 0, name
            continue
        assert (got.double() - w).abs().max() < 2e-5 * max(1.0, w.abs().max().item()), name


def _fast_act_runs(m, x):
    runs = {}
    for on in (True, False):
        was = OPS.set_fast_act(on)
        try:
            runs[on] = [t for t in _layer_grads(m, x, True) if t is not None]
        finally:
            OPS.set_fast_act(was)
    return runs[True], runs[False]


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "swiglu"])
def test_native_fp32_activation_kernels_are_used_and_agree_with_aten(activation):
    """Switched on, the fp32 layer differs from ATen's in the last bits (so the kernels ran) and agrees with it
    to fp32 accuracy; float64 and ReLU layers never take them (bit-equal either way)."""
    torch.manual_seed(0)
    m = MoE(16, 40, 4, 2, impl="cpu_fused", activation=activation, bias=activation != "swiglu")
    x = torch.randn(2, 30, 16)
    on, off = _fast_act_runs(m, x)
    assert not all(torch.equal(a, b) for a, b in zip(on, off))
    for a, b in zip(on, off, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    on, off = _fast_act_runs(m.double(), x.double())
    assert all(torch.equal(a, b) for a, b in zip(on, off, strict=True))
    torch.manual_seed(0)
    on, off = _fast_act_runs(MoE(16, 40, 4, 2, impl="cpu_fused", activation="relu"), x)
    assert all(torch.equal(a, b) for a, b in zip(on, off, strict=True))


@pytest.mark.parametrize("act,glu", [(0, False), (1, False), (3, False), (3, True)],
                         ids=["gelu", "gelu_tanh", "silu", "swiglu"])
def test_native_fp32_activation_backward_takes_its_kernels(act, glu):
    """From the same saved forward, the backward with the activation kernels on differs from ATen's in the last
    bits of the activation's gradients (so they ran in backward too) and agrees to fp32 accuracy."""
    p = _op_inputs(41, 6, 40, 4, 2, None, dtype=torch.float32, bias=not glu, glu=glu)
    tok = torch.div(p["order"], 2, rounding_mode="floor")
    saved = OPS.expert_mlp_fwd(p["x"], tok, p["gates"], p["pos"], 2, p["w1"], p["b1"], p["w2"], p["b2"], p["w3"],
                               p["offs"], act)[1:]
    gout = torch.randn(41, 6)
    grads = {}
    for on in (True, False):
        was = OPS.set_fast_act(on)
        try:
            grads[on] = OPS.expert_mlp_bwd(gout, tok, p["order"], p["pos"], p["gates"], 2, *saved, p["w1"], p["w2"],
                                           p["w3"], p["offs"], act, True, True, True, not glu, True, not glu, glu)
        finally:
            OPS.set_fast_act(was)
    for i in (0, 2) + ((6,) if glu else (3,)):  # x, w1, and b1 or w3: through the activation's backward
        assert not torch.equal(grads[True][i], grads[False][i]), i
    for a, b in zip(grads[True], grads[False], strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_native_ops_reject_inconsistent_arguments():
    p = _op_inputs(20, 6, 10, 4, 1)
    bad = p["offs"].clone()
    bad[-1] += 1
    with pytest.raises(RuntimeError, match="offsets end at"):
        OPS.expert_mlp_fwd(p["x"], p["order"], p["gates"], p["pos"], 1, p["w1"], p["b1"], p["w2"], p["b2"], None, bad, 0)
    for dt in (torch.float64, torch.float32):  # the fp32 activation kernels read b1 raw: its shape is checked
        q = {k: (v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in p.items()}
        with pytest.raises(RuntimeError, match=r"b1 must be \(E, F\) = \(4, 10\), got \[4, 9\]"):
            OPS.expert_mlp_fwd(q["x"], p["order"], q["gates"], p["pos"], 1, q["w1"], q["b1"][:, :9], q["w2"], q["b2"],
                               None, p["offs"], 0)
        with pytest.raises(RuntimeError, match=r"b2 must be \(E, D\)"):
            OPS.expert_mlp_fwd(q["x"], p["order"], q["gates"], p["pos"], 1, q["w1"], q["b1"], q["w2"], q["b2"][:3],
                               None, p["offs"], 0)
    _, xs, h, h3, a, y = OPS.expert_mlp_fwd(p["x"], p["order"], p["gates"], p["pos"], 1, p["w1"], p["b1"], p["w2"],
                                            p["b2"], None, p["offs"], 0)
    with pytest.raises(RuntimeError, match="saved h / a / h3 must be"):
        OPS.expert_mlp_bwd(torch.ones(20, 6, dtype=torch.float64), p["order"], p["order"], p["pos"], p["gates"], 1, xs,
                           h[:, :9], h3, a, y, p["w1"], p["w2"], None, p["offs"], 0, True, True, True, True, True, True,
                           False)
    with pytest.raises(RuntimeError, match="unknown activation"):
        OPS.expert_mlp_fwd(p["x"], p["order"], p["gates"], p["pos"], 1, p["w1"], p["b1"], p["w2"], p["b2"], None,
                           p["offs"], 9)
    with pytest.raises(RuntimeError, match="top_k must be in"):
        OPS.router_fwd(p["x"], torch.randn(4, 6, dtype=torch.float64), None, 5)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_native_router_core_equals_eager(k, threads):
    """Logits, softmax (with noise), top-k (ties: lower index first, as ``max``) and the backward from grads
    of all three outputs, against autograd on the eager formula; 1-3 thread blocks (each its own logits
    GEMM, and a partial w-gradient summed after the region)."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(90, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    noise = torch.randn(90, 5, dtype=torch.float64, generator=g) * 0.1
    x.data[0] = 0  # a row of equal logits: ties
    noise[0] = 0
    logits, probs, top_v, top_i = OPS.router_fwd(x.detach(), w.detach(), noise, k)
    ref_l = x @ w.t()
    ref_p = (ref_l + noise).softmax(-1)
    assert torch.allclose(logits, ref_l, atol=1e-13) and torch.allclose(probs, ref_p, atol=1e-13)
    ref_v, ref_i = ref_p.topk(k, dim=-1)
    assert torch.equal(top_i[1:], ref_i[1:]) and torch.allclose(top_v, ref_v, atol=1e-13)
    assert top_i[0].tolist() == list(range(k))
    gl, gp, gv = torch.randn_like(ref_l), torch.randn_like(ref_p), torch.randn(90, k, dtype=torch.float64)
    ((ref_l * gl).sum() + (ref_p * gp).sum() + (ref_p.gather(1, top_i) * gv).sum()).backward(retain_graph=True)
    dx, dw = OPS.router_bwd(x.detach(), w.detach(), probs, top_i, gl, gp, gv, True, True)
    assert torch.allclose(dx, x.grad, atol=1e-12) and torch.allclose(dw, w.grad, atol=1e-12)
    dx2, dw2 = OPS.router_bwd(x.detach(), w.detach(), probs, top_i, None, None, gv, False, True)
    assert dx2.numel() == 0 and dw2.shape == w.shape
    # the grads autograd hands over may be broadcast (a loss on a sum over tokens) or transposed views:
    # read through their strides
    gp_row = torch.randn(1, 5, dtype=torch.float64, generator=g).expand(90, 5)
    gl_t = torch.randn(5, 90, dtype=torch.float64, generator=g).t()
    gv_b = torch.randn((), dtype=torch.float64, generator=g).expand(90, k)
    x.grad = w.grad = None
    ((ref_l * gl_t).sum() + (ref_p * gp_row).sum() + (ref_p.gather(1, top_i) * gv_b).sum()).backward()
    dx3, dw3 = OPS.router_bwd(x.detach(), w.detach(), probs, top_i, gl_t, gp_row, gv_b, True, True)
    assert torch.allclose(dx3, x.grad, atol=1e-12) and torch.allclose(dw3, w.grad, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_native_router_softmax_is_accurate_in_fp32_and_keeps_nan(threads):
    """The fp32 router softmax against fp64 over logits from -150 to 150 apart: within a few fp32 roundings of
    each probability (the exp is the native one: ATen's exp_ on each thread's block was off by up to 2e-5 in
    about one process in ten), an underflowing probability exactly 0, and a NaN input row NaN, not a finite
    softmax."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 6, generator=g) * torch.logspace(-2, 1.5, 301).unsqueeze(1)
    w = torch.randn(8, 6, generator=g)
    x[7, 2] = float("nan")
    logits, probs, _, _ = OPS.router_fwd(x, w, None, 2)
    ref = logits.double().softmax(-1)
    fin = torch.ones(301, dtype=torch.bool)
    fin[7] = False
    assert bool(probs[7].isnan().all())
    err = (probs[fin].double() - ref[fin]).abs()
    # a few roundings, plus the fp32 rounding of l - max (what any fp32 softmax has): exp's relative error |l - max| ulp
    shift = (logits - logits.amax(-1, keepdim=True)).abs().double()[fin]
    tol = ref[fin] * (4e-7 + 2 ** -23 * shift) + 1e-37
    assert bool((err <= tol).all()), (err / tol).max()
    assert bool((probs[fin][ref[fin] < 1e-40] == 0).all()) and bool((ref[fin] < 1e-40).any())


def test_native_router_core_single_rows_and_bad_grads():
    """Fewer rows than a thread block (one block), and a gradient of the wrong shape is refused."""
    x, w = torch.randn(3, 4), torch.randn(6, 4)
    logits, probs, top_v, top_i = OPS.router_fwd(x, w, None, 2)
    assert torch.allclose(probs, (x @ w.t()).softmax(-1), atol=1e-6)
    with pytest.raises(RuntimeError, match="wrong shape"):
        OPS.router_bwd(x, w, probs, top_i, None, torch.randn(3, 5), None, True, True)


def test_switched_off_the_layer_runs_the_python_path(monkeypatch):
    called = []
    real = native.ops

    def spy():
        o = real()
        called.append(o is not None)
        return o

    monkeypatch.setattr(native, "ops", spy)
    m = MoE(8, 16, 4, 2)
    m(torch.randn(10, 8)).out.sum().backward()
    assert called and all(called)
    called.clear()
    kernels.use_native(False)
    try:
        assert "switched off" in kernels.native_status()
        m(torch.randn(10, 8)).out.sum().backward()
    finally:
        kernels.use_native(True)
    assert called and not any(called)
    assert "in use" in kernels.native_status()


def test_env_variable_disables_the_build(monkeypatch):
    monkeypatch.setenv("MOEVISION_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {"tried": False, "ops": None, "reason": "", "enabled": True})
    assert native.ops() is None
    assert "MOEVISION_NATIVE=0" in native.status()


def test_bench_model_times_the_python_path_beside_the_native_one():
    from moevision.bench import bench_model

    rows = bench_model(torch.device("cpu"), torch.float32, repeats=1, batch=4, impls=("cpu_fused",))
    assert [r["model"] for r in rows] == ["vit_fmnist_hybrid", "moe_vit_fmnist_hybrid (cpu_fused)",
                                          "moe_vit_fmnist_hybrid (cpu_fused, python)"]
    assert all(r["step_ms"] > 0 for r in rows)
    assert "in use" in kernels.native_status()  # switched back on after the A/B


@pytest.mark.parametrize("E", [1, 5, 300])
def test_native_counting_sort_is_the_stable_argsort(E):
    g = torch.Generator().manual_seed(E)
    exp = torch.randint(0, E, (997,), generator=g)
    exp[:3] = E - 1
    order, pos, offs = OPS.sort_by_expert(exp, E)
    assert torch.equal(order, torch.sort(exp, stable=True).indices)
    assert torch.equal(pos[order], torch.arange(997))
    assert torch.equal(offs, torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(exp, minlength=E).cumsum(0)]))
    with pytest.raises(RuntimeError, match="out of"):
        OPS.sort_by_expert(torch.tensor([0, E]), E)


def test_cpu_floor_benchmark_compares_the_same_function(monkeypatch):
    """benchmarks/cpu_floor.py: the native op with every expert holding the dense weights is checked equal
    to the dense FFN (output and grad of x) before it is timed, for E=1, equal and routed segments."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_floor.py"
    spec = importlib.util.spec_from_file_location("cpu_floor", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(mod.SHAPES, "tiny", (96, 16, 32, 4, 2))
    r = mod.run("tiny", repeats=1)
    assert set(r["ratio"]) == {"dense", "native E=1", "native E=4, equal", "native E=4, routed", "layer (cpu_fused)"}
    assert r["ratio"]["dense"] == 1.0 and all(v > 0 for v in r["ms"].values())
    assert sum(r["routed_counts"]) == 96 * 2 and r["equal_counts"] == [48] * 4
    assert set(r["gemm_us_per_row_1thread"]) == {48, 96 * 2 // torch.get_num_threads()}


# -- the router folded into cpu_fused's node (kernels.cpu.topk_moe_fused)

def _node(t):
    """The name of the autograd node under t's view nodes."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__.startswith("ViewBackward"):
        fn = fn.next_functions[0][0]
    return type(fn).__name__ if fn is not None else None

def _fold_grads(m, x, fold: bool, seed: int = 1, x_grad: bool = True):
    kernels.use_folded_router(fold)
    try:
        m.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(x_grad)
        torch.manual_seed(seed)  # the same router noise both ways
        o = m(xr)
        name = _node(o.out)
        w = torch.linspace(-1, 1, o.out.numel(), dtype=x.dtype).view_as(o.out)
        ((o.out * w).sum() + o.out.square().sum() + 3.0 * o.aux_loss).backward()
        st = o.stats
        res = [o.out.detach(), o.aux_loss.detach(), xr.grad, st.tokens_per_expert, st.importance, st.dropped_fraction,
               st.dropped_token_fraction, torch.tensor(float(st.capacity or -1)),
               st.router_entropy] + [st.aux_losses[k] for k in sorted(st.aux_losses)] + [p.grad for p in m.parameters()]
        return name, sorted(st.aux_losses), res
    finally:
        kernels.use_folded_router(True)


FOLD_CASES = [
    dict(top_k=1), dict(top_k=2), dict(top_k=3, activation="gelu_tanh", group_size=37),
    dict(top_k=1, noise_std=0.0), dict(top_k=2, noise_std=0.0, group_size=37),
    dict(top_k=2, importance_loss_weight=0.0), dict(top_k=2, load_loss_weight=0.0),
    dict(top_k=1, importance_loss_weight=0.0, load_loss_weight=0.0),
    dict(top_k=2, activation="swiglu", bias=False, load_loss_weight=0.3, importance_loss_weight=0.2),
    dict(top_k=2, activation="relu", noise_std=3.0, load_loss_weight=1.0, group_size=3),
    dict(top_k=1, capacity_factor=1.0), dict(top_k=2, capacity_factor=0.5, group_size=37),
    dict(top_k=2, capacity_factor=0.75, batch_priority=True, capacity_multiple_of=1),
    dict(top_k=3, capacity_factor=0.6, batch_priority=True, bpr_score="sum", noise_std=0.0, group_size=3),
]


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("cfg", FOLD_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_router_folded_in_equals_the_separate_router(cfg, threads):
    """One autograd node for router + losses + experts (hand-written loss gradients, the router's x grad
    added into the experts') against router -> plan -> dispatch with autograd: same output, aux loss,
    statistics and every gradient, with noise, groups, the load loss and loss weights of 0."""
    cfg = dict(cfg)
    k = cfg.pop("top_k")
    torch.manual_seed(0)
    m = MoE(12, 20, 5, k, impl="cpu_fused", **cfg).double()
    x = torch.randn(3, 37, 12, dtype=torch.float64)
    n1, l1, fold = _fold_grads(m, x, True)
    n0, l0, ref = _fold_grads(m, x, False)
    assert n1 == "_TopKMoEBackward" and n0 != n1, (n1, n0)  # the folded node ran, and only when on
    assert l1 == l0
    for a, b in zip(fold, ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-11, rtol=1e-9), (a - b).abs().max()


def test_router_folded_in_frozen_parts_and_fp32():
    torch.manual_seed(0)
    m = MoE(16, 24, 4, 2, impl="cpu_fused", load_loss_weight=0.5)
    x = torch.randn(2, 50, 16)
    m.router.weight.requires_grad_(False)
    _, _, fold = _fold_grads(m, x, True, x_grad=False)
    _, _, ref = _fold_grads(m, x, False, x_grad=False)
    for a, b in zip(fold, ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    assert fold[2] is None and m.router.weight.grad is None


def test_router_folded_in_steps_aside_for_hooks_and_other_options():
    torch.manual_seed(0)
    m = MoE(8, 12, 4, 2, impl="cpu_fused").double()
    x = torch.randn(20, 8, dtype=torch.float64)
    assert _node(m(x).out) == "_TopKMoEBackward"
    seen = []
    h = m.router.register_forward_hook(lambda mod, i, o: seen.append(o))
    assert _node(m(x).out) != "_TopKMoEBackward" and len(seen) == 1  # the hook still runs
    h.remove()
    m.router.normalize_topk = True  # an option it does not fold
    assert _node(m(x).out) != "_TopKMoEBackward"
    m.router.normalize_topk = False
    m.eval()  # eval: no noise, folded too
    assert _node(m(x).out) == "_TopKMoEBackward"


def test_cv2_gradient_is_autograd_s():
    from moevision.kernels.cpu import _cv2_grad
    from moevision.moe.losses import cv_squared

    v = torch.rand(3, 7, dtype=torch.float64, requires_grad=True)
    cv, g = _cv2_grad(v.detach())
    ref = cv_squared(v)
    ref.sum().backward()
    assert torch.allclose(cv, ref.detach()) and torch.allclose(g, v.grad)
    # by hand: v = (1, 3): m = 2, var = 1, cv = 1/4; d/dv = (2(v - m) / (2 * 4)) - 1 * 2 * 2 / (2 * 16)
    cv, g = _cv2_grad(torch.tensor([[1.0, 3.0]], dtype=torch.float64), eps=0.0)
    assert cv.item() == 0.25 and torch.allclose(g, torch.tensor([[-0.25 - 0.125, 0.25 - 0.125]], dtype=torch.float64))


def _ranges(counts, nt, whole=True):
    offs = torch.zeros(len(counts) + 1, dtype=torch.long)
    offs[1:] = torch.tensor(counts).cumsum(0)
    return offs, OPS.expert_thread_ranges(offs, nt, whole).tolist()


@pytest.mark.parametrize("counts,nt,whole_expected", [
    ([776, 873, 829, 832, 802, 805, 802, 681], 2, True),  # a real router's ViT-Ti k1 counts
    ([398, 397, 424, 406, 405, 407, 337, 426], 2, True),
    ([5, 3, 9, 1, 7, 2], 3, True),  # 27 rows on 3 threads: largest first gives 9 | 7+2 | 5+3+1
    ([1000, 10, 10], 2, False),  # one expert holds most rows: no even split of whole experts, blocks
    ([3, 0, 0, 5], 1, True),
])
def test_thread_split_covers_every_row_once_and_keeps_experts_whole_when_balanced(counts, nt, whole_expected):
    offs, r = _ranges(counts, nt)
    A = sum(counts)
    rows = sorted((lo, hi) for _, lo, hi in r if hi > lo)
    assert [lo for lo, _ in rows] == [0] + [hi for _, hi in rows[:-1]] and (not rows or rows[-1][1] == A)
    load = [sum(hi - lo for t, lo, hi in r if t == i) for i in range(nt)]
    starts = set(offs.tolist())
    whole = all(lo in starts and hi in starts for _, lo, hi in r)
    if whole_expected:
        assert whole and max(load) * 100 <= (A // nt) * 101 + 800
    else:
        assert [hi - lo for _, lo, hi in r] == [(t + 1) * A // nt - t * A // nt for t in range(nt)]  # equal blocks
    if nt == 2 and whole_expected:  # the subset-sum split is exact: the best split of these counts
        best = min(abs(A - 2 * sum(c for c, b in zip(counts, bits) if b))
                   for bits in __import__("itertools").product([0, 1], repeat=len(counts)))
        assert max(load) - min(load) == best
    _, blocks = _ranges(counts, nt, whole=False)
    assert [hi - lo for _, lo, hi in blocks] == [(t + 1) * A // nt - t * A // nt for t in range(nt)]
    assert all(hi == lo for _, lo, hi in _ranges([0, 0, 0, 0], 2)[1])  # no rows: nothing to run


def test_router_folded_in_records_the_same_routing():
    torch.manual_seed(0)
    m = MoE(8, 12, 4, 2, impl="cpu_fused", capacity_factor=0.75, record_routing=True).double()
    x = torch.randn(2, 30, 8, dtype=torch.float64)
    got = {}
    for fold in (True, False):
        kernels.use_folded_router(fold)
        try:
            torch.manual_seed(3)
            o = m(x)
            assert (_node(o.out) == "_TopKMoEBackward") == fold
            st = o.stats
            got[fold] = [st.expert_idx, st.gates, st.kept, st.probs, st.tokens_per_expert, st.dropped_fraction]
        finally:
            kernels.use_folded_router(True)
    assert not bool(got[True][2].all())  # the capacity drops some
    for a, b in zip(got[True], got[False], strict=True):
        assert a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=1e-12)


@pytest.mark.parametrize("switch", ["fold", "whole"])
def test_cpu_ab_benchmark_checks_both_paths_agree(monkeypatch, switch):
    """benchmarks/cpu_ab.py: a paired A/B of a switch; both paths are checked equal before timing, and
    every switch is set back on afterwards."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_ab.py"
    spec = importlib.util.spec_from_file_location("cpu_ab", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(mod.SHAPES, "tiny", (96, 16, 32, 4, 2))
    r = mod.run("tiny", switch, repeats=3)
    assert set(r["ms"]) == {"on", "off", "dense"} and r["ratio_to_dense"]["dense"] == 1.0
    assert 0 < r["paired_on_over_off"]["q25"] <= r["paired_on_over_off"]["median"] <= r["paired_on_over_off"]["q75"]
    assert OPS.set_whole_experts(True) is True  # left on
    from moevision.kernels import cpu
    assert cpu._FOLD_ROUTER["on"]
