"""Training loop: learns, logs, checkpoints atomically and resumes exactly."""

import json
import os
import shutil

import pytest
import torch

from moevision import config as C
from moevision.errors import CheckpointError
from moevision.recipes import get_recipe
from moevision.train import fit, load_checkpoint, read_run_config
from moevision.train.engine import build_model
from moevision.train.optim import warmup_cosine


def _cfg(**sets):
    cfg = get_recipe("smoke_synthetic")
    cfg.train.num_threads = None
    for k, v in sets.items():
        C.set_by_path(cfg, k.replace("__", "."), v)
    C.validate_config(cfg)
    return cfg


def test_smoke_run_learns_and_writes_run_dir(tmp_path):
    s = fit(_cfg(), tmp_path / "run", progress=False, log=lambda *_: None)
    assert s["test_accuracy"] > 0.8  # 4 classes: chance is 0.25
    for f in ("config.json", "metrics.jsonl", "checkpoint.safetensors", "model/config.json",
              "model/model.safetensors", "summary.json"):
        assert (tmp_path / "run" / f).is_file(), f
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for k in ("test_accuracy", "train_seconds", "params_total", "params_active"):
        assert k in summary
    assert 0 <= summary["test_accuracy"] <= 1 and summary["params_active"] < summary["params_total"]
    assert summary["wall_seconds"] >= summary["train_seconds"] > 0
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["type"] for r in recs} == {"train", "eval"}
    assert [r["epoch"] for r in recs if r["type"] == "eval"] == [1, 2, 3]
    assert read_run_config(tmp_path / "run").to_dict() == _cfg().to_dict()


def test_resume_is_exact(tmp_path):
    """Stopped at step 15 (last checkpoint at 10, mid-epoch, inside a logging window of 4 steps), resumed:
    same final weights and the same metrics records (the window's sums are in the checkpoint)."""
    cfg = _cfg(train__epochs="2", train__checkpoint_every="10", model__noise_std="1.0",
               data__augment="flip_crop", model__drop_path_rate="0.1", train__log_every="4")
    fit(cfg, tmp_path / "a", progress=False, log=lambda *_: None)

    def boom(step):
        if step == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "b", progress=False, log=lambda *_: None, on_step=boom)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.safetensors", restore_rng=False)["step"] == 10
    fit(read_run_config(tmp_path / "b"), tmp_path / "b", resume=True, progress=False, log=lambda *_: None)
    ma, mb = build_model(cfg), build_model(cfg)
    load_checkpoint(tmp_path / "a" / "checkpoint.safetensors", model=ma, restore_rng=False)
    load_checkpoint(tmp_path / "b" / "checkpoint.safetensors", model=mb, restore_rng=False)
    for (k, a), (_, b) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(a, b), k
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # the resumed log reads as one run

    def records(run):  # all but the timing
        return [{k: v for k, v in json.loads(l).items() if k != "images_per_s"}
                for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert records("b") == records("a")


def test_resume_from_a_checkpoint_without_log_window(tmp_path):
    """Older checkpoints have no logging-window sums: they resume as before (the window restarts)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = _cfg(train__max_steps="12", train__checkpoint_every="6", train__log_every="4", train__epochs="1")

    def boom(step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "r", progress=False, log=lambda *_: None, on_step=boom)
    p = tmp_path / "r" / "checkpoint.safetensors"
    with safe_open(str(p), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(meta["state"])
    assert state.pop("log_window")["n"] == 2 * cfg.data.batch_size  # steps 5 and 6
    save_file(tensors, str(p), metadata={**meta, "state": json.dumps(state)})
    s = fit(read_run_config(tmp_path / "r"), tmp_path / "r", resume=True, progress=False, log=lambda *_: None)
    assert s["steps"] == 12


def test_fresh_run_over_an_old_one_removes_its_artifacts_and_divergence_is_a_clear_error(tmp_path):
    from moevision.errors import ConfigError, DivergenceError, MoEVisionError

    run = tmp_path / "r"
    fit(_cfg(train__max_steps="2"), run, progress=False, log=lambda *_: None)
    (run / "analysis").mkdir()
    with pytest.raises(DivergenceError, match=r"step \d+; lower train.lr \(now 10000\) or train.grad_clip") as e:
        fit(_cfg(train__lr="1e4"), run, progress=False, log=lambda *_: None)
    assert isinstance(e.value, MoEVisionError) and isinstance(e.value, FloatingPointError)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # no stale checkpoint, model/, metrics ...
    with pytest.raises(ConfigError, match="train.lr=inf"):
        _cfg(train__lr="inf")


def test_corrupt_checkpoint_is_reported(tmp_path):
    fit(_cfg(train__max_steps="3"), tmp_path / "r", progress=False, log=lambda *_: None)
    p = tmp_path / "r" / "checkpoint.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_warmup_cosine_schedule_values():
    kw = dict(total_steps=110, warmup_steps=10, lr=1.0, min_lr=0.0)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)  # (0+1)/10
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert warmup_cosine(60, **kw) == pytest.approx(0.5)  # half way: (1 + cos(pi/2)) / 2
    assert warmup_cosine(110, **kw) == pytest.approx(0.0)


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                    reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_training_matches_eager(tmp_path):
    """train.compile: the same run under torch.compile logs the same losses (the first, before any
    update, to float precision), and its checkpoint has the plain model's keys (the compiled wrapper
    is never saved). Weights agree loosely only: AdamW's first steps are sign-like, so float-level
    gradient differences move near-zero-gradient weights by up to ~lr."""
    sets = dict(train__max_steps="3", train__log_every="1", model__noise_std="0.0")  # compiled RNG differs
    cfg = _cfg(**sets)
    fit(cfg, tmp_path / "eager", progress=False, log=lambda *_: None)
    fit(_cfg(**sets, train__compile="default"), tmp_path / "compiled", progress=False, log=lambda *_: None)

    def losses(run):
        recs = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r["type"] == "train"]

    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["compile"] == "default" and summary["first_step_seconds"] > 0
    assert summary["images_per_s_after_first"] > 0
    le, lc = losses("eager"), losses("compiled")
    assert len(le) == len(lc) == 3
    assert lc[0] == pytest.approx(le[0], rel=1e-5)
    assert lc == pytest.approx(le, rel=1e-3)
    ma, mb = build_model(cfg), build_model(cfg)
    load_checkpoint(tmp_path / "eager" / "checkpoint.safetensors", model=ma, restore_rng=False)
    load_checkpoint(tmp_path / "compiled" / "checkpoint.safetensors", model=mb, restore_rng=False)
    for (k, a), (_, b) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.allclose(a, b, atol=3 * cfg.train.lr), k


def test_compile_mode_is_validated():
    with pytest.raises(Exception, match="train.compile='fast'"):
        _cfg(train__compile="fast")
    with pytest.raises(Exception, match="expert parallelism"):
        _cfg(train__compile="default", parallel__ep="2")
