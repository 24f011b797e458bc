"""Pruning rarely used experts (router rows dropped, top-k semantics kept) and merging experts into
fewer, on hand-made routers whose choices are known."""

import pytest
import torch

import moevision
from moevision.errors import ConfigError
from moevision.techniques.qmoe import merge_experts, prune_by_usage, prune_experts
from moevision.techniques.qmoe.prune import similarity_groups

LAYER = "blocks.1.mlp"


def _model(**kw):
    torch.manual_seed(0)
    m = moevision.create_model("moe_vit_tiny_test", capacity_factor=None, **kw).eval()
    with torch.no_grad():  # hand-made router: expert e scores 4 * x[e]
        m.blocks[1].mlp.router.weight.zero_()
        m.blocks[1].mlp.router.weight[:, :4] = 4.0 * torch.eye(4)
    return m


def _tokens(first, second=None, scale=0.5):
    x = 0.05 * torch.randn(len(first), 32)
    x[torch.arange(len(first)), torch.tensor(first)] += 1.0
    if second is not None:
        x[torch.arange(len(first)), torch.tensor(second)] += scale
    return x


@torch.no_grad()
def test_prune_keeps_outputs_of_tokens_not_routed_to_pruned_experts():
    model = _model(top_k=2, normalize_topk=True)  # Mixtral-style gates: renormalised over the top-k
    first, second = [0, 1, 2, 0, 3, 1, 3], [1, 2, 0, 2, 0, 3, 1]
    x = _tokens(first, second)
    old = model.blocks[1].mlp(x)
    assert old.stats.tokens_per_expert.tolist() == [4.0, 4.0, 3.0, 3.0]  # the routing is the hand-made one
    pruned = prune_experts(model, {LAYER: [0, 1, 2]})
    assert pruned.config.num_experts == 3 and pruned.blocks[1].mlp.router.weight.shape == (3, 32)
    new = pruned.blocks[1].mlp(x).out
    untouched = torch.tensor([3 not in (a, b) for a, b in zip(first, second)])
    assert torch.allclose(new[untouched], old.out[untouched], atol=1e-6)
    assert not torch.allclose(new[~untouched], old.out[~untouched], atol=1e-3)
    # the rest of the network is untouched
    images = torch.randn(2, 1, 16, 16)
    assert pruned(images).logits.shape == (2, 4)


@torch.no_grad()
def test_prune_with_unnormalised_gates_renormalises_the_softmax_over_kept_experts():
    model = _model(top_k=1)  # V-MoE: gate = softmax probability of the chosen expert
    first = [0, 1, 2, 3, 2, 3]
    x = _tokens(first)
    moe = model.blocks[1].mlp
    probs = torch.softmax(x @ moe.router.weight.T, -1)
    old = moe(x).out
    new = prune_experts(model, {LAYER: [0, 1, 2]}).blocks[1].mlp(x).out
    for t, e in enumerate(first):
        if e != 3:  # same expert, gate p_e / (1 - p_3)
            assert torch.allclose(new[t] * (1 - probs[t, 3]), old[t], atol=1e-6)
        else:  # rerouted to the best kept expert
            best = int(probs[t, :3].argmax())
            y = moe.experts.forward_expert(best, x[t:t + 1])[0] * probs[t, best] / (1 - probs[t, 3])
            assert torch.allclose(new[t], y, atol=1e-6)


def test_prune_by_usage_drops_the_least_used():
    model = _model(top_k=1)
    pruned, keep = prune_by_usage(model, {LAYER: torch.tensor([5.0, 1.0, 7.0, 3.0])}, 3)
    assert keep == {LAYER: [0, 2, 3]}
    assert torch.equal(pruned.blocks[1].mlp.experts.w2, model.blocks[1].mlp.experts.w2[[0, 2, 3]])
    with pytest.raises(ConfigError, match="--keep"):
        prune_by_usage(model, {LAYER: torch.ones(4)}, 4)


@torch.no_grad()
def test_merge_averages_groups_by_usage_and_is_exact_for_identical_experts():
    model = _model(top_k=1)
    usage = {LAYER: torch.tensor([1.0, 3.0, 1.0, 1.0])}
    merged = merge_experts(model, {LAYER: [[0, 1], [2, 3]]}, usage)
    w = model.blocks[1].mlp.experts.w1
    assert torch.allclose(merged.blocks[1].mlp.experts.w1[0], 0.25 * w[0] + 0.75 * w[1], atol=1e-6)
    r = model.blocks[1].mlp.router.weight
    top = merge_experts(model, {LAYER: [[0, 1], [2, 3]]}, usage, router="top", weighting="uniform")
    assert torch.equal(top.blocks[1].mlp.router.weight[0], r[1])
    assert torch.allclose(top.blocks[1].mlp.experts.b1[1], 0.5 * (model.blocks[1].mlp.experts.b1[2] +
                                                                model.blocks[1].mlp.experts.b1[3]), atol=1e-7)
    # identical experts with gate 1 (top-1, renormalised): merging changes nothing
    same = _model(top_k=1, normalize_topk=True, expert_init="shared")
    with torch.no_grad():
        ex = same.blocks[1].mlp.experts
        for p in ex.parameters():
            p.copy_(p[:1].expand_as(p) + 0.01 * torch.randn_like(p[:1]))
    images = torch.randn(3, 1, 16, 16)
    out = merge_experts(same, {LAYER: [[0, 3], [1, 2]]}, usage)(images).logits
    assert torch.allclose(out, same(images).logits, atol=1e-5)


def test_similarity_groups_pair_the_similar_experts():
    model = _model()
    with torch.no_grad():
        ex = model.blocks[1].mlp.experts
        for p in ex.parameters():
            p[2] = p[0] + 1e-3 * torch.randn_like(p[0])
            p[3] = p[1] + 1e-3 * torch.randn_like(p[1])
    assert similarity_groups(model.blocks[1].mlp, 2) == [[0, 2], [1, 3]]
