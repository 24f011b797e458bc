"""Core MoE layer: oracle tests for the invariants of vision_moe.md §0.7, §1(e), §2(e), §3(e)."""

import math

import pytest
import torch
import torch.nn.functional as F

from moevision.moe import MoE, compute_capacity, moe_layer_indices
from moevision.moe import losses as L

IMPLS = ["loop", "einsum", "sorted", "padded", "grouped"]  # grouped falls back to sorted in float64


def dense_mlp(x, w1, b1, w2, b2):
    return F.gelu(x @ w1 + b1) @ w2 + b2


def _copy(dst, src):
    dst.load_state_dict(src.state_dict())
    return dst


# ---------------------------------------------------------------- capacity (§0.3)
def test_capacity_worked_example():
    # 400 tokens, k=2, E=8, c=1.05: ceil(400*2*1.05/8) = ceil(105.0) = 105 -> next multiple of 4 = 108
    assert compute_capacity(400 * 2, 8, 1.05) == 108
    assert compute_capacity(400 * 2, 8, 1.05, multiple_of=None) == 105  # float64: not 106
    assert compute_capacity(10, 4, 1.0, mode="round", multiple_of=1) == 2  # round(2.5) = 2 (banker's)
    with pytest.raises(ValueError, match="capacity"):
        compute_capacity(1, 8, 0.1, mode="round", multiple_of=None)  # round(0.0125) = 0 < 1
    with pytest.raises(ValueError, match="capacity_factor"):
        compute_capacity(8, 2, 0.0)


def test_placement_helpers():
    assert moe_layer_indices("every_2", 12) == (1, 3, 5, 7, 9, 11)
    assert moe_layer_indices("last_odd_2", 8) == (5, 7)
    assert moe_layer_indices("last_6", 12) == tuple(range(6, 12))
    assert moe_layer_indices([3, 1], 4) == (1, 3)
    with pytest.raises(ValueError, match="outside"):
        moe_layer_indices([4], 4)
    with pytest.raises(ValueError, match="not understood"):
        moe_layer_indices("odd", 4)


# ---------------------------------------------------------------- oracles: dense equivalence
@pytest.mark.parametrize("impl", IMPLS)
def test_one_expert_equals_dense_mlp_outputs_and_grads(impl):
    moe = MoE(8, 16, 1, 1, impl=impl).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    e = moe.experts
    w1, b1, w2, b2 = (p[0].detach().clone().requires_grad_() for p in (e.w1, e.b1, e.w2, e.b2))
    y = moe(x).out
    x2 = x.detach().clone().requires_grad_()
    y_ref = dense_mlp(x2, w1, b1, w2, b2)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(e.w1.grad[0], w1.grad)
    torch.testing.assert_close(e.b2.grad[0], b2.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_identical_experts_renormalised_equal_dense(impl):
    moe = MoE(8, 16, 4, 2, normalize_topk=True, expert_init="shared", impl=impl).double()
    e = moe.experts
    x = torch.randn(20, 8, dtype=torch.float64)
    ref = dense_mlp(x, e.w1[0], e.b1[0], e.w2[0], e.b2[0])
    torch.testing.assert_close(moe(x).out, ref, rtol=1e-10, atol=1e-10)
    # without renormalisation: MoE(x) = s(x) * FFN(x), s = sum of the selected softmax gates
    moe2 = _copy(MoE(8, 16, 4, 2, expert_init="shared", impl=impl).double(), moe)
    moe2.eval()
    probs = (x @ moe2.router.weight.t()).softmax(-1)
    s = probs.topk(2, dim=-1).values.sum(-1, keepdim=True)
    torch.testing.assert_close(moe2(x).out, s * ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- dispatch equivalence (§0.7.2)
CONFIGS = [
    dict(router="topk", top_k=2, capacity_factor=None),
    dict(router="topk", top_k=2, capacity_factor=0.5),
    dict(router="topk", top_k=1, capacity_factor=0.75, batch_priority=True),
    dict(router="topk", top_k=3, capacity_factor=1.0, normalize_topk=True, normalize_after_drop=True),
    dict(router="topk", top_k=2, capacity_factor=1.0, activation="swiglu", bias=False, group_size=12),
    dict(router="expert_choice", capacity_factor=1.5, group_size=12),
    dict(router="random"),
    dict(router="hash"),
]


def _brute_force(moe, x_TD, plan):
    """Per-token python loop over the plan's assignments: y_t = sum gate * FFN_e(x_t)."""
    out = torch.zeros_like(x_TD)
    for t, e, g, k in zip(plan.token_idx.tolist(), plan.expert_idx.tolist(), plan.gates, plan.kept.tolist()):
        if k:
            out[t] = out[t] + g * moe.experts.forward_expert(e, x_TD[t:t + 1])[0]
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dispatch_paths_agree_forward_backward(cfg):
    cfg = dict(cfg)
    top_k = cfg.pop("top_k", 1)
    base = MoE(6, 10, 4, top_k, **cfg).double()
    x0 = torch.randn(4, 6, 6, dtype=torch.float64)
    results = []
    for impl in IMPLS:
        moe = _copy(MoE(6, 10, 4, top_k, impl=impl, **cfg).double(), base)
        x = x0.clone().requires_grad_()
        torch.manual_seed(5)  # same noise / random partition for every impl
        o = moe(x)
        g = torch.linspace(-1, 1, o.out.numel(), dtype=torch.float64).view_as(o.out)
        ((o.out * g).sum() + o.aux_loss).backward()
        grads = [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in moe.parameters()]
        results.append((o.out.detach(), grads))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-10, atol=1e-12)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # and the brute-force per-token loop over the routing plan
    base.eval()
    x_TD = x0.reshape(-1, 6)
    G = x_TD.shape[0] // (base.group_size or x_TD.shape[0])
    plan = base.router(x_TD.view(G, -1, 6))
    torch.testing.assert_close(base(x0).out.reshape(-1, 6), _brute_force(base, x_TD, plan))


# ---------------------------------------------------------------- capacity and priority (§1(e))
def _controlled(E, top_k, logits, **kw):
    """An MoE whose router logits equal the input (router.weight = I, dim = E)."""
    moe = MoE(E, 4, E, top_k, noise_std=0.0, capacity_multiple_of=None, **kw).double().eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(E))
    return moe, torch.as_tensor(logits, dtype=torch.float64)


