"""Sparse upcycling (vision_moe.md §4): step-0 equivalence, layer selection, noise, parameter count,
optimizer-state copy, save/load and fine-tuning through `moevision train --init`."""

import json

import pytest
import torch

import moevision as mv
from moevision.cli import main
from moevision.errors import CheckpointError, ConfigError
from moevision.techniques.upcycling import (expected_num_params, init_router, mlp_params, upcycle,
                                            upcycle_optimizer_state, upcycled_config)
from moevision.train.init_from import OPTIMIZER_STATE_NAME, load_init_optimizer_state, named_optimizer_state


pytestmark = pytest.mark.usefixtures("one_thread")


def _dense(**kw):
    torch.manual_seed(1)
    m = mv.create_model("vit_tiny_test", **{"depth": 4, **kw})
    with torch.no_grad():  # non-trivial biases and norms, so a mapping mistake shows
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_step0_logits_equal_dense_float64(k):
    d = _dense().double()
    m = upcycle(d, num_experts=4, top_k=k).eval()
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    assert m.moe_layers == (1, 3)
    torch.testing.assert_close(m(x).logits, d(x).logits, rtol=0, atol=1e-10)


def test_step0_equal_in_float32_and_in_training_mode():
    d = _dense()
    m = upcycle(d, num_experts=4, top_k=2, router_init="zero")
    x = torch.randn(6, 1, 16, 16)
    assert (m.eval()(x).logits - d(x).logits).abs().max() <= 1e-6
    # training mode: router noise on, but renormalised gates of identical experts still sum to one expert
    m.train()
    assert (m(x).logits - d(x).logits).abs().max() <= 1e-6


def test_raw_topk_gates_scale_the_mlp_branch_by_s():
    """Without renormalisation a block computes x + s(x) * MLP(LN2 x), s = sum of the top-k probabilities."""
    d = _dense(depth=2).double()
    m = upcycle(d, num_experts=4, top_k=2, moe_layers=[1], normalize_topk=False).eval()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    captured = {}
    m.blocks[1].register_forward_hook(lambda mod, inp, out: captured.update(inp=inp[0], out=out[0]))
    m(x)
    h = captured["inp"]
    blk = d.blocks[1]
    h = h + blk.attn(blk.norm1(h))
    z = blk.norm2(h)
    probs = (z @ m.blocks[1].mlp.router.weight.t()).softmax(-1)
    s = probs.topk(2, dim=-1).values.sum(-1, keepdim=True)
    torch.testing.assert_close(captured["out"], h + s * blk.mlp(z), rtol=0, atol=1e-10)
    assert (s < 1).all()  # so the whole model is NOT the dense one
    assert (m(x).logits - d(x).logits).abs().max() > 1e-4


def test_weights_are_exact_copies_and_everything_else_verbatim():
    d = _dense()
    m = upcycle(d, num_experts=3, top_k=1, moe_layers="last_2")
    assert m.moe_layers == (2, 3)
    ds, ms = d.state_dict(), m.state_dict()
    for i in (2, 3):
        ex = m.blocks[i].mlp.experts
        for e in range(3):
            assert torch.equal(ex.w1[e], ds[f"blocks.{i}.mlp.fc1.weight"].t())
            assert torch.equal(ex.w2[e], ds[f"blocks.{i}.mlp.fc2.weight"].t())
            assert torch.equal(ex.b1[e], ds[f"blocks.{i}.mlp.fc1.bias"])
            assert torch.equal(ex.b2[e], ds[f"blocks.{i}.mlp.fc2.bias"])
    for k, v in ds.items():
        if not any(k.startswith(f"blocks.{i}.mlp.") for i in (2, 3)):
            assert torch.equal(ms[k], v), k
    assert m.num_params() == expected_num_params(d.num_params(), m.config)
    D, F = 32, 64  # vit_tiny_test: embed 32, mlp ratio 2
    assert m.num_params() - d.num_params() == 2 * (2 * (2 * D * F + F + D) + 3 * D)
    assert mlp_params(d.config) == 2 * D * F + F + D


