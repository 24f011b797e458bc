"""Routing statistics on hand-made routings (hand-computed answers) and the recording pass against the
MoE layer's own statistics and the training engine's evaluation."""

import math

import pytest
import torch

from moevision import MoE, create_model
from moevision.analytics import (
    LayerRouting,
    collect_routing,
    conditional,
    dead_experts,
    drop_rates,
    entropy_bits,
    expert_load,
    expert_weight_similarity,
    image_purity,
    joint_counts,
    load_cv,
    mutual_information_bits,
    patch_expert_frequency,
    router_entropy_bits,
    shuffled_image_purity,
    summarize,
)
from moevision.analytics.routing import summarize_layer
from moevision.data import get_dataset
from moevision.train import evaluate


# ------------------------------------------------------------------ pure statistics
def test_entropy_bits_hand_values():
    assert float(entropy_bits(torch.tensor([0.25, 0.25, 0.25, 0.25]))) == pytest.approx(2.0)
    assert float(entropy_bits(torch.tensor([1.0, 0.0, 0.0]))) == 0.0  # 0 log 0 = 0, no NaN
    # [1/2, 1/4, 1/4]: 1/2*1 + 2 * 1/4*2 = 1.5 bits; counts are normalised first
    assert float(entropy_bits(torch.tensor([2.0, 1.0, 1.0]))) == pytest.approx(1.5)
    assert router_entropy_bits(torch.tensor([[0.5, 0.5], [1.0, 0.0]])) == pytest.approx(0.5)


def test_mutual_information_independent_deterministic_and_hand_case():
    # independent: joint = outer product of the marginals -> 0 bits
    pc, pe = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.5, 0.3, 0.2])
    assert mutual_information_bits(1000 * pc[:, None] * pe[None, :]) == pytest.approx(0.0, abs=1e-12)
    # deterministic class -> expert map: I = H(class)
    counts = torch.diag(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    assert mutual_information_bits(counts) == pytest.approx(float(entropy_bits(torch.tensor([1.0, 2, 3, 4]))))
    # two classes onto one expert: I = H(expert) < H(class)
    many_to_one = torch.tensor([[5.0, 0], [5.0, 0], [0, 10.0]])
    assert mutual_information_bits(many_to_one) == pytest.approx(1.0)
    # [[2, 0], [1, 1]]: P = [[.5, 0], [.25, .25]], P(c) = [.5, .5], P(e) = [.75, .25]
    # I = .5 log2(.5/.375) + .25 log2(.25/.375) + .25 log2(.25/.125) = 0.2075187 - 0.1462406 + 0.25
    assert mutual_information_bits(torch.tensor([[2.0, 0.0], [1.0, 1.0]])) == pytest.approx(0.3112781, abs=1e-6)


def test_joint_counts_and_conditional():
    labels = torch.tensor([0, 0, 1, 2])
    w = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0.25, 0.75]])  # soft rows are allowed (soft MoE mass)
    counts = joint_counts(labels, w, 3)
    assert counts.tolist() == [[1, 1], [1, 0], [0.25, 0.75]]
    assert conditional(counts).tolist() == [[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]]
    assert conditional(torch.zeros(1, 2)).tolist() == [[0.0, 0.0]]  # a class with no tokens: no NaN


def test_load_cv_and_dead_experts_hand_values():
    share = expert_load(torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]))
    assert share.tolist() == [0.5, 0.25, 0.25, 0.0]
    # mean 1/4, deviations (1/4, 0, 0, -1/4): std = sqrt(2/64) = 0.1767767, CV = 0.7071068
    assert load_cv(share) == pytest.approx(math.sqrt(0.5))
    assert load_cv(torch.full((4,), 0.25)) == 0.0
    s = torch.tensor([0.5, 0.49, 0.01, 0.0])  # uniform share 0.25; 0.05 x 0.25 = 0.0125
    assert dead_experts(s) == [2, 3]
    assert dead_experts(s, threshold=0.0) == [3]  # only never-chosen experts
    assert dead_experts(s, threshold=0.03) == [3]  # 0.01 >= 0.03 * 0.25 = 0.0075


def test_drop_rates_hand_case():
    chosen = torch.tensor([[1.0, 1, 0], [1, 0, 1], [0, 1, 1]])  # 3 tokens, top-2
    kept = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1, 1]])  # 3 of 6 assignments dropped, token 1 lost all
    assert drop_rates(chosen, kept) == pytest.approx((0.5, 1 / 3))
    assert drop_rates(chosen, chosen) == (0.0, 0.0)