def test_top1_never_displaced_by_top2():
    # 6 tokens, E=3, k=2, capacity = ceil(6*2*0.25/3) = 1 slot per expert.
    # token 0: 1st choice expert 0, 2nd choice expert 1; token 5: 1st choice expert 1.
    logits = [[3, 2, 0], [-5, -5, 9], [-5, -5, 9], [-5, -5, 9], [-5, -5, 9], [0, 3, -1]]
    moe, x = _controlled(3, 2, logits, capacity_factor=0.25, eval_capacity_factor=0.25)
    plan = moe.router(x.view(1, 6, 3))
    kept = plan.kept.view(6, 2)
    assert plan.capacity == 1
    assert kept[5, 0]  # token 5's first choice (expert 1) kept ...
    assert not kept[0, 1]  # ... although token 0 came first, its 2nd choice is dropped
    assert kept[0, 0]


def test_bpr_keeps_most_confident_tokens():
    # E=2, k=1, 8 tokens all preferring expert 0 with increasing confidence; capacity 2 slots.
    conf = torch.tensor([0.1, 0.5, 0.2, 2.0, 0.3, 1.0, 0.4, 0.05], dtype=torch.float64)
    logits = torch.stack([conf, torch.zeros(8, dtype=torch.float64)], -1)
    moe, x = _controlled(2, 1, logits, capacity_factor=0.5, batch_priority=True)
    kept = moe.router(x.view(1, 8, 2)).kept
    assert kept.nonzero().flatten().tolist() == [3, 5]  # the two largest max-gates win
    moe_pos, _ = _controlled(2, 1, logits, capacity_factor=0.5)
    assert moe_pos.router(x.view(1, 8, 2)).kept.nonzero().flatten().tolist() == [0, 1]  # by position


def test_bpr_ties_resolved_by_position():
    logits = torch.tensor([[1.0, 0.0]] * 6, dtype=torch.float64)
    moe, x = _controlled(2, 1, logits, capacity_factor=2 / 3, batch_priority=True)
    assert moe.router(x.view(1, 6, 2)).kept.nonzero().flatten().tolist() == [0, 1]


def test_no_overflow_vanilla_equals_bpr_equals_plain_topk():
    x = torch.randn(30, 8, dtype=torch.float64)
    outs = []
    base = MoE(8, 12, 4, 2, capacity_factor=10.0).double().eval()
    for kw in (dict(), dict(batch_priority=True)):
        moe = _copy(MoE(8, 12, 4, 2, capacity_factor=10.0, **kw).double().eval(), base)
        outs.append(moe(x).out)
    dropless = _copy(MoE(8, 12, 4, 2).double().eval(), base)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], dropless(x).out)


def test_tokens_per_expert_within_capacity_and_gates_not_renormalised():
    moe = MoE(8, 12, 4, 2, capacity_factor=0.5).train()
    out = moe(torch.randn(64, 8))
    plan_cap = out.stats.capacity
    assert plan_cap == compute_capacity(128, 4, 0.5)
    assert (out.stats.tokens_per_expert <= plan_cap).all()
    assert out.stats.tokens_per_expert.sum() <= 4 * plan_cap
    assert 0 < float(out.stats.dropped_fraction) < 1
    moe.eval()
    moe.record_routing = True
    st = moe(torch.randn(16, 8)).stats
    assert (st.gates.sum(-1) <= 1 + 1e-6).all() and (st.gates.sum(-1) < 1 - 1e-3).any()


