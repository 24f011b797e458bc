"""Union of Experts (vision_moe.md §13): exact decompositions, routing, index addition, FLOPs, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moevision.errors import ConfigError
from moevision.layers import Attention, Mlp
from moevision.models.vit import ViTConfig, VisionTransformer
from moevision.techniques.uoe import (SMHA, DecomposedMHA, DecomposedMLP, UoME, smha_flops, uoe_vit,
                                      uome_flops)

D64 = torch.float64


def _mlp(dim=8, hidden=16, act=nn.GELU, seed=0) -> Mlp:
    torch.manual_seed(seed)
    m = Mlp(dim, hidden, act_layer=act).to(D64)
    for p in m.parameters():  # non-zero biases, so that "b2 once" is tested
        nn.init.normal_(p, std=0.5)
    return m


def _attn(dim=8, heads=4, seed=0) -> Attention:
    torch.manual_seed(seed)
    a = Attention(dim, heads).to(D64)
    for p in a.parameters():
        nn.init.normal_(p, std=0.5)
    return a


def _expert_oracle(mlp: Mlp, n: int, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of the exact decomposition, straight from the dense weights: W2[:, H_e] act(W1[H_e] x + b1[H_e])."""
    Fe = mlp.fc1.out_features // n
    H = slice(e * Fe, (e + 1) * Fe)
    return mlp.act(x @ mlp.fc1.weight[H].t() + mlp.fc1.bias[H]) @ mlp.fc2.weight[:, H].t()


