"""m2mKD (vision_moe.md §8(e) unit tests): splitting, hybrids, stitches, loss, gradients, assembly."""

import pytest
import torch
import torch.nn.functional as F

import moevision as mv
from moevision.data import make_synthetic
from moevision.errors import ConfigError
from moevision.techniques.m2mkd import (StitchAdapter, assemble_student, distill_module, m2mkd, m2mkd_loss,
                                        run_segments, split_model, student_modules)


pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(**kw):
    return mv.create_model("vit_tiny_test", **kw).eval()


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_split_and_recompose_is_the_same_forward(pool):
    m = _vit(depth=5, global_pool=pool, class_token=pool == "token")
    x = torch.randn(3, 1, 16, 16)
    segs = split_model(m, [2, 1, 2])
    y, _ = run_segments(segs, x)
    torch.testing.assert_close(y, m(x).logits, rtol=0, atol=1e-6)
    keys = [k for s in segs for k in s.state_dict()]
    assert sorted(keys) == sorted(m.state_dict()) and len(keys) == len(set(keys))
    with pytest.raises(ConfigError, match="add up"):
        split_model(m, [2, 2])


def test_split_moe_model_sums_aux_losses():
    m = mv.create_model("moe_vit_tiny_test", depth=4).train()
    x = torch.randn(2, 1, 16, 16)
    torch.manual_seed(0)
    full = m(x)
    torch.manual_seed(0)
    y, aux = run_segments(split_model(m, [1, 3]), x)
    torch.testing.assert_close(y, full.logits)
    torch.testing.assert_close(aux, full.aux_loss)


def test_hybrid_shapes_first_middle_last_module():
    meta = _vit(depth=3)  # width 32
    student = mv.create_model("moe_vit_tiny_test", depth=6, embed_dim=24, num_heads=2, moe_layers="all")
    mods = student_modules(student, [2, 2, 2], meta_width=32)
    assert isinstance(mods[0].pre, torch.nn.Identity) and isinstance(mods[2].post, torch.nn.Identity)
    assert isinstance(mods[1].pre, StitchAdapter) and isinstance(mods[1].post, StitchAdapter)
    meta_segs = split_model(meta, [1, 1, 1])
    x = torch.randn(2, 1, 16, 16)
    tokens = 17
    h0, _ = mods[0](x, {})
    assert h0.shape == (2, tokens, 32)  # post-stitched to the meta width
    h, _ = run_segments(meta_segs[:1], x)
    h1, _ = mods[1](h, {})
    assert h1.shape == (2, tokens, 32)
    h, _ = run_segments(meta_segs[:2], x)
    z, _ = mods[2](h, {})
    assert z.shape == (2, 4)  # the last module owns norm + head
    assert mods[1].pre.proj.weight.shape == (24, 32) and mods[1].post.proj.weight.shape == (32, 24)


def test_loss_oracles():
    z_s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    z_t = torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]])
    y = torch.tensor([0, 2])
    ce = F.cross_entropy(z_s, y)
    torch.testing.assert_close(m2mkd_loss(z_s, z_t, y, alpha=0.0), ce)  # alpha = 0: pure CE
    assert float(m2mkd_loss(z_s, z_s, y, alpha=1.0)) == pytest.approx(0.0, abs=1e-7)  # z_S = z_T: no KL
    tau = 2.0
    p_t, p_s = (z_t / tau).softmax(-1), (z_s / tau).softmax(-1)
    kl_sum = (p_t * (p_t.log() - p_s.log())).sum()
    want = 0.3 * ce + 0.7 * tau ** 2 * kl_sum / 6  # summed KL / numel (= 2 x 3)
    torch.testing.assert_close(m2mkd_loss(z_s, z_t, y, alpha=0.7, tau=tau), want)
    hard = m2mkd_loss(z_s, z_t, y, alpha=1.0, distillation_type="hard")
    torch.testing.assert_close(hard, F.cross_entropy(z_s, torch.tensor([1, 0])))
    with pytest.raises(ConfigError):
        m2mkd_loss(z_s, z_t, y, distillation_type="medium")