# ---------------------------------------------------------------- V-MoE and Mixtral parity
def _vmoe_reference(x, W, w1, b1, w2, b2, k, cap):
    """The vmoe pseudo-code of vision_moe.md §1(b), one group, eval mode (no noise), einsum dispatch."""
    S, E = x.shape[0], W.shape[1]
    g = (x @ W).softmax(-1)
    topv, topi = g.topk(k, dim=-1)
    idx = topi.t().reshape(-1)
    oh = F.one_hot(idx, E)
    pos = (oh.cumsum(0) * oh - 1).view(k, S, E).transpose(0, 1)
    slot = pos.max(dim=1).values
    keep = (slot >= 0) & (slot < cap)
    combine = torch.zeros(S, E, cap, dtype=x.dtype)
    for s in range(S):
        for e in range(E):
            if keep[s, e]:
                combine[s, e, slot[s, e]] = g[s, e]
    dispatch = (combine > 0).to(x.dtype)
    xe = torch.einsum("sec,sd->ecd", dispatch, x)
    ye = torch.stack([dense_mlp(xe[e], w1[e], b1[e], w2[e], b2[e]) for e in range(E)])
    return torch.einsum("sec,ecd->sd", combine, ye)


@pytest.mark.parametrize("impl", ["sorted", "padded"])
def test_reproduces_vmoe_layer(impl):
    S, D, E, k, c = 40, 8, 8, 2, 1.05
    moe = MoE(D, 16, E, k, capacity_factor=c, impl=impl).double().eval()
    x = torch.randn(S, D, dtype=torch.float64)
    cap = compute_capacity(S * k, E, c)
    e = moe.experts
    ref = _vmoe_reference(x, moe.router.weight.t(), e.w1, e.b1, e.w2, e.b2, k, cap)
    torch.testing.assert_close(moe(x).out, ref)
    # with a tight capacity too, where tokens are dropped
    moe.router.eval_capacity_factor = 0.5
    ref = _vmoe_reference(x, moe.router.weight.t(), e.w1, e.b1, e.w2, e.b2, k, compute_capacity(S * k, E, 0.5))
    torch.testing.assert_close(moe(x).out, ref)


@pytest.mark.parametrize("norm_topk", [True, False])  # Mixtral renormalises; OLMoE does not
def test_reproduces_mixtral_olmoe_block(norm_topk):
    D, Fh, E, k = 8, 20, 6, 2
    gate = torch.nn.Linear(D, E, bias=False).double()
    lin = [[torch.nn.Linear(D, Fh, bias=False).double(), torch.nn.Linear(Fh, D, bias=False).double(),
            torch.nn.Linear(D, Fh, bias=False).double()] for _ in range(E)]
    x = torch.randn(30, D, dtype=torch.float64)
    # independent reference written the way HF's MixtralSparseMoeBlock computes it
    w = F.softmax(gate(x), dim=1)
    w, sel = torch.topk(w, k, dim=-1)
    if norm_topk:
        w = w / w.sum(dim=-1, keepdim=True)
    ref = torch.zeros_like(x)
    for e in range(E):
        tok, j = torch.where(sel == e)
        w1, w2, w3 = lin[e]
        ref[tok] += w[tok, j, None] * w2(F.silu(w1(x[tok])) * w3(x[tok]))
    moe = MoE(D, Fh, E, k, normalize_topk=norm_topk, activation="swiglu", bias=False, noise_std=0.0).double()
    with torch.no_grad():
        moe.router.weight.copy_(gate.weight)
        moe.experts.w1.copy_(torch.stack([m[0].weight.t() for m in lin]))
        moe.experts.w2.copy_(torch.stack([m[1].weight.t() for m in lin]))
        moe.experts.w3.copy_(torch.stack([m[2].weight.t() for m in lin]))
    torch.testing.assert_close(moe.train()(x).out, ref)  # no noise: train == eval
    mix = MoE(D, Fh, E, k, softmax_order="after_topk", activation="swiglu", bias=False, noise_std=0.0).double()
    _copy(mix, moe)
    if norm_topk:  # softmax over the top-k logits == renormalised top-k softmax
        torch.testing.assert_close(mix(x).out, ref)