# ---- exact decompositions ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU])
def test_decomposed_mlp_equals_dense(n, act):
    mlp = _mlp(act=act)
    dec = DecomposedMLP.from_mlp(mlp, n)
    x = torch.randn(3, 5, 8, dtype=D64)
    torch.testing.assert_close(dec(x), mlp(x), atol=1e-12, rtol=0)
    # each expert is its hidden slice, and the slices sum to the dense MLP minus b2
    parts = sum(dec.partial(x, torch.full((3,), e)) for e in range(n))
    torch.testing.assert_close(parts + mlp.fc2.bias, mlp(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(dec.partial(x, torch.full((3,), n - 1)), _expert_oracle(mlp, n, n - 1, x),
                               atol=1e-12, rtol=0)


def test_input_split_is_the_block_diagonal_first_layer():
    torch.manual_seed(0)
    dec = DecomposedMLP(8, 16, 4, input_split=True).to(D64)
    nn.init.normal_(dec.b1)
    W1 = torch.block_diag(*[dec.w1[e].t() for e in range(4)])  # (16, 8): expert e sees x[..., 2e:2e+2]
    x = torch.randn(2, 3, 8, dtype=D64)
    want = F.gelu(x @ W1.t() + dec.b1.flatten()) @ dec.w2.reshape(16, 8) + dec.b2
    torch.testing.assert_close(dec(x), want, atol=1e-12, rtol=0)
    g = torch.tensor([2, 0])
    torch.testing.assert_close(dec.partial(x, g)[0], F.gelu(x[0, :, 4:6] @ dec.w1[2] + dec.b1[2]) @ dec.w2[2])
    with pytest.raises(ConfigError, match="not a decomposition"):
        DecomposedMLP.from_mlp(_mlp(), 4, input_split=True)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_decomposed_mha_equals_dense(n):
    attn = _attn()
    dec = DecomposedMHA.from_attention(attn, n)
    x = torch.randn(2, 6, 8, dtype=D64)
    torch.testing.assert_close(dec(x), attn(x), atol=1e-12, rtol=0)
    assert dec.heads(x).shape == (2, n, 6, 8)


# ---- UoME -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix,router", [(0, "sequence"), (1, "sequence"), (1, "mean")])
def test_uome_with_all_experts_and_patches_is_the_dense_mlp(prefix, router):
    mlp = _mlp()
    N = prefix + 12
    u = UoME(DecomposedMLP.from_mlp(mlp, 4), seq_len=N, top_k=4, n_patches=3, patch_capacity=3,
             num_prefix_tokens=prefix, router=router).to(D64)
    x = torch.randn(3, N, 8, dtype=D64)
    out = u(x)
    torch.testing.assert_close(out.out, mlp(x), atol=1e-12, rtol=0)
    assert float(out.stats.dropped_token_fraction) == 0.0
    # fewer experts or patches is a different function (the test above can fail)
    u.top_k, u.patch_capacity = 2, 2
    assert (u(x).out - mlp(x)).abs().max() > 1e-3


def _fixed_route(u: UoME, experts, patches):
    """Replace u's routing by fixed selections: experts (B, K), patches (B, K, C)."""
    def route(x):
        B = x.shape[0]
        logp = torch.full((B, u.num_experts), -math.log(u.num_experts))
        logs = torch.full((B, u.top_k, u.n_patches), -math.log(u.n_patches))
        return logp, torch.tensor(experts), logs, torch.tensor(patches)
    u.route = route


def test_index_addition_sums_overlaps_and_zeroes_unselected_patches():
    """6 patch tokens in m=3 patches of 2 tokens. Image 0: experts 1 and 3 take patches {0,1} and {1,2};
    patch 1 gets expert 1 + expert 3. Image 1: experts 0 and 2 both take patch 0 only; patches 1, 2 get 0."""
    mlp = _mlp()
    u = UoME(DecomposedMLP.from_mlp(mlp, 4), seq_len=6, top_k=2, n_patches=3, patch_capacity=2).to(D64)
    x = torch.randn(2, 6, 8, dtype=D64)
    _fixed_route(u, [[1, 3], [0, 2]], [[[0, 1], [1, 2]], [[0, 2], [1, 2]]])  # image 1: checked below, c=1
    out = u(x).out
    e = lambda k, rows, b: _expert_oracle(mlp, 4, k, x[b, rows])  # noqa: E731
    b2 = mlp.fc2.bias
    want0 = torch.cat([e(1, slice(0, 2), 0) + b2, e(1, slice(2, 4), 0) + e(3, slice(2, 4), 0) + b2,
                       e(3, slice(4, 6), 0) + b2])
    torch.testing.assert_close(out[0], want0, atol=1e-12, rtol=0)

    u1 = UoME(u.mlp, seq_len=6, top_k=2, n_patches=3, patch_capacity=1).to(D64)
    _fixed_route(u1, [[0, 2]], [[[0], [0]]])
    got = u1(x[1:]).out[0]
    torch.testing.assert_close(got[:2], e(0, slice(0, 2), 1) + e(2, slice(0, 2), 1) + b2, atol=1e-12, rtol=0)
    assert torch.equal(got[2:], torch.zeros(4, 8, dtype=D64))
    assert abs(float(u1(x[1:]).stats.dropped_token_fraction) - 4 / 6) < 1e-6


@pytest.mark.parametrize("router", ["sequence", "mean"])
def test_patches_never_straddle_images(router):
    torch.manual_seed(0)
    u = UoME(DecomposedMLP(8, 16, 4), seq_len=13, top_k=2, n_patches=4, patch_capacity=2, num_prefix_tokens=1,
             router=router)
    x = torch.randn(3, 13, 8)
    y = u(x).out
    x2 = x.clone()
    x2[1] += torch.randn(13, 8) * 3  # perturb image 1 only
    y2 = u(x2).out
    assert torch.equal(y[0], y2[0]) and torch.equal(y[2], y2[2])
    assert not torch.equal(y[1], y2[1])
    # every selected expert's tokens are whole patches of its own image: the covered positions of each image
    # come in complete runs of l_p = 3 tokens
    _, _, _, patches = u.route(x)
    assert patches.min() >= 0 and patches.max() < 4
    assert (patches[..., 1:] > patches[..., :-1]).all()  # distinct and sorted


def test_uome_routers_get_no_gradient_by_default_and_do_with_the_options():
    torch.manual_seed(0)
    dec = DecomposedMLP(8, 16, 4)
    x = torch.randn(3, 13, 8)
    outs = {}
    for opt in ({}, {"straight_through": True}, {"weight_by_prob": True}):
        torch.manual_seed(1)
        u = UoME(dec, seq_len=13, top_k=2, n_patches=4, patch_capacity=2, num_prefix_tokens=1, **opt)
        y = u(x).out
        outs[tuple(opt)] = y.detach()
        (y ** 2).sum().backward()
        grads = [u.router.weight.grad, u.scorer.weight.grad]
        if not opt:  # the released code: the probabilities only select
            assert all(g is None for g in grads)
        else:
            assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        dec.zero_grad()
    assert torch.equal(outs[()], outs[("straight_through",)])  # straight-through keeps the forward pass
    assert not torch.allclose(outs[()], outs[("weight_by_prob",)])


@pytest.mark.parametrize("layer", ["uome", "smha"])
def test_straight_through_gives_the_routers_weight_by_probs_gradient(layer):
    """With a loss linear in the output, the upstream gradient does not depend on the forward pass, so the
    straight-through router gradients must equal those of weight_by_prob exactly."""
    torch.manual_seed(0)
    x, grads = torch.randn(3, 13, 8, dtype=D64), []
    c = torch.randn(3, 13, 8, dtype=D64)
    for opt in ({"straight_through": True}, {"weight_by_prob": True}):
        torch.manual_seed(1)
        if layer == "uome":
            m = UoME(DecomposedMLP(8, 16, 4), seq_len=13, top_k=2, n_patches=4, patch_capacity=2,
                     num_prefix_tokens=1, **opt).to(D64)
            params = [m.router.weight, m.router.bias, m.scorer.weight]
        else:
            m = SMHA(DecomposedMHA(8, 4, 4), top_k=2, **opt).to(D64)
            params = [m.gate.weight, m.gate.bias]
        (m(x).out * c).sum().backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_uome_weight_by_prob_hand_computed():
    """weight_by_prob: expert e's output on patch j is scaled by p_e · m · s_ej."""
    mlp = _mlp()
    u = UoME(DecomposedMLP.from_mlp(mlp, 4), seq_len=6, top_k=1, n_patches=3, patch_capacity=1,
             weight_by_prob=True).to(D64)
    x = torch.randn(1, 6, 8, dtype=D64)
    p = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    s = torch.tensor([[[0.2, 0.5, 0.3]]])
    u.route = lambda x_: (p.log(), torch.tensor([[1]]), s.log(), torch.tensor([[[2]]]))
    got = u(x).out[0]
    want = 0.6 * 3 * 0.3 * _expert_oracle(mlp, 4, 1, x[0, 4:6]) + mlp.fc2.bias
    torch.testing.assert_close(got[4:6], want, atol=1e-6, rtol=0)  # routing weights are fp32
    assert torch.equal(got[:4], torch.zeros(4, 8, dtype=D64))


def test_uome_flops_scale_as_k_over_n_times_c_over_m():
    full = uome_flops(64, 256, 4, 4, 7, 7, seq_len=49)
    dense_mlp = 2 * 49 * 2 * 64 * 256
    assert full["experts"] == dense_mlp
    for k in (1, 2, 3, 4):
        for c in (1, 3, 4, 7):
            f = uome_flops(64, 256, 4, k, 7, c, seq_len=49)
            assert f["experts"] * 4 * 7 == dense_mlp * k * c
            assert f["routing"] == 2 * (49 * 64 * 4 + 7 * 64 * 4)
    # the layer reports the same count for its batch
    u = UoME(DecomposedMLP(64, 256, 4), seq_len=50, top_k=2, n_patches=7, patch_capacity=4, num_prefix_tokens=1)
    st = u(torch.randn(3, 50, 64)).stats
    assert float(st.flops) == 3 * uome_flops(64, 256, 4, 2, 7, 4, 50, 1)["total"]
    assert float(st.tokens_per_expert.sum()) == 3 * 2 * (1 + 4 * 7)


# ---- SMHA ---------------------------------------------------------------------------------------------
def test_smha_with_every_head_is_the_dense_attention():
    attn = _attn()
    s = SMHA(DecomposedMHA.from_attention(attn, 4), top_k=4).to(D64)
    x = torch.randn(2, 6, 8, dtype=D64)
    torch.testing.assert_close(s(x).out, attn(x), atol=1e-12, rtol=0)
    s.top_k = 2
    assert (s(x).out - attn(x)).abs().max() > 1e-3


def test_smha_heads_attend_only_among_their_routed_tokens():
    """Brute force: for each image and head, dense attention of that head on its routed tokens alone."""
    attn = _attn(seed=3)
    s = SMHA(DecomposedMHA.from_attention(attn, 4), top_k=2).to(D64)
    torch.manual_seed(4)
    x = torch.randn(3, 7, 8, dtype=D64)
    _, mask, _ = s.route(x)
    got = s(x).out
    W, b = attn.qkv.weight.view(3, 4, 2, 8), attn.qkv.bias.view(3, 4, 2)
    want = attn.proj.bias.expand(3, 7, 8).clone()
    for bi in range(3):
        for h in range(4):
            idx = mask[bi, :, h].nonzero().flatten()
            if len(idx) == 0:
                continue
            xs = x[bi, idx]
            q, k, v = (xs @ W[j, h].t() + b[j, h] for j in range(3))
            o = torch.softmax(q @ k.t() / math.sqrt(2), -1) @ v
            want[bi, idx] += o @ attn.proj.weight[:, 2 * h:2 * h + 2].t()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert (mask.sum(-1) == 2).all()


def test_switchgate_normalisation_sums_to_the_capacity_over_the_batch():
    torch.manual_seed(0)
    s = SMHA(DecomposedMHA(8, 4, 4), top_k=2, capacity_factor=1.5)
    x = torch.randn(4, 5, 8)
    p, mask, g = s.route(x)
    cap = int(1.5 * 4)
    tot = g.sum(0)  # (N, E)
    routed = mask.any(0)
    torch.testing.assert_close(tot[routed], torch.full_like(tot[routed], float(cap)), atol=1e-4, rtol=1e-5)
    assert (tot[~routed] == 0).all() and (g[~mask] == 0).all()
    g_none = SMHA(s.attn, top_k=2, normalize="none")
    g_none.gate = s.gate
    assert torch.equal(g_none.route(x)[2], p * mask)


def test_smha_gradients_and_image_independence():
    torch.manual_seed(0)
    dec = DecomposedMHA(8, 4, 4)
    x = torch.randn(3, 5, 8)
    for opt in ({}, {"straight_through": True}):
        s = SMHA(dec, **opt)
        s(x).out.pow(2).sum().backward()
        g = s.gate.weight.grad
        assert (g is None) if not opt else (torch.isfinite(g).all() and g.abs().sum() > 0)
    s = SMHA(dec)  # selection only: one image's tokens never change another's output
    x2 = x.clone()
    x2[0] += 2.0
    assert torch.equal(s(x).out[1:], s(x2).out[1:])


def test_smha_flops_hand_count():
    # D=8, E=4 experts of De=2; expert token counts 3 and 1 (others 0); gate N·D·E
    f = smha_flops(8, 4, [3, 1, 0, 0], seq_len=4)
    heads = (4 * 3 * 8 * 2 + 2 * 9 * 2) + (4 * 1 * 8 * 2 + 2 * 1 * 2)
    assert f["total"] == 2 * (heads + 4 * 8 * 4)


# ---- the ViT conversion ---------------------------------------------------------------------------------
def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=4, mlp_ratio=2.0))
    for blk in m.blocks:
        for p in blk.parameters():
            nn.init.normal_(p, std=0.2)
    return m.to(D64).eval()


