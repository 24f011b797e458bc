"""MomentumSMoE: closed-form recurrences (vision_moe.md §5(e))."""

import pytest
import torch

import moevision as mv
from moevision.techniques import robust_constants


def _constant_moe_model(c1, c2, **block_options):
    """2 MoE blocks whose attention outputs 0 and whose MoE outputs the constants c1, c2 (E=1)."""
    m = mv.create_model("vit_tiny_test", depth=2, moe_layers="all", num_experts=1, top_k=1,
                        block="momentum", block_options=block_options).double().eval()
    with torch.no_grad():
        for blk, c in zip(m.blocks, (c1, c2)):
            blk.attn.proj.weight.zero_()
            blk.attn.proj.bias.zero_()
            ex = blk.mlp.experts
            ex.w2.zero_()
            ex.b2.copy_(c.view(1, -1))
    return m


def _run_blocks(m, x):
    state = {}
    for blk in m.blocks:
        x, _, _ = blk(x, state)
    return x, state


def test_heavy_ball_two_layer_closed_form():
    c1, c2 = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    mu, g = 0.7, 0.5
    m = _constant_moe_model(c1, c2, mu=mu, gamma=g)
    x0 = torch.randn(2, 5, 32, dtype=torch.float64)
    x2, state = _run_blocks(m, x0)
    # m1 = g c1, x1 = x0 + g c1; m2 = mu g c1 + g c2, x2 = x1 + m2
    torch.testing.assert_close(x2, x0 + g * c1 + (mu * g * c1 + g * c2))
    torch.testing.assert_close(state["m"], (mu * g * c1 + g * c2).expand_as(x0))


def test_mu_zero_gamma_one_is_the_plain_moe_model():
    plain = mv.create_model("moe_vit_tiny_test", depth=4).eval()
    mom = mv.create_model("moe_vit_tiny_test", depth=4, block="momentum",
                          block_options={"mu": 0.0, "gamma": 1.0}).eval()
    mom.load_state_dict(plain.state_dict())
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(mom(x).logits, plain(x).logits)


def test_robust_constants_and_recurrence():
    a, b, gr = robust_constants(1.25, 0.2)
    assert (round(a, 6), round(b, 6), round(gr, 6)) == (0.96, 0.04, 0.041667)
    with pytest.warns(UserWarning, match="outside"):
        robust_constants(1.25, 0.5)
    c1, c2 = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    m = _constant_moe_model(c1, c2, variant="robust", kappa=1.25, rho=0.2)
    x0 = torch.randn(1, 3, 32, dtype=torch.float64)
    x2, _ = _run_blocks(m, x0)
    # p1 = c1, x1 = x0 + a c1; p2 = c2 + b p1, x2 = x1 + a p2 (constant experts ignore the look-ahead)
    torch.testing.assert_close(x2, x0 + a * c1 + a * (c2 + b * c1))


def test_adam_first_layer_closed_form():
    c1 = torch.tensor([3.0, -2.0] * 16, dtype=torch.float64)
    c2 = torch.randn(32, dtype=torch.float64)
    m = _constant_moe_model(c1, c2, variant="adam", mu=0.7, gamma=1.0, gamma1=1.0)
    x0 = torch.zeros(1, 2, 32, dtype=torch.float64)
    x2, state = _run_blocks(m, x0)
    # zero init: a/sqrt(v + eps) = (1 - b1)/sqrt(1 - b2) * sign(f) for |f| >> sqrt(eps)
    step1 = (1 - 0.9) / (1 - 0.999) ** 0.5 * torch.sign(c1)
    torch.testing.assert_close(x2, (step1 + (0.7 * c1 + c2)).expand_as(x2), rtol=1e-5, atol=1e-5)  # eps=1e-8 in sqrt


def test_dense_blocks_pass_buffer_and_state_resets_per_call():
    m = mv.create_model("moe_vit_tiny_test", depth=4, moe_layers=[1, 3], block="momentum").eval()
    x = torch.randn(2, 1, 16, 16)
    a, b = m(x).logits, m(x).logits
    assert torch.equal(a, b)  # no state leaks across calls
    # gradient flows through the buffer to the first MoE block's experts from the last block's output
    m.train()
    out = m(x)
    out.logits.sum().backward()
    assert m.blocks[1].mlp.experts.w2.grad.abs().sum() > 0


