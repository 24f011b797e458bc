"""MoAI (spec §8): compressor output shape and masking, the LoRA-attention expert against a hand-written
formula, mixer gates summing to 1, step-1 mode using exactly one expert per side, zero-init o = identity,
the write-back by masks, the wiring into the tiny VLM (identity at init, gradients only to MoAI's
parameters), and the verbalised ShapeWorld "CV experts"."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moevision as mv
from moevision.errors import ConfigError
from moevision.techniques.moai import (LoRAAttention, MoAICompressor, MoAIConfig, MoAIMixer, attach_mixers,
                                       gate_entropy, mixer_layers, verbalize)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    return MoAIConfig(**{**dict(dim=16, num_latents=6, compressor_depth=2, compressor_heads=2, compressor_head_dim=8,
                                rank=4, mixer_heads=2, every=2), **kw})


def test_compressor_output_shape_and_padding_is_ignored():
    torch.manual_seed(0)
    comp = MoAICompressor(_cfg(aux_dim=10)).double()
    aux = torch.randn(2, 9, 10, dtype=torch.float64)
    out = comp(aux)
    assert out.shape == (2, 6, 16)
    # padded auxiliary tokens (mask False) change nothing, whatever they hold
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 7:] = False
    garbage = aux.clone()
    garbage[:, 7:] = 1e3 * torch.randn(2, 2, 10, dtype=torch.float64)
    torch.testing.assert_close(comp(aux, mask), comp(garbage, mask))
    torch.testing.assert_close(comp(aux[:, :7]), comp(aux, mask))
    with pytest.raises(ValueError, match="auxiliary tokens must be"):
        comp(torch.randn(2, 9, 16))


def test_lora_attention_equals_the_formula():
    torch.manual_seed(1)
    ex = LoRAAttention(8, rank=3, heads=2, zero_init_o=False).double()
    q_in = torch.randn(2, 5, 8, dtype=torch.float64)
    kv = torch.randn(2, 7, 8, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False

    def lr(m, x):
        return m[1](m[0](x))

    out = ex(q_in, kv, mask)
    for b in range(2):
        keep = mask[b]
        q, k, v = F.gelu(lr(ex.q, q_in[b])), F.gelu(lr(ex.k, kv[b][keep])), F.gelu(lr(ex.v, kv[b][keep]))
        heads = []
        for h in range(2):
            s = slice(4 * h, 4 * h + 4)
            a = torch.softmax(q[:, s] @ k[:, s].t() / math.sqrt(4), dim=-1)  # no causal mask
            heads.append(a @ v[:, s])
        ref = q_in[b] + F.gelu(lr(ex.o, torch.cat(heads, -1)))
        torch.testing.assert_close(out[b], ref)


def test_expert_with_no_keys_returns_its_query():
    ex = LoRAAttention(8, rank=3, heads=2, zero_init_o=False)
    q = torch.randn(2, 4, 8)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :2] = True
    out = ex(q, torch.randn(2, 6, 8), mask)
    assert torch.equal(out[1], q[1]) and not torch.equal(out[0], q[0])


def _mixer_inputs(B=2, N=9, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, D, generator=g)
    img = torch.zeros(B, N, dtype=torch.bool)
    img[:, :4] = True
    lang = ~img
    lang[1, 7:] = False  # padding
    aux = torch.randn(B, 6, D, generator=g)
    return h, img, lang, aux


def _perturb(mixer):
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))


def test_zero_init_mixer_is_the_identity_and_gates_sum_to_one():
    torch.manual_seed(0)
    m = MoAIMixer(_cfg())
    h, img, lang, aux = _mixer_inputs()
    torch.testing.assert_close(m(h, img, lang, aux), h, rtol=1e-6, atol=1e-6)  # sum_j w_j * h, w sums to 1
    info = m.last
    torch.testing.assert_close(info.gates_I[img].sum(-1), torch.ones(int(img.sum())))
    torch.testing.assert_close(info.gates_L[lang].sum(-1), torch.ones(int(lang.sum())))
    assert not info.gates_I[~img].any() and not info.gates_L[~lang].any()
    assert 0 < gate_entropy(info, "I") <= math.log(3) + 1e-6


def test_soft_mixer_is_the_gate_weighted_sum_of_the_six_experts_written_back_by_masks():
    torch.manual_seed(0)
    m = MoAIMixer(_cfg(zero_init_o=False))
    _perturb(m)
    h, img, lang, aux = _mixer_inputs()
    out = m(h, img, lang, aux)
    wI, wL = torch.softmax(m.gate_I(h), -1), torch.softmax(m.gate_L(h), -1)
    eI = [m.experts_I[0](h, aux), m.experts_I[1](h, h, lang), m.experts_I[2](h, h, img)]
    eL = [m.experts_L[0](h, aux), m.experts_L[1](h, h, img), m.experts_L[2](h, h, lang)]
    refI = sum(wI[..., j:j + 1] * eI[j] for j in range(3))
    refL = sum(wL[..., j:j + 1] * eL[j] for j in range(3))
    torch.testing.assert_close(out[img], refI[img])
    torch.testing.assert_close(out[lang], refL[lang])
    pad = ~(img | lang)
    assert torch.equal(out[pad], h[pad])
    # the image tokens' output depends on the language tokens only through CA(I<-L)
    h2 = h.clone()
    h2[lang] += 1.0
    with torch.no_grad():
        m.experts_I[1].o[1].weight.zero_()
        m.experts_I[1].o[1].bias.zero_()
        for p in m.gate_I.parameters():
            p.zero_()
    torch.testing.assert_close(m(h, img, lang, aux)[img], m(h2, img, lang, aux)[img])


def test_step1_random_mode_uses_exactly_one_expert_per_side():
    torch.manual_seed(0)
    m = MoAIMixer(_cfg(zero_init_o=False, mode="random"))
    _perturb(m)
    h, img, lang, aux = _mixer_inputs()
    seen = set()
    for s in range(30):
        out = m(h, img, lang, aux, generator=torch.Generator().manual_seed(s))
        ci, cl = m.last.choice
        seen.add((ci, cl))
        gI, gL = m.last.gates_I[img], m.last.gates_L[lang]
        assert torch.equal(gI, F.one_hot(torch.full((gI.shape[0],), ci), 3).float())
        assert torch.equal(gL, F.one_hot(torch.full((gL.shape[0],), cl), 3).float())
        keysI = [(aux, None), (h, lang), (h, img)][ci]
        keysL = [(aux, None), (h, img), (h, lang)][cl]
        torch.testing.assert_close(out[img], m.experts_I[ci](h, *keysI)[img])
        torch.testing.assert_close(out[lang], m.experts_L[cl](h, *keysL)[lang])
    assert len(seen) >= 6  # the choice is random, over both sides
    m.set_mode("soft")
    m(h, img, lang, aux)
    assert m.last.choice is None
    with pytest.raises(ConfigError):
        m.set_mode("hard")


def test_mixer_rejects_bad_masks():
    m = MoAIMixer(_cfg())
    h, img, lang, aux = _mixer_inputs()
    with pytest.raises(ValueError, match="both an image and a language"):
        m(h, img, img, aux)
    with pytest.raises(ValueError, match="masks must be"):
        m(h, img[:, :3], lang, aux)
    with pytest.raises(ConfigError, match="divisible"):
        MoAIConfig(dim=10, mixer_heads=3)


def test_attached_to_the_tiny_vlm_identity_at_init_and_only_moai_trains():
    assert mixer_layers(32, 8) == [7, 15, 23, 31]
    torch.manual_seed(0)
    model = mv.create_model("vlm_tiny_test", depth=4).eval()
    tokens = torch.randint(5, len(model.config.vocab), (2, 6))
    lengths = torch.tensor([6, 4])
    img = torch.rand(2, 3, 32, 32)
    before = model(tokens, lengths, images=img).logits
    handle = attach_mixers(model, _cfg(dim=model.config.dim, aux_dim=12))
    assert handle.layer_ids == [1, 3]
    aux = torch.randn(2, 10, 12)
    handle.set_aux(aux)
    torch.testing.assert_close(model(tokens, lengths, images=img).logits, before)  # zero-init o: identity
    _perturb(handle.mixers["1"])
    out = model(tokens, lengths, images=img).logits
    assert not torch.allclose(out, before)
    out.sum().backward()
    assert all(p.grad is None for p in model.parameters())  # the LM is frozen
    assert handle.compressor.latents.grad is not None and handle.mixers["1"].gate_I.weight.grad is not None
    handle.set_aux(None)  # no auxiliary tokens: the mixers pass through
    torch.testing.assert_close(model(tokens, lengths, images=img).logits, before)
    handle.remove()
    handle.set_aux(aux)
    torch.testing.assert_close(model(tokens, lengths, images=img).logits, before)
    with pytest.raises(ConfigError, match="must equal the model's width"):
        attach_mixers(model, _cfg(dim=8))


def test_verbalize_exact_and_noisy():
    scene = [dict(shape="circle", colour="red", row=0, col=1), dict(shape="square", colour="blue", row=2, col=3)]
    assert verbalize(list(reversed(scene))) == \
        "detections : red circle at row 0 col 1 ; blue square at row 2 col 3 ."
    assert verbalize([]) == "detections : none ."
    many = [dict(shape="cross", colour="green", row=r, col=c) for r in range(4) for c in range(4)] * 50
    noisy = verbalize(many, noise=0.1, rng=np.random.default_rng(0))
    kept = noisy.split(" ; ")
    assert 0.9 * 800 * 0.96 < len(kept) < 800  # ~1/3 of the 10% are dropped
    changed = sum("green cross" not in part for part in kept)
    assert 0.03 * 800 < changed < 0.1 * 800  # ~2/3 of the 10% flip colour or shape
    assert noisy == verbalize(many, noise=0.1, rng=np.random.default_rng(0))  # seeded
    with pytest.raises(ValueError, match="needs rng"):
        verbalize(scene, noise=0.1)
