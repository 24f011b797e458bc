"""Uni-MoE (spec multimodal_compression_systems.md §4): LoRA by reparametrisation on linears and on per-expert
weights, Mixtral routing, MoE from modality experts, the speech connector, the stage sets, and the
miniature's pipeline on a tiny budget (spec §4(d) tests 1-3; 4-5 are the experiment's own figures)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from moevision import MoE
from moevision.errors import ConfigError
from moevision.models.vlm import VisionLanguageModel, VLMConfig, _vision, default_vocab
from moevision.techniques import unimoe as U


def _dense_vlm(**kw):
    cfg = dict(vocab=default_vocab(), vision=_vision(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2),
               dim=32, depth=2, num_heads=2, ffn_hidden=48, max_len=64)
    cfg.update(kw)
    torch.manual_seed(0)
    return VisionLanguageModel(VLMConfig.from_dict(cfg))


def test_lora_on_a_linear_starts_as_the_base_and_merges_to_the_same_function():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5, bias=True)
    x = torch.randn(4, 6)
    ref = lin(x)
    delta = U.add_lora(lin, "weight", rank=2, alpha=4.0)
    assert torch.equal(lin(x), ref)  # the output-side factor starts at 0 (LoRA's B = 0)
    assert not lin.parametrizations.weight.original.requires_grad
    with torch.no_grad():
        delta.U.normal_()
        delta.V.normal_()
    W0 = lin.parametrizations.weight.original.detach().clone()
    want = x @ (W0 + 2.0 * delta.U @ delta.V).t() + lin.bias  # scale alpha / r = 2
    torch.testing.assert_close(lin(x), want)
    lin(x).sum().backward()
    assert delta.U.grad is not None and lin.parametrizations.weight.original.grad is None
    U.merge_lora(lin)
    assert isinstance(lin.weight, torch.nn.Parameter) and not hasattr(lin, "parametrizations")
    torch.testing.assert_close(lin(x), want)
    with pytest.raises(ConfigError, match="rank"):
        U.add_lora(torch.nn.Linear(2, 2), "weight", rank=0, alpha=1.0)


@pytest.mark.parametrize("impl", ["loop", "cpu_fused", "sorted"])
def test_lora_experts_are_per_expert_and_every_dispatch_path_sees_them(impl):
    """Uni-MoE 8e's LlamaMLPLoRA: frozen SwiGLU experts + a LoRA per expert on w1, w3, w2. With B = 0 the
    layer is unchanged; with random factors it equals a hand-written per-expert formula, and the gradient
    reaches the factors only."""
    torch.manual_seed(0)
    moe = MoE(8, 12, 3, 2, activation="swiglu", bias=False, normalize_topk=True, noise_std=0.0,
              importance_loss_weight=0.0, load_loss_weight=0.0, impl=impl)
    x = torch.randn(10, 8)
    ref = moe(x).out
    deltas = U.add_lora_to_experts(moe.experts, rank=2, alpha=2.0)
    torch.testing.assert_close(moe(x).out, ref)
    with torch.no_grad():
        for d in deltas:
            d.U.normal_(std=0.3)
            d.V.normal_(std=0.3)
    ex = moe.experts
    orig = {n: ex.parametrizations[n].original.detach() for n in ("w1", "w2", "w3")}
    eff = {n: orig[n] + d.U @ d.V for n, d in zip(("w1", "w2", "w3"), deltas)}  # scale 2 / 2 = 1
    plan = moe.router(x.view(1, 10, 8))
    want = torch.zeros(10, 8)
    for a in range(20):
        t, e, g = int(plan.token_idx[a]), int(plan.expert_idx[a]), plan.gates[a]
        h = F.silu(x[t] @ eff["w1"][e]) * (x[t] @ eff["w3"][e])
        want[t] += g * (h @ eff["w2"][e])
    out = moe(x).out
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert all(d.U.grad is not None and d.U.grad.abs().sum() > 0 for d in deltas)
    assert all(ex.parametrizations[n].original.grad is None for n in ("w1", "w2", "w3"))
    merged = U.merge_lora(copy.deepcopy(moe))
    torch.testing.assert_close(merged(x).out, out.detach(), atol=1e-6, rtol=1e-6)  # merged == unmerged
    with pytest.raises(ConfigError, match="bias"):
        U.add_lora_to_experts(MoE(8, 12, 3, 2, bias=True).experts, 2, 2.0)


def test_unimoe_routing_is_mixtral_softmax_over_the_top2_logits_and_drops_nothing():
    """Spec §4(d) test 1: the gates are the softmax of the top-k logits (not of all E), sum to 1, and
    nothing is dropped (no capacity)."""
    dense = _dense_vlm()
    model = U.moe_from_modality_experts(dense, [None] * 4)
    moe = model.layers[0].ffn
    assert moe.router.capacity_factor is None and moe.router.eval_capacity_factor is None
    x = torch.randn(1, 30, 32)
    plan = moe.router(x)
    logits = x @ moe.router.weight.t()
    top = logits.topk(2, dim=-1)
    want = torch.softmax(top.values, dim=-1)
    torch.testing.assert_close(plan.gates.view(1, 30, 2), want)
    assert bool(plan.kept.all()) and float(plan.aux_loss) == 0.0


def test_moe_from_modality_experts_copies_each_expert_and_equals_the_dense_model_with_base_experts():
    dense = _dense_vlm()
    tokens = torch.randint(4, 20, (2, 7))
    lens = torch.tensor([7, 5])
    ref = dense(tokens, lens).logits
    upc = U.moe_from_modality_experts(dense, [None] * 4)  # all base: the dense function at step 0
    valid = torch.arange(7) < lens.unsqueeze(1)  # padding is not routed (the MoE writes 0 there)
    torch.testing.assert_close(upc(tokens, lens).logits[valid], ref[valid], atol=1e-5, rtol=1e-5)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    with torch.no_grad():
        for m in (a, b):
            for layer in m.layers:
                for p in layer.ffn.parameters():
                    p.add_(torch.randn_like(p))
    model = U.moe_from_modality_experts(dense, [{i: l.ffn for i, l in enumerate(a.layers)},
                                                {i: l.ffn for i, l in enumerate(b.layers)}, None, None])
    for i, layer in enumerate(model.layers):
        ex = layer.ffn.experts
        torch.testing.assert_close(ex.w1[0], a.layers[i].ffn.gate_proj.weight.t())
        torch.testing.assert_close(ex.w2[1], b.layers[i].ffn.down_proj.weight.t())
        torch.testing.assert_close(ex.w3[2], dense.layers[i].ffn.up_proj.weight.t())
    with pytest.raises(ConfigError, match="dense"):
        U.moe_from_modality_experts(model, [None] * 4)


def test_speech_connector_ignores_padding_and_feeds_the_lm_as_a_prefix():
    torch.manual_seed(0)
    sc = U.SpeechConnector(5, 8, 32, queries=3, heads=2)
    frames = torch.randn(2, 6, 5)
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = sc(frames, mask)
    assert out.shape == (2, 3, 32)
    padded = torch.cat([frames, torch.randn(2, 4, 5) * 100], dim=1)
    pmask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(sc(padded, pmask), out, atol=1e-5, rtol=1e-5)
    lm = _dense_vlm()
    o = lm(torch.randint(4, 20, (2, 5)), torch.tensor([5, 3]), prefix=out)
    assert o.logits.shape[:2] == (2, 3 + 5)
    with pytest.raises(ValueError, match="not both"):
        lm(torch.randint(4, 20, (2, 5)), torch.tensor([5, 3]), prefix=out, image_feats=torch.randn(2, 16, 16))
    with pytest.raises(ValueError, match="prefix must be"):
        lm(torch.randint(4, 20, (2, 5)), torch.tensor([5, 3]), prefix=torch.randn(2, 3, 7))
    with pytest.raises(ConfigError, match="divisible"):
        U.SpeechConnector(5, 9, 32, heads=2)


def test_stage_sets_follow_the_recipe():
    """Spec §4(d) test 3: stage 1 trains the connectors only; stage 3 the routers, LoRA and projectors."""
    from moevision.techniques.unimoe_experiment import UniMoEModel

    dense = _dense_vlm()
    m = UniMoEModel(dense, U.SpeechConnector(5, 8, 32, queries=3))
    s1 = U.stage_parameters(m, 1)
    assert s1 and all(n.startswith("lm.projector.") or n.startswith("speech.") for n in s1)
    assert any(n.startswith("speech.conv1.") for n in s1)
    s2 = U.stage_parameters(m, 2)
    assert s2 and all(".ffn." in n for n in s2)
    moe = UniMoEModel(U.moe_from_modality_experts(dense, [None] * 4), m.speech)
    U.add_lora_to_linears(moe.lm, 2, 4.0, lambda n: n.startswith("layers."))
    for layer in moe.lm.layers:
        U.add_lora_to_experts(layer.ffn.experts, 2, 4.0)
    trained = U.set_stage(moe, 3)
    kinds = {("router" if ".router." in n else "lora" if n.endswith((".U", ".V")) else "proj") for n in trained}
    assert kinds == {"router", "lora", "proj"}
    assert not any(n.startswith("speech.conv") or ".original" in n or "embed" in n for n in trained)
    assert all(p.requires_grad == (n in trained) for n, p in moe.named_parameters())
    with pytest.raises(ConfigError, match="stage"):
        U.stage_parameters(m, 4)


def test_miniature_pipeline_runs_and_reports_both_rows(tmp_path):
    """The whole recipe on a tiny budget: both rows, per-modality accuracies, routing shares, the report."""
    from moevision.techniques.unimoe_experiment import UniMoESettings, run_unimoe

    S = UniMoESettings(seeds=1, train_scenes=40, test_scenes=8, dim=32, ffn_hidden=32, speech_width=16,
                       batch_size=8, vision_steps=2, lm_steps=2, stage1_steps=2, stage2_steps=2, stage3_steps=2)
    rep = run_unimoe(S, out=tmp_path / "u.md", work=tmp_path / "work", log=lambda s: None)
    run = rep["results"][0]
    for row in ("unimoe", "dense"):
        for m in ("image", "speech"):
            assert 0.0 <= run["rows"][row][m]["all"] <= 1.0
    loads = run["rows"]["unimoe"]["image"]["prefix_load"]
    assert len(loads) == 4 and abs(sum(loads) - 1.0) < 1e-5
    assert "text_load" in run["rows"]["unimoe"]["speech"] and "prefix_load" not in run["rows"]["dense"]["image"]
    assert run["trainable_stage3"]["unimoe"] > 0
    text = (tmp_path / "u.md").read_text()
    assert "Uni-MoE" in text and "dense twin" in text and (tmp_path / "u.json").is_file()
    again = run_unimoe(S, out=None, work=tmp_path / "work", log=lambda s: None)  # cached per seed
    assert again["results"][0]["rows"] == run["rows"]
    with pytest.raises(ConfigError, match="stage3_steps"):
        run_unimoe(UniMoESettings(stage3_steps=-1))
