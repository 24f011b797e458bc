"""MERV (multimodal_compression_systems.md §7.2; §7.4 tests 6 and 7): 3-D pooling, the mixers, the assembled
video encoder, the ShapeWorld video data and the experiment."""

import argparse
import copy
import json
import math

import numpy as np
import pytest
import torch

from moevision.errors import ConfigError
from moevision.techniques.merv import (ChannelConcatMixer, CrossAttentionMixer, EncoderSpec, MERVConfig, MERVEncoder,
                                       PerFrame, ScalarMixer, SequenceConcatMixer, SpatioTemporalAligner, Tiny3DConv,
                                       build_mixer, pool_3d, sample_frames)
from moevision.techniques.merv_experiment import ROWS, MERVSettings, build_vit, mover_colours, run_merv


def _adaptive_window(i, n_in, n_out):
    # PyTorch's adaptive pooling window: [floor(i*in/out), ceil((i+1)*in/out))
    return math.floor(i * n_in / n_out), math.ceil((i + 1) * n_in / n_out)


def _hand_pool(x_BNC, grid, out_frames, s):
    T, H, W = grid
    B, _, C = x_BNC.shape
    out = torch.zeros(B, out_frames * s * s, C, dtype=x_BNC.dtype)
    for to in range(out_frames):
        t0, t1 = _adaptive_window(to, T, out_frames)
        for ho in range(s):
            h0, h1 = _adaptive_window(ho, H, s)
            for wo in range(s):
                w0, w1 = _adaptive_window(wo, W, s)
                idx = [t * H * W + h * W + w for t in range(t0, t1) for h in range(h0, h1) for w in range(w0, w1)]
                out[:, to * s * s + ho * s + wo] = x_BNC[:, idx].mean(1)
    return out


@pytest.mark.parametrize("grid,out_frames,s", [((4, 4, 4), 2, 2), ((3, 3, 5), 2, 2), ((8, 8, 8), 4, 4)])
def test_pool_3d_equals_the_hand_computed_average(grid, out_frames, s):
    x = torch.randn(2, grid[0] * grid[1] * grid[2], 3, dtype=torch.float64)
    got = pool_3d(x, grid, out_frames, s)
    assert got.shape == (2, out_frames * s * s, 3)
    torch.testing.assert_close(got, _hand_pool(x, grid, out_frames, s), rtol=0, atol=1e-12)


def test_pool_3d_tiny_input_by_hand():
    # grid (T, H, W) = (2, 2, 2), one channel, tokens 0..7 in (t, h, w) order; pool to (1, 1, 1): the mean 3.5;
    # pool to T'=2, s=1: the mean of each frame, (0+1+2+3)/4 = 1.5 and (4+5+6+7)/4 = 5.5
    x = torch.arange(8, dtype=torch.float64).view(1, 8, 1)
    assert pool_3d(x, (2, 2, 2), 1, 1).flatten().tolist() == [3.5]
    assert pool_3d(x, (2, 2, 2), 2, 1).flatten().tolist() == [1.5, 5.5]
    with pytest.raises(ConfigError, match="needs 8"):
        pool_3d(x[:, :7], (2, 2, 2), 1, 1)


def test_sample_frames():
    assert sample_frames(8, 4).tolist() == [0, 2, 4, 6]
    assert sample_frames(8, 8).tolist() == list(range(8))
    assert sample_frames(6, 4).tolist() == [0, 1, 3, 4]
    with pytest.raises(ConfigError, match="only 4"):
        sample_frames(4, 8)


def _tiny_encoders(width=8, vit_width=8):
    vit = build_vit(vit_width)
    return [(EncoderSpec("vit", vit_width, frames=8, grid=(8, 8, 8)), PerFrame(vit)),
            (EncoderSpec("c3d", width, frames=4, grid=(4, 8, 8)), Tiny3DConv(width))]