@pytest.mark.parametrize("spec,expected", [("every_2", (1, 3)), ("last_2", (2, 3)), ("all", (0, 1, 2, 3)),
                                           ([0, 2], (0, 2)), ("last_odd_1", (3,))])
def test_layer_selection(spec, expected):
    m = upcycle(_dense(), num_experts=2, top_k=1, moe_layers=spec)
    assert m.moe_layers == expected
    assert all(isinstance(m.blocks[i].mlp, mv.MoE) == (i in expected) for i in range(4))


def test_expert_noise_breaks_symmetry_deterministically():
    d = _dense()
    a = upcycle(d, num_experts=4, top_k=2, expert_noise=0.1, seed=3)
    b = upcycle(d, num_experts=4, top_k=2, expert_noise=0.1, seed=3)
    c = upcycle(d, num_experts=4, top_k=2, expert_noise=0.1, seed=4)
    w = a.blocks[1].mlp.experts.w1
    dense_w = d.blocks[1].mlp.fc1.weight.t()
    assert torch.equal(w, b.blocks[1].mlp.experts.w1) and not torch.equal(w, c.blocks[1].mlp.experts.w1)
    assert all(not torch.equal(w[e], w[0]) for e in range(1, 4))
    rel = ((w - dense_w).std() / dense_w.std()).item()
    assert 0.08 < rel < 0.12  # noise = 0.1 * std(W)
    assert torch.equal(a.blocks[1].mlp.experts.b1[2], d.blocks[1].mlp.fc1.bias)  # biases stay exact
    x = torch.randn(4, 1, 16, 16)
    gap = (a.eval()(x).logits - d(x).logits).abs().max()
    assert 1e-6 < gap < 1.0


def test_router_inits():
    m = upcycle(_dense(), num_experts=4, top_k=2, router_init="zero")
    assert torch.count_nonzero(m.blocks[1].mlp.router.weight) == 0
    layer = m.blocks[1].mlp
    init_router(layer, "normal", 0.5, torch.Generator().manual_seed(0))
    assert 0.4 < layer.router.weight.std() < 0.6
    init_router(layer, "lecun", generator=torch.Generator().manual_seed(0))
    assert abs(layer.router.weight.std().item() - 32 ** -0.5) < 0.05
    init_router(layer, "linear", generator=torch.Generator().manual_seed(0))
    assert layer.router.weight.abs().max() <= 32 ** -0.5
    with pytest.raises(ConfigError, match="router_init"):
        init_router(layer, "xavier")


def test_bad_inputs():
    with pytest.raises(ConfigError, match="already MoE"):
        upcycle(mv.create_model("moe_vit_tiny_test"), num_experts=4)
    with pytest.raises(ConfigError, match="top_k"):
        upcycle(_dense(), num_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="unknown upcycle option"):
        upcycled_config(_dense().config, num_experts=2, bogus=1)
    with pytest.raises(ConfigError, match="outside"):
        upcycle(_dense(), num_experts=2, top_k=1, moe_layers=[7])


def test_optimizer_state_copy_places_dense_moments_in_every_expert_slot():
    from moevision.train.optim import build_optimizer

    d = _dense().train()
    opt = build_optimizer(d, lr=1e-3, weight_decay=0.05)
    for _ in range(2):
        opt.zero_grad()
        d(torch.randn(4, 1, 16, 16)).logits.square().mean().backward()
        opt.step()
    named = named_optimizer_state(d, opt)
    m = upcycle(d, num_experts=3, top_k=2)
    mapped = upcycle_optimizer_state(named, m.config)
    mopt = build_optimizer(m, lr=1e-3, weight_decay=0.05)
    import tempfile
    from moevision.train.init_from import save_optimizer_state
    with tempfile.TemporaryDirectory() as tmp:
        save_optimizer_state(tmp, mapped)
        n = load_init_optimizer_state(m, mopt, tmp)
    assert n == len(list(d.named_parameters()))  # every dense parameter's state lands somewhere
    ex = m.blocks[1].mlp.experts
    for e in range(3):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(mopt.state[ex.w1][key][e], named[f"blocks.1.mlp.fc1.weight::{key}"].t())
            assert torch.equal(mopt.state[ex.b2][key][e], named[f"blocks.1.mlp.fc2.bias::{key}"])
    assert float(mopt.state[ex.w2]["step"]) == 2.0
    assert m.blocks[1].mlp.router.weight not in mopt.state  # the new router starts fresh
    assert torch.equal(mopt.state[m.head.weight]["exp_avg"], named["head.weight::exp_avg"])
    # and the optimizer can step with the mixed state
    m.train()
    mopt.zero_grad()
    m(torch.randn(4, 1, 16, 16)).logits.square().mean().backward()
    mopt.step()


