"""The MoAI CPU miniature (spec §8(d), ``moevision moai``): the "CV model" texts against the ShapeWorld
scenes they describe, the frozen LVLM staying frozen while MoAI trains, and the whole pipeline on a tiny
budget (report, caching, validation)."""

import numpy as np
import pytest
import torch

from moevision.data.shapeworld import ShapeWorld
from moevision.errors import ConfigError
from moevision.techniques import moai as M
from moevision.techniques import moai_experiment as X

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scene_objects_round_trip_and_aux_texts_per_row():
    from moevision.train.vlm_data import cell_labels

    scenes = ShapeWorld(3, image_size=32).scenes(20, "train")
    cells = cell_labels(scenes)
    for sc, c in zip(scenes, cells):
        key = lambda o: (o["row"], o["col"])  # noqa: E731
        assert sorted(X.scene_objects(c), key=key) == sorted(({k: o[k] for k in ("colour", "shape", "row", "col")}
                                                              for o in sc["objects"]), key=key)
    split = X.make_split(0, 30, "test", 0.0)
    idx = list(range(10))
    exact = X.aux_texts(split, idx, "exact", 0.1, None)
    assert exact == [M.verbalize(X.scene_objects(split.cells[i])) for i in idx]
    assert X.aux_texts(split, idx, "no_aux", 0.1, None) == ["detections : none ."] * 10
    noisy = X.aux_texts(split, idx, "noisy", 0.5, np.random.default_rng(1))
    assert noisy == X.aux_texts(split, idx, "noisy", 0.5, np.random.default_rng(1)) and noisy != exact
    vocab = set(X.build_vocab(split))  # every word the detector can say is in the LM's vocabulary
    assert all(w in vocab for t in exact + noisy + ["detections : none ."] for w in t.split())


def test_images_get_the_requested_pixel_noise():
    clean, noisy = X.make_split(0, 5, "train", 0.0), X.make_split(0, 5, "train", 0.3)
    assert torch.equal(clean.cells, noisy.cells)  # the same scenes
    d = (noisy.images - clean.images).abs()
    assert 0.05 < float(d.mean()) < 1.0 and float((clean.images - clean.images.round()).abs().max()) == 0.0


def test_moai_training_leaves_the_frozen_lvlm_alone():
    S = X.MoAISettings(train_scenes=30, dim=32, depth=2, heads=2, ffn_hidden=32, batch_size=8, vision_steps=1,
                       lm_steps=1, base_steps=1, step1_steps=2, step2_steps=2, num_latents=4, compressor_heads=2,
                       compressor_head_dim=8, rank=4, mixer_heads=2, every=2)
    S.validate()
    data = X.make_split(0, S.train_scenes, "train", 0.0)
    base = X.new_model(S, X.build_vocab(data))
    X.train_base(S, base, data, 0)
    assert not any(p.requires_grad for p in base.parameters())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    vlm, handle, losses = X.train_moai(S, base, data, "exact", 0)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    # the copy's LM weights did not move either; MoAI's did (step 2 trains the gates)
    assert all(torch.equal(before[k], v) for k, v in vlm.state_dict().items())
    torch.manual_seed(100)  # train_moai seeds 100 + seed before attaching: this is the handle at init
    init = M.MoAIHandle(X.moai_config(S, "random"), handle.layer_ids).state_dict()
    trained = handle.state_dict()
    assert not torch.equal(init["compressor.latents"], trained["compressor.latents"])
    gates = [k for k in init if ".gate_I." in k]
    assert gates and any(not torch.equal(init[k], trained[k]) for k in gates)
    assert set(losses) == {"step1", "step2"} and all(np.isfinite(v) for v in losses.values())
    for m in handle.mixers.values():
        assert m.mode == "soft"


def test_miniature_pipeline_runs_and_reports_every_row(tmp_path):
    S = X.MoAISettings(seeds=1, train_scenes=30, test_scenes=6, dim=32, depth=2, heads=2, ffn_hidden=32,
                       batch_size=8, vision_steps=2, lm_steps=2, base_steps=2, step1_steps=2, step2_steps=2,
                       num_latents=4, compressor_heads=2, compressor_head_dim=8, rank=4, mixer_heads=2, every=2)
    rep = X.run_moai(S, out=tmp_path / "m.md", work=tmp_path / "work", log=lambda s: None)
    run = rep["results"][0]
    assert set(run["rows"]) == set(X.ROWS)
    for row in X.ROWS:
        r = run["rows"][row]
        assert all(0.0 <= r[q] <= 1.0 for q in X.QTYPES + ("all",))
        if row == "base":
            assert "gates_image" not in r
        else:  # mean gates of the soft mixture: each side sums to 1
            assert abs(sum(r["gates_image"].values()) - 1) < 1e-5
            assert abs(sum(r["gates_language"].values()) - 1) < 1e-5
    assert run["trainable_moai"] > 0 and run["frozen_lvlm"] > 0
    text = (tmp_path / "m.md").read_text()
    assert "MoAI miniature" in text and "CA(I<-A)" in text and (tmp_path / "m.json").is_file()
    again = X.run_moai(S, out=None, work=tmp_path / "work", log=lambda s: None)  # cached per seed
    assert again["results"][0]["rows"] == run["rows"]
    with pytest.raises(ConfigError, match="step2_steps"):
        X.run_moai(X.MoAISettings(step2_steps=-1))
    with pytest.raises(ConfigError, match="every=8"):
        X.run_moai(X.MoAISettings(depth=4, every=8))
    with pytest.raises(ConfigError, match="image_noise"):
        X.run_moai(X.MoAISettings(image_noise=2.0))


def test_exact_match_tally_by_hand():
    from moevision.techniques._experiment import ExactMatch

    s = ExactMatch(("exist", "count", "colour_mcq"))
    s.add([" yes", "no", "2 "], ["yes", "yes", "2"], ["exist", "exist", "count"])
    s.add(["3"], ["1"], ["count"])
    r = s.result()
    assert r == {"exist": 0.5, "count": 0.5, "colour_mcq": 0.0, "all": 0.5}