def test_3d_pooling_gives_equal_L_for_every_encoder_and_weights_on_the_simplex():
    """Spec §7.4 test 6: a per-frame TinyViT at 8 frames and a Tiny3D at 4 frames, different widths, pooled to
    the same L; the mixer's weights sum to 1 per sample."""
    enc = _tiny_encoders(width=12, vit_width=8)
    model = MERVEncoder(enc, MERVConfig(dim=16, out_size=4, out_frames={"vit": 4}))
    assert {a.token_length for a in model.aligners.values()} == {64} and model.token_length == 64
    video = torch.rand(3, 8, 3, 32, 32)
    feats = model.features(video)
    assert [tuple(f.shape) for f in feats] == [(3, 8 * 64, 8), (3, 4 * 64, 12)]
    assert [tuple(p.shape) for p in model.pooled(video)] == [(3, 64, 8), (3, 64, 12)]
    out = model(video)
    assert out.tokens.shape == (3, 64, 16) and out.weights.shape == (3, 2)
    assert (out.weights >= 0).all()
    torch.testing.assert_close(out.weights.sum(1), torch.ones(3))
    assert not torch.allclose(out.weights[0], out.weights[1])  # per sample, not global


def test_mismatched_token_length_raises_naming_the_encoders():
    with pytest.raises(ConfigError, match=r"token length L.*vit: L=128, c3d: L=64"):
        MERVEncoder(_tiny_encoders(), MERVConfig(dim=16, out_size=4))  # T' = 8 and 4
    with pytest.raises(ConfigError, match=r"frame_factor"):
        MERVEncoder(_tiny_encoders(), MERVConfig(dim=16, out_size=4, frame_factor=8))  # c3d: T' = 4 // 8 = 0
    with pytest.raises(ConfigError, match=r"unknown encoders \['vid'\]"):
        MERVEncoder(_tiny_encoders(), MERVConfig(dim=16, out_frames={"vid": 4}))
    # frame_factor=2 (the official knob) aligns 8 -> 4 and 4 -> 2 frames: still unequal
    with pytest.raises(ConfigError, match="vit: L=64, c3d: L=32"):
        MERVEncoder(_tiny_encoders(), MERVConfig(dim=16, out_size=4, frame_factor=2))


@pytest.mark.parametrize("mixer,embed", [("cross_attention_avg_lq", False), ("cross_attention_avg_lq", True),
                                         ("scalar", False)])
def test_identical_encoders_give_the_single_encoders_projected_output(mixer, embed):
    """Spec §7.4 test 7: E copies of one encoder with the same projector -> the mixer output equals that encoder's
    projected tokens, whatever the (simplex) weights."""
    torch.manual_seed(1)
    c3d = Tiny3DConv(8).double()
    spec = EncoderSpec("a", 8, frames=4, grid=(4, 8, 8))
    encs = [(spec, c3d)] + [(EncoderSpec(n, 8, frames=4, grid=(4, 8, 8)), copy.deepcopy(c3d)) for n in "bc"]
    model = MERVEncoder(encs, MERVConfig(dim=6, out_size=2, mixer=mixer, encoder_embedding=embed,
                                         projector="gelu-mlp")).double()
    for n in "bc":
        model.aligners[n].load_state_dict(model.aligners["a"].state_dict())
    video = torch.rand(2, 8, 3, 32, 32, dtype=torch.float64)
    single = model.aligners["a"](c3d(video[:, ::2]))
    out = model(video)
    torch.testing.assert_close(out.tokens, single, rtol=0, atol=1e-12)
    if mixer == "cross_attention_avg_lq" and not embed:  # equal keys: exactly uniform attention
        torch.testing.assert_close(out.weights, torch.full((2, 3), 1 / 3, dtype=torch.float64))


