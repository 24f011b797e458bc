"""Task-dependent routing (M³ViT, vision_moe.md §10) and Edge-MoE's numerics, against independent oracles."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from moevision import MoE
from moevision.errors import ConfigError
from moevision.models.vit import ViTConfig, VisionTransformer
from moevision.moe.dispatch import dispatch_loop
from moevision.techniques.edge_moe import (dispatch_by_expert, gelu_lut, gelu_lut_table, online_softmax,
                                           streaming_topk)
from moevision.techniques.multitask import (MultiTaskSettings, MultiTaskViT, build_model, from_single_gate,
                                            patch_stats, specialisation, task_flops)

TINY = dict(img_size=8, in_chans=1, num_classes=10, patch_size=2, embed_dim=16, depth=2, num_heads=2,
            mlp_ratio=2.0, moe_layers="every_2", num_experts=4, top_k=2, noise_std=0.0)


def _vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig.from_dict({**TINY, **kw}))


# ---- the router ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["multi_gate", "task_conditioned"])
def test_task_router_logits_match_the_papers_gate(mode):
    """multi-gate: task t's logits are x @ W_t^T; task-conditioned: the gate on [x ; one_hot(t)]."""
    torch.manual_seed(0)
    moe = MoE(6, 8, 4, 2, num_tasks=3, task_routing=mode, noise_std=0.0).eval()
    x = torch.randn(1, 5, 6)
    r = moe.router
    for t in range(3):
        got = r.logits(x, t)
        if mode == "multi_gate":
            want = x @ r.weight[t].t()
        else:
            full = torch.cat([r.weight, r.task_weight], dim=1)  # (E, D + T): the paper's one gate
            want = torch.cat([x, F.one_hot(torch.tensor(t), 3).float().expand(1, 5, 3)], -1) @ full.t()
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["multi_gate", "task_conditioned"])
def test_per_sample_task_tensor_equals_one_call_per_task(mode):
    torch.manual_seed(1)
    moe = MoE(8, 16, 4, 2, num_tasks=2, task_routing=mode).eval()
    x = torch.randn(3, 5, 8)
    task = torch.tensor([1, 0, 1])
    out = moe(x, task=task).out
    for b in range(3):
        torch.testing.assert_close(out[b], moe(x[b:b + 1], task=int(task[b])).out[0])
    # per-token ids too
    per_tok = torch.tensor([[0, 1, 0, 1, 1]] * 3)
    out_tok = moe(x, task=per_tok).out
    for t in (0, 1):
        m = per_tok == t
        torch.testing.assert_close(out_tok[m], moe(x, task=t).out[m])


@pytest.mark.parametrize("mode", ["multi_gate", "task_conditioned"])
def test_task_id_changes_routing_and_only_its_gate_gets_gradients(mode):
    torch.manual_seed(2)
    moe = MoE(8, 16, 4, 1, num_tasks=3, task_routing=mode, task_init_std=1.0).eval()
    x = torch.randn(64, 8)
    choices = [moe.router(x.view(1, 64, 8), task=t).expert_idx for t in range(3)]
    assert not torch.equal(choices[0], choices[1]) and not torch.equal(choices[0], choices[2])
    moe.zero_grad()
    o = moe(x, task=1)
    (o.out.square().sum() + o.aux_loss).backward()
    if mode == "multi_gate":
        g = moe.router.weight.grad
        assert g[1].abs().sum() > 0
        assert g[0].abs().sum() == 0 and g[2].abs().sum() == 0
    else:
        g = moe.router.task_weight.grad
        assert g[:, 1].abs().sum() > 0
        assert g[:, 0].abs().sum() == 0 and g[:, 2].abs().sum() == 0
        assert moe.router.weight.grad.abs().sum() > 0  # the shared token columns learn from every task


def test_task_embedding_option():
    moe = MoE(8, 16, 4, 2, num_tasks=3, task_routing="task_conditioned", task_embed_dim=5).eval()
    r = moe.router
    assert tuple(r.task_embed.shape) == (3, 5) and tuple(r.task_weight.shape) == (4, 5)
    x = torch.randn(1, 4, 8)
    torch.testing.assert_close(r.logits(x, 2), x @ r.weight.t() + r.task_embed[2] @ r.task_weight.t())