def test_bad_block_options():
    with pytest.raises(mv.ConfigError, match="block_options"):
        mv.create_model("moe_vit_tiny_test", block="momentum", block_options={"muu": 0.5})
    with pytest.raises(mv.ConfigError, match="variant"):
        mv.create_model("moe_vit_tiny_test", block="momentum", block_options={"variant": "nesterov"})
    with pytest.raises(mv.ConfigError, match="unknown block"):
        mv.create_model("moe_vit_tiny_test", block="wavy")


def test_default_has_no_momentum_parameters():
    """learnable=False (default): mu, gamma stay plain floats; no parameter or state-dict key is added."""
    plain = mv.create_model("moe_vit_tiny_test", depth=4)
    mom = mv.create_model("moe_vit_tiny_test", depth=4, block="momentum", block_options={"mu": 0.7, "gamma": 0.5})
    assert [n for n, _ in mom.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(mom.state_dict()) == list(plain.state_dict())
    assert all(type(b.mu) is float and type(b.gamma) is float for b in mom.blocks)


def test_learnable_mu_gamma_are_trained_scalar_parameters():
    """learnable=True (paper ablation): per MoE block scalar parameters initialised to mu, gamma; the
    forward is unchanged at init and the gradients match the two-layer closed form
    x2 = x0 + g1 c1 + mu2 g1 c1 + g2 c2 (summed over the B*N tokens)."""
    c1, c2 = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    mu, g = 0.75, 0.5  # exact in fp32 (parameters are created in the default dtype, then .double())
    fixed = _constant_moe_model(c1, c2, mu=mu, gamma=g)
    m = _constant_moe_model(c1, c2, mu=mu, gamma=g, learnable=True)
    for blk in m.blocks:
        assert isinstance(blk.mu, torch.nn.Parameter) and blk.mu.shape == () and blk.mu.item() == mu
        assert isinstance(blk.gamma, torch.nn.Parameter) and blk.gamma.item() == g
    assert {"blocks.0.mu", "blocks.0.gamma", "blocks.1.mu", "blocks.1.gamma"} <= set(m.state_dict())
    x0 = torch.randn(2, 5, 32, dtype=torch.float64)
    x2, _ = _run_blocks(m, x0)
    assert torch.equal(x2, _run_blocks(fixed, x0)[0])
    x2.sum().backward()
    b0, b1 = m.blocks
    n = 2 * 5
    torch.testing.assert_close(b1.mu.grad, n * g * c1.sum())
    torch.testing.assert_close(b1.gamma.grad, n * c2.sum())
    torch.testing.assert_close(b0.gamma.grad, n * (1 + mu) * c1.sum())
    assert b0.mu.grad is None  # the first MoE block has no buffer to carry
    with pytest.raises(mv.ConfigError, match="robust"):
        mv.create_model("moe_vit_tiny_test", block="momentum", block_options={"variant": "robust", "learnable": True})


def test_learnable_momentum_from_run_config_trains_and_round_trips(tmp_path):
    from moevision import config as C
    from moevision.recipes import get_recipe
    from moevision.train import fit

    cfg = get_recipe("smoke_synthetic")
    cfg.train.num_threads = None
    for k, v in {"model.block": "momentum", "model.block_options": {"mu": 0.7, "gamma": 1.0, "learnable": True},
                 "train.max_steps": 4}.items():
        C.set_by_path(cfg, k, v)
    C.validate_config(cfg)
    fit(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    m = mv.from_pretrained(tmp_path / "run" / "model")
    moe_blocks = [b for b in m.blocks if isinstance(b.mlp, mv.MoE)]
    assert moe_blocks and all(isinstance(b.gamma, torch.nn.Parameter) for b in moe_blocks)
    assert all(b.gamma.item() != 1.0 for b in moe_blocks)  # the optimiser moved them
    assert all(type(b.mu) is float for b in m.blocks if not isinstance(b.mlp, mv.MoE))  # dense: no parameters