def test_cross_attention_weights_equal_torch_multihead_attention():
    """The official mixer takes the weights of a 1-head nn.MultiheadAttention(embed=Q, kdim=vdim=D) queried by
    the learnable query over the mean tokens; with the same projections ours must agree."""
    B, E, L, D, Q = 4, 3, 5, 6, 10
    mix = CrossAttentionMixer(D, E, query_dim=Q, encoder_embedding=True).double()
    with torch.no_grad():
        mix.q_proj.bias.normal_()
        mix.k_proj.bias.normal_()
    mha = torch.nn.MultiheadAttention(Q, 1, kdim=D, vdim=D, batch_first=True).double()
    with torch.no_grad():
        mha.q_proj_weight.copy_(mix.q_proj.weight)
        mha.k_proj_weight.copy_(mix.k_proj.weight)
        mha.in_proj_bias[:Q].copy_(mix.q_proj.bias)
        mha.in_proj_bias[Q:2 * Q].copy_(mix.k_proj.bias)
    V = torch.randn(B, E, L, D, dtype=torch.float64)
    vbar = V.mean(2) + mix.encoder_embed
    _, w = mha(mix.query.expand(B, 1, Q), vbar, vbar)
    out = mix(V)
    torch.testing.assert_close(out.weights, w[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out.tokens, sum(w[:, 0, e, None, None] * V[:, e] for e in range(E)), rtol=0,
                               atol=1e-12)


def test_ablation_mixers_shapes_and_values():
    B, E, L, D = 2, 3, 4, 5
    V = torch.randn(B, E, L, D)
    seq = SequenceConcatMixer()(V)
    assert seq.tokens.shape == (B, E * L, D) and seq.weights is None
    torch.testing.assert_close(seq.tokens[:, L:2 * L], V[:, 1])
    ch = ChannelConcatMixer(D, E)
    out = ch(V)
    assert out.tokens.shape == (B, L, D) and out.weights is None
    cat = torch.cat([V[:, e] for e in range(E)], -1)  # per token: encoder 0's features, then 1's, ...
    torch.testing.assert_close(out.tokens, cat @ ch.proj.weight.T + ch.proj.bias)
    ln = build_mixer("concat_channel_ln", D, E)
    assert isinstance(ln.norm, torch.nn.LayerNorm) and ln(V).tokens.shape == (B, L, D)
    sc = ScalarMixer(E)
    out = sc(V)
    a = torch.softmax(sc.scalars, 0)
    assert out.tokens.shape == (B, L, D) and torch.equal(out.weights[0], out.weights[1])
    torch.testing.assert_close(out.tokens, torch.einsum("e,beld->bld", a, V))
    assert torch.equal(ScalarMixer(E, init="zeros")(V).weights, torch.full((B, E), 1 / E))
    with pytest.raises(ConfigError, match="mixer must be one of"):
        build_mixer("gated", D, E)


@pytest.mark.parametrize("mixer", ["cross_attention_avg_lq", "concat_sequence", "concat_channel", "scalar"])
def test_each_mixer_in_the_assembled_encoder(mixer):
    model = MERVEncoder(_tiny_encoders(), MERVConfig(dim=16, out_size=2, out_frames={"vit": 2, "c3d": 2},
                                                     mixer=mixer))
    out = model(torch.rand(2, 8, 3, 32, 32))
    assert out.tokens.shape == (2, 8 * (2 if mixer == "concat_sequence" else 1), 16)
    assert (out.weights is None) == (mixer in ("concat_sequence", "concat_channel"))


def test_gradient_reaches_query_and_projectors_but_not_frozen_encoders():
    model = MERVEncoder(_tiny_encoders(), MERVConfig(dim=16, out_size=2, out_frames={"vit": 2, "c3d": 2}))
    model.train()
    assert not model.encoders.training  # frozen encoders stay in eval mode
    model(torch.rand(2, 8, 3, 32, 32)).tokens.pow(2).mean().backward()
    assert model.mixer.query.grad is not None and model.mixer.query.grad.abs().sum() > 0
    assert model.mixer.k_proj.weight.grad.abs().sum() > 0
    for a in model.aligners.values():
        assert a.proj.weight.grad is not None and a.proj.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.encoders.parameters())
    # unfrozen: the encoders learn too
    model = MERVEncoder(_tiny_encoders(), MERVConfig(dim=16, out_size=2, out_frames={"vit": 2, "c3d": 2},
                                                     freeze_encoders=False))
    model(torch.rand(2, 8, 3, 32, 32)).tokens.pow(2).mean().backward()
    # (the ViT's classification head is not used by forward_features)
    assert all(p.grad is not None for n, p in model.encoders.named_parameters() if ".head." not in n)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="mixer must be one of"):
        MERVConfig(dim=8, mixer="sum").validate()
    with pytest.raises(ConfigError, match="projector"):
        MERVConfig(dim=8, projector="mlp").validate()
    with pytest.raises(ConfigError, match="out_size must be a positive integer, got 0"):
        MERVConfig(dim=8, out_size=0).validate()
    with pytest.raises(ConfigError, match=r"out_frames\['vit'\]"):
        MERVConfig(dim=8, out_frames={"vit": 0}).validate()
    with pytest.raises(ConfigError, match="grid must be"):
        SpatioTemporalAligner(4, 4, grid=(4, 4), out_frames=1, out_size=1)
    with pytest.raises(ConfigError, match="names must be distinct"):
        MERVEncoder(_tiny_encoders()[:1] * 2, MERVConfig(dim=8, out_size=2))