def test_expert_weight_similarity_hand_cases():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-2.0, 0.0], [1.0, 1.0]])  # 4 experts of 2 weights
    b = torch.zeros(4, 1)  # a second (zero) weight tensor joins the flattened vector without changing it
    sim = expert_weight_similarity([a.view(4, 2, 1), b])
    assert sim[0, 0] == pytest.approx(1.0)
    assert sim[0, 1] == pytest.approx(0.0)  # orthogonal
    assert sim[0, 2] == pytest.approx(-1.0)  # opposite, scale does not matter
    assert sim[0, 3] == pytest.approx(1 / math.sqrt(2))
    torch.testing.assert_close(sim, sim.t())


def test_patch_expert_frequency_skips_prefix_and_untaken_tokens():
    primary = torch.tensor([[3, 0, 1, 1, 2], [0, 0, 1, 2, -1]])  # CLS then 2x2 patches; -1 = taken by nobody
    freq = patch_expert_frequency(primary, num_prefix=1, num_experts=4)
    assert freq.tolist() == [[2, 0, 0, 0], [0, 2, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]]


def test_image_purity_hand_cases():
    whole = torch.tensor([[2, 2, 2, 2], [0, 0, 0, 0], [1, 1, 1, 1]])  # every image routed as a whole
    assert image_purity(whole, 3) == 1.0
    mixed = torch.tensor([[0, 1, 2, 3], [0, 0, 1, -1]])  # 1/4 and 2/3 (the untaken token counts nowhere)
    assert image_purity(mixed, 4) == pytest.approx((0.25 + 2 / 3) / 2)
    # image-wise routing over a balanced set: purity 1, while the shuffled baseline breaks the link
    by_image = torch.arange(400).remainder(4).unsqueeze(1).expand(400, 16)
    assert image_purity(by_image, 4) == 1.0 and shuffled_image_purity(by_image, 4) < 0.6


# ------------------------------------------------------------------ hand-made routings of each kind
def _token_choice_layer():
    # 2 images x (CLS + 4 patches), E = 3, top-1: class 0 -> expert 0, class 1 -> expert 2 (deterministic)
    idx = torch.tensor([[0, 0, 0, 0, 0], [2, 2, 2, 2, 2]]).unsqueeze(-1)
    kept = torch.ones_like(idx, dtype=torch.bool)
    kept[1, 3:] = False  # image 1 loses its last two patches to capacity
    probs = torch.nn.functional.one_hot(idx[..., 0], 3).float()
    return LayerRouting(block=1, router="topk", num_experts=3, top_k=1, capacity_factor=1.0,
                        gates=kept.float(), probs=probs, expert_idx=idx, kept=kept)


def test_token_choice_layer_summary_hand_computed():
    layer = _token_choice_layer()
    assert layer.kind == "token"
    assert layer.dropped_BN()[1].tolist() == [False, False, False, True, True]
    s = summarize_layer(layer, torch.tensor([0, 1]), num_classes=2, num_prefix=1, grid_size=2, batch_size=2)
    assert s["load_share"] == pytest.approx([5 / 8, 0.0, 3 / 8])  # kept: 5 to expert 0, 3 to expert 2
    assert s["class_drop_rate"] == pytest.approx([0.0, 0.4])  # class 1's only image lost 2 of its 5 tokens
    assert s["drop_rate_batch_halves"] == pytest.approx([0.0, 0.4])  # image 1 is in the 2nd half of its batch
    assert s["choice_share"] == pytest.approx([0.5, 0.0, 0.5])
    assert s["assignment_drop_rate"] == pytest.approx(0.2) and s["token_drop_rate"] == pytest.approx(0.2)
    assert s["mi_class_bits"] == pytest.approx(1.0)  # = H(class) for a deterministic class -> expert map
    assert s["class_expert"] == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert s["dead_experts"] == [1]
    assert s["router_entropy_bits"] == 0.0 and s["max_entropy_bits"] == pytest.approx(math.log2(3))
    assert s["cls_primary_share"] == [0.5, 0.0, 0.5]
    assert s["patch_drop_rate"] == [0.0, 0.0, 0.5, 0.5]
    assert s["mi_position_bits"] == pytest.approx(0.0)  # every position sees both experts equally
    assert s["patch_mode_share"] == [0.5] * 4
    assert s["image_purity"] == 1.0  # each image's patches share one expert
    assert s["cls_with_image_majority"] == 1.0 and s["mean_top_prob"] == 1.0


