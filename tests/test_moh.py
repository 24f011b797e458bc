"""Mixture-of-Head attention: the oracle tests of vision_moe.md §7(e)."""

import pytest
import torch

import moevision as mv
from moevision.layers import Attention
from moevision.techniques import MoHAttention


@pytest.mark.parametrize("shared,top_k", [(0, 6), (6, 0), (2, 4)])
def test_zero_routers_with_all_heads_active_equal_mha(shared, top_k):
    mha = Attention(48, 6).double().eval()
    moh = MoHAttention.from_mha(mha, shared_heads=shared, top_k=top_k).eval()
    assert torch.equal(moh.qkv.weight, mha.qkv.weight) and torch.equal(moh.proj.bias, mha.proj.bias)
    x = torch.randn(2, 9, 48, dtype=torch.float64)
    g, _, _ = moh.gates(x)
    torch.testing.assert_close(g, torch.ones_like(g))
    torch.testing.assert_close(moh(x).out, mha(x), rtol=1e-6, atol=1e-6)


def test_gate_structure_exactly_k_routed_heads():
    moh = MoHAttention(48, 6, shared_heads=2, top_k=2)
    x = torch.randn(3, 7, 48)
    g, r, mask = moh.gates(x)
    gs, gr = g[..., :2], g[..., 2:]
    assert ((gr > 0).sum(-1) == 2).all() and (mask.sum(-1) == 2).all()
    a = (moh.wg_mix(x).softmax(-1) * 2)
    torch.testing.assert_close(gr.sum(-1), 2 * a[..., 1])  # sum g_routed = K * a2
    torch.testing.assert_close(gs.sum(-1), 2 * a[..., 0])  # sum g_shared = h_s * a1
    torch.testing.assert_close(a.sum(-1), torch.full((3, 7), 2.0))  # a1 + a2 = 2


def test_head_balance_loss_values():
    moh = MoHAttention(32, 4, shared_heads=0, top_k=2)
    torch.nn.init.zeros_(moh.wg_routed.weight)
    out = moh(torch.randn(2, 5, 32))
    # uniform r = 1/4; ties -> topk picks 2 heads for every token: f = [1, 1, 0, 0] (some 2 heads), P = 1/4
    # L_b = h_r * sum f_i P_i = 4 * (1/4 + 1/4) = 2 = K
    assert abs(float(out.stats.aux_losses["head_balance"]) - 2.0) < 1e-6
    # collapsed routing (every token prefers heads 0, 1 strongly) is penalised more
    with torch.no_grad():
        moh.wg_routed.weight.zero_()
        moh.wg_routed.weight[0, 0] = moh.wg_routed.weight[1, 0] = 50.0
    x = torch.zeros(2, 5, 32)
    x[..., 0] = 1.0
    assert float(moh(x).stats.aux_losses["head_balance"]) > 3.9  # -> 4 * (1 * 0.5 + 1 * 0.5) = 4


def test_moh_in_vit_trains_and_round_trips(tmp_path):
    m = mv.create_model("vit_tiny_test", num_heads=4, attention="moh",
                        attention_options={"shared_heads": 2, "top_k": 1})
    assert all(isinstance(b.attn, MoHAttention) for b in m.blocks)
    out = m(torch.randn(2, 1, 16, 16))
    assert float(out.aux_loss.detach()) > 0  # head-balance loss reaches the model's aux loss
    (out.logits.sum() + out.aux_loss).backward()
    assert m.blocks[0].attn.wg_routed.weight.grad.abs().sum() > 0
    m.eval()
    m.save_pretrained(tmp_path / "moh")
    m2 = mv.from_pretrained(tmp_path / "moh").eval()
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(m(x).logits, m2(x).logits)
    with pytest.raises(mv.ConfigError, match="attention_options"):
        mv.create_model("vit_tiny_test", attention="moh", attention_options={"shared_headz": 1})
    with pytest.raises(mv.ConfigError, match="top_k"):
        mv.create_model("vit_tiny_test", attention="moh", attention_options={"shared_heads": 0, "top_k": 5})


def _oracle_head_balance(attn, x):
    """L_b = h_r * sum_i f_i P_i from the layer's router weight (vision_moe.md §7(b)), by hand."""
    r = torch.softmax(x.double() @ attn.wg_routed.weight.detach().double().T, -1)
    mask = torch.zeros_like(r).scatter(-1, r.topk(attn.top_k, -1).indices, 1.0)
    return attn.routed_heads * (mask.mean((0, 1)) * r.mean((0, 1))).sum()


@pytest.mark.parametrize("arch", ["vit_tiny_test", "moe_vit_tiny_test"])
def test_model_head_balance_loss_is_mean_over_moh_layers(arch):
    """Reference MoH-ViT engine: loss += 0.01 * sum(LOSSES) / len(LOSSES) -- the MEAN over MoH layers
    (the sum would be 4x too large at depth 4); MoE-FFN aux losses are still added per layer."""
    torch.manual_seed(0)
    m = mv.create_model(arch, depth=4, num_heads=4, attention="moh",
                        attention_options={"shared_heads": 1, "top_k": 1}).train()
    inputs, moe_aux = [], []
    for b in m.blocks:
        b.attn.register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach()))
        if isinstance(b.mlp, mv.moe.MoE):
            b.mlp.register_forward_hook(lambda mod, a, o: moe_aux.append(float(o.aux_loss.detach())))
    out = m(torch.randn(3, 1, 16, 16))
    lb = [float(_oracle_head_balance(b.attn, x)) for b, x in zip(m.blocks, inputs)]
    assert len(lb) == 4 and all(0.99 < v < 1.5 for v in lb)
    expected = 0.01 * sum(lb) / len(lb) + sum(moe_aux)
    assert (arch == "moe_vit_tiny_test") == bool(moe_aux)
    assert abs(float(out.aux_loss.detach()) - expected) < 1e-7
    # a standalone layer (no model around it) keeps 0.01 * L_b
    attn = m.blocks[0].attn
    solo = MoHAttention(32, 4, shared_heads=1, top_k=1)
    solo.load_state_dict(attn.state_dict())
    assert solo.aux_layers == 1 and attn.aux_layers == 4
    x = inputs[0]
    assert abs(float(solo(x).aux_loss.detach()) - 0.01 * float(_oracle_head_balance(solo, x))) < 1e-8
