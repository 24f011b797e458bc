"""PILL (spec multimodal_compression_systems.md §9) in the small VLM: GLU adapters, Modality-Attention-
Gating, the Mixture of Modality Adapter Experts, the two stages, and a training smoke run."""

import json

import pytest
import torch
import torch.nn.functional as F

import moevision as mv
from moevision.models.vlm import GLUAdapter, add_pill, set_stage, stage_parameters
from moevision.models.vlm import apply_rope, rope_tables
from moevision.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(m, B=3, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = len(m.tokenizer.vocab)
    tokens = torch.randint(4, V, (B, L), generator=g)
    lengths = torch.tensor([L, L - 2, L - 4][:B])
    labels = torch.full((B, L), -100)
    labels[:, 3:5] = tokens[:, 3:5]
    return tokens, lengths, labels, torch.rand(B, 3, 32, 32, generator=g)


def test_glu_adapter_formula_and_zero_start():
    torch.manual_seed(0)
    a = GLUAdapter(8, 4)
    x = torch.randn(5, 8)
    assert torch.equal(a(x), torch.zeros(5, 8))  # U = 0: exactly a no-op at the start
    torch.nn.init.normal_(a.U.weight)
    ref = (F.silu(x @ a.G.weight.t()) * (x @ a.D.weight.t())) @ a.U.weight.t()
    assert torch.allclose(a(x), ref, atol=1e-6)
    assert all(lin.bias is None for lin in (a.G, a.D, a.U))


def test_fresh_pill_model_equals_the_frozen_lm():
    """With fresh adapters the PILL copy computes exactly the base model's logits on text-only input,
    and on image + text input with MAG off."""
    torch.manual_seed(0)
    base = mv.create_model("vlm_tiny_test").double().eval()
    pill = add_pill(base).double().eval()
    tokens, lengths, labels, img = _inputs(base)
    assert torch.equal(base(tokens, lengths).logits, pill(tokens, lengths).logits)
    pill.mag_enabled = False
    assert torch.allclose(base(tokens, lengths, images=img.double()).logits,
                          pill(tokens, lengths, images=img.double()).logits, atol=1e-12)
    pill.mag_enabled = True  # g = tanh(0) = 0: the image tokens' values are gone, so the output changes
    assert not torch.allclose(base(tokens, lengths, images=img.double()).logits,
                              pill(tokens, lengths, images=img.double()).logits, atol=1e-6)
    nomag = add_pill(base, pill_mag=False).double().eval()  # the ablation: never gated, so a fresh copy
    assert nomag.config.pill_mag is False                     # equals the base with images too
    assert torch.allclose(base(tokens, lengths, images=img.double()).logits,
                          nomag(tokens, lengths, images=img.double()).logits, atol=1e-12)


def test_mag_at_init_gives_image_tokens_zero_value_in_attention():
    """The first layer's attention output of a fresh PILL model equals causal attention computed
    independently with the image tokens' value vectors set to 0 (their keys still take softmax mass)."""
    torch.manual_seed(0)
    m = mv.create_model("vlm_tiny_test", adapter="pill").double().eval()
    tokens, lengths, _, img = _inputs(m)
    feats = m.encode_images(img.double())
    x = torch.cat([m.projector(feats), m.embed(tokens)], 1)
    B, N, D = x.shape
    Ni = feats.shape[1]
    layer = m.layers[0]
    got = {}
    layer.attn.register_forward_hook(lambda mod, inp, out: got.setdefault("out", out))
    m(tokens, lengths, images=img.double())
    xn = layer.norm1(x)
    a = xn + layer.pill.attn(xn)
    H, Dh = layer.attn.num_heads, layer.attn.head_dim
    q, k, v = layer.attn.qkv(a).view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    cos, sin = rope_tables(N, Dh, m.config.rope_base, x.device)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    v = v.clone()
    v[:, :, :Ni] = 0
    mask = torch.ones(N, N, dtype=torch.bool).tril()
    w = ((q @ k.transpose(-1, -2)) / Dh ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    ref = layer.attn.proj((w @ v).transpose(1, 2).reshape(B, N, D))
    assert torch.allclose(got["out"], ref, atol=1e-10)


def test_momae_routes_image_positions_to_the_vision_adapter_only():
    torch.manual_seed(0)
    m = mv.create_model("vlm_tiny_test", adapter="pill").eval()
    tokens, lengths, _, img = _inputs(m)
    seen = {"vis": [], "txt": []}
    for layer in m.layers:
        for name in seen:
            getattr(layer.pill, name).register_forward_hook(lambda mod, inp, out, n=name: seen[n].append(inp[0]))
    m(tokens, lengths, images=img)
    B, L, Ni = tokens.shape[0], tokens.shape[1], m.config.num_image_tokens
    assert [t.shape[0] for t in seen["vis"]] == [B * Ni] * len(m.layers)
    assert [t.shape[0] for t in seen["txt"]] == [B * L] * len(m.layers)
    seen = {"vis": [], "txt": []}
    m(tokens, lengths)  # text only: the vision adapter never runs
    assert seen["vis"] == [] and [t.shape[0] for t in seen["txt"]] == [B * L] * len(m.layers)


def test_pill_stage_sets_and_gradients():
    """Stage I: projector + vision adapters; II: projector + every adapter + MAG; the LM and the tower
    never; the LM pre-stage never trains an adapter; a stage-II step gives W_g a non-zero gradient."""
    torch.manual_seed(0)
    m = mv.create_model("vlm_tiny_test", adapter="pill")
    names = {n for n, _ in m.named_parameters()}
    proj = {n for n in names if n.startswith("projector.")}
    pill = {n for n in names if ".pill." in n}
    vis = {n for n in pill if ".pill.vis." in n}
    assert vis and len({n.split(".pill.")[1].split(".")[0] for n in pill}) == 4  # attn, vis, txt, mag
    assert stage_parameters(m, 1) == proj | vis
    assert stage_parameters(m, 2) == proj | pill
    assert not stage_parameters(m, "lm") & pill and stage_parameters(m, "lm")
    with pytest.raises(ValueError, match="no stage 3"):
        stage_parameters(m, 3)
    set_stage(m, 2)
    tokens, lengths, labels, img = _inputs(m)
    m(tokens, lengths, labels, images=img).loss.backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == (n in proj | pill), n
    assert all(m.layers[i].pill.mag.weight.grad.abs().sum() > 0 for i in range(len(m.layers)))
    # the vision adapter of layer 0 reaches the loss (through the keys of the image tokens in layer 1);
    # that of the last layer cannot: nothing attends to the image positions after it
    assert m.layers[0].pill.vis.U.weight.grad.abs().sum() > 0
    assert m.layers[-1].pill.vis.U.weight.grad.abs().sum() == 0


def test_pill_config_errors_and_save_load(tmp_path):
    with pytest.raises(ConfigError, match="model.adapter"):
        mv.create_model("vlm_tiny_test", adapter="lora")
    with pytest.raises(ConfigError, match="moe_layers"):
        mv.create_model("moe_vlm_tiny_test", adapter="pill")
    with pytest.raises(ConfigError, match="adapter_rank"):
        mv.create_model("vlm_tiny_test", adapter="pill", adapter_rank=0)
    with pytest.raises(ValueError, match="dense"):
        add_pill(mv.create_model("moe_vlm_tiny_test"))
    torch.manual_seed(0)
    m = mv.create_model("vlm_tiny_test", adapter="pill", adapter_rank=4).eval()
    for p in m.parameters():  # non-zero adapters and gates
        torch.nn.init.normal_(p, std=0.05)
    tokens, lengths, _, img = _inputs(m)
    m.save_pretrained(tmp_path / "m")
    m2 = mv.from_pretrained(tmp_path / "m").eval()
    assert m2.config.adapter == "pill" and m2.config.adapter_rank == 4
    assert torch.equal(m(tokens, lengths, images=img).logits, m2(tokens, lengths, images=img).logits)


def test_pill_training_run_has_no_stage_three_and_keeps_the_lm_frozen(tmp_path):
    from moevision.config import set_by_path
    from moevision.models import from_pretrained
    from moevision.recipes import get_recipe
    from moevision.train.vlm import fit_vlm

    cfg = get_recipe("vlm_smoke")
    for k, v in (("model.moe_layers", "none"), ("data.shapeworld_train_images", "24"), ("eval.pope_images", "3"),
                 ("eval.mcq_items", "2")):
        set_by_path(cfg, k, v)
    # as `vlm-results` does: the pre-stages of a plain run, then PILL resumes from the saved LM stage
    # (whose config has none of the PILL settings: they must come from the PILL run's config)
    fit_vlm(cfg, tmp_path / "run", progress=False, log=lambda *_: None, stop_after="lm")
    for k, v in (("model.adapter", "pill"), ("model.adapter_rank", "8"), ("model.pill_mag", "false")):
        set_by_path(cfg, k, v)
    s = fit_vlm(cfg, tmp_path / "run", resume=True, progress=False, log=lambda *_: None)
    assert set(s["stages"]) == {"vision", "lm", "1", "2"}
    assert s["stages"]["1"]["trainable_params"] < s["stages"]["2"]["trainable_params"]
    lm = from_pretrained(tmp_path / "run" / "stages" / "lm")
    final = from_pretrained(tmp_path / "run" / "model")
    assert final.config.adapter == "pill" and final.config.adapter_rank == 8 and final.config.pill_mag is False
    ref = lm.state_dict()
    for k, v in final.state_dict().items():
        if ".pill." in k:
            continue
        if k.startswith("projector."):
            assert not torch.equal(v, ref[k]), k  # trained
        else:
            assert torch.equal(v, ref[k]), k  # the LM and the tower are frozen after the LM stage
    assert json.loads((tmp_path / "run" / "stages" / "progress.json").read_text()).keys() == {"vision", "lm", "1",
                                                                                              "2"}
