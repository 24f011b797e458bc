"""MouSi (spec §6): fusion shapes, position-id schemes, RoPE with repeated ids, grouping, validation."""

import pytest
import torch

from moevision.errors import ConfigError
from moevision.techniques.mousi import (ExpertSegment, ExpertSpec, MouSiConfig, PolyExpertFusion, TextSegment,
                                        apply_position_rope, group_tokens, position_ids, rope, rope_2d)

EXPERTS = [ExpertSpec("vit", 12, 8, 8), ExpertSpec("cnn", 20, 4, 4), ExpertSpec("glyph", 6, 16, 1)]
TOY = [TextSegment(3), ExpertSegment(2, 2), ExpertSegment(3, 3), TextSegment(2)]


# ---------------------------------------------------------------------------------------------------
# spec test 1: fusion shapes
def test_mlp_fusion_tokens_are_sum_of_expert_tokens():
    torch.manual_seed(0)
    fusion = PolyExpertFusion(MouSiConfig(EXPERTS, llm_dim=16))
    feats = [torch.randn(2, e.num_tokens, e.dim) for e in EXPERTS]
    out = fusion(feats)
    assert out.shape == (2, 64 + 16 + 16, 16)
    assert fusion.tokens_per_expert() == [64, 16, 16]
    # the expert order is fixed: the cnn slice is exactly the cnn MLP applied to the cnn features alone
    assert torch.allclose(out[:, 64:80], fusion.heads["cnn"](feats[1]))


@pytest.mark.parametrize("group,shape,expected", [(4, "row", 16), (4, "square", 16), (2, "row", 32),
                                                  (16, "square", 4)])
def test_mlp_fusion_grouped_expert_divides_tokens(group, shape, expected):
    experts = [ExpertSpec("sam", 5, 8, 8, group=group, group_shape=shape), ExpertSpec("clip", 7, 2, 2)]
    fusion = PolyExpertFusion(MouSiConfig(experts, llm_dim=8))
    out = fusion([torch.randn(3, 64, 5), torch.randn(3, 4, 7)])
    assert out.shape == (3, 64 // group + 4, 8) == (3, expected + 4, 8)
    assert fusion.heads["sam"].fc1.in_features == group * 5


def test_qformer_fusion_gives_e_times_q_tokens():
    torch.manual_seed(0)
    cfg = MouSiConfig(EXPERTS, llm_dim=16, fusion="qformer", num_queries=5, qformer_dim=8, qformer_heads=2,
                      qformer_layers=2)
    fusion = PolyExpertFusion(cfg)
    feats = [torch.randn(2, e.num_tokens, e.dim) for e in EXPERTS]
    out = fusion(feats)
    assert out.shape == (2, 3 * 5, 16)
    # the output depends on each expert's features only through that expert's Q slots
    feats2 = [f.clone() for f in feats]
    feats2[1] = torch.randn_like(feats2[1])
    out2 = fusion(feats2)
    assert torch.equal(out[:, :5], out2[:, :5]) and torch.equal(out[:, 10:], out2[:, 10:])
    assert not torch.allclose(out[:, 5:10], out2[:, 5:10])


def test_gradients_reach_projectors_and_queries():
    torch.manual_seed(0)
    for fusion_kind in ("mlp", "qformer"):
        fusion = PolyExpertFusion(MouSiConfig(EXPERTS, llm_dim=8, fusion=fusion_kind, num_queries=3,
                                              qformer_heads=2))
        fusion([torch.randn(2, e.num_tokens, e.dim) for e in EXPERTS]).square().sum().backward()
        for name, p in fusion.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (fusion_kind, name)
        if fusion_kind == "qformer":
            assert all(fusion.heads[e.name].queries.grad.abs().sum() > 0 for e in EXPERTS)


# ---------------------------------------------------------------------------------------------------
# spec test 2: exact ids of the toy layout (text 3, A 2x2, B 3x3, text 2), written out by hand
def test_position_ids_original():
    assert position_ids(TOY, "original").tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]


def test_position_ids_share_all():
    # A -> 3, B -> 4, text continues at 5
    assert position_ids(TOY, "share_all").tolist() == [0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5, 6]


def test_position_ids_share_by_row():
    # A rows -> 3, 4; B rows -> 5, 6, 7; text continues at 8
    assert position_ids(TOY, "share_by_row").tolist() == [0, 1, 2, 3, 3, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7, 8, 9]


def test_position_ids_share_by_row_col():
    ids = position_ids(TOY, "share_by_row_col")
    assert ids.shape == (2, 18)
    # A starts at 3: rows 3,3,4,4 / cols 3,4,3,4; B starts at 5: rows 5..7, cols 5..7; text at max+1 = 8
    assert ids[0].tolist() == [0, 1, 2, 3, 3, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7, 8, 9]
    assert ids[1].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 5, 6, 7, 5, 6, 7, 8, 9]


