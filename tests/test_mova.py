"""MoVA (multimodal_compression_systems.md §7.1; tests 1-5 of §7.4) against independent oracles."""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moevision.errors import ConfigError
from moevision.techniques.mova import (MoVAAdapter, MoVAConfig, TextEncoder, apply_rope, feature_align, gate_text,
                                       masked_topk_softmax, parse_routing, resize_tokens, rope_2d_angles,
                                       routing_letters, routing_prompt, run_experts, split_aligned)

DIMS = (12, 8, 6)  # three experts of different widths


def tiny_cfg(**kw) -> MoVAConfig:
    d = dict(dim=16, grid=4, expert_dims=DIMS, out_dim=10, text_dim=8, num_blocks=2, num_heads=2, top_k=3,
             reg_depth=1)
    d.update(kw)
    return MoVAConfig(**d)


def inputs(B=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, 16, 16, generator=g, dtype=dtype)
    experts = [torch.randn(B, 4, 12, generator=g, dtype=dtype),  # 2x2 grid
               torch.randn(B, 16, 8, generator=g, dtype=dtype),  # 4x4 (the base grid)
               torch.randn(B, 64, 6, generator=g, dtype=dtype)]  # 8x8
    text = torch.randn(B, 8, generator=g, dtype=dtype)
    return base, experts, text


def randomise(module: nn.Module, seed: int = 1) -> nn.Module:
    """Every parameter redrawn (the zero-inits included), so that every branch contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


def bilinear_oracle(m: np.ndarray, out: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize (align_corners=False) of a (C, h, h) map, written out by hand."""
    C, h, _ = m.shape
    res = np.zeros((C, out, out))
    for i, j in itertools.product(range(out), range(out)):
        y, x = max((i + 0.5) * h / out - 0.5, 0.0), max((j + 0.5) * h / out - 0.5, 0.0)
        y0, x0 = min(int(np.floor(y)), h - 1), min(int(np.floor(x)), h - 1)
        y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, h - 1)
        dy, dx = y - y0, x - x0
        res[:, i, j] = ((1 - dy) * (1 - dx) * m[:, y0, x0] + (1 - dy) * dx * m[:, y0, x1]
                        + dy * (1 - dx) * m[:, y1, x0] + dy * dx * m[:, y1, x1])
    return res


# ---- test 1: feature_align ---------------------------------------------------------------------------------
def test_feature_align_resizes_bilinearly_and_splits_back_exactly():
    base, experts, _ = inputs()
    cat = feature_align(base, experts)
    assert cat.shape == (2, 16, 16 + sum(DIMS))
    b, parts = split_aligned(cat, 16, DIMS)
    assert torch.equal(b, base)
    assert torch.equal(parts[1], experts[1])  # already on the base grid: untouched
    for e in (0, 2):  # up from 2x2 and down from 8x8, against the hand-written oracle
        h = int(experts[e].shape[1] ** 0.5)
        m = experts[e][0].T.reshape(-1, h, h).numpy()
        want = bilinear_oracle(m, 4).reshape(m.shape[0], 16).T
        np.testing.assert_allclose(parts[e][0].numpy(), want, atol=1e-12)
    # concat -> split -> concat is the identity
    assert torch.equal(torch.cat([b, *parts], -1), cat)
    with pytest.raises(ConfigError, match="channels"):
        split_aligned(cat, 16, (12, 8))
    with pytest.raises(ConfigError, match="square grid"):
        resize_tokens(torch.zeros(1, 15, 3), 4)