def test_task_validation_messages():
    moe = MoE(8, 16, 4, 2, num_tasks=2, task_routing="multi_gate")
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="pass task"):
        moe(x)
    with pytest.raises(ValueError, match=r"task must be in \[0, num_tasks=2\)"):
        moe(x, task=2)
    with pytest.raises(ValueError, match=r"task ids must be in \[0, num_tasks=2\)"):
        moe(x, task=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="shape"):
        moe(x, task=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="integer"):
        moe(x, task=torch.tensor([0.0, 1.0]))
    with pytest.raises(ConfigError, match="does not route by task"):
        MoE(8, 16, 4, 2)(x, task=0)
    with pytest.raises(ConfigError, match="router='topk'"):
        MoE(8, 16, 4, router="soft", num_tasks=2, task_routing="multi_gate")
    with pytest.raises(ConfigError, match="task_routing must be"):
        MoE(8, 16, 4, 2, num_tasks=2, task_routing="per_task")
    with pytest.raises(ConfigError, match="num_tasks >= 1"):
        MoE(8, 16, 4, 2, task_routing="multi_gate")
    with pytest.raises(ConfigError, match="model.num_tasks"):
        ViTConfig.from_dict({**TINY, "task_routing": "multi_gate", "num_tasks": 0})
    with pytest.raises(ConfigError, match="model.moe_layers"):
        ViTConfig.from_dict({**TINY, "moe_layers": "none", "task_routing": "multi_gate", "num_tasks": 2})


# ---- the model --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["multi_gate", "task_conditioned"])
def test_from_single_gate_preserves_the_function_for_every_task(mode):
    single = _vit().eval()
    multi = from_single_gate(single, 3, mode).eval()
    assert multi.config.task_routing == mode
    x = torch.randn(4, 1, 8, 8)
    ref = single(x)
    for t in range(3):
        got = multi(x, task=t)
        torch.testing.assert_close(got.logits, ref.logits)
        for a, b in zip(got.routing, ref.routing):
            torch.testing.assert_close(a.tokens_per_expert, b.tokens_per_expert)
    # the task-routed model saves and reloads like any model
    state = multi.state_dict()
    again = VisionTransformer(multi.config)
    again.load_state_dict(state)
    torch.testing.assert_close(again.eval()(x, task=1).logits, ref.logits)


def test_vit_task_argument_is_required_and_refused_as_needed():
    with pytest.raises(ValueError, match="task=<id>"):
        _vit(task_routing="multi_gate", num_tasks=2)(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="does not route by task"):
        _vit()(torch.randn(2, 1, 8, 8), task=0)


def test_momentum_block_passes_the_task():
    m = _vit(task_routing="multi_gate", num_tasks=2, block="momentum").eval()
    x = torch.randn(2, 1, 8, 8)
    assert not torch.equal(m(x, task=0).logits, m(x, task=1).logits)  # the task reaches the momentum block
    with pytest.raises(ValueError, match="pass task"):
        m.blocks[1].mlp(torch.randn(2, 3, 16))


