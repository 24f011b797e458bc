"""Experts Weights Averaging: update rule, merge oracle, training hook, merge command."""

import json

import pytest
import torch

import moevision as mv
from moevision.cli import main
from moevision.data import get_dataset
from moevision.train import evaluate
from moevision.techniques import ewa_layers, ewa_update, merge_experts_to_dense


def _ewa_model(**kw):
    return mv.create_model("vit_tiny_test", moe_layers="every_2", router="random", num_experts=4, **kw)


def test_ewa_update_two_experts_hand_computed():
    layer = mv.MoE(2, 3, 2, router="random")
    with torch.no_grad():
        layer.experts.b2.copy_(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    ewa_update([layer], 0.3, mode="others")
    # N=2, "others": P_0 <- 0.7*P_0 + 0.3*P_1 = [0.7+0.9, 1.4+1.8] = [1.6, 3.2]; P_1 <- 0.7*P_1 + 0.3*P_0 = [2.4, 4.8]
    torch.testing.assert_close(layer.experts.b2, torch.tensor([[1.6, 3.2], [2.4, 4.8]]))


@pytest.mark.parametrize("mode", ["others", "mean"])
def test_ewa_update_keeps_mean_and_shrinks_deviations(mode):
    m = _ewa_model()
    layer = ewa_layers(m)[0]
    w = layer.experts.w1.detach().clone()
    ewa_update([layer], 0.3, mode=mode)
    new = layer.experts.w1.detach()
    torch.testing.assert_close(new.mean(0), w.mean(0))
    factor = 1 - 0.3 * 4 / 3 if mode == "others" else 1 - 0.3
    torch.testing.assert_close(new - new.mean(0), factor * (w - w.mean(0)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        ewa_update([layer], 1.5)


def test_merged_dense_equals_moe_when_experts_are_equal():
    m = _ewa_model(expert_init="shared").eval()
    d = merge_experts_to_dense(m).eval()
    assert not d.moe_layers and d.num_params() < m.num_params()
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(d(x).logits, m(x).logits)
    # and merging averages: fc1.weight is the mean of the experts' w1 (transposed)
    m2 = _ewa_model()
    d2 = merge_experts_to_dense(m2)
    torch.testing.assert_close(d2.blocks[1].mlp.fc1.weight, m2.blocks[1].mlp.experts.w1.mean(0).t())


def test_ewa_training_hook_and_merge_command(tmp_path, capsys):
    run = tmp_path / "ewa"
    argv = ["train", "--recipe", "smoke_synthetic", "--out", str(run), "--no-progress",
            "--set", "model.router=random", "--set", "techniques.ewa.enabled=true",
            "--set", "techniques.ewa.beta=1.0", "--set", "techniques.ewa.mode=mean"]
    assert main(argv) == 0
    model = mv.from_pretrained(run / "model")
    w = model.blocks[1].mlp.experts.w1
    # beta=1 in "mean" mode sets every expert to the mean after each step: experts stay equal
    torch.testing.assert_close(w, w[:1].expand_as(w))
    capsys.readouterr()
    assert main(["merge", str(run), "--out", str(tmp_path / "dense")]) == 0
    assert main(["eval", str(tmp_path / "dense"), "--dataset", "synthetic", "--no-progress"]) == 0
    merged_acc = json.loads((tmp_path / "dense" / "eval.json").read_text())["test_accuracy"]
    moe_acc = evaluate(model, get_dataset("synthetic", "test"))["accuracy"]
    assert merged_acc == moe_acc  # equal experts: the merged model computes the same function
    # EWA on a model without random-routed MoE layers is a config error
    code = main(["train", "--recipe", "smoke_synthetic", "--out", str(tmp_path / "bad"), "--no-progress",
                 "--set", "techniques.ewa.enabled=true"])
    assert code == 2 and "router=random" in capsys.readouterr().err


def test_others_and_mean_modes_agree_with_rescaled_beta():
    a, b = _ewa_model(), _ewa_model()
    b.load_state_dict(a.state_dict())
    n, beta = 4, 0.3
    ewa_update(ewa_layers(a), beta, mode="others")
    ewa_update(ewa_layers(b), beta * n / (n - 1), mode="mean")  # beta' = beta N / (N - 1)
    for pa, pb in zip(ewa_layers(a)[0].experts.parameters(), ewa_layers(b)[0].experts.parameters()):
        torch.testing.assert_close(pa, pb)
    # beta = (N-1)/N in "others" makes all experts identical after one update
    ewa_update(ewa_layers(a), (n - 1) / n, mode="others")
    w = ewa_layers(a)[0].experts.w1
    torch.testing.assert_close(w, w[:1].expand_as(w))


def _early_ewa_cfg(**sets):
    from moevision import config as C
    from moevision.recipes import get_recipe

    cfg = get_recipe("smoke_synthetic")  # top-k routed MoE ViT (router-based MoE kept at inference)
    cfg.train.num_threads = None
    for k, v in {"techniques.ewa.enabled": True, **sets}.items():
        C.set_by_path(cfg, k, v)
    C.validate_config(cfg)
    return cfg


def test_early_ewa_on_topk_moe_acts_only_during_first_fraction():
    """vision_moe.md §6(b)/(c) Early EWA: on a router-based MoE, EWA for the first part of training only.
    Each hook call is checked against the paper's share-rate formula written out term by term."""
    from moevision.train.engine import build_model
    from moevision.train.hooks import build_step_hooks

    beta, total, stop = 0.3, 8, 0.5
    cfg = _early_ewa_cfg(**{"techniques.ewa.beta": beta, "techniques.ewa.stop_fraction": stop})
    torch.manual_seed(0)
    model = build_model(cfg)
    layers = [m for m in model.modules() if isinstance(m, mv.MoE)]
    assert layers and all(m.router_name == "topk" for m in layers)
    hooks = build_step_hooks(cfg, model)
    assert len(hooks) == 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    n = layers[0].num_experts
    for step in range(1, total + 1):
        x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 4, (16,))
        out = model(x)
        opt.zero_grad()
        (torch.nn.functional.cross_entropy(out.logits, y) + 0.01 * out.aux_loss).backward()
        opt.step()
        before = [{k: p.detach().clone() for k, p in m.experts.named_parameters()} for m in layers]
        hooks[0](model, step, total)
        for m, b in zip(layers, before):
            for k, p in m.experts.named_parameters():
                P = b[k]
                if step <= stop * total:  # P_i <- (1 - beta) P_i + beta / (N - 1) sum_{j != i} P_j
                    exp = torch.stack([(1 - beta) * P[i] + beta / (n - 1) * sum(P[j] for j in range(n) if j != i)
                                       for i in range(n)])
                    torch.testing.assert_close(p, exp, rtol=1e-5, atol=1e-6)
                    dev, dev0 = (p - p.mean(0)).norm(), (P - P.mean(0)).norm()
                    if dev0 > 0:  # experts move toward each other
                        assert dev < dev0
                else:
                    assert torch.equal(p, P)  # EWA has stopped


def test_early_ewa_through_fit_and_config_validation(tmp_path, monkeypatch):
    import moevision.train.engine as engine

    built = []
    real_build = engine.build_model
    monkeypatch.setattr(engine, "build_model", lambda cfg: built.append(real_build(cfg)) or built[-1])
    # beta = 1 in "mean" mode makes every expert the mean after each EWA step: equal experts while EWA runs,
    # diverging (top-k routing sends them different tokens) once it stops after 3 of 6 steps
    cfg = _early_ewa_cfg(**{"techniques.ewa.beta": 1.0, "techniques.ewa.mode": "mean",
                            "techniques.ewa.stop_fraction": 0.5, "train.max_steps": 6})
    spread = {}

    def on_step(step):
        w = built[0].blocks[1].mlp.experts.w1.detach()
        spread[step] = float((w - w[:1]).abs().max())

    engine.fit(cfg, tmp_path / "run", progress=False, log=lambda *_: None, on_step=on_step)
    assert built[0].blocks[1].mlp.router_name == "topk"
    assert [spread[s] == 0.0 for s in range(1, 7)] == [True, True, True, False, False, False]
    # whole-training EWA on a router-based MoE is not Early EWA: refused, pointing at stop_fraction
    with pytest.raises(mv.ConfigError, match="stop_fraction < 1"):
        engine.fit(_early_ewa_cfg(), tmp_path / "bad", progress=False, log=lambda *_: None)


def test_merge_of_float64_model_is_float64_and_exact():
    torch.manual_seed(0)
    m = _ewa_model().double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1e-3 * torch.randn_like(p))  # fp64 values off the fp32 grid
    d = merge_experts_to_dense(m)
    assert all(p.dtype == torch.float64 for p in d.parameters())
    assert torch.equal(d.blocks[0].attn.qkv.weight, m.blocks[0].attn.qkv.weight)
    assert torch.equal(d.blocks[1].mlp.fc1.weight, m.blocks[1].mlp.experts.w1.mean(0).t())
    assert torch.equal(d.blocks[1].mlp.fc2.bias, m.blocks[1].mlp.experts.b2.mean(0))