# ---- test 2: zero-init -------------------------------------------------------------------------------------
def readout_oracle(adapter: MoVAAdapter, base_BNC: torch.Tensor) -> torch.Tensor:
    """MLP(AdaptiveAvgPool(base grid)) computed directly from the readout weights."""
    B, N, C = base_BNC.shape
    R = int(N ** 0.5)
    grid = base_BNC.reshape(B, R, R, C)
    pooled = grid.reshape(B, R // 2, 2, R // 2, 2, C).mean((2, 4)).reshape(B, -1, C)  # 2x2 means = pool to R/2
    l1, l2 = adapter.readout[0], adapter.readout[2]
    h = pooled @ l1.weight.T + l1.bias
    return (0.5 * h * (1 + torch.erf(h / 2 ** 0.5))) @ l2.weight.T + l2.bias


def test_fresh_adapter_is_mlp_of_pooled_base_grid():
    torch.manual_seed(0)
    adapter = MoVAAdapter(tiny_cfg()).double()
    base, experts, text = inputs()
    routed = torch.tensor([[1.0, 1, 1], [1, 0, 1]], dtype=torch.float64)
    out = adapter(base, experts, text, routed)
    assert out.tokens.shape == (2, 4, 10)
    torch.testing.assert_close(out.tokens, readout_oracle(adapter, base), atol=1e-12, rtol=0)
    # not vacuous: a non-zero cross-attention output projection changes the output
    with torch.no_grad():
        adapter.blocks[0].cross[0].proj.weight.normal_()
    assert (adapter(base, experts, text, routed).tokens - readout_oracle(adapter, base)).abs().max() > 1e-3


# ---- test 3: the gate --------------------------------------------------------------------------------------
def test_gate_masks_unrouted_and_renormalises_top3():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=g) * 3
    routed = (torch.rand(64, 5, generator=g) < 0.6).float()
    routed[0] = torch.tensor([1.0, 1, 1, 1, 1])
    routed[1] = torch.tensor([0.0, 1, 0, 0, 0])
    w = masked_topk_softmax(logits, routed, 3)
    has = routed.sum(1) > 0
    assert (w[routed == 0][has[:, None].expand_as(routed)[routed == 0]] < 1e-6).all()
    torch.testing.assert_close(w.sum(1), torch.ones(64))
    assert ((w > 1e-6).sum(1) <= 3).all()
    for b in range(64):  # oracle: softmax over the (at most 3) largest routed logits
        idx = [e for e in sorted(range(5), key=lambda e: -logits[b, e]) if routed[b, e]][:3]
        if idx:
            want = torch.zeros(5)
            want[idx] = torch.softmax(logits[b, idx], 0)
            torch.testing.assert_close(w[b], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(w[1], torch.tensor([0.0, 1, 0, 0, 0]))


def test_no_routed_expert_means_no_cross_attention_contribution():
    torch.manual_seed(0)
    adapter = randomise(MoVAAdapter(tiny_cfg(skip_unrouted=False)).double())
    base, experts, text = inputs()
    routed = torch.tensor([[0.0, 0, 0], [1, 1, 0]], dtype=torch.float64)
    out = adapter(base, experts, text, routed).tokens
    other = [torch.randn_like(f) for f in experts]
    out2 = adapter(base, other, text, routed).tokens
    assert torch.equal(out[0], out2[0])  # sample 0 routes nothing: expert features cannot matter
    assert (out[1] - out2[1]).abs().max() > 1e-3  # sample 1 routes A and B: they do
    # the unrouted expert C of sample 1 does not matter either
    other = [experts[0], experts[1], torch.randn_like(experts[2])]
    assert torch.equal(out, adapter(base, other, text, routed).tokens)


# ---- test 4: 2-D RoPE --------------------------------------------------------------------------------------
def test_2d_rope_dot_product_depends_only_on_offsets():
    g = torch.Generator().manual_seed(0)
    Dh = 16
    q, k = torch.randn(Dh, generator=g, dtype=torch.float64), torch.randn(Dh, generator=g, dtype=torch.float64)

    def dot(p, s):
        rows, cols = torch.tensor([p[0], s[0]]), torch.tensor([p[1], s[1]])
        ang = rope_2d_angles(rows, cols, Dh)
        return float(apply_rope(q[None], ang[:1])[0] @ apply_rope(k[None], ang[1:])[0])

    for (r1, c1, r2, c2) in [(0, 0, 1, 2), (3, 1, 0, 5), (2, 2, 2, 7)]:
        ref = dot((r1, c1), (r2, c2))
        for a, b in [(1, 0), (0, 3), (4, 5), (7, 1)]:
            assert abs(dot((r1 + a, c1 + b), (r2 + a, c2 + b)) - ref) < 1e-10
    # rows and columns are told apart, and rotation keeps norms
    assert abs(dot((0, 0), (1, 0)) - dot((0, 0), (0, 1))) > 1e-3
    assert abs(dot((0, 0), (1, 2)) - dot((0, 0), (2, 1))) > 1e-3
    ang = rope_2d_angles(torch.arange(5), torch.arange(5) * 2, Dh)
    x = torch.randn(5, Dh, generator=g, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, ang).norm(dim=-1), x.norm(dim=-1))
    with pytest.raises(ConfigError, match="head_dim"):
        rope_2d_angles(torch.arange(2), torch.arange(2), 6)