# ---------------------------------------------------------------- expert choice (§2(e))
def test_expert_choice_every_expert_takes_exactly_c_distinct_tokens():
    moe = MoE(8, 12, 4, router="expert_choice", capacity_factor=1.0, group_size=16).double()
    x = torch.randn(32, 8, dtype=torch.float64)
    plan = moe.router(x.view(2, 16, 8))
    C = compute_capacity(16, 4, 1.0)
    assert plan.capacity == C == 4
    exp = plan.expert_idx.view(2, 4, C)
    tok = plan.token_idx.view(2, 4, C)
    for g in range(2):
        for e in range(4):
            assert (exp[g, e] == e).all() and len(set(tok[g, e].tolist())) == C
            assert ((tok[g, e] // 16) == g).all()  # never crosses groups
    probs = (x @ moe.router.weight.t()).softmax(-1)
    torch.testing.assert_close(plan.gates, probs[plan.token_idx, plan.expert_idx])  # weight = S[t, e]
    assert float(plan.aux_loss) == 0.0
    stats = moe(x).stats
    assert stats.tokens_per_expert.tolist() == [2 * C] * 4


def test_expert_choice_full_capacity_is_dense_soft_mixture():
    moe = MoE(8, 12, 3, router="expert_choice", capacity_factor=3.0, capacity_multiple_of=1).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    probs = (x @ moe.router.weight.t()).softmax(-1)
    e = moe.experts
    ref = sum(probs[:, j:j + 1] * dense_mlp(x, e.w1[j], e.b1[j], e.w2[j], e.b2[j]) for j in range(3))
    torch.testing.assert_close(moe(x).out, ref)


# ---------------------------------------------------------------- soft MoE (§3(e))
def test_soft_moe_softmax_axes_and_permutation_equivariance():
    moe = MoE(8, 12, 4, router="soft", slots_per_expert=2).double()
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    plan = moe.router(x)
    torch.testing.assert_close(plan.dispatch_GSP.sum(1), torch.ones(3, 8, dtype=torch.float64))
    torch.testing.assert_close(plan.combine_GSP.sum(2), torch.ones(3, 7, dtype=torch.float64))
    perm = torch.randperm(7)
    torch.testing.assert_close(moe(x[:, perm]).out, moe(x).out[:, perm])
    # scale invariance of routing, and no mixing across images
    p2 = moe.router(3.7 * x)
    torch.testing.assert_close(p2.dispatch_GSP, plan.dispatch_GSP)
    x2 = x.clone()
    x2[1] = torch.randn(7, 8)
    torch.testing.assert_close(moe(x2).out[[0, 2]], moe(x).out[[0, 2]])


@pytest.mark.parametrize("m,p", [(5, 5), (4, 4)])
def test_soft_moe_axis_check_identity(m, p):
    # tokens e_i, one expert with p = m slots, phi[:, s] = e_s, scale 50 -> D ~ Cw ~ I -> y_i ~ FFN(x_i)
    d = 8
    moe = MoE(d, 12, 1, router="soft", slots_per_expert=p).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(d, dtype=torch.float64)[:p])
        moe.router.scale.fill_(50.0)
    x = torch.eye(d, dtype=torch.float64)[:m].unsqueeze(0)
    e = moe.experts
    ref = dense_mlp(x, e.w1[0], e.b1[0], e.w2[0], e.b2[0])
    torch.testing.assert_close(moe(x).out, ref, atol=1e-3, rtol=1e-3)


def test_soft_moe_noise_is_absolute_and_capacity_factor_warns():
    # vmoe's SoftRouter adds noise_std * N(0, 1) to the logits (no 1/E, unlike topk / expert_choice)
    moe = MoE(8, 12, 4, router="soft", noise_std=2.0).train()
    x = torch.randn(64, 6, 8)
    torch.manual_seed(0)
    noisy = moe.router(x).logits_GSP
    clean = moe.eval().router(x).logits_GSP
    assert abs((noisy - clean).std().item() - 2.0) < 0.1
    with pytest.warns(UserWarning, match=r"soft.*capacity_factor=1\.25.*slots_per_expert"):
        MoE(8, 12, 4, router="soft", capacity_factor=1.25)


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_stats_with_float64_default_dtype(router):
    # the statistics' buffers take the kept mask's dtype, not the default one (was a scatter dtype error)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        moe = MoE(8, 12, 4, 1, router=router, capacity_factor=1.0)
        st = moe(torch.randn(20, 8)).stats
        # token choice: kept assignments; expert choice: each expert takes its C tokens
        want = 20 * (1 - float(st.dropped_fraction)) if router == "topk" else 4 * st.capacity
        assert float(st.tokens_per_expert.sum()) == pytest.approx(want)
        assert st.tokens_per_expert.dtype == torch.float32
        assert 0.0 <= float(st.dropped_token_fraction) <= 1.0
    finally:
        torch.set_default_dtype(old)


def test_soft_moe_grads_reach_phi_and_scale():
    moe = MoE(8, 12, 4, router="soft")
    moe(torch.randn(2, 6, 8)).out.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0 and moe.router.scale.grad.abs() > 0


# ---------------------------------------------------------------- generic invariants (§0.7)
@pytest.mark.parametrize("router", ["topk", "expert_choice", "soft"])
def test_group_independence(router):
    kw = dict(capacity_factor=0.75) if router != "soft" else {}
    moe = MoE(8, 12, 4, 1 if router != "topk" else 2, router=router, group_size=10, **kw).double().eval()
    x = torch.randn(30, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[10:20] = torch.randn(10, 8, dtype=torch.float64) * 3
    torch.testing.assert_close(moe(x2).out[:10], moe(x).out[:10])
    torch.testing.assert_close(moe(x2).out[20:], moe(x).out[20:])


def test_permutation_equivariance_dropless_topk_and_expert_choice():
    x = torch.randn(24, 8, dtype=torch.float64)
    perm = torch.randperm(24)
    for moe in (MoE(8, 12, 4, 2).double().eval(),
                MoE(8, 12, 4, router="expert_choice", capacity_factor=1.0).double().eval()):
        torch.testing.assert_close(moe(x[perm]).out, moe(x).out[perm])


def test_router_gradients_from_task_and_aux_and_no_nan_with_equal_logits():
    moe = MoE(8, 12, 4, 2, capacity_factor=1.0).train()
    x = torch.randn(32, 8)
    moe(x).out.sum().backward()
    g_task = moe.router.weight.grad.clone()
    assert torch.isfinite(g_task).all() and g_task.abs().sum() > 0
    moe.zero_grad()
    moe(x).aux_loss.backward()
    assert torch.isfinite(moe.router.weight.grad).all() and moe.router.weight.grad.abs().sum() > 0
    flat = MoE(8, 12, 4, 2, capacity_factor=1.0, router_init_std=0.0).train()
    o = flat(x)
    (o.out.sum() + o.aux_loss).backward()
    assert torch.isfinite(o.out).all() and torch.isfinite(flat.router.weight.grad).all()


def test_noise_only_in_training_with_std_one_over_e():
    E = 2
    moe = MoE(4, 8, E, 1, router_init_std=0.0, record_routing=True)  # clean logits are all 0
    x = torch.randn(20000, 4)
    moe.train()
    g = moe(x).stats.gates[:, 0].double()
    # logit gap d = |sigma (eps1 - eps2)|, E|d| = 2 sigma / sqrt(pi) with sigma = noise_std / E = 0.5
    d = torch.log(g / (1 - g))
    assert abs(float(d.mean()) - 2 * 0.5 / math.sqrt(math.pi)) < 0.02
    assert "load" in moe(x[:64]).stats.aux_losses
    moe.eval()
    o = moe(x[:64])
    torch.testing.assert_close(o.stats.gates[:, 0], torch.full((64,), 0.5))
    assert "load" not in o.stats.aux_losses


def test_eval_capacity_factor_separate_from_training():
    moe = MoE(8, 12, 4, 1, capacity_factor=1.0, eval_capacity_factor=4.0, noise_std=0.0)
    x = torch.randn(64, 8)
    assert moe.train()(x).stats.capacity == 16
    assert moe.eval()(x).stats.capacity == 64
    assert MoE(8, 12, 4, capacity_factor=2.0).eval()(x).stats.capacity == 32  # defaults to training's


def test_determinism_fixed_seed():
    x = torch.randn(40, 8)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        moe = MoE(8, 12, 4, 2, capacity_factor=1.0, record_routing=True).train()
        o = moe(x)
        outs.append((o.out, o.stats.expert_idx))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_random_router_uniform_partition_and_hash():
    moe = MoE(8, 12, 3, router="random", record_routing=True).train()
    x = torch.randn(2, 10, 8)
    a = moe(x).stats
    assert sorted(a.tokens_per_expert.tolist()) == [6.0, 7.0, 7.0]  # 20 tokens -> 6/7/7
    assert (a.gates == 1).all()
    b = moe(x).stats
    assert not torch.equal(a.expert_idx, b.expert_idx)  # fresh partition every step
    moe.eval()
    assert torch.equal(moe(x).stats.expert_idx, moe(x).stats.expert_idx)
    h = MoE(8, 12, 3, router="hash", record_routing=True)
    assert h(x.view(20, 8)).stats.expert_idx.flatten().tolist() == [i % 3 for i in range(20)]


# ---------------------------------------------------------------- losses, hand-worked
def test_importance_switch_z_losses_hand_computed():
    probs = torch.tensor([[[0.8, 0.2], [0.6, 0.4]]])
    # Imp = [0.8+0.6, 0.2+0.4] = [1.4, 0.6]; mean 1.0; var = (0.4² + 0.4²)/2 = 0.16; CV² = 0.16/1.0
    assert abs(float(L.importance_cv2(probs)) - 0.16) < 1e-6
    # both tokens' top-1 is expert 0: f = [1, 0]; P = [0.7, 0.3]; L = E * sum f*P = 2 * 0.7 = 1.4
    top = probs.topk(1, dim=-1).indices
    assert abs(float(L.switch_loss(probs, top)) - 1.4) < 1e-6
    # perfect balance gives 1: f = [.5, .5], P = [.5, .5] -> 2 * (.25 + .25) = 1
    bal = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    assert abs(float(L.switch_loss(bal, torch.tensor([[[0], [1]]]))) - 1.0) < 1e-6
    # z-loss of zero logits over 2 experts: (log(e^0 + e^0))² = (ln 2)² = 0.480453
    assert abs(float(L.z_loss(torch.zeros(1, 3, 2))) - math.log(2) ** 2) < 1e-6
    # importance is 0 for a router with zero weights (uniform probabilities)
    assert float(L.importance_cv2(torch.full((1, 5, 4), 0.25))) == 0.0


def test_load_cv2_matches_monte_carlo():
    torch.manual_seed(1)
    S, E, k, sigma = 32, 4, 2, 0.3
    clean = torch.randn(1, S, E, dtype=torch.float64)
    noisy = clean + sigma * torch.randn_like(clean)
    analytic = L.load_cv2(clean, noisy, sigma, k)
    # p_e(x) = P(clean_e + sigma*eps > eta(x)) with eta(x) fixed: resample only expert e's noise
    thr = noisy.topk(k, dim=-1).values[..., -1:]
    eps = torch.randn(10000, 1, S, E, dtype=torch.float64)
    p = ((clean + sigma * eps) > thr).double().mean(0)
    mc = L.cv_squared(p.mean(1)).mean()
    assert abs(float(analytic) - float(mc)) < 2e-2


def _phi(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_prob_in_top_k_thresholds_by_hand():
    # E=4, k=2, noisy [3, 1, 2, 0]: experts 0 and 2 are in the top-2; the 2nd largest noisy logit is 2, the 3rd 1
    clean = torch.tensor([[2.5, 0.5, 1.5, 0.2]], dtype=torch.float64)
    noisy = torch.tensor([[3.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    sig = 0.5
    kth = [_phi((c - 2.0) / sig) for c in (2.5, 0.5, 1.5, 0.2)]  # vmoe: the k-th (2) for every expert
    inout = [_phi((2.5 - 1.0) / sig), _phi((0.5 - 2.0) / sig), _phi((1.5 - 1.0) / sig), _phi((0.2 - 2.0) / sig)]
    torch.testing.assert_close(L.prob_in_top_k(clean, noisy, sig, 2), torch.tensor([kth], dtype=torch.float64))
    torch.testing.assert_close(L.prob_in_top_k(clean, noisy, sig, 2, "shazeer_in_out"),
                               torch.tensor([inout], dtype=torch.float64))
    assert torch.equal(L.prob_in_top_k(clean, noisy, sig, 4, "shazeer_in_out"), torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="threshold_mode"):
        L.prob_in_top_k(clean, noisy, sig, 2, "kth+1")


@pytest.mark.parametrize("impl", ["auto", "loop"])
@pytest.mark.parametrize("mode", ["kth", "shazeer_in_out"])
def test_layer_load_loss_threshold(impl, mode):
    # the layer's load loss against the one made from its own logits and noise (replayed from the seed)
    E, K, G, S, D = 4, 2, 1, 24, 8
    moe = MoE(D, 16, E, K, noise_std=1.0, load_threshold=mode, impl=impl).train()
    x = torch.randn(S, D)
    torch.manual_seed(3)
    got = moe(x).stats.aux_losses["load"]
    with torch.no_grad():
        logits = (x @ moe.router.weight.t()).view(G, S, E)
    torch.manual_seed(3)
    sigma = 1.0 / E
    noisy = logits + sigma * torch.randn(G, S, E)
    torch.testing.assert_close(got, L.load_cv2(logits, noisy, sigma, K, mode))
    other = "kth" if mode != "kth" else "shazeer_in_out"
    assert abs(float(got) - float(L.load_cv2(logits, noisy, sigma, K, other))) > 1e-6  # the modes differ here
    with pytest.raises(Exception, match="load_threshold"):
        MoE(D, 16, E, router="expert_choice", load_threshold="shazeer_in_out")


def test_triton_router_core_steps_aside_for_shazeer_load(monkeypatch):
    # the Triton core's load loss is vmoe's k-th threshold: with the in/out form (noise and a load weight) the
    # eager ops run; with kth it is taken (stubbed here: it would run in Triton's interpreter)
    from moevision.moe import router as R
    calls = []

    def core(*a, **k):
        calls.append(1)
        raise RuntimeError("taken")
    monkeypatch.setattr(R, "_triton_router_core", core)
    monkeypatch.setitem(R._TRITON_ROUTER_CPU, "on", True)
    monkeypatch.setattr(R, "_native_router_ops", lambda x: None)  # else the native CPU router core runs first
    x = torch.randn(16, 8)
    MoE(8, 16, 4, 2, load_threshold="shazeer_in_out", impl="loop").train()(x)
    assert calls == []
    with pytest.raises(RuntimeError, match="taken"):
        MoE(8, 16, 4, 2, impl="loop").train()(x)


# ---------------------------------------------------------------- contract and errors
def test_state_dict_keys_and_shapes():
    sd = MoE(8, 16, 4, 2).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "router.weight": (4, 8), "experts.w1": (4, 8, 16), "experts.w2": (4, 16, 8),
        "experts.b1": (4, 16), "experts.b2": (4, 8)}
    sd = MoE(8, 16, 4, 2, activation="swiglu", bias=False).state_dict()
    assert set(sd) == {"router.weight", "experts.w1", "experts.w2", "experts.w3"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=5), "top_k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(eval_capacity_factor=0), "eval_capacity_factor"),
    (dict(router="switchy"), "router"),
    (dict(activation="tanh"), "activation"),
    (dict(impl="cuda_magic"), "impl"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    kw = dict(top_k=1) | kwargs
    with pytest.raises(ValueError, match=match):
        MoE(8, 16, 4, **kw)


def test_bad_inputs_raise():
    moe = MoE(8, 16, 4, check_finite=True)
    with pytest.raises(ValueError, match="dim=8"):
        moe(torch.randn(3, 7))
    with pytest.raises(ValueError, match="NaN"):
        moe(torch.full((3, 8), float("nan")))
    with pytest.raises(ValueError, match="group_size"):
        MoE(8, 16, 4, group_size=5)(torch.randn(12, 8))


# ---------------------------------------------------------------- grouped GEMM fast path (fp32 on CPU)
@pytest.mark.parametrize("cfg", [
    dict(top_k=2), dict(top_k=2, capacity_factor=0.5), dict(top_k=1, router="expert_choice", capacity_factor=1.0),
    dict(top_k=2, activation="swiglu", bias=False, normalize_topk=True)], ids=str)
def test_grouped_gemm_path_matches_reference(cfg):
    cfg = dict(cfg)
    k = cfg.pop("top_k")
    base = MoE(16, 32, 4, k, **cfg)
    assert base.experts.grouped_mm_ok(torch.randn(2, 16))  # it really runs grouped GEMM here
    x0 = torch.randn(64, 16)
    res = []
    for impl in ("loop", "grouped"):
        moe = _copy(MoE(16, 32, 4, k, impl=impl, **cfg), base)
        x = x0.clone().requires_grad_()
        torch.manual_seed(7)
        o = moe(x)
        (o.out * torch.linspace(-1, 1, o.out.numel()).view_as(o.out)).sum().backward()
        res.append((o.out.detach(), x.grad, [p.grad for p in moe.experts.parameters()]))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(res[1][2], res[0][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_small_axis_softmax_equals_torch_and_gradchecks():
    """The router's CPU softmax over the experts (a faster formulation for short axes) equals
    torch.softmax, masked (-inf) entries included, and its hand-written backward passes gradcheck."""
    from moevision.moe.router import _SoftmaxSmall, _softmax

    torch.manual_seed(0)
    x = torch.randn(4, 30, 8) * 5
    x[0, :5, 2:] = float("-inf")  # MoMa-style masked experts
    assert torch.allclose(_softmax(x), x.softmax(-1), atol=1e-7)
    assert _softmax(x)[0, :5, 2:].eq(0).all()
    xd = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SoftmaxSmall.apply, (xd,))


def test_router_logits_stay_fp32_under_autocast():
    """vmoe computes the router in float32; under bf16 autocast the matmul would otherwise run in bf16."""
    torch.manual_seed(0)
    m = MoE(16, 32, 4, 2, noise_std=0.0)
    x = torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m.router.logits(x.view(1, 64, 16))
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, x.view(1, 64, 16) @ m.router.weight.t(), atol=1e-6)


def test_top1_router_by_max_equals_topk_of_the_softmax():
    """The k=1 router takes max (faster) instead of topk: same experts and gates as topk of the softmax
    of the logits (random weights: no ties), and the same gradient into the router."""
    from moevision.moe import TopKRouter

    torch.manual_seed(0)
    r = TopKRouter(16, 8, 1, noise_std=0.0).double()
    x = torch.randn(2, 50, 16, dtype=torch.float64)
    plan = r(x)
    probs = (x @ r.weight.t()).softmax(-1)
    v, i = probs.topk(1, dim=-1)
    assert torch.equal(plan.expert_idx, i.flatten()) and torch.allclose(plan.gates, v.flatten(), atol=1e-14)
    g = torch.autograd.grad(plan.gates.sum(), r.weight)[0]
    g_ref = torch.autograd.grad(((x @ r.weight.t()).softmax(-1).topk(1, dim=-1).values).sum(), r.weight)[0]
    assert torch.allclose(g, g_ref, atol=1e-12)


def test_cosine_router_formula_clamp_and_init():
    """SwinV2-MoE / Tutel cosine_top: logits = exp(min(t, ln 100)) * cos(P x, w_e); t starts at ln(1/0.5)."""
    torch.manual_seed(0)
    m = MoE(12, 24, 5, 2, router_logits="cosine", cosine_dim=7, noise_std=0.0).double()
    r = m.router
    assert r.weight.shape == (5, 7) and r.cosine_proj.weight.shape == (7, 12)
    assert math.isclose(float(r.logit_scale.detach()), math.log(2.0), rel_tol=1e-6)
    big = MoE(12, 24, 64, 2, router_logits="cosine")
    assert 0.008 < float(big.router.weight.detach().std()) < 0.012  # N(0, 0.01)
    x = torch.randn(3, 10, 12, dtype=torch.float64)
    logits = r.logits(x)
    p = F.normalize(x @ r.cosine_proj.weight.t() + r.cosine_proj.bias, dim=-1)
    w = F.normalize(r.weight, dim=-1)
    torch.testing.assert_close(logits, 2.0 * p @ w.t())
    with torch.no_grad():
        r.logit_scale.fill_(10.0)  # e^10 >> 100: clamped
    logits = r.logits(x)
    assert float(logits.detach().abs().max()) <= 100.0 + 1e-9
    torch.testing.assert_close(logits, 100.0 * p @ w.t())
    logits.sum().backward()
    assert float(r.logit_scale.grad) == 0.0  # beyond the clamp the scale gets no gradient


def test_cosine_router_layer_trains_and_matches_the_loop_reference():
    torch.manual_seed(0)
    ref = MoE(12, 24, 4, 2, router_logits="cosine", cosine_dim=6, impl="loop", noise_std=0.0).double()
    fast = MoE(12, 24, 4, 2, router_logits="cosine", cosine_dim=6, impl="cpu_fused", noise_std=0.0).double()
    fast.load_state_dict(ref.state_dict())
    assert {"router.cosine_proj.weight", "router.cosine_proj.bias", "router.logit_scale"} <= set(ref.state_dict())
    x = torch.randn(40, 12, dtype=torch.float64)
    outs = []
    for m in (ref, fast):
        xr = x.clone().requires_grad_()
        o = m(xr)
        (o.out.square().sum() + o.aux_loss).backward()
        outs.append((o.out, xr.grad, m.router.cosine_proj.weight.grad, m.router.logit_scale.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    assert float(outs[0][3].abs()) > 0  # the temperature learns
    from moevision.errors import ConfigError

    with pytest.raises(ConfigError, match="needs router='topk'"):
        MoE(12, 24, 4, 1, router="expert_choice", router_logits="cosine")
    with pytest.raises(ConfigError, match="task routing"):
        MoE(12, 24, 4, 1, router_logits="cosine", task_routing="multi_gate", num_tasks=2)
    with pytest.raises(ConfigError, match="logits must be one of"):
        MoE(12, 24, 4, 1, router_logits="dot")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lowp_router_logits_equal_the_upcast_router(dtype):
    """_LowpLogits (the 16-bit router GEMM with fp32 output) against the upcast form, on CPU through its
    fallback product: the logits match to fp32 rounding; the gradients to one 16-bit rounding of the
    logit gradient (the documented difference)."""
    from moevision.moe.router import _LowpLogits

    torch.manual_seed(0)
    x = torch.randn(2, 96, 64).to(dtype).requires_grad_()
    w = (torch.randn(8, 64) * 0.1).to(dtype).requires_grad_()
    g = torch.randn(2, 96, 8)
    out = _LowpLogits.apply(x, w)
    assert out.dtype == torch.float32 and out.shape == (2, 96, 8)
    ref = x.float() @ w.float().t()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    assert dx.dtype == dtype and dw.dtype == dtype
    for a, b in ((dx, rx), (dw, rw)):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < 8e-3, rel  # about one bf16 rounding (2^-8); a wrong formula is O(1) off


def test_lowp_router_taken_only_on_cuda_with_matching_16bit_dtypes():
    from moevision.moe.router import _lowp_router_ok

    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert not _lowp_router_ok(x, torch.zeros(2, 8, dtype=torch.bfloat16))  # CPU: the upcast path
    if torch.cuda.is_available():
        xc = x.cuda()
        assert _lowp_router_ok(xc, torch.zeros(2, 8, dtype=torch.bfloat16, device="cuda"))
        assert not _lowp_router_ok(xc, torch.zeros(2, 8, device="cuda"))  # fp32 weight (autocast): upcast
        assert not _lowp_router_ok(xc.float(), torch.zeros(2, 8, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lowp_router_on_gpu_matches_upcast_router():
    from moevision import kernels

    torch.manual_seed(0)
    m = MoE(256, 512, 8, 2, impl="fused", noise_std=0.0).cuda().bfloat16()
    x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    res = []
    try:
        for on in (False, True):
            kernels.use_lowp_router_gemm(on)
            m.zero_grad(set_to_none=True)
            xr = x.clone().requires_grad_()
            o = m(xr)
            (o.out.float().square().mean() + o.aux_loss).backward()
            res.append([o.aux_loss.float(), xr.grad.float(), m.router.weight.grad.float()])
    finally:
        kernels.use_lowp_router_gemm(True)
    for a, b in zip(*res):
        assert ((a - b).norm() / a.norm().clamp_min(1e-12)).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("noise_std", [0.0, 1.0])
def test_triton_router_on_gpu_matches_eager_router(noise_std):
    """The Triton router kernels against the eager ops on a GPU, noise-free and in V-MoE's training form
    (noisy top-k and the load loss, the same draws both ways): plan, aux losses and gradients."""
    from moevision import kernels

    if not kernels.TRITON_AVAILABLE:
        pytest.skip("needs Triton")
    torch.manual_seed(0)
    m = MoE(256, 512, 8, 2, impl="fused", noise_std=noise_std).cuda()
    x = torch.randn(4096, 256, device="cuda")
    res = []
    try:
        for on in (False, True):
            kernels.use_triton_router(on)
            m.zero_grad(set_to_none=True)
            xr = x.clone().requires_grad_()
            torch.manual_seed(1)
            o = m(xr)
            (o.out.square().mean() + o.aux_loss).backward()
            assert ("load" in o.stats.aux_losses) == (noise_std > 0)
            res.append([o.out, o.aux_loss, xr.grad, m.router.weight.grad]
                       + [o.stats.aux_losses[k] for k in sorted(o.stats.aux_losses)])
    finally:
        kernels.use_triton_router(True)
    for a, b in zip(*res):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
