"""IMP (multimodal_compression_systems.md §11): AGD, DropToken, InfoNCE, the multimodal encoder, the data."""

import math

import pytest
import torch
import torch.nn.functional as F

from moevision.errors import ConfigError
from moevision.techniques.imp import (AGDTask, IMPConfig, IMPEncoder, agd_train, drop_tokens, info_nce,
                                      task_schedule)
from moevision.techniques.imp_experiment import DIRECTIONS, build_tasks, make_data, moving_videos


def test_task_schedule_frequencies_match_the_weights_chi_square():
    w = [1.0, 2.0, 3.0]
    sched = task_schedule(w, 2000, seed=0)
    counts = [sched.count(i) for i in range(3)]
    expected = [2000 * x / 6 for x in w]
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected))
    assert chi2 < 9.21  # df = 2, p = 0.01
    assert task_schedule(w, 50, seed=3) == task_schedule(w, 50, seed=3)
    assert task_schedule([0.0, 1.0], 20, seed=0) == [1] * 20
    with pytest.raises(ConfigError, match="weights"):
        task_schedule([0.0, 0.0], 5, seed=0)


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))


def _spy_tasks(calls):
    def make(i):
        def sample(step, g):
            return torch.randn(4, generator=g)

        def loss(model, batch):
            calls.append(i)
            return (model.w[i] - batch.mean()) ** 2 + model.w[i] ** 2

        return AGDTask(f"t{i}", sample, loss, weight=float(i + 1))
    return [make(i) for i in range(3)]


def test_agd_runs_exactly_one_task_loss_per_step_following_the_schedule():
    calls = []
    hist = agd_train(_Lin(), _spy_tasks(calls), steps=40, lr=0.1, seed=5)
    assert len(calls) == 40 and [f"t{i}" for i in calls] == [n for n, _ in hist]
    assert calls == task_schedule([1.0, 2.0, 3.0], 40, seed=5)
    calls.clear()
    hist = agd_train(_Lin(), _spy_tasks(calls), steps=10, lr=0.1, seed=5, mode="sum")
    assert calls == [0, 1, 2] * 10 and {n for n, _ in hist} == {"sum"}
    with pytest.raises(ConfigError, match="mode"):
        agd_train(_Lin(), _spy_tasks([]), steps=1, mode="both")


def test_drop_tokens_keeps_a_sorted_subset():
    x = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    y = drop_tokens(x, 0.5, torch.Generator().manual_seed(0))
    assert y.shape == (2, 5, 3)
    for b in range(2):
        rows = [int(r[0] - x[b, 0, 0]) // 3 for r in y[b]]
        assert rows == sorted(rows) and len(set(rows)) == 5
        torch.testing.assert_close(y[b], x[b, rows])
    assert drop_tokens(x, 0.0) is x
    with pytest.raises(ConfigError):
        drop_tokens(x, 1.0)


def test_info_nce_hand_value():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    s = torch.tensor(math.log(10.0))
    sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T * 10
    ref = 0.5 * (-(sim.log_softmax(1).diag().mean()) - sim.T.log_softmax(1).diag().mean())
    torch.testing.assert_close(info_nce(a, b, s), ref)


def _tiny(**kw):
    torch.manual_seed(0)
    opts = dict(width=16, depth=2, num_heads=2, moe_layers=(1,), num_experts=4, vocab_size=20, max_text_len=8,
                heads=(("count", 4), ("video", 4)))
    return IMPEncoder(IMPConfig(**{**opts, **kw}))


def test_encoder_takes_every_modality_and_variable_frame_counts():
    m = _tiny()
    for T in (2, 4, 8):
        f, aux = m.encode("video", torch.rand(3, T, 3, 32, 32))
        assert f.shape == (3, 16) and aux.ndim == 0
    assert m.encode("image", torch.rand(2, 3, 32, 32))[0].shape == (2, 16)
    assert m.encode("text", torch.tensor([[3, 4, 0, 0]]))[0].shape == (1, 16)
    with pytest.raises(ValueError, match="frame count"):
        m.encode("video", torch.rand(1, 3, 3, 32, 32))
    with pytest.raises(ValueError, match="modality"):
        m.encode("audio", torch.rand(1, 10))
    with pytest.raises(ConfigError, match="moe_layers"):
        IMPEncoder(IMPConfig(moe_layers=(7,)))
    ec = _tiny(router="expert_choice")
    assert ec.encode("image", torch.rand(2, 3, 32, 32))[0].shape == (2, 16)


def test_dense_and_moe_twins_have_equal_active_ffn_flops_up_to_the_router():
    moe, dense = _tiny(), _tiny(moe_layers=())
    assert moe.active_ffn_flops_per_token() - dense.active_ffn_flops_per_token() == 2 * 16 * 4


def test_moving_videos_move_in_the_labelled_direction():
    v, y = moving_videos(24, seed=1)
    assert v.shape == (24, 8, 3, 32, 32) and float(v.min()) >= 0 and float(v.max()) <= 1
    grid_r, grid_c = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for i in range(24):
        d = v[i, -1].sum(0) - v[i, 0].sum(0)  # the static distractor cancels, up to overlaps
        pos, neg = d.clamp_min(0), (-d).clamp_min(0)
        if pos.sum() == 0 or neg.sum() == 0:
            continue
        dr = float((pos * grid_r).sum() / pos.sum() - (neg * grid_r).sum() / neg.sum())
        dc = float((pos * grid_c).sum() / pos.sum() - (neg * grid_c).sum() / neg.sum())
        want = DIRECTIONS[int(y[i])]
        got = ("right" if dc > 0 else "left") if abs(dc) > abs(dr) else ("down" if dr > 0 else "up")
        assert got == want, (i, dr, dc)


def test_agd_on_the_three_tasks_is_deterministic_uses_both_frame_counts_and_learns():
    data = make_data(64, 32, seed=0)
    tasks = build_tasks(data, 16, {"nce": 1.0, "video": 1.0, "count": 1.0})
    shapes = []
    vid = tasks[1]
    orig = vid.loss

    def spy(model, batch):
        shapes.append(batch[0].shape[1])
        return orig(model, batch)

    tasks[1] = AGDTask(vid.name, vid.sample, spy, vid.weight)
    h1 = agd_train(_tiny(vocab_size=data.vocab_size, max_text_len=data.max_len), tasks, steps=60, lr=3e-3, seed=0)
    h2 = agd_train(_tiny(vocab_size=data.vocab_size, max_text_len=data.max_len), tasks, steps=60, lr=3e-3, seed=0)
    assert h1 == h2  # fixed seed: identical task sequence and losses
    assert set(shapes) == {4, 8}  # the frame count changed between steps, no padding
    for mode in ("agd", "sum"):
        h = agd_train(_tiny(vocab_size=data.vocab_size, max_text_len=data.max_len), tasks, steps=80, lr=3e-3,
                      seed=1, mode=mode)
        cnt = [loss for n, loss in h if n in ("count", "sum")]
        assert sum(cnt[-5:]) / 5 < sum(cnt[:5]) / 5  # the loss goes down in both modes


def test_imp_cli_tiny_run(tmp_path):
    from moevision.cli.main import main

    out = tmp_path / "imp.md"
    assert main(["imp", "--rows", "dense_agd,moe_sum", "--seeds", "1", "--steps", "6", "--train-size", "40",
                 "--test-size", "20", "--out", str(out), "--work-dir", str(tmp_path / "w"), "--no-progress"]) == 0
    text = out.read_text()
    assert "dense encoder, AGD" in text and "summed task losses" in text
    assert main(["imp", "--rows", "bogus"]) == 2