# ---- test 5: the routing text ------------------------------------------------------------------------------
def test_routing_parser_cases():
    assert parse_routing("A, C") == [1, 0, 1, 0, 0, 0, 0]
    assert parse_routing("B,D,E,F") == [0, 1, 0, 1, 1, 0, 0]  # first 3 items only
    assert parse_routing("none") == [0] * 7
    assert parse_routing("  None. ") == [0] * 7
    assert parse_routing("") == [0] * 7
    assert parse_routing(" a ,  c. ") == [1, 0, 1, 0, 0, 0, 0]
    assert parse_routing("Model B, expert g") == [0, 1, 0, 0, 0, 0, 1]
    assert parse_routing("H, A, banana, C") == [1, 0, 0, 0, 0, 0, 0]  # unknown items ignored, still counted
    assert parse_routing("A, C", num_experts=3) == [1, 0, 1]
    with pytest.raises(ConfigError, match="'H'"):
        parse_routing("A, H", strict=True)
    for k in range(4):  # letters -> parser round trip for every routing of at most 3 experts
        for sel in itertools.combinations(range(7), k):
            v = [int(i in sel) for i in range(7)]
            assert parse_routing(routing_letters(v)) == v
    p = routing_prompt("what colour is the square ?")
    assert "Model pool:" in p and "\nA: " in p and "\nG: " in p and "Question: what colour is the square ?" in p
    assert gate_text(["What IS it ?", "B"]) == "question 0: what is it ?\n\n question 1: b"


# ---- batch-1 skipping, validation, gradients ---------------------------------------------------------------
class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def conv_expert(width: int, stride: int) -> nn.Module:
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, width, stride, stride=stride)

        def forward(self, x):
            return self.conv(x).flatten(2).transpose(1, 2)

    return Tokens()


def test_batch1_skipping_unselected_experts_gives_the_same_output():
    torch.manual_seed(0)
    experts = [Counting(conv_expert(w, s)) for w, s in zip(DIMS, (8, 4, 2))]
    base_enc = conv_expert(16, 4)
    img = torch.rand(1, 3, 16, 16)
    routed = torch.tensor([[1.0, 0, 1]])
    fast = randomise(MoVAAdapter(tiny_cfg(skip_unrouted=True)))
    slow = MoVAAdapter(tiny_cfg(skip_unrouted=False))
    slow.load_state_dict(fast.state_dict())
    text = torch.randn(1, 8)
    with torch.no_grad():
        feats = run_experts(experts, img, routed, skip_unselected=True)
        assert feats[1] is None and [e.calls for e in experts] == [1, 0, 1]  # B is not run
        a = fast(base_enc(img), feats, text, routed).tokens
        b = slow(base_enc(img), run_experts(experts, img, routed, skip_unselected=False), text, routed).tokens
    assert experts[1].calls == 1
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert a.abs().max() > 1e-3