def test_gradients_only_reach_the_student_module():
    teacher, meta = _vit(depth=4), _vit(depth=2)
    student = mv.create_model("moe_vit_tiny_test", depth=4, embed_dim=16, num_heads=2, moe_layers="all")
    mods = student_modules(student, [2, 2], meta_width=32)
    snap_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    snap_m = {k: v.clone() for k, v in meta.state_dict().items()}
    other = {k: v.clone() for k, v in mods[0].state_dict().items()}
    before = {k: v.clone() for k, v in mods[1].state_dict().items()}
    train = make_synthetic("train", num_samples=64)
    losses = distill_module(1, teacher=teacher, meta=meta, module=mods[1], teacher_sizes=[2, 2], train=train,
                            batch_size=16, lr=1e-2)
    assert len(losses) == 4
    assert all(p.grad is None and not p.requires_grad for p in [*teacher.parameters(), *meta.parameters()])
    assert all(torch.equal(v, snap_t[k]) for k, v in teacher.state_dict().items())
    assert all(torch.equal(v, snap_m[k]) for k, v in meta.state_dict().items())
    assert all(torch.equal(v, other[k]) for k, v in mods[0].state_dict().items())  # module 0 untouched
    changed = [k for k, v in mods[1].state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("pre.") for k in changed) and any(k.startswith("segment.") for k in changed)


def test_assemble_drops_stitches_and_concatenates_module_state():
    teacher, meta = _vit(depth=4), _vit(depth=2)
    student = mv.create_model("moe_vit_tiny_test", depth=4, embed_dim=16, num_heads=2, moe_layers="all")
    train = make_synthetic("train", num_samples=32)
    assembled = m2mkd(teacher, meta, student, train, teacher_sizes=[2, 2], student_sizes=[2, 2], batch_size=16,
                      lr=1e-2)
    mods = student_modules(student, [2, 2], meta_width=32)  # segments share the trained student's modules
    concat = {k: v for m in mods for k, v in m.segment.state_dict().items()}
    sd = assembled.state_dict()
    assert sorted(sd) == sorted(concat) and all(torch.equal(sd[k], concat[k]) for k in sd)
    assert not any("pre." in k or "post." in k for k in sd)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(assembled.eval()(x).logits, student.eval()(x).logits)
    with pytest.raises(ConfigError, match="same number of modules"):
        m2mkd(teacher, meta, student, train, teacher_sizes=[2, 2], student_sizes=[4])


def test_meta_from_teacher_takes_the_teachers_blocks_and_ends():
    from moevision.techniques.m2mkd import hybrid_accuracy, meta_from_teacher

    teacher = _vit(depth=4)
    meta = meta_from_teacher(teacher, [2, 2])
    assert meta.config.depth == 2
    t, m = teacher.state_dict(), meta.state_dict()
    for j, b in enumerate((1, 3)):  # the last block of each module
        assert all(torch.equal(m[f"blocks.{j}.{k}"], v) for k, v in teacher.blocks[b].state_dict().items())
    assert all(torch.equal(m[k], t[k]) for k in m if not k.startswith("blocks."))
    first = meta_from_teacher(teacher, [2, 2], pick="first")
    assert torch.equal(first.blocks[1].mlp.fc1.weight, teacher.blocks[2].mlp.fc1.weight)
    # a teacher hybrid with the first module in place is the meta model with blocks 0, 1, 3
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    segs = split_model(teacher, [2, 2])
    t0m1 = [segs[0], split_model(meta, [1, 1])[1]]
    ref = mv.create_model("vit_tiny_test", depth=3).eval()
    ref.load_state_dict({**{k: v for k, v in t.items() if not k.startswith("blocks.")},
                         **{f"blocks.{j}.{k}": v for j, b in enumerate((0, 1, 3))
                            for k, v in teacher.blocks[b].state_dict().items()}})
    torch.testing.assert_close(run_segments(t0m1, x)[0], ref(x).logits)
    assert hybrid_accuracy(t0m1, x, y) == float((ref(x).logits.argmax(-1) == y).float().mean())