def test_cli_upcycle_then_train_init(tmp_path, capsys):
    dense_run = tmp_path / "dense"
    assert main(["train", "--recipe", "smoke_synthetic", "--out", str(dense_run), "--no-progress",
                 "--set", "model_name=vit_tiny_test", "--set", "model.moe_layers=none",
                 "--set", "train.max_steps=3"]) == 0
    up = tmp_path / "up"
    assert main(["upcycle", str(dense_run), "--experts", "4", "--top-k", "2", "--out", str(up),
                 "--copy-optimizer-state", "--set", "load_loss_weight=0.01"]) == 0
    out = capsys.readouterr().out
    assert "step-0 check" in out and "expected ~0" in out
    gap = float(out.split("max |logit difference| ")[1].split()[0])
    assert gap <= 1e-6
    cfg = json.loads((up / "config.json").read_text())["config"]
    assert cfg["num_experts"] == 4 and cfg["load_loss_weight"] == 0.01 and (up / OPTIMIZER_STATE_NAME).is_file()
    model = mv.from_pretrained(up)
    assert model.moe_layers == (1,)
    run = tmp_path / "ft"
    assert main(["train", "--init", str(up), "--recipe", "smoke_synthetic", "--out", str(run), "--no-progress",
                 "--set", "train.max_steps=2", "--set", "train.init_optimizer_state=true",
                 "--set", "model.capacity_factor=2.0"]) == 0
    rc = json.loads((run / "config.json").read_text())
    assert rc["train"]["init_from"] == str(up) and rc["model"]["num_experts"] == 4
    assert rc["model"]["capacity_factor"] == 2.0
    # the run really started from the upcycled weights: one step at a tiny lr stays close to them
    run2 = tmp_path / "ft2"
    assert main(["train", "--init", str(up), "--recipe", "smoke_synthetic", "--out", str(run2), "--no-progress",
                 "--set", "train.max_steps=1", "--set", "train.lr=1e-9", "--set", "train.min_lr=0",
                 "--set", "train.warmup_epochs=0"]) == 0
    trained = mv.from_pretrained(run2 / "model")
    torch.testing.assert_close(trained.blocks[1].mlp.experts.w1, model.blocks[1].mlp.experts.w1, atol=1e-6, rtol=0)
    capsys.readouterr()
    # a --set that changes the architecture fails strictly, as one line
    assert main(["train", "--init", str(up), "--recipe", "smoke_synthetic", "--out", str(tmp_path / "bad"),
                 "--no-progress", "--set", "model.num_experts=8"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err or "has shape" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,match", [
    (["upcycle", "/nonexistent", "--experts", "4", "--top-k", "1"], "does not exist"),
])
def test_cli_upcycle_errors(argv, match, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr().err


def test_cli_upcycle_rejects_moe_source_and_bad_set(tmp_path, capsys):
    src = tmp_path / "moe"
    mv.create_model("moe_vit_tiny_test").save_pretrained(src)
    assert main(["upcycle", str(src), "--experts", "4", "--top-k", "1", "--out", str(tmp_path / "o")]) == 2
    assert "already MoE" in capsys.readouterr().err
    dsrc = tmp_path / "dense"
    _dense().save_pretrained(dsrc)
    assert main(["upcycle", str(dsrc), "--experts", "4", "--top-k", "1", "--out", str(tmp_path / "o2"),
                 "--set", "depth=3"]) == 2
    assert "not an upcycle option" in capsys.readouterr().err
    assert main(["upcycle", str(dsrc), "--experts", "4", "--top-k", "1", "--out", str(tmp_path / "o3"),
                 "--copy-optimizer-state"]) == 2
    assert "run directory" in capsys.readouterr().err


def test_init_from_missing_dir_is_checkpoint_error(tmp_path):
    from moevision.train.init_from import load_init_weights

    with pytest.raises(CheckpointError, match="not a directory"):
        load_init_weights(_dense(), tmp_path / "nope")


def test_expert_choice_tokens_picked_by_no_expert_lose_their_mlp_branch():
    """Identical experts with expert-choice routing: block output = x + c(t) * MLP(LN2 x), where c(t) sums the
    router probabilities of the experts that picked token t (0 for tokens nobody picked)."""
    from moevision.moe import compute_capacity

    d = _dense(depth=2).double()
    m = upcycle(d, num_experts=4, top_k=1, moe_layers=[1], router="expert_choice", capacity_factor=0.5).eval()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    captured = {}
    m.blocks[1].register_forward_hook(lambda mod, inp, out: captured.update(inp=inp[0], out=out[0]))
    m(x)
    blk = d.blocks[1]
    h = captured["inp"] + blk.attn(blk.norm1(captured["inp"]))
    z = blk.norm2(h)
    z_TD = z.reshape(-1, z.shape[-1])
    probs = (z_TD @ m.blocks[1].mlp.router.weight.t()).softmax(-1)  # (T, E), one routing group
    C = min(compute_capacity(z_TD.shape[0], 4, 0.5), z_TD.shape[0])
    c = torch.zeros(z_TD.shape[0], dtype=torch.float64)
    for e in range(4):
        top = probs[:, e].topk(C).indices
        c[top] += probs[top, e]
    assert (c == 0).any() and (c > 0).any()  # some tokens were picked by nobody
    want = h + c.view(h.shape[:-1]).unsqueeze(-1) * blk.mlp(z)
    torch.testing.assert_close(captured["out"], want, rtol=0, atol=1e-10)


def test_save_load_round_trip(tmp_path):
    m = upcycle(_dense(), num_experts=4, top_k=2, moe_layers="last_2", expert_noise=0.05)
    m.save_pretrained(tmp_path / "up")
    r = mv.from_pretrained(tmp_path / "up")
    assert r.config == m.config and r.moe_layers == (2, 3)
    assert all(torch.equal(v, r.state_dict()[k]) for k, v in m.state_dict().items())


def test_float64_parent_with_non_fp32_values_upcycles_bit_exactly():
    """Weights that fp32 cannot represent survive upcycling bit for bit (no fp32 round trip)."""
    d = _dense().double()
    with torch.no_grad():
        for p in d.parameters():
            p.add_(1e-3 * torch.randn_like(p))  # fp64 values off the fp32 grid
    w = d.blocks[0].attn.qkv.weight
    assert not torch.equal(w, w.float().double())
    m = upcycle(d, num_experts=4, top_k=2).eval()
    assert all(p.dtype == torch.float64 for p in m.parameters())
    ms = m.state_dict()
    for k, v in d.state_dict().items():
        if ".mlp." not in k:
            assert torch.equal(ms[k], v), k
    for i in m.moe_layers:
        ex = m.blocks[i].mlp.experts
        for e in range(4):
            assert torch.equal(ex.w1[e], d.blocks[i].mlp.fc1.weight.t())
            assert torch.equal(ex.b2[e], d.blocks[i].mlp.fc2.bias)
    x = torch.randn(5, 1, 16, 16, dtype=torch.float64)
    assert (m(x).logits - d(x).logits).abs().max() <= 1e-12