def test_position_ids_grouped_expert_uses_grouped_grid():
    # 2x4 grid grouped by 2 along rows -> 2x2 grid; by 4 as 2x2 squares -> 1x2 grid
    lay = [TextSegment(1), ExpertSegment(2, 4, group=2), ExpertSegment(2, 4, group=4, group_shape="square"),
           TextSegment(1)]
    assert position_ids(lay, "original").tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert position_ids(lay, "share_by_row").tolist() == [0, 1, 1, 2, 2, 3, 3, 4]


# ---------------------------------------------------------------------------------------------------
# spec test 3: distinct visual ids
def test_sharing_reduces_distinct_visual_ids():
    grids = [(2, 2), (3, 3), (64, 64), (4, 7)]
    lay = [TextSegment(5)] + [ExpertSegment(h, w) for h, w in grids] + [TextSegment(4)]
    n_vis = sum(h * w for h, w in grids)
    vis = slice(5, 5 + n_vis)
    assert position_ids(lay, "original")[vis].unique().numel() == n_vis
    assert position_ids(lay, "share_all")[vis].unique().numel() == len(grids)
    assert position_ids(lay, "share_by_row")[vis].unique().numel() == sum(h for h, _ in grids)
    rc = position_ids(lay, "share_by_row_col")[:, vis]
    assert rc[0].unique().numel() == sum(h for h, _ in grids)
    assert rc[1].unique().numel() == sum(w for _, w in grids)
    for scheme in ("original", "share_all", "share_by_row", "share_by_row_col"):
        ids = position_ids(lay, scheme)
        ids = ids.reshape(-1, ids.shape[-1])
        # text after the image continues at max(id used) + 1
        assert ids[:, 5 + n_vis].tolist() == [int(ids[:, :5 + n_vis].max()) + 1] * ids.shape[0]


# ---------------------------------------------------------------------------------------------------
# RoPE with arbitrary / repeated ids
def _rope_oracle(x, ids, base=10000.0):
    """Per-token explicit 2x2 rotation of pair p by angle id * base^(-2p/Dh) (a loop, float64)."""
    out = torch.empty_like(x)
    dh = x.shape[-1]
    for n in range(x.shape[-2]):
        for p in range(dh // 2):
            theta = torch.tensor(float(ids[n]) * base ** (-2 * p / dh), dtype=torch.float64)
            c, s = torch.cos(theta), torch.sin(theta)
            a, b = x[..., n, 2 * p], x[..., n, 2 * p + 1]
            out[..., n, 2 * p], out[..., n, 2 * p + 1] = a * c - b * s, a * s + b * c
    return out


def test_rope_matches_rotation_oracle_and_equal_ids_rotate_equally():
    torch.manual_seed(0)
    ids = position_ids(TOY, "share_by_row")
    x = torch.randn(2, 18, 8, dtype=torch.float64)
    y = rope(x, ids)
    assert torch.allclose(y, _rope_oracle(x, ids), atol=1e-12)
    same = torch.randn(8, dtype=torch.float64).expand(18, 8)
    ys = rope(same, ids)
    assert torch.equal(ys[3], ys[4]) and torch.equal(ys[7], ys[9])  # equal ids -> identical rotation
    assert not torch.allclose(ys[4], ys[5])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12)


def test_rope_dot_product_depends_only_on_id_difference():
    torch.manual_seed(1)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def score(i, j):
        return float(rope(q[None], torch.tensor([i])) @ rope(k[None], torch.tensor([j]))[0])

    assert score(3, 3) == pytest.approx(score(40, 40), abs=1e-12)
    assert score(3, 3) == pytest.approx(float(q @ k), abs=1e-12)
    assert score(7, 2) == pytest.approx(score(105, 100), abs=1e-10)
    assert abs(score(7, 2) - score(7, 3)) > 1e-6


def test_rope_2d_dot_product_depends_only_on_row_and_col_difference():
    torch.manual_seed(2)
    q, k = torch.randn(1, 16, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)
    for split in ("halves", "alternate"):
        def score(ri, ci, rj, cj):
            a = rope_2d(q, torch.tensor([ri]), torch.tensor([ci]), split=split)
            b = rope_2d(k, torch.tensor([rj]), torch.tensor([cj]), split=split)
            return float((a * b).sum())

        assert score(5, 9, 2, 4) == pytest.approx(score(13, 30, 10, 25), abs=1e-10)  # same (3, 5)
        assert abs(score(5, 9, 2, 4) - score(5, 9, 2, 5)) > 1e-6  # column matters
        assert abs(score(5, 9, 2, 4) - score(5, 9, 3, 4)) > 1e-6  # row matters