def test_patch_stats_against_a_loop():
    x = torch.rand(2, 1, 8, 8)
    got = patch_stats(x, 4)  # 4 patches, row-major
    for b in range(2):
        for i in range(2):
            for j in range(2):
                p = x[b, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
                torch.testing.assert_close(got[b, 2 * i + j], torch.stack([p.mean(), p.std(unbiased=False)]))


def test_multitask_model_passes_and_flops():
    S = MultiTaskSettings(embed_dim=16, depth=2, num_heads=2, num_experts=4, top_k=2)
    x = torch.randn(3, 1, 8, 8)
    for row in ("dense", "moe", "multi_gate", "task_conditioned"):
        m = build_model(row, S, (1, 8, 8))
        preds, aux, stats = m(x)
        assert preds["classify"].shape == (3, 10) and preds["patch_stats"].shape == (3, 16, 2)
        assert (len(stats["classify"]) == 0) == (row == "dense")
    dense, moe = build_model("dense", S, (1, 8, 8)), build_model("multi_gate", S, (1, 8, 8))
    # expert hidden = D * mlp_ratio / top_k: the MoE's active FLOPs are the dense twin's plus its routers
    N, D, E = 17, 16, 4
    router = 2 * N * D * E  # one MoE block (block 1 of 2)
    assert task_flops(moe, "classify") - task_flops(dense, "classify") == router
    with pytest.raises(ConfigError, match="task names"):
        MultiTaskViT(moe.backbone, ("classify",))


def test_specialisation_metric():
    same = [[[0.5, 0.5], [0.5, 0.5]]]
    disjoint = [[[1.0, 0.0], [0.0, 1.0]]]
    assert specialisation(same) == 0.0 and specialisation(disjoint) == 1.0


def test_multitask_cli_on_digits(tmp_path, capsys):
    from moevision.cli.main import main

    out = tmp_path / "mt.md"
    rc = main(["multitask", "--dataset", "digits", "--rows", "dense,task_conditioned", "--seeds", "1",
               "--epochs", "1", "--train-subset", "128", "--test-subset", "64", "--out", str(out),
               "--work-dir", str(tmp_path / "work"), "--no-progress"])
    assert rc == 0
    text = out.read_text()
    assert "M³ViT task-conditioned" in text and "Usage matrix" in text
    assert (tmp_path / "mt.json").is_file()
    assert main(["multitask", "--rows", "dense,bogus"]) != 0
    assert "--rows: unknown ['bogus']" in capsys.readouterr().err


# ---- Edge-MoE numerics --------------------------------------------------------------------------------
def test_online_softmax_equals_softmax():
    torch.manual_seed(0)
    x = torch.randn(50, 9, dtype=torch.float64) * 5
    x[0] += 1e4
    x[1] -= 1e4
    x[2, 3] = float("-inf")
    x[3, :8] = float("-inf")
    torch.testing.assert_close(online_softmax(x), torch.softmax(x, -1), atol=1e-12, rtol=0)
    perm = torch.randperm(9)
    torch.testing.assert_close(online_softmax(x[:, perm]), torch.softmax(x, -1)[:, perm], atol=1e-12, rtol=0)
    torch.testing.assert_close(online_softmax(x.t(), dim=0), torch.softmax(x, -1).t(), atol=1e-12, rtol=0)


def test_gelu_lut_error_and_grid():
    x = torch.linspace(-8, 8, 200001, dtype=torch.float64)
    err = (gelu_lut(x) - F.gelu(x)).abs().max().item()
    assert err <= 1e-4, err
    tanh_err = (F.gelu(x, approximate="tanh") - F.gelu(x)).abs().max().item()
    assert err < tanh_err  # better than the tanh approximation, as Edge-MoE says
    k = torch.arange(0, 176, dtype=torch.float64)
    grid = k / 32
    table = gelu_lut_table()
    torch.testing.assert_close(gelu_lut(grid), torch.relu(grid) - table[:176], atol=1e-15, rtol=0)
    torch.testing.assert_close(gelu_lut(-grid), -table[:176], atol=1e-15, rtol=0)
    assert table[-1] == 0 and math.isclose(float(table[32]), 1.0 * 0.5 * math.erfc(1 / math.sqrt(2)))


def test_streaming_topk_equals_topk_and_breaks_ties_by_index():
    torch.manual_seed(0)
    s = torch.randn(40, 8)
    for k in (1, 2, 3, 8):
        v, i = streaming_topk(s, k)
        tv, ti = torch.topk(s, k)
        torch.testing.assert_close(v, tv)
        assert torch.equal(i, ti)
    ties = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    v, i = streaming_topk(ties, 3)
    assert i.tolist() == [[1, 2, 4]] and v.tolist() == [[3.0, 3.0, 3.0]]
    with pytest.raises(ValueError):
        streaming_topk(s, 9)


def test_dispatch_by_expert_equals_token_wise_moe():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 2, capacity_factor=0.75).eval()  # some tokens dropped, too
    x = torch.randn(30, 8)
    plan = moe.router(x.view(1, 30, 8))
    want = dispatch_loop(x, plan, moe.experts)
    torch.testing.assert_close(dispatch_by_expert(x, plan, moe.experts), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(moe(x).out, want, atol=1e-6, rtol=0)


def test_single_task_training_refuses_task_routing():
    from moevision.train.run_config import RunConfig

    with pytest.raises(ConfigError, match="moevision multitask"):
        RunConfig.from_dict({"model": {"task_routing": "multi_gate", "num_tasks": 2, "moe_layers": "every_2"}})


def test_expert_pruning_refuses_task_routers():
    from moevision.techniques.qmoe.prune import prune_experts

    m = _vit(task_routing="multi_gate", num_tasks=2)
    with pytest.raises(ConfigError, match="task-dependent routers"):
        prune_experts(m, {"blocks.1.mlp": [0, 1]})


# ---- Mod-Squad's mutual-information loss ---------------------------------------------------------------
def test_mi_loss_is_minus_mutual_information_by_brute_force():
    from moevision.techniques.multitask import mutual_information_from_usage, mutual_information_loss

    torch.manual_seed(0)
    A = torch.rand(3, 5, dtype=torch.float64) * 10
    n = float(A.sum())
    P = A / n
    Pt, Pe = P.sum(1), P.sum(0)
    mi = sum(float(P[t, e]) * math.log(float(P[t, e]) / (float(Pt[t]) * float(Pe[e])))
             for t in range(3) for e in range(5))
    assert abs(float(mutual_information_loss(A, n, eps=0.0)) + mi) < 1e-12
    # one-to-one task -> expert attains -log T; identical usage attains ~0
    one = torch.zeros(2, 4, dtype=torch.float64)
    one[0, 1], one[1, 3] = 50.0, 50.0
    assert abs(float(mutual_information_loss(one, 100.0, eps=0.0)) + math.log(2)) < 1e-12
    same = torch.full((2, 4), 12.5, dtype=torch.float64)  # 100 tokens, spread alike
    assert abs(float(mutual_information_loss(same, 100.0))) < 1e-3
    # the hard-usage counterpart at evaluation
    assert abs(mutual_information_from_usage([[0, 1, 0, 0], [0, 0, 0, 1]]) - math.log(2)) < 1e-12
    assert abs(mutual_information_from_usage([[0.5, 0.5], [0.5, 0.5]])) < 1e-12


def test_modsquad_rows_zero_init_uniform_probs_and_mi_reaches_the_routers():
    S = MultiTaskSettings(embed_dim=16, depth=2, num_heads=2, num_experts=4, top_k=2)
    m = build_model("modsquad", S, (1, 8, 8))
    assert m.mi_weight == 0.005 and m.backbone.config.task_routing == "multi_gate"
    moe = m.backbone.blocks[1].mlp
    x = torch.randn(3, 1, 8, 8)
    plan = moe.router(torch.randn(1, 5, 16), task=1)
    torch.testing.assert_close(plan.probs_GSE, torch.full_like(plan.probs_GSE, 0.25))  # zero-init router
    with torch.no_grad():
        moe.router.weight.normal_()
    m.train()
    _, aux_mi, _ = m(x)
    m.mi_weight = 0.0
    _, aux_plain, _ = m(x)
    assert float(aux_mi.detach()) != float(aux_plain.detach())
    for layer in m.modules():  # only the MI term may reach the routers through aux
        if isinstance(layer, MoE):
            layer.router.weights = {k: 0.0 for k in layer.router.weights}
    m.mi_weight = 0.0
    assert not m(x)[1].requires_grad  # without the MI term the aux loss has no path to any parameter
    m.mi_weight = 1.0
    m.zero_grad()
    m(x)[1].backward()
    assert moe.router.weight.grad.abs().sum() > 0  # the MI loss alone moves the routers
    with pytest.raises(ConfigError, match="mutual-information loss needs task-dependent routing"):
        MultiTaskViT(build_model("moe", S, (1, 8, 8)).backbone, mi_weight=0.1)


def test_cli_row_names_match_the_experiment():
    from moevision.cli.multitask import ROW_NAMES
    from moevision.techniques.multitask import ROWS

    assert set(ROW_NAMES) == set(ROWS) and tuple(MultiTaskSettings().rows) == ROW_NAMES


def test_task_pruning_rule_and_pruned_layer_equals_masked_full_layer():
    from moevision.techniques.multitask import prune_for_task, task_expert_keep

    # usage = fraction of the task's tokens per expert (top-2: sums to 2); keep usage > θ / k
    assert task_expert_keep([1.0, 0.6, 0.32, 0.08], 0.3, 2) == [0, 1, 2]
    assert task_expert_keep([1.8, 0.2, 0.0, 0.0], 0.5, 2) == [0, 1]  # at least k
    S = MultiTaskSettings(embed_dim=16, depth=2, num_heads=2, num_experts=4, top_k=2)
    torch.manual_seed(3)
    m = build_model("multi_gate", S, (1, 8, 8)).eval()
    usage = [[0.8, 0.1, 0.6, 0.5]]  # one MoE layer (block 1); task 0 = classify; sums to k = 2
    pruned, keeps = prune_for_task(m, 0, usage, 0.3)
    assert keeps == [[0, 2, 3]] and pruned.backbone.config.num_experts == 3
    assert pruned.backbone.config.task_routing == "none" and pruned.task_names == ("classify",)
    # the pruned MoE layer == the full layer for task 0 with the removed experts' logits at -inf
    full, small = m.backbone.blocks[1].mlp, pruned.backbone.blocks[1].mlp
    x = torch.randn(2, 17, 16)
    allowed = torch.zeros(2, 17, 4, dtype=torch.bool)
    allowed[..., [0, 2, 3]] = True
    torch.testing.assert_close(small(x).out, full(x, expert_mask=allowed, task=0).out)
    # keeping every expert gives back task 0's function exactly
    whole, _ = prune_for_task(m, 0, [[0.5] * 4], 0.0)
    xi = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(whole.forward_task(xi, 0)[0], m.forward_task(xi, 0)[0])
    with pytest.raises(ConfigError, match="multi_gate"):
        prune_for_task(build_model("task_conditioned", S, (1, 8, 8)), 0, usage, 0.3)


def test_from_single_gate_and_pruning_keep_dtype_and_mode():
    from moevision.techniques.multitask import prune_for_task

    single = _vit().double().eval()
    multi = from_single_gate(single, 2, "multi_gate")
    assert next(multi.parameters()).dtype == torch.float64 and not multi.training
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(multi(x, task=0).logits, single(x).logits)
    mt = MultiTaskViT(multi).eval()
    pruned, _ = prune_for_task(mt, 0, [[0.5] * 4], 0.0)
    assert next(pruned.parameters()).dtype == torch.float64 and not pruned.training


def test_router_level_task_validation():
    moe = MoE(8, 16, 4, 2, num_tasks=2, task_routing="multi_gate")
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="task must be an integer"):
        moe.router(x, task=-1)
    with pytest.raises(ValueError, match="bool"):
        moe(x, task=True)
    with pytest.raises(ValueError, match="does not route by task"):
        MoE(8, 16, 4, 2).router(x, task=0)
    with pytest.raises(ConfigError, match="task_init_std"):
        MoE(8, 16, 4, 2, num_tasks=2, task_routing="task_conditioned", task_init_std=-1.0)