def test_expert_choice_layer_untaken_token_is_dropped():
    gates = torch.zeros(1, 3, 2)  # CLS + 2 patches, 2 experts
    gates[0, 0, 0], gates[0, 0, 1], gates[0, 1, 1] = 0.6, 0.4, 0.9  # token 2 taken by no expert
    layer = LayerRouting(block=0, router="expert_choice", num_experts=2, top_k=0, capacity_factor=1.0,
                         gates=gates, probs=torch.full((1, 3, 2), 0.5))
    assert layer.kind == "expert"
    assert layer.primary_BN().tolist() == [[0, 1, -1]]
    assert layer.dropped_BN().tolist() == [[False, False, True]]
    s = summarize_layer(layer, torch.tensor([0]), num_classes=1, num_prefix=1, grid_size=None)
    assert s["load_share"] == pytest.approx([1 / 3, 2 / 3])
    assert s["token_drop_rate"] == pytest.approx(1 / 3) and s["assignment_drop_rate"] is None


def test_soft_layer_reports_mass_and_says_what_does_not_apply():
    comb = torch.tensor([[[0.75, 0.25], [0.5, 0.5], [0.0, 1.0]]])
    layer = LayerRouting(block=0, router="soft", num_experts=2, top_k=0, capacity_factor=None, gates=comb,
                         probs=comb, dispatch=torch.tensor([[[0.2, 0.1], [0.3, 0.3], [0.5, 0.6]]]))
    assert layer.kind == "soft" and not layer.dropped_BN().any()
    s = summarize_layer(layer, torch.tensor([0]), num_classes=1, num_prefix=1, grid_size=None)
    assert s["load_share"] == pytest.approx([1.25 / 3, 1.75 / 3])
    assert s["token_drop_rate"] is None and s["dead_experts"] == []
    assert any("dropped" in n for n in s["not_applicable"])


# ------------------------------------------------------------------ recording through the layer and model
@pytest.mark.parametrize("kw", [dict(top_k=2, capacity_factor=0.5), dict(router="expert_choice", capacity_factor=0.5),
                                dict(router="soft"), dict(top_k=1)])
def test_recorded_routing_matches_the_layers_own_statistics(kw):
    moe = MoE(8, 16, 4, record_routing=True, **kw).eval()
    st = moe(torch.randn(3, 5, 8)).stats
    layer = LayerRouting(block=0, router=moe.router_name, num_experts=4,
                         top_k=st.expert_idx.shape[-1] if st.expert_idx is not None else 0, capacity_factor=None,
                         gates=st.gates, probs=st.probs, expert_idx=st.expert_idx, kept=st.kept, dispatch=st.dispatch)
    torch.testing.assert_close(layer.kept_TE().sum(0).float(), st.tokens_per_expert.float())
    if layer.kind == "soft":
        # dispatch is a softmax over the image's tokens per slot: each expert receives exactly 1 slot's mass
        torch.testing.assert_close(st.dispatch.sum(1), torch.ones(3, 4))
    else:
        a, t = drop_rates(layer.chosen_TE(), layer.kept_TE())
        assert t == pytest.approx(float(st.dropped_token_fraction))
        # the layer reports expert choice's unpicked tokens as its dropped fraction (it has no choices)
        assert (t if layer.kind == "expert" else a) == pytest.approx(float(st.dropped_fraction))
        assert (float(st.dropped_fraction) > 0) == ("capacity_factor" in kw)
    assert router_entropy_bits(st.probs.reshape(-1, 4)) == pytest.approx(float(st.router_entropy) / math.log(2),
                                                                          rel=1e-5)


def test_collect_routing_agrees_with_evaluate_and_restores_recording():
    model = create_model("moe_vit_tiny_test", eval_capacity_factor=0.5)
    ds = get_dataset("synthetic", "test", num_samples=40)
    rec = collect_routing(model, ds, batch_size=16)
    assert [m.record_routing for m in model.modules() if isinstance(m, MoE)] == [False]
    assert rec.grid_size == 4 and rec.num_prefix_tokens == 1 and rec.labels.tolist() == ds.labels.tolist()
    ev = evaluate(model, ds, batch_size=16)  # the engine's own per-layer statistics, same batches
    s = summarize(rec)
    assert s["layers"][0]["load_share"] == pytest.approx(ev["moe_layers"][0]["expert_load"], abs=1e-4)
    assert s["accuracy"] == pytest.approx(ev["accuracy"])
    # dropped fraction: the engine averages per batch (16, 16, 8 images); weight the record the same way
    dropped = [drop_rates(*(t[i:j].reshape(-1, 4) for t in (ch, kp)))[0] for i, j in ((0, 16), (16, 32), (32, 40))
               for ch, kp in [(rec.layers[0].chosen_TE().view(40, 17, 4), rec.layers[0].kept_TE().view(40, 17, 4))]]
    assert sum(dropped) / 3 == pytest.approx(ev["moe_layers"][0]["dropped_fraction"], abs=1e-4)
    assert rec.one_per_class(4) == [int((ds.labels == c).nonzero()[0]) for c in range(4)]
