"""Mod-Squad's mixture of attention-head experts (MoA), vision_moe.md §14."""

import dataclasses

import pytest
import torch

from moevision.errors import ConfigError
from moevision.models.vit import ViTConfig, VisionTransformer
from moevision.techniques.moa import MoAAttention, multi_query_reference
from moevision.techniques.multitask import MultiTaskViT, _RouterProbs, prune_for_task, task_flops


def _moa(**kw):
    torch.manual_seed(0)
    m = MoAAttention(16, 4, **kw).double()
    with torch.no_grad():
        for p in (m.q_bias, m.o_bias, m.kv.bias):
            p.normal_()
    return m


def test_zero_routers_with_all_experts_reduce_to_scaled_multi_query_attention():
    m = _moa(num_experts=4, top_k=4)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ref = multi_query_reference(x, m.q_weight, m.q_bias, m.kv, m.o_weight, m.o_bias, head_scale=1 / 4 + 1e-4)
    torch.testing.assert_close(m(x).out, ref, rtol=1e-6, atol=1e-9)  # gates are fp32 (the router runs in fp32)
    assert m.head_dim == 8  # Mod-Squad: 2·D / heads


def test_only_the_selected_experts_contribute_with_unrenormalised_probs():
    m = _moa(num_experts=6, top_k=2)
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    with torch.no_grad():  # a constant direction makes every token prefer experts 1 and 4
        m.router.weight.zero_()
        m.router.weight[0, 1] = 0.3
        m.router.weight[0, 4] = 0.2
    x = x + 5.0
    probs = m.router(x)
    sel = probs.topk(2, dim=-1).indices
    assert bool((sel.sort(-1).values == torch.tensor([1, 4])).all())
    k, v = m.kv(x).chunk(2, dim=-1)
    ref = m.o_bias.expand(1, 4, -1).clone()
    for e in (1, 4):
        q = x @ m.q_weight[e] + m.q_bias[e]
        a = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
        ref = ref + probs[..., e:e + 1].double() * ((a @ v) @ m.o_weight[e])
    torch.testing.assert_close(m(x).out, ref, rtol=0, atol=1e-10)
    out = m(x)
    assert out.stats.tokens_per_expert.tolist() == [0, 4, 0, 0, 4, 0]
    assert float(out.stats.aux_losses["switch"]) > 1.0  # all tokens on 2 of 6 experts: unbalanced


def test_task_routers():
    m = _moa(num_experts=4, top_k=2, num_tasks=3)
    assert m.router.weight.shape == (3, 4, 16)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        m.router.weight.normal_()
    a, b = m(x, task=0).out, m(x, task=2).out
    assert not torch.allclose(a, b)
    both = m(x, task=torch.tensor([0, 2])).out  # one id per sample
    torch.testing.assert_close(both[0], a[0])
    torch.testing.assert_close(both[1], b[1])
    with pytest.raises(ValueError, match="pass task"):
        m(x)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        m(x, task=3)
    with pytest.raises(ValueError, match="single router"):
        _moa()(x, task=0)


def test_validation():
    with pytest.raises(ConfigError, match="top_k"):
        MoAAttention(16, 4, num_experts=3, top_k=4)
    with pytest.raises(ConfigError, match="head_dim"):
        MoAAttention(16, 4, head_dim=0)


def test_active_flops_hand_value():
    m = MoAAttention(16, 4, num_experts=8, top_k=4, head_dim=8)
    N = 5
    macs = N * 16 * 8 + N * 4 * 16 * 8 * 2 + N * 16 * 16 + 2 * N * N * 4 * 8
    assert m.active_flops(N) == 2 * macs


def _modsquad_vit(**kw):
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=3,
                    moe_layers=[1], num_experts=4, top_k=2, task_routing="multi_gate", num_tasks=2,
                    attention="moa", attention_layers=[0], **kw)
    return VisionTransformer(cfg)


def _random_routers(vit):
    """Non-zero routers (the zero init would tie every token's choice)."""
    with torch.no_grad():
        for blk in vit.blocks:
            for n, p in blk.named_parameters():
                if "router" in n:
                    p.normal_(std=0.5)
    return vit


def test_vit_hands_tasks_to_moa_and_mi_loss_collects_its_probs():
    vit = _modsquad_vit()
    moa = vit.blocks[0].attn
    assert isinstance(moa, MoAAttention) and moa.router.weight.shape == (2, 8, 16)
    with torch.no_grad():
        moa.router.weight[1].normal_()
    x = torch.randn(3, 1, 8, 8)
    assert not torch.allclose(vit(x, task=0).logits, vit(x, task=1).logits)
    model = MultiTaskViT(vit, ("classify", "patch_stats"), mi_weight=0.05)
    probs = _RouterProbs(model)
    model.forward_task(x, 0)
    sums, toks = probs.take()
    probs.close()
    assert [s.shape[0] for s in sums] == [8, 4]  # the MoA router (E=8), then the MoE-MLP router (E=4)
    assert toks == [3 * 5, 3 * 5]
    model.train()
    _, aux, _ = model(x)
    aux.backward()
    assert float(moa.router.weight.grad.abs().sum()) > 0  # the MI loss reaches the MoA router (zero-init)


