"""CLIP-MoE diversified multiplet upcycling (vision_moe.md §9(e) unit tests)."""

import pytest
import torch

import moevision as mv
from moevision.data import make_synthetic
from moevision.moe import losses as L
from moevision.techniques.clip_moe import (accumulate_pseudo_labels, build_clip_moe, cluster_batches,
                                           expert_diversity, joint_cluster, kmeans, lock_except_gate,
                                           lock_except_mlp, mcl_loss, mcl_stages, mlp_state, train_routers)


pytestmark = pytest.mark.usefixtures("one_thread")


def _base():
    torch.manual_seed(0)
    return mv.create_model("vit_tiny_test").eval()


def test_pseudo_label_arithmetic():
    prev = torch.tensor([0, 1, 4, 8])
    t = torch.tensor([2, 0, 1, 2])
    i = torch.tensor([1, 2, 0, 2])
    joint = joint_cluster(t, i, 3)
    assert joint.tolist() == [7, 2, 3, 8]  # 3 t + i
    assert accumulate_pseudo_labels(prev, joint, 9).tolist() == [7, 11, 39, 80]  # P * 9 + 3 t + i
    # two stages from P0 = 0: samples share P2 iff they shared the joint cluster at both stages
    p1 = accumulate_pseudo_labels(torch.zeros(3, dtype=torch.long), torch.tensor([4, 4, 5]), 9)
    p2 = accumulate_pseudo_labels(p1, torch.tensor([1, 2, 1]), 9)
    assert p2.tolist() == [37, 38, 46] and len(set(p2.tolist())) == 3


def test_cluster_batches_single_label_and_at_most_once():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 2 + [3] * 8)
    batches = cluster_batches(labels, 4, seed=1)
    assert all(len(set(labels[b].tolist())) == 1 for b in batches)
    assert all(b.numel() == 4 for b in batches)
    used = torch.cat(batches)
    assert used.unique().numel() == used.numel()  # no sample twice in an epoch
    per = {c: sum(1 for b in batches if labels[b[0]] == c) for c in range(4)}
    assert per == {0: 2, 1: 1, 2: 0, 3: 2}  # full batches only; the 2-sample cluster is skipped
    assert [b.tolist() for b in cluster_batches(labels, 4, seed=1)] == [b.tolist() for b in batches]
    assert [b.tolist() for b in cluster_batches(labels, 4, seed=1, epoch=1)] != [b.tolist() for b in batches]


def test_kmeans_recovers_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(30)
    x = centers[truth] + 0.5 * torch.randn(90, 2, generator=g)
    lab = kmeans(x, 3, seed=0)
    # same partition up to relabelling
    for c in range(3):
        assert lab[truth == c].unique().numel() == 1
    assert lab.unique().numel() == 3
    assert torch.equal(kmeans(x, 3, seed=0), lab)


def test_mcl_loss_batch_classes_oracle():
    logits = torch.tensor([[2.0, 0.5, -1.0, 3.0], [0.0, 1.0, 0.0, 2.5]])
    y = torch.tensor([0, 2])
    # only classes 0 and 2 are present: 2-way softmax over them
    want = -(torch.log_softmax(logits[:, [0, 2]], -1)[[0, 1], [0, 1]]).mean()
    torch.testing.assert_close(mcl_loss(logits, y), want)
    torch.testing.assert_close(mcl_loss(logits, y, "ce"), torch.nn.functional.cross_entropy(logits, y))
    all_present = torch.tensor([0, 1, 2, 3])
    z = torch.randn(4, 4)
    torch.testing.assert_close(mcl_loss(z, all_present), torch.nn.functional.cross_entropy(z, all_present))


def test_locks_leave_exactly_the_intended_parameters_trainable():
    m = mv.create_model("vit_tiny_test", depth=3)
    names = lock_except_mlp(m, unlocked_from=1)
    assert names and all(n.startswith(("blocks.1.mlp.", "blocks.2.mlp.")) for n in names)
    assert len(names) == 8 and not any(p.requires_grad for n, p in m.named_parameters() if n not in names)
    moe = build_clip_moe(_base(), [mlp_state(_base())] * 3)
    gates = lock_except_gate(moe)
    assert gates == ["blocks.0.mlp.router.weight", "blocks.1.mlp.router.weight"]