def test_gelu_lut_keeps_nan():
    out = gelu_lut(torch.tensor([float("nan"), 1.0, -9.0]))
    assert torch.isnan(out[0]) and not torch.isnan(out[1:]).any()


def test_importance_on_gates_is_cv2_of_the_summed_sparse_gates():
    """M³ViT / Shazeer importance: CV²(sum over tokens of the top-k gates scattered to their experts)."""
    torch.manual_seed(0)
    moe = MoE(6, 8, 4, 2, noise_std=0.0, importance_on="gates", load_loss_weight=0.0).eval()
    x = torch.randn(1, 10, 6)
    plan = moe.router(x)
    imp = torch.zeros(4)
    for a in range(20):  # by hand: add each assignment's gate to its expert
        imp[plan.expert_idx[a]] += plan.gates[a]
    want = imp.var(unbiased=False) / (imp.mean() ** 2 + 1e-10)
    torch.testing.assert_close(plan.aux_losses["importance"], want)
    default = MoE(6, 8, 4, 2, noise_std=0.0, load_loss_weight=0.0).eval()
    default.load_state_dict(moe.state_dict())
    assert not torch.allclose(default.router(x).aux_losses["importance"], want)  # probs-based differs
    with pytest.raises(ConfigError, match="importance_on"):
        MoE(6, 8, 4, 2, importance_on="logits")