def test_pruning_keeps_moa_with_the_task_router_and_is_exact_when_nothing_is_pruned():
    vit = _random_routers(_modsquad_vit())
    model = MultiTaskViT(vit, ("classify", "patch_stats")).eval()
    x = torch.randn(4, 1, 8, 8)
    usage = [[0.5, 0.5, 0.5, 0.5]]  # every expert used: theta 0.1 keeps all four
    for t in (0, 1):
        pruned, keeps = prune_for_task(model, t, usage, 0.1)
        assert keeps == [[0, 1, 2, 3]]
        name = model.task_names[t]
        torch.testing.assert_close(pruned.forward_task(x, 0)[0], model.forward_task(x, t)[0])
        assert pruned.backbone.blocks[0].attn.router.weight.shape == (1, 8, 16)
        assert task_flops(pruned, name) == task_flops(model, name)  # nothing pruned: the same active FLOPs


def test_from_single_gate_copies_the_moa_router_to_every_task():
    from moevision.techniques.multitask import from_single_gate

    torch.manual_seed(0)
    cfg = ViTConfig(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=3,
                    moe_layers=[1], num_experts=4, top_k=2, attention="moa", attention_layers=[0])
    single = VisionTransformer(cfg).eval()
    with torch.no_grad():
        single.blocks[0].attn.router.weight.normal_()
    multi = from_single_gate(single, 2)
    x = torch.randn(3, 1, 8, 8)
    for t in (0, 1):
        torch.testing.assert_close(multi(x, task=t).logits, single(x).logits)
    assert multi.blocks[0].attn.router.weight.shape == (2, 8, 16)


def test_num_tasks_in_attention_options_needs_task_routing():
    with pytest.raises(ConfigError, match="task_routing"):
        ViTConfig(attention="moa", attention_options={"num_tasks": 2}).validate()


def test_task_flops_counts_moa_blocks_by_hand():
    vit = _modsquad_vit()
    model = MultiTaskViT(vit, ("classify", "patch_stats"))
    moa = vit.blocks[0].attn
    N, D = 5, 16
    dense_attn = 2 * (N * 4 * D * D + 2 * N * N * D)
    # the same model with plain attention in block 0 differs by exactly MoA's active FLOPs minus MHA's
    plain = VisionTransformer(dataclasses.replace(vit.config, attention="mha"))
    diff = task_flops(model, "classify") - task_flops(MultiTaskViT(plain, ("classify", "patch_stats")), "classify")
    assert diff == moa.active_flops(N) - dense_attn


def test_pruning_moa_experts_equals_the_full_layer_with_removed_experts_masked():
    vit = _random_routers(_modsquad_vit())
    model = MultiTaskViT(vit, ("classify", "patch_stats")).eval()
    moa_usage = [[1.0, 0.9, 0.05, 0.6, 0.02, 0.8, 0.5, 0.07]]  # task 0's usage of the 8 MoA experts (sums to 4)
    pruned, keeps = prune_for_task(model, 0, [[0.5, 0.5, 0.5, 0.5]], 0.3, moa_usage=moa_usage)
    assert keeps[0] == [0, 1, 2, 3] and keeps[1] == [0, 1, 3, 5, 6]  # usage > 0.3 / 4 = 0.075
    small = pruned.backbone.blocks[0].attn
    assert small.num_experts == 5 and small.top_k == 4 and small.router.weight.shape == (1, 5, 16)
    # oracle: the full MoA with the removed experts' router rows pushed to -inf (softmax over the kept only)
    full = vit.blocks[0].attn
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        logits = x @ full.router.weight[0].T
        logits[..., [2, 4, 7]] = float("-inf")
        probs = logits.softmax(-1) + full.router.eps
        top_p, top_i = probs.topk(4, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p)
        q = torch.einsum("bnd,edh->bneh", x, full.q_weight) + full.q_bias
        k, v = full.kv(x).chunk(2, dim=-1)
        a = (torch.einsum("bneh,bmh->benm", q, k) / full.head_dim ** 0.5).softmax(-1)
        o = torch.einsum("benm,bmh->bneh", a, v) * gates.unsqueeze(-1)
        ref = torch.einsum("bneh,ehd->bnd", o, full.o_weight) + full.o_bias
    torch.testing.assert_close(small(x).out, ref, rtol=1e-5, atol=1e-6)


def test_evaluate_multitask_reports_moa_usage():
    from moevision.techniques.multitask import evaluate_multitask, patch_stats

    model = MultiTaskViT(_modsquad_vit(), ("classify", "patch_stats"))
    imgs = torch.rand(6, 1, 8, 8)
    res = evaluate_multitask(model, imgs, torch.zeros(6, dtype=torch.long), lambda x: patch_stats(x, 4),
                             lambda x: x)
    assert len(res["moa_usage"]) == 1 and len(res["moa_usage"][0]) == 2
    for row in res["moa_usage"][0]:
        assert abs(sum(row) - 1.0) < 1e-6 and len(row) == 8
    assert res["moa_mutual_information"] >= 0.0