def test_identical_experts_equal_the_dense_model_and_balance_weighting():
    base = _base()
    moe = build_clip_moe(base, [mlp_state(base)] * 3, top_k=2).eval()
    x = torch.randn(5, 1, 16, 16)
    assert (moe(x).logits - base(x).logits).abs().max() <= 1e-6
    assert moe.moe_layers == (0, 1) and expert_diversity(moe) == 0.0
    r = moe.blocks[0].mlp.router
    assert r.switch_use_all_k and r.normalize_topk and r.capacity_factor is None
    assert r.weights["switch"] == pytest.approx(0.01 * 2 / 2)
    # CLIP-MoE's L_bal = N * sum_e f_e P_e with f counting all top-2 choices is 2 at uniform routing; the
    # per-layer Switch loss (sum f = 1) times k gives the same value
    N, S = 4, 8
    probs = torch.full((1, S, N), 1.0 / N)
    idx = torch.tensor([[0, 1], [2, 3]] * 4).view(1, S, 2)
    assert float(L.switch_loss(probs, idx, use_all_k=True)) * 2 == pytest.approx(2.0)


def test_mcl_stages_diversify_ffns_and_router_training_touches_only_routers():
    torch.manual_seed(0)  # a conv-stem (BatchNorm) model: frozen BN statistics must not move either
    base = mv.create_model("vit_fmnist_hybrid", depth=2, embed_dim=16, num_heads=2, stem_channels=4,
                           stem_convs_per_stage=1).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    train = make_synthetic("train", num_samples=96, image_size=28, num_classes=10)
    ffns, stats = mcl_stages(base, train, num_experts=3, k_image=2, k_text=2, batch_size=8, lr=3e-3, seed=0)
    assert len(ffns) == 3 and [s["stage"] for s in stats] == [1, 2]
    assert stats[0]["clusters"] <= 4 and stats[1]["clusters"] <= 16 and stats[1]["batches"] >= 1
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # base untouched
    assert all(torch.equal(ffns[0][k], before[k]) for k in ffns[0])  # expert 0 = the base FFN
    assert all(not torch.equal(ffns[s]["blocks.1.mlp.fc1.weight"], ffns[0]["blocks.1.mlp.fc1.weight"])
               for s in (1, 2))
    moe = build_clip_moe(base, ffns, top_k=2)
    assert expert_diversity(moe) > 0
    snap = {k: v.clone() for k, v in moe.state_dict().items()}
    train_routers(moe, train, batch_size=32, lr=1e-2)
    changed = {k for k, v in moe.state_dict().items() if not torch.equal(v, snap[k])}
    assert changed == {"blocks.0.mlp.router.weight", "blocks.1.mlp.router.weight"}
    assert all(p.requires_grad for p in moe.parameters())  # unlocked again afterwards


def test_an_mcl_step_changes_only_ffn_parameters():
    from moevision.techniques._loop import run_steps

    m = mv.create_model("vit_tiny_test")
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    names = set(lock_except_mlp(m))
    params = [p for n, p in m.named_parameters() if n in names]
    x, y = torch.randn(8, 1, 16, 16), torch.tensor([0, 1, 2, 3] * 2)
    run_steps(params, [(x, y)] * 2, lambda a, b: mcl_loss(m(a).logits, b), total_steps=2, lr=1e-2)
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, snap[k])}
    assert changed == {k for k in snap if ".mlp." in k}


def test_float64_base_keeps_its_dtype_and_exact_expert_copies():
    base = _base().double()
    ffns = [mlp_state(base)]
    torch.manual_seed(1)
    ffns += [{k: v + 1e-3 * torch.randn_like(v) for k, v in ffns[0].items()} for _ in range(2)]  # off the fp32 grid
    moe = build_clip_moe(base, ffns, top_k=2).eval()
    assert all(p.dtype == torch.float64 for p in moe.parameters())
    for i in moe.moe_layers:
        ex = moe.blocks[i].mlp.experts
        for e in range(3):
            assert torch.equal(ex.w1[e], ffns[e][f"blocks.{i}.mlp.fc1.weight"].t())
            assert torch.equal(ex.b2[e], ffns[e][f"blocks.{i}.mlp.fc2.bias"])
    assert torch.equal(moe.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)
    same = build_clip_moe(base, [ffns[1]] * 3).eval()  # equal experts: the base model with FFN set 1
    ref = _base().double()
    ref.load_state_dict({**base.state_dict(), **ffns[1]})
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    assert (same(x).logits - ref.eval()(x).logits).abs().max() <= 1e-12
