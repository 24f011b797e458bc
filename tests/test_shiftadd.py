"""ShiftAddViT (vision_moe.md §12): shift layer, routers, LL-loss, MoE linear, ViT reparameterisation."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from moevision.errors import ConfigError
from moevision.models import create_model
from moevision.techniques.shiftadd import (MoELinear, NoisyGate, ShiftLinear, latency_aware_loss,
                                           modelled_latency, moe_linears, prob_in_top_k, shift_parameters,
                                           shiftadd_reparameterize)


def _pow2_linear(din=12, dout=7, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(-14, 1, (dout, din), generator=g).double()
    s = torch.randint(0, 2, (dout, din), generator=g).double() * 2 - 1
    lin = nn.Linear(din, dout, bias=bias).double()
    with torch.no_grad():
        lin.weight.copy_(s * 2.0 ** p)
        if bias:
            lin.bias.normal_(generator=g)
    return lin


def test_shift_weights_are_signed_powers_of_two_in_range():
    torch.manual_seed(0)
    m = ShiftLinear(16, 8)
    with torch.no_grad():
        m.shift.add_(torch.randn_like(m.shift) * 5)  # push some out of range: they are clamped
    w = m.quantized_weight().detach()
    nz = w != 0
    assert nz.float().mean() > 0.3  # the ternary sign makes some weights zero, but not most
    p = torch.log2(w[nz].abs())
    assert torch.equal(p, p.round())
    assert p.min() >= -14 and p.max() <= 0
    assert m.shift_range == (-14, 0)
    assert ShiftLinear(4, 4, weight_bits=3).shift_range == (-2, 0)


def test_conversion_of_powers_of_two_is_exact():
    lin = _pow2_linear()
    m = ShiftLinear.from_linear(lin, act_bits=None)
    assert m.shift.dtype == torch.float64
    assert torch.equal(m.quantized_weight().detach(), lin.weight.detach())
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=1e-12)
    # with 16.16 fixed point the inputs and bias are floored to multiples of 2^-16
    m16 = ShiftLinear.from_linear(lin)
    xq = torch.floor(x * 2 ** 16) / 2 ** 16
    bq = torch.floor(lin.bias.detach() * 2 ** 16) / 2 ** 16
    torch.testing.assert_close(m16(x), xq @ lin.weight.detach().T + bq, rtol=0, atol=1e-12)


def test_conversion_rounds_log2_and_keeps_zeros():
    lin = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.3, -0.0, -1e-9]], dtype=torch.float64))
    w = ShiftLinear.from_linear(lin, act_bits=None).quantized_weight().detach()
    # log2(0.3) = -1.74 -> 2^-2; an exact zero stays zero; a tiny weight is clamped to 2^-14
    assert w.tolist() == [[0.25, 0.0, -2.0 ** -14]]


def test_straight_through_gradients_match_the_analytic_form():
    lin = _pow2_linear(bias=False)
    m = ShiftLinear.from_linear(lin, act_bits=None)
    x = torch.randn(9, 12, dtype=torch.float64)
    g_out = torch.randn(9, 7, dtype=torch.float64)
    (m(x) * g_out).sum().backward()
    g_w = g_out.T @ x  # dL/dW
    W = lin.weight.detach()
    torch.testing.assert_close(m.shift.grad, g_w * W * math.log(2))  # d(2^s)/ds = ln 2 · 2^s
    torch.testing.assert_close(m.sign.grad, g_w * W.abs())  # d(2^p · sign)/dsign (STE) = 2^p
    assert m.shift.grad.abs().sum() > 0 and m.sign.grad.abs().sum() > 0


def test_latency_aware_loss_hand_values_and_scale_invariance():
    imp = torch.tensor([30.0, 70.0])
    load = torch.tensor([45.0, 55.0])

    def cv2(v):
        v = np.asarray(v, dtype=np.float64)
        return v.var() / v.mean() ** 2

    got = latency_aware_loss(imp, load, [1.0, 1.0])
    assert float(got) == pytest.approx(cv2([30, 70]) + cv2([45, 55]), rel=1e-6)  # the standard loss
    got = latency_aware_loss(imp, load, [6.0, 4.0])
    assert float(got) == pytest.approx(cv2([180, 280]) + cv2([270, 220]), rel=1e-6)
    assert float(latency_aware_loss(imp, load, [60.0, 40.0])) == pytest.approx(float(got), rel=1e-6)
    assert float(latency_aware_loss(imp, None, [6.0, 4.0])) == pytest.approx(cv2([180, 280]), rel=1e-6)
    # at the optimum alpha_e * n_e is equal: shares 40 / 60 for alpha (6, 4)
    assert float(latency_aware_loss(torch.tensor([40.0, 60.0]), torch.tensor([40.0, 60.0]), [6, 4])) < 1e-9
    with pytest.raises(ConfigError, match="alpha"):
        latency_aware_loss(imp, load, [1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="alpha"):
        latency_aware_loss(imp, load, [1.0, 0.0])


@pytest.mark.parametrize("alpha", [(6.0, 4.0), (1.0, 3.0, 2.0)])
def test_minimising_the_ll_loss_gives_shares_inversely_proportional_to_alpha(alpha):
    torch.manual_seed(0)
    logits = torch.randn(256, len(alpha), requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(400):
        p = logits.softmax(-1)
        loss = latency_aware_loss(p.sum(0), p.sum(0), alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    share = logits.softmax(-1).mean(0).detach().numpy()
    target = 1 / np.array(alpha)
    target /= target.sum()
    np.testing.assert_allclose(share, target, atol=0.02)


def test_prob_in_top_k_matches_monte_carlo():
    torch.manual_seed(0)
    T, E, k = 4, 3, 1
    clean = torch.randn(T, E)
    std = torch.rand(T, E) + 0.3
    noisy = clean + torch.randn(T, E) * std
    p = prob_in_top_k(clean, noisy, std, k)
    n = 40000
    for e in range(E):  # resample only expert e's noise; is e then in the top-k?
        sample = noisy.unsqueeze(0).repeat(n, 1, 1)
        sample[:, :, e] = clean[:, e] + torch.randn(n, T) * std[:, e]
        in_top = (sample.topk(k, dim=-1).indices == e).any(-1).float().mean(0)
        torch.testing.assert_close(p[:, e], in_top, atol=0.01, rtol=0)
    assert torch.equal(prob_in_top_k(clean, noisy, std, E), torch.ones(T, E))


def test_noisy_gate_is_clean_in_eval_and_noisy_in_training():
    torch.manual_seed(0)
    g = NoisyGate(8, 2)
    x = torch.randn(10, 8)
    g.eval()
    clean, noisy, std = g(x)
    assert std is None and torch.equal(clean, noisy)
    torch.testing.assert_close(clean, x @ g.w_gate)
    g.train()
    clean, noisy, std = g(x)
    assert not torch.equal(clean, noisy) and bool((std >= 0.01).all())


def _forced(layer: MoELinear, expert: int) -> MoELinear:
    """Route every token to ``expert`` (NaiveGate with a dominant bias)."""
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.bias.fill_(-100.0)
        layer.router.gate.bias[expert] = 100.0
    return layer


@pytest.mark.filterwarnings("ignore:MoELinear")
def test_moe_linear_routes_to_one_expert_exactly():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7).double()
    shift = ShiftLinear.from_linear(lin)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    for e, expert in enumerate((lin, shift)):
        m = _forced(MoELinear([lin, shift], 12, 7, router="naive"), e)
        torch.testing.assert_close(m(x), expert(x), rtol=0, atol=0)
        assert m.tokens_per_expert.tolist() == ([15.0, 0.0] if e == 0 else [0.0, 15.0])


def test_moe_linear_top2_is_the_softmax_weighted_sum():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 4).double(), nn.Linear(6, 4).double()
    m = MoELinear([a, b], 6, 4, top_k=2, router="naive").double()
    x = torch.randn(10, 6, dtype=torch.float64)
    w = torch.softmax(m.router.gate(x).float(), -1).double()
    torch.testing.assert_close(m(x), w[:, :1] * a(x) + w[:, 1:] * b(x))


def test_straight_through_gate_trains_the_router_from_the_task():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 4), nn.Linear(6, 4)
    x = torch.randn(32, 6)
    outs = {}
    for gw in ("topk_softmax", "straight_through"):
        torch.manual_seed(1)
        m = MoELinear([a, b], 6, 4, loss_weight=0.0, gate_weight=gw)
        m.train()
        torch.manual_seed(2)
        y = m(x)
        outs[gw] = y.detach()
        y.square().sum().backward()
        outs[gw + "_grad"] = m.router.w_gate.grad
    torch.testing.assert_close(outs["topk_softmax"], outs["straight_through"])  # same values
    g0, g1 = outs["topk_softmax_grad"], outs["straight_through_grad"]
    assert g0 is None or float(g0.abs().sum()) == 0.0  # top-1 gate weight is 1: no task gradient
    assert float(g1.abs().sum()) > 0


def test_ll_loss_reaches_the_noisy_router_through_the_smooth_load():
    torch.manual_seed(0)
    m = MoELinear([nn.Linear(6, 4), nn.Linear(6, 4)], 6, 4, alpha=(6, 4), loss_weight=0.01)
    m.train()
    m(torch.randn(64, 6))
    assert m.aux_loss is not None and m.aux_loss.requires_grad
    m.aux_loss.backward()
    assert float(m.router.w_gate.grad.abs().sum()) > 0 and float(m.router.w_noise.grad.abs().sum()) > 0
    m.eval()
    m(torch.randn(64, 6))
    assert m.aux_loss is None


@pytest.mark.filterwarnings("ignore:MoELinear")
def test_reparameterised_vit_equals_dense_when_routed_to_the_mult_expert():
    torch.manual_seed(0)
    dense = create_model("vit_tiny_test").double().eval()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    ref = dense(x).logits
    import copy

    moe = shiftadd_reparameterize(copy.deepcopy(dense), "moe", router="naive", attention=True).double().eval()
    layers = moe_linears(moe)
    assert len(layers) == 2 * 2 * 2  # 2 blocks x (fc1, fc2, qkv, proj)
    for _, m in layers:
        _forced(m, 0)
    torch.testing.assert_close(moe(x).logits, ref, rtol=0, atol=1e-12)
    # training mode: the LL-loss of every MoE linear reaches the model's aux loss
    moe.train()
    aux = moe(x).aux_loss
    assert aux.requires_grad
    moe.eval()
    for _, m in layers:
        _forced(m, 1)
    shift = shiftadd_reparameterize(copy.deepcopy(dense), "shift", attention=True).double().eval()
    torch.testing.assert_close(moe(x).logits, shift(x).logits, rtol=0, atol=1e-12)
    assert len(shift_parameters(shift)) == 2 * 2 * 2 * 2


def test_reparameterise_validates():
    dense = create_model("vit_tiny_test")
    with pytest.raises(ConfigError, match="mode"):
        shiftadd_reparameterize(dense, "add")
    with pytest.raises(ConfigError, match="blocks"):
        shiftadd_reparameterize(dense, "moe", blocks=[5])
    shiftadd_reparameterize(dense, "moe", blocks=[0])
    with pytest.raises(ConfigError, match="once"):
        shiftadd_reparameterize(dense, "shift", blocks=[0])
    with pytest.raises(ConfigError, match="alpha"):
        MoELinear([nn.Linear(2, 2), nn.Linear(2, 2)], 2, 2, alpha=(1.0,))
    with pytest.raises(ConfigError, match="top_k"):
        MoELinear([nn.Linear(2, 2), nn.Linear(2, 2)], 2, 2, top_k=3)
    with pytest.raises(ConfigError, match="gate_weight"):
        MoELinear([nn.Linear(2, 2), nn.Linear(2, 2)], 2, 2, gate_weight="probs")
    with pytest.raises(ConfigError, match="weight_bits"):
        ShiftLinear(2, 2, weight_bits=1)
    with pytest.raises(ValueError, match="last dim"):
        MoELinear([nn.Linear(2, 2), nn.Linear(2, 2)], 2, 2)(torch.randn(3, 4))


def test_modelled_latency_hand_values():
    assert modelled_latency([0.4, 0.6], [6, 4]) == pytest.approx({"parallel": 0.4, "sequential": 0.8})
    assert modelled_latency([1.0, 0.0], [6, 4]) == pytest.approx({"parallel": 1.0, "sequential": 1.0})
    assert modelled_latency([0.5, 0.5], [6, 4]) == pytest.approx({"parallel": 0.5, "sequential": 0.8333333})


def test_shiftadd_cli_end_to_end_and_resume(tmp_path, capsys):
    from moevision.cli.main import main

    out = tmp_path / "sa.md"
    argv = ["shiftadd", "--dataset", "digits", "--rows", "mult,shift,moe_ll", "--seeds", "1", "--epochs", "1",
            "--pretrain-epochs", "1", "--train-subset", "300", "--test-subset", "100", "--out", str(out),
            "--work-dir", str(tmp_path / "work"), "--no-progress"]
    assert main(argv) == 0
    text = out.read_text()
    assert "LL-loss α = (6, 4)" in text and "Shift token share per layer" in text
    import json

    rep = json.loads(out.with_suffix(".json").read_text())
    r = rep["results"]["moe_ll"][0]
    assert 0.0 <= r["mean_shift_share"] <= 1.0 and len(r["shift_share"]) == 8  # 4 blocks x (fc1, fc2)
    assert rep["results"]["shift"][0]["latency_parallel"] == pytest.approx(4 / 6)
    assert list((tmp_path / "work").rglob("dense_seed0.safetensors"))
    capsys.readouterr()
    assert main(argv) == 0  # cached: no training the second time
    assert "seed 0" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["results"] == rep["results"]
    assert main(argv[:4] + ["bogus"] + argv[5:]) == 2  # an unknown row: one clear line, status 2
    assert "unknown" in capsys.readouterr().err


def test_shift_linear_under_fp16_and_called_twice_before_backward():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    m = ShiftLinear.from_linear(lin)
    x = torch.randn(5, 8) * 3  # |x| > 1: x / 2^-16 overflows fp16
    ref = m(x)
    half = m.half()(x.half()).float()
    torch.testing.assert_close(half, ref, rtol=2e-2, atol=2e-2)
    m.float().train()
    (m(x) + m(x)).sum().backward()  # a second forward before backward (two views, checkpointing)
    assert m.shift.grad is not None


def test_naive_top1_router_warns_that_it_cannot_learn():
    with pytest.warns(UserWarning, match="no gradient"):
        MoELinear([nn.Linear(2, 2), nn.Linear(2, 2)], 2, 2, router="naive")


def test_noisy_gate_init_follows_the_code():
    torch.manual_seed(0)
    code, fan_in = NoisyGate(64, 2), NoisyGate(64, 2, init="fan_in")
    assert float(code.w_gate.detach().abs().max()) > 0.5  # bound 1/sqrt(E) = 0.71
    assert float(fan_in.w_gate.detach().abs().max()) <= 1 / 8 + 1e-6  # bound 1/sqrt(D)