def test_bad_shapes_and_configs_raise_naming_the_field():
    adapter = MoVAAdapter(tiny_cfg())
    base, experts, text = inputs(dtype=torch.float32)
    routed = torch.ones(2, 3)
    with pytest.raises(ConfigError, match="base"):
        adapter(base[:, :9], experts, text, routed)
    with pytest.raises(ConfigError, match="experts: expected 3"):
        adapter(base, experts[:2], text, routed)
    with pytest.raises(ConfigError, match=r"experts\[1\]"):
        adapter(base, [experts[0], experts[2], experts[2]], text, routed)
    with pytest.raises(ConfigError, match="text"):
        adapter(base, experts, text[:, :4], routed)
    with pytest.raises(ConfigError, match="routed"):
        adapter(base, experts, text, torch.full((2, 3), 0.5))
    with pytest.raises(ConfigError, match=r"experts\[0\] is None"):
        adapter(base, [None, experts[1], experts[2]], text, routed)
    with pytest.raises(ConfigError, match="num_heads=3"):
        MoVAAdapter(tiny_cfg(num_heads=3))
    with pytest.raises(ConfigError, match="grid=5"):
        MoVAAdapter(tiny_cfg(grid=5))
    with pytest.raises(ConfigError, match="top_k=4"):
        MoVAAdapter(tiny_cfg(top_k=4))
    with pytest.raises(ConfigError, match="num_blocks"):
        MoVAAdapter(tiny_cfg(num_blocks=0))


def test_gradients_reach_gate_and_adapter_not_frozen_encoders():
    from moevision.techniques.mova_experiment import MoVAQA

    torch.manual_seed(0)
    base_enc = conv_expert(16, 4)
    experts = [conv_expert(w, s) for w, s in zip(DIMS, (8, 4, 2))]
    for m in (base_enc, *experts):
        m.requires_grad_(False)
    model = MoVAQA(base_enc, experts, tiny_cfg(out_dim=16), vocab_size=20, max_len=16)
    img = torch.rand(4, 3, 16, 16)
    q = torch.randint(1, 20, (4, 7))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    blk = model.adapter.blocks[0]

    def backward():
        opt.zero_grad()
        logits, w = model(img, q, q, torch.ones(4, 3))
        F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
        return w

    w = backward()
    for p in (blk.cross[2].proj.weight, blk.attn.proj.weight, blk.mlp.w2.weight, model.adapter.readout[0].weight,
              model.answer.head[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # at init every cross-attention output is 0, so no signal reaches the gate yet; one step later it does
    assert blk.gate.fc2.weight.grad.abs().sum() == 0
    opt.step()
    backward()
    assert blk.gate.fc2.weight.grad.abs().sum() > 0
    opt.step()
    backward()
    assert blk.gate.fc1.weight.grad.abs().sum() > 0 and model.text.embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for m in (base_enc, *experts) for p in m.parameters())
    assert w.shape == (4, 2, 3)


def test_text_encoder_ignores_padding():
    torch.manual_seed(0)
    enc = TextEncoder(12, dim=8, depth=1, num_heads=2).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0]])
    torch.testing.assert_close(enc(ids), enc(ids[:, :3]))


# ---- the experiment, through the CLI handler -----------------------------------------------------------------
def test_experiment_smoke_through_cli(tmp_path):
    from moevision.cli.mova import register
    from moevision.techniques.mova_experiment import ROWS

    parser = argparse.ArgumentParser()
    handlers = register(parser.add_subparsers(dest="command"))
    out = tmp_path / "mova.md"
    args = parser.parse_args(["mova", "--seeds", "1", "--steps", "2", "--train-scenes", "30", "--test-scenes", "12",
                              "--pretrain-steps", "2", "--measure-steps", "2", "--measure-records", "16",
                              "--router-steps", "2", "--work-dir", str(tmp_path / "work"), "--out", str(out),
                              "--no-progress"])
    assert handlers["mova"](args) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["results"]) == list(ROWS)
    for row, runs in report["results"].items():
        assert len(runs) == 1 and 0 <= runs[0]["accuracy"] <= 1
        assert set(runs[0]["per_qtype"]) == {"exist", "colour", "count", "spatial"}
    assert report["results"]["base_only"][0]["experts_per_question"] == 0
    assert report["results"]["all_experts"][0]["experts_per_question"] == 3
    text = out.read_text()
    assert all(desc in text for desc in ROWS.values())
    with pytest.raises(Exception, match="--rows"):
        handlers["mova"](parser.parse_args(["mova", "--rows", "nope"]))