def test_rope_2d_equal_row_col_is_1d_rope_and_halves_split_is_explicit():
    torch.manual_seed(3)
    x = torch.randn(3, 2, 18, 8, dtype=torch.float64)  # (B, heads, N, Dh)
    ids = position_ids(TOY, "share_by_row_col")
    text = [0, 1, 2, 16, 17]
    y2 = apply_position_rope(x, ids, "share_by_row_col")
    assert torch.allclose(y2[..., text, :], rope(x, ids[0])[..., text, :], atol=1e-12)
    # halves split: pairs 0, 1 (dims 0..3) turn with the row id, pairs 2, 3 (dims 4..7) with the column id
    assert torch.allclose(y2[..., :4], rope(x, ids[0])[..., :4], atol=1e-12)
    assert torch.allclose(y2[..., 4:], rope(x, ids[1])[..., 4:], atol=1e-12)
    ya = rope_2d(x, ids[0], ids[1], split="alternate")
    assert torch.allclose(ya[..., 0:2], rope(x, ids[0])[..., 0:2], atol=1e-12)
    assert torch.allclose(ya[..., 2:4], rope(x, ids[1])[..., 2:4], atol=1e-12)


def test_rope_batched_ids_match_per_sample():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    ids = torch.tensor([[0, 1, 1, 1, 2], [0, 1, 2, 3, 4]])
    y = rope(x, ids)
    for b in range(2):
        assert torch.allclose(y[b], rope(x[b], ids[b]), atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# grouping against an explicit oracle
def test_group_tokens_row_matches_explicit_oracle():
    B, H, W, D, g = 2, 3, 6, 4, 3
    x = torch.randn(B, H * W, D)
    y = group_tokens(x, H, W, g, "row")
    assert y.shape == (B, H * (W // g), g * D)
    for r in range(H):
        for c2 in range(W // g):
            want = torch.cat([x[:, r * W + c2 * g + j] for j in range(g)], dim=-1)
            assert torch.equal(y[:, r * (W // g) + c2], want)


def test_group_tokens_square_matches_explicit_oracle():
    B, H, W, D, s = 2, 4, 6, 3, 2
    x = torch.randn(B, H * W, D)
    y = group_tokens(x, H, W, s * s, "square")
    assert y.shape == (B, (H // s) * (W // s), s * s * D)
    for R in range(H // s):
        for C in range(W // s):
            want = torch.cat([x[:, (R * s + i) * W + C * s + j] for i in range(s) for j in range(s)], dim=-1)
            assert torch.equal(y[:, R * (W // s) + C], want)


# ---------------------------------------------------------------------------------------------------
# validation
@pytest.mark.parametrize("spec,match", [
    (ExpertSpec("sam", 4, 8, 6, group=4), r"experts\[0\]\.group=4.*width 6"),
    (ExpertSpec("sam", 4, 8, 8, group=8, group_shape="square"), r"experts\[0\]\.group=8.*perfect square"),
    (ExpertSpec("sam", 4, 6, 6, group=16, group_shape="square"), r"experts\[0\]\.group=16"),
    (ExpertSpec("sam", 4, 8, 8, group_shape="diag"), r"experts\[0\]\.group_shape.*'diag'"),
    (ExpertSpec("sam", 0, 8, 8), r"experts\[0\]\.dim.*0"),
])
def test_bad_expert_spec_raises_config_error(spec, match):
    with pytest.raises(ConfigError, match=match):
        MouSiConfig([spec], llm_dim=8).validate()


def test_bad_config_and_inputs_raise_config_error():
    with pytest.raises(ConfigError, match="fusion.*'perceiver'"):
        MouSiConfig(EXPERTS, fusion="perceiver").validate()
    with pytest.raises(ConfigError, match="num_queries.*0"):
        MouSiConfig(EXPERTS, fusion="qformer", num_queries=0).validate()
    with pytest.raises(ConfigError, match="qformer_heads=3"):
        MouSiConfig(EXPERTS, llm_dim=8, fusion="qformer", qformer_heads=3).validate()
    with pytest.raises(ConfigError, match="repeated"):
        MouSiConfig([EXPERTS[0], EXPERTS[0]]).validate()
    fusion = PolyExpertFusion(MouSiConfig(EXPERTS, llm_dim=8))
    with pytest.raises(ConfigError, match="3 tensors"):
        fusion([torch.randn(1, 64, 12)])
    with pytest.raises(ConfigError, match="'cnn'.*\\(B, 16, 20\\)"):
        fusion([torch.randn(1, 64, 12), torch.randn(1, 16, 19), torch.randn(1, 16, 6)])
    with pytest.raises(ConfigError, match="cnn has 15 tokens"):
        fusion([torch.randn(1, 64, 12), torch.randn(1, 15, 20), torch.randn(1, 16, 6)])
    with pytest.raises(ConfigError, match="scheme.*'share_col'"):
        position_ids(TOY, "share_col")
    with pytest.raises(ConfigError, match=r"layout\[1\]\.group=2"):
        position_ids([TextSegment(1), ExpertSegment(3, 3, group=2)], "original")
    with pytest.raises(ConfigError, match="head_dim=6"):
        rope_2d(torch.randn(4, 6), torch.arange(4), torch.arange(4))
    with pytest.raises(ConfigError, match="ids has 3 positions"):
        rope(torch.randn(4, 8), torch.arange(3))
    with pytest.raises(ConfigError, match="share_by_row_col.*\\(2, N\\)"):
        apply_position_rope(torch.randn(4, 8), torch.arange(4), "share_by_row_col")
