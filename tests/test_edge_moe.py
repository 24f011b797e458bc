"""Edge-MoE's numerics wired into a model for hardware-parity evaluation (techniques/edge_moe.py):
ap_fixed emulation, the GELU table and the single-pass softmax in place of the float ones."""

import pytest
import torch

from moevision import MoE
from moevision.layers import Attention, Mlp
from moevision.models.vit import ViTConfig, VisionTransformer
from moevision.techniques.edge_moe import GELULUT, edge_numerics, gelu_lut, quantize_fixed

D64 = torch.float64


def test_quantize_fixed_follows_ap_fixed_modes():
    # ap_fixed<4, 2>: step 0.25, range [-2, 1.75]
    x = torch.tensor([0.13, -0.13, 1.9, 2.1, -2.2, 1.75, -2.0], dtype=D64)
    assert quantize_fixed(x, 4, 2).tolist() == [0.0, -0.25, 1.75, -2.0, 1.75, 1.75, -2.0]  # AP_TRN, AP_WRAP
    assert quantize_fixed(x, 4, 2, overflow="sat").tolist() == [0.0, -0.25, 1.75, 1.75, -2.0, 1.75, -2.0]
    assert quantize_fixed(x, 4, 2, rounding="rnd", overflow="sat").tolist() == [0.25, -0.25, 1.75, 1.75, -2.0,
                                                                                  1.75, -2.0]
    y = torch.rand(1000, dtype=D64) * 3.9 - 1.95  # inside ap_fixed<16, 2>'s range [-2, 2)
    q = quantize_fixed(y, 16, 2)
    assert torch.equal(q * 2 ** 14, (q * 2 ** 14).round()) and (y - q).max() < 2 ** -14 and (y - q).min() >= 0
    with pytest.raises(ValueError, match="int_bits"):
        quantize_fixed(y, 4, 5)
    with pytest.raises(ValueError, match="rounding"):
        quantize_fixed(y, 8, 2, rounding="up")


def test_mlp_attention_and_experts_use_the_edge_numerics():
    torch.manual_seed(0)
    mlp = Mlp(8, 16).to(D64)
    x = torch.randn(5, 8, dtype=D64)
    e_mlp = edge_numerics(torch.nn.Sequential(mlp))[0]
    assert isinstance(e_mlp.act, GELULUT) and isinstance(mlp.act, torch.nn.GELU)  # the original is untouched
    torch.testing.assert_close(e_mlp(x), mlp.fc2(gelu_lut(mlp.fc1(x))), atol=1e-12, rtol=0)
    assert (e_mlp(x) - mlp(x)).abs().max() > 1e-7  # the table is not the exact GELU

    attn = Attention(8, 2).to(D64)
    e_attn = edge_numerics(torch.nn.Sequential(attn))[0]
    xs = torch.randn(2, 6, 8, dtype=D64)
    torch.testing.assert_close(e_attn(xs), attn(xs), atol=1e-12, rtol=0)  # single-pass softmax is exact

    moe = MoE(8, 16, 1, 1, noise_std=0.0).to(D64).eval()  # one expert: out = its MLP (gate = softmax = 1)
    e_moe = edge_numerics(torch.nn.Sequential(moe))[0]
    assert e_moe.impl == "sorted"
    ex = moe.experts
    want = gelu_lut(x @ ex.w1[0] + ex.b1[0]) @ ex.w2[0] + ex.b2[0]
    torch.testing.assert_close(e_moe(x).out, want, atol=1e-12, rtol=0)


def _vit():
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                    num_classes=3, moe_layers=[1], num_experts=4, top_k=2)
    return VisionTransformer(cfg).eval()


def test_fixed_point_weights_and_features():
    vit = _vit()
    x = torch.randn(3, 1, 8, 8)
    e = edge_numerics(vit, weights=(16, 2), features=(32, 10))
    for name, p in e.named_parameters():
        owner = e.get_submodule(name.rsplit(".", 1)[0]) if "." in name else e
        if isinstance(owner, (torch.nn.Linear, torch.nn.Conv2d)) or ".experts." in name or ".router." in name:
            assert torch.equal(p * 2 ** 14, (p * 2 ** 14).round()) and p.abs().max() <= 2, name
        else:  # LayerNorm, embeddings: not a linear weight in Edge-MoE's sense
            assert torch.equal(p, vit.get_parameter(name)), name
    seen = []
    e.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o))  # runs after the quantising hook
    out = e(x).logits
    assert torch.equal(seen[0] * 2 ** 22, (seen[0] * 2 ** 22).round())
    base = vit(x).logits
    assert (out - base).abs().max() < 1e-2 * base.abs().max()  # close to the float model, not equal
    coarse = edge_numerics(vit, weights=(6, 2), features=(8, 4))(x).logits
    assert (coarse - base).abs().max() > (out - base).abs().max()
    with pytest.raises(ValueError, match="weights"):
        edge_numerics(vit, weights=(16,))
