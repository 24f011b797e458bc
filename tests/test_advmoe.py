"""MoE-CNN (channel-group experts, straight-through top-1) and AdvMoE's training pieces (vision_moe.md §11)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moevision.errors import ConfigError
from moevision.models.cnn import CNNConfig, MoECNN, MoEConv2d, build_cnn, straight_through_top1
from moevision.techniques.advmoe import (AdvConfig, advmoe_step, evaluate_autoattack, evaluate_robust,
                                         joint_trades_step, load_row_model, pgd_attack, trades_attack, trades_kl)


def _moe(**kw) -> MoECNN:
    torch.manual_seed(0)
    return build_cnn(**{"width": 8, "num_experts": 3, "width_ratio": 0.5, "router_widths": [4, 8],
                        "router_blocks": 1, **kw})


def test_selected_group_conv_equals_masked_full_conv():
    torch.manual_seed(0)
    conv = MoEConv2d(4, 5, 3, num_experts=3, stride=2, padding=1, bias=True)
    x = torch.randn(6, 4, 9, 9)
    sel = torch.tensor([2, 0, 2, 1, 1, 0])
    mask = F.one_hot(sel, 3).float()
    full = conv.forward_masked(x, mask)
    assert full.shape == (6, 5, 5, 5)
    torch.testing.assert_close(conv.forward_selected(x, sel), full)
    # only the selected group's channels: equal to a plain conv with that group's weights
    for b in range(6):
        e = int(sel[b])
        ref = F.conv2d(x[b:b + 1], conv.weight[5 * e:5 * e + 5], conv.bias[5 * e:5 * e + 5], 2, 1)
        torch.testing.assert_close(full[b:b + 1], ref)


def test_straight_through_gradient_is_the_mask_gradient():
    s = torch.randn(4, 3, requires_grad=True)
    m = straight_through_top1(s)
    assert torch.equal(m.detach(), F.one_hot(s.argmax(-1), 3).float())
    g = torch.randn(4, 3)
    (m * g).sum().backward()
    torch.testing.assert_close(s.grad, g)  # dL/ds = dL/dmask


def test_global_router_reaches_every_moe_conv_and_eval_path_matches_training_path():
    model = _moe().eval()
    x = torch.rand(5, 1, 12, 12)
    seen = []
    for m in model.modules():
        if isinstance(m, MoEConv2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[1].argmax(-1) if len(inp) > 1 else None))
    with torch.no_grad():
        scores = model.router_scores(x)
        model(x)  # eval + no grad: the selected-group path
    assert len(seen) == 3 and all(torch.equal(s, scores.argmax(-1)) for s in seen)
    with torch.no_grad():
        fast = model(x)
    model.train()
    for mod in model.modules():  # BN in eval, so both paths see the same statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()
    torch.testing.assert_close(model(x), fast, atol=1e-5, rtol=1e-5)


def test_router_gets_gradients_through_the_straight_through_mask_for_every_expert():
    model = _moe()
    x, y = torch.rand(8, 1, 12, 12), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    g = model.router.fc.weight.grad
    assert g is not None and (g.abs().sum(1) > 0).all()  # every expert's score row learns


def test_dense_and_narrow_models_and_flops():
    full, half = build_cnn(width=8), build_cnn(width=8, width_ratio=0.5)
    moe = _moe(num_experts=2)
    assert full.router is None and not full.router_parameters()
    f_full, f_half, f_moe = (m.inference_flops(12) for m in (full, half, moe))
    assert f_half < f_full and f_moe > f_half
    # the MoE's inference FLOPs = the narrow dense pathway + its router CNN
    router_only = moe.inference_flops(12) - half.inference_flops(12)
    assert router_only > 0
    per_layer = _moe(num_experts=2, router_scope="per_layer")
    assert per_layer.router is None and per_layer.router_parameters()
    out, s = per_layer.forward_with_router(torch.rand(2, 1, 12, 12))
    assert out.shape == (2, 10) and s.shape == (2, 2)
    with pytest.raises(ConfigError, match="model.width_ratio"):
        CNNConfig(width_ratio=1.5).validate()
    with pytest.raises(ConfigError, match="model.router_scope"):
        CNNConfig(router_scope="local").validate()
    r18 = build_cnn(arch="resnet18", width=8, num_experts=2, width_ratio=0.5, router_widths=[4], router_blocks=1)
    assert r18(torch.rand(2, 1, 16, 16)).shape == (2, 10)


def test_pgd_stays_in_the_ball_and_the_box_and_raises_the_loss():
    model = build_cnn(width=8).eval()
    torch.manual_seed(1)
    x, y = torch.rand(6, 1, 12, 12), torch.randint(0, 10, (6,))
    loss = lambda z: F.cross_entropy(model(z), y, reduction="sum")  # noqa: E731
    x_adv = pgd_attack(loss, x, eps=0.05, step=0.02, steps=5)
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert float(loss(x_adv)) > float(loss(x))
    moe = _moe()
    xt = trades_attack(moe, x, eps=0.05, step=0.03, steps=2)
    assert (xt - x).abs().max() <= 0.05 + 1e-6 and xt.min() >= 0 and xt.max() <= 1
    assert moe.training  # the attack restores the mode it found


def test_trades_kl_is_summed_over_the_batch():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    p, q = a.softmax(1), b.softmax(1)
    want = (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(trades_kl(a, b), want)


def test_each_optimiser_touches_only_its_parameters():
    """Step 1 updates θ with φ frozen (no φ gradient, φ unchanged); step 2 updates φ, not θ, against the
    updated θ. Both optimisers are real (nonzero lr), so a joint step would fail these checks."""
    model = _moe(num_experts=2)
    theta, phi = model.expert_parameters(), model.router_parameters()
    assert {id(p) for p in theta}.isdisjoint({id(p) for p in phi}) and phi
    x, y = torch.rand(8, 1, 12, 12), torch.randint(0, 10, (8,))
    cfg = AdvConfig(eps=0.05, step=0.03, steps=1)
    seen = {}

    class Spy(torch.optim.SGD):
        def step(self, *a, **k):  # record what each optimiser sees when it steps
            seen.setdefault(self.tag, []).append(
                ([p.grad is not None and bool(p.grad.abs().sum() > 0) for p in phi],
                 [p.detach().clone() for p in theta], [p.detach().clone() for p in phi]))
            return super().step(*a, **k)

    opt_t, opt_p = Spy(theta, lr=0.1), Spy(phi, lr=0.1)
    opt_t.tag, opt_p.tag = "theta", "phi"
    snap_t0 = [p.detach().clone() for p in theta]
    snap_p0 = [p.detach().clone() for p in phi]
    advmoe_step(model, x, y, opt_t, opt_p, cfg)
    phi_has_grad, theta_at_t, phi_at_t = seen["theta"][0]
    assert not any(phi_has_grad)  # step 1: no gradient reaches the router
    assert all(torch.equal(a, b) for a, b in zip(phi_at_t, snap_p0))
    _, theta_at_p, phi_at_p = seen["phi"][0]
    assert any(not torch.equal(a, b) for a, b in zip(theta_at_p, snap_t0))  # step 2 sees the updated θ
    assert all(torch.equal(a, b) for a, b in zip(theta_at_p, theta))  # ... and does not move it
    assert any(not torch.equal(a, b) for a, b in zip(phi_at_p, phi))  # φ moved in step 2
    with pytest.raises(ConfigError, match="global router"):
        advmoe_step(build_cnn(width=8), x, y, opt_t, opt_p, cfg)


def test_per_layer_router_models_are_attacked_with_fixed_routing_too():
    model = _moe(num_experts=2, router_scope="per_layer")
    x, y = torch.rand(6, 1, 12, 12), torch.randint(0, 10, (6,))
    res = evaluate_robust(model, x, y, eps=0.05, step=0.02, steps=2)
    assert "ra_fixed" in res and "ra_ste" in res and "router_acc" not in res
    assert res["ra"] <= min(res["ra_ste"], res["ra_fixed"])
    conv = next(m for m in model.modules() if isinstance(m, MoEConv2d))
    empty = torch.rand(0, conv.weight.shape[1], 6, 6)
    assert conv.forward_selected(empty, torch.zeros(0, dtype=torch.long)).shape[0] == 0


def test_router_through_moe_loss_and_joint_step_and_evaluation():
    model = _moe(num_experts=2)
    x, y = torch.rand(8, 1, 12, 12), torch.randint(0, 10, (8,))
    cfg = AdvConfig(eps=0.05, step=0.03, steps=1, router_loss="trades_through_moe")
    phi = model.router_parameters()
    snap = [p.detach().clone() for p in phi]
    advmoe_step(model, x, y, torch.optim.SGD(model.expert_parameters(), lr=0.0),
                torch.optim.SGD(phi, lr=0.5), cfg)
    assert any(not torch.equal(a, b) for a, b in zip(snap, phi))  # gradient reached φ through the STE
    info = joint_trades_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.01), cfg)
    assert set(info) == {"loss"}
    res = evaluate_robust(model, x, y, eps=0.05, step=0.02, steps=2, batch_size=4)
    assert set(res) == {"sa", "ra", "ra_ste", "ra_fixed", "router_acc", "router_ra", "eval_version"}
    assert 0 <= res["ra"] <= min(res["ra_ste"], res["ra_fixed"])  # robust = survives both attacks
    with pytest.raises(ConfigError, match="router_loss"):
        AdvConfig(router_loss="x").validate()


def test_advmoe_cli_on_digits(tmp_path, capsys):
    from moevision.cli.main import main

    out = tmp_path / "adv.md"
    rc = main(["advmoe", "--dataset", "digits", "--rows", "dense_half,advmoe", "--seeds", "1", "--epochs", "1",
               "--train-subset", "256", "--test-subset", "64", "--out", str(out), "--work-dir",
               str(tmp_path / "w"), "--no-progress"])
    assert rc == 0
    text = out.read_text()
    assert "AdvMoE (alternating" in text and "dense CNN, half width" in text
    # the trained weights are kept (safetensors, config in the metadata) and load back exactly
    saved = sorted((tmp_path / "w").glob("*/advmoe_seed0.safetensors"))
    assert len(saved) == 1
    model = load_row_model(saved[0]).eval()
    assert model.is_moe and model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ConfigError, match="metadata"):
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
        load_row_model(tmp_path / "bare.safetensors")
    assert main(["advmoe", "--eps", "2"]) != 0
    assert "--eps must be in (0, 1]" in capsys.readouterr().err


def test_autoattack_is_no_stronger_than_clean_and_stays_in_the_ball():
    pytest.importorskip("pyautoattack")
    model = build_cnn(width=8).eval()
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 12, 12), torch.randint(0, 10, (16,))
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    aa = evaluate_autoattack(model, x, y, eps=0.05, attacks=("apgd-ce",), batch_size=16)
    with pytest.raises(ConfigError, match="unknown AutoAttack"):
        evaluate_autoattack(model, x, y, eps=0.05, attacks=("pgd",))
    assert 0.0 <= aa <= clean


def test_fixed_routing_gradient_is_the_gradient_with_the_routing_frozen():
    from moevision.models.cnn import FixedRouting

    model = _moe(num_experts=2).eval()
    x = torch.rand(4, 1, 12, 12, requires_grad=True)
    with torch.no_grad():
        scores = model.router_scores(x)
    g_fixed, = torch.autograd.grad(FixedRouting(model)(x).square().sum(), x)
    g_ste, = torch.autograd.grad(model(x).square().sum(), x)

    class Const(torch.nn.Module):  # the same routing, but no path from the input to the scores
        def forward(self, z):
            return scores

    router, model.router = model.router, Const()
    g_frozen, = torch.autograd.grad(model(x).square().sum(), x)
    model.router = router
    torch.testing.assert_close(g_fixed, g_frozen)
    assert not torch.allclose(g_ste, g_frozen)  # the straight-through surrogate adds the router's path


def test_training_attack_with_fixed_routing():
    model = _moe(num_experts=2)
    x = torch.rand(4, 1, 12, 12)
    torch.manual_seed(0)
    a = trades_attack(model, x, eps=0.05, step=0.03, steps=2, straight_through=False)
    torch.manual_seed(0)
    b = trades_attack(model, x, eps=0.05, step=0.03, steps=2)
    assert (a - x).abs().max() <= 0.05 + 1e-6 and not torch.equal(a, b)
    with pytest.raises(ConfigError, match="attack_routing"):
        AdvConfig(attack_routing="ste").validate()
    cfg = AdvConfig(eps=0.05, step=0.03, steps=1, attack_routing="fixed")
    y = torch.randint(0, 10, (4,))
    assert "loss" in joint_trades_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.01), cfg)