def test_uoe_vit_with_everything_selected_is_the_dense_model():
    m = _vit()
    x = torch.randn(2, 1, 8, 8, dtype=D64)
    u = uoe_vit(m, mlp_experts=4, top_k=4, n_patches=4, patch_capacity=4, attn_experts=4, attn_top_k=4)
    torch.testing.assert_close(u(x).logits, m(x).logits, atol=1e-10, rtol=0)
    assert isinstance(u.blocks[0].mlp, UoME) and isinstance(u.blocks[1].attn, SMHA)
    assert isinstance(m.blocks[0].mlp, Mlp)  # the source model is untouched
    sparse = uoe_vit(m, top_k=2, n_patches=4, patch_capacity=2, attn_experts=2)
    assert (sparse(x).logits - m(x).logits).abs().max() > 1e-4
    out = sparse(x)
    assert len(out.routing) == 2 and float(out.aux_loss) == 0.0


def test_errors_name_the_field_and_value():
    dec = DecomposedMLP(8, 16, 4)
    with pytest.raises(ConfigError, match=r"n_patches=5 must divide the 12 patch tokens \(seq_len=13"):
        UoME(dec, seq_len=13, n_patches=5, num_prefix_tokens=1)
    with pytest.raises(ConfigError, match="patch_capacity=5 must be <= n_patches=4"):
        UoME(dec, seq_len=12, n_patches=4, patch_capacity=5)
    with pytest.raises(ConfigError, match="top_k=5 must be <= num_experts=4"):
        UoME(dec, seq_len=12, n_patches=4, top_k=5)
    with pytest.raises(ConfigError, match="router='token'"):
        UoME(dec, seq_len=12, n_patches=4, router="token")
    with pytest.raises(ConfigError, match="exclude each other"):
        UoME(dec, seq_len=12, n_patches=4, weight_by_prob=True, straight_through=True)
    with pytest.raises(ConfigError, match="built for seq_len=12 tokens, got 10"):
        UoME(dec, seq_len=12, n_patches=4)(torch.randn(1, 10, 8))
    with pytest.raises(ConfigError, match="num_experts=3 must divide hidden_dim=16"):
        DecomposedMLP(8, 16, 3)
    with pytest.raises(ConfigError, match="num_experts=3 must divide num_heads=4"):
        DecomposedMHA(8, 4, 3)
    with pytest.raises(ConfigError, match="normalize='batch'"):
        SMHA(DecomposedMHA(8, 4, 2), normalize="batch")
    with pytest.raises(ConfigError, match="n_patches=3 must divide the 16 patch tokens"):
        uoe_vit(_vit(), n_patches=3)
    with pytest.raises(ConfigError, match="nothing to convert"):
        uoe_vit(_vit(), mlp_experts=None)