def test_pruned_rows_are_fine_tuned_after_pruning(tmp_path):
    from moevision.techniques.multitask import MultiTaskSettings, run_multitask

    S = MultiTaskSettings(dataset="digits", train_subset=128, test_subset=64, epochs=1, seeds=1,
                          rows=("modsquad_moa",), prune_thresholds=(0.3,))
    rep = run_multitask(S, out=tmp_path / "mt.md", progress=False)
    entry = rep["results"]["modsquad_moa"][0]["pruning"]["0.3"]
    assert 0.0 <= entry["accuracy"] <= 1.0 and 0.0 <= entry["accuracy_finetuned"] <= 1.0
    text = (tmp_path / "mt.md").read_text()
    assert "classify-only fine-tuning" in text and "MoA attention experts of" in text
    with pytest.raises(ConfigError, match="prune_finetune_epochs"):
        MultiTaskSettings(prune_finetune_epochs=-1).validate()


def test_heterogeneous_forward_runs_each_task_on_its_own_batch_and_accumulates_mi():
    from moevision.techniques.multitask import _task_parts, build_model, MultiTaskSettings
    from moevision.data import get_dataset

    torch.manual_seed(0)
    S = MultiTaskSettings(dataset="digits")
    model = build_model("modsquad_hetero", S, (1, 8, 8), 10)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "router" in n:
                p.normal_(std=0.5)
    model.eval()
    xa, xb = torch.randn(3, 1, 8, 8), torch.randn(5, 1, 8, 8)
    preds, aux, _ = model({"classify": xa, "patch_stats": xb})
    torch.testing.assert_close(preds["classify"], model.forward_task(xa, 0)[0])
    torch.testing.assert_close(preds["patch_stats"], model.forward_task(xb, 1)[0])
    model.train()
    torch.manual_seed(1)
    with_mi = model({"classify": xa, "patch_stats": xb})[1]
    model.mi_weight = 0.0
    torch.manual_seed(1)
    without = model({"classify": xa, "patch_stats": xb})[1]
    assert float(with_mi.detach()) != float(without.detach())  # the MI term over both tasks' batches is in the aux loss
    with pytest.raises(ValueError, match="one batch per task"):
        model({"classify": xa})
    train = get_dataset("digits", "train")
    train = dataclasses.replace(train, labels=torch.arange(len(train)))  # the label names the sample
    parts = _task_parts(train, ("classify", "patch_stats"))
    a, b = set(parts["classify"].labels.tolist()), set(parts["patch_stats"].labels.tolist())
    assert len(a) == len(b) == len(train) // 2 and not a & b  # disjoint halves


def test_heterogeneous_row_trains(tmp_path):
    from moevision.techniques.multitask import MultiTaskSettings, run_multitask

    S = MultiTaskSettings(dataset="digits", train_subset=256, test_subset=64, epochs=1, seeds=1,
                          rows=("modsquad_hetero",), prune_thresholds=(0.3,), prune_finetune_epochs=0)
    r = run_multitask(S, progress=False)["results"]["modsquad_hetero"][0]
    assert r["steps"] == 2 * (128 // S.batch_size) == 256 // S.batch_size  # as many steps as the other rows
    assert 0.0 <= r["accuracy"] <= 1.0