def _replay_mover_colours(n, seed):
    """An independent oracle: replay moving_videos' random draws (label, shape, colour, distractor shape,
    colour, row, col, start row, col, then the free start coordinate) to read the mover's colour index."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n)
    out = []
    for d in labels:
        rng.integers(4)
        out.append(int(rng.integers(7)))
        rng.integers(4), rng.integers(7), rng.integers(0, 25), rng.integers(0, 25), rng.integers(0, 25)
        rng.integers(0, 25)
        rng.integers(0, 32 - 8 - 7 + 1)  # step_px=1, 8 frames: span 7
    return out


def test_mover_colours_match_the_generator():
    from moevision.techniques.imp_experiment import moving_videos

    v, _ = moving_videos(300, 5, frames=8, step_px=1)
    assert mover_colours(v, chunk=64).tolist() == _replay_mover_colours(300, 5)


def test_settings_validation():
    with pytest.raises(ConfigError, match="rows"):
        MERVSettings(rows=("vit", "bogus")).validate()
    with pytest.raises(ConfigError, match="steps must be a positive integer, got 0"):
        MERVSettings(steps=0).validate()
    with pytest.raises(ConfigError, match="step_px"):
        MERVSettings(step_px=4).validate()
    with pytest.raises(ConfigError, match="out_frames"):
        MERVSettings(out_frames=5).validate()
    with pytest.raises(ConfigError, match="projector"):
        MERVSettings(projector="conv").validate()
    with pytest.raises(ConfigError, match="lr"):
        MERVSettings(lr=0.0).validate()
    MERVSettings().validate()


def _tiny_settings(**kw):
    return dict(train_size=48, test_size=24, pretrain_size=32, pretrain_steps=3, steps=4, batch_size=16, dim=8,
                out_size=2, out_frames=2, encoder_width=8, head_hidden=8, seeds=1, **kw)


def test_experiment_smoke_every_row(tmp_path):
    out = tmp_path / "merv.md"
    report = run_merv(MERVSettings(**_tiny_settings()), out=out, work=tmp_path / "w", progress=False)
    res = report["results"]
    assert list(res) == list(ROWS) and all(len(runs) == 1 for runs in res.values())
    for row, (r,) in res.items():
        assert 0 <= r["accuracy"] <= r["colour_accuracy"] <= 1 and r["accuracy"] <= r["direction_accuracy"]
        assert ("mixer_weights" in r) == (row in ("merv", "scalar"))
    assert res["merv"][0]["mixer_weight_sum_max_error"] < 1e-6
    assert res["vit"][0]["encoders"] == ["vit"] and res["merv"][0]["encoders"] == ["vit", "c3d"]
    text = out.read_text()
    assert all(desc in text for desc in ROWS.values()) and "test 8" in text
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["steps"] == 4
    assert (tmp_path / "w" / "merv_seed0.json").is_file()


def test_cli_handler(tmp_path):
    from moevision.cli import merv

    p = argparse.ArgumentParser(prog="moevision")
    handlers = merv.register(p.add_subparsers(dest="command"))
    assert list(handlers) == ["merv"]
    out = tmp_path / "m.md"
    args = p.parse_args(["merv", "--rows", "c3d,merv", "--seeds", "1", "--steps", "3", "--pretrain-steps", "2",
                         "--pretrain-size", "30", "--train-size", "40", "--test-size", "20", "--out", str(out), "--work-dir",
                         str(tmp_path / "w"), "--no-progress"])
    assert handlers["merv"](args) == 0
    assert "cross-attention mixer" in out.read_text()
    from moevision.errors import MoEVisionError
    with pytest.raises(MoEVisionError, match="--rows"):
        handlers["merv"](p.parse_args(["merv", "--rows", "bogus"]))