def test_cli_smoke(tmp_path, capsys):
    from moevision.cli.main import main

    out = tmp_path / "uoe.md"
    rc = main(["uoe", "--dataset", "digits", "--rows", "dense,uoe", "--seeds", "1", "--epochs", "1",
               "--train-subset", "128", "--test-subset", "64", "--out", str(out), "--work-dir",
               str(tmp_path / "w"), "--no-progress"])
    assert rc == 0
    text = out.read_text()
    assert "UoE: UoME + SMHA" in text and "no (as in the code)" in text
    assert (tmp_path / "uoe.json").is_file()
    assert main(["uoe", "--rows", "dense,bogus"]) != 0
    assert "--rows: unknown ['bogus']" in capsys.readouterr().err
    assert main(["uoe", "--patch-capacity", "9", "--rows", "uome", "--out", str(tmp_path / "x.md")]) != 0
    assert "patch_capacity=9 must be <= n_patches=7" in capsys.readouterr().err


def test_smha_refuses_a_zero_switch_capacity_with_weight_by_prob():
    import pytest as _pytest
    import torch as _torch

    from moevision.errors import ConfigError as _ConfigError
    from moevision.layers import Attention
    from moevision.techniques.uoe import SMHA, DecomposedMHA

    _torch.manual_seed(0)
    smha = SMHA(DecomposedMHA.from_attention(Attention(16, 4), 4), top_k=2, weight_by_prob=True,
                capacity_factor=0.5)
    with _pytest.raises(_ConfigError, match="capacity"):
        smha(_torch.randn(1, 5, 16))
    assert smha(_torch.randn(2, 5, 16)).out.shape == (2, 5, 16)


def test_uome_output_dropout_acts_once_on_the_union():
    """As in the dense MLP, the output dropout acts on (sum of the experts + b2): with zero first-layer
    weights every expert outputs 0 (GELU(0) = 0), so each output element is either dropped to 0 or
    b2 / (1 - p). Dropping each expert's output apart (and adding b2 undropped) gave b2 everywhere."""
    mlp = DecomposedMLP(8, 16, 4, drop=0.5).to(D64)
    with torch.no_grad():
        mlp.w1.zero_()
        mlp.b1.zero_()
        mlp.b2.copy_(torch.linspace(1, 2, 8, dtype=D64))
    u = UoME(mlp, seq_len=6, top_k=4, n_patches=3, patch_capacity=3).to(D64).train()
    out = u(torch.randn(64, 6, 8, dtype=D64)).out
    dropped = out == 0
    assert torch.allclose(out[~dropped], (2 * mlp.b2).expand_as(out)[~dropped])
    assert 0.4 < dropped.double().mean() < 0.6
    u.eval()
    torch.testing.assert_close(u(torch.randn(2, 6, 8, dtype=D64)).out, mlp.b2.expand(2, 6, 8), atol=0, rtol=0)
