"""The MouSi CPU miniature (spec §6(d), ``moevision mousi``): the experts' cell targets against the
ShapeWorld objects, the shape expert's colour-blindness, the fusion's token counts per row, and the whole
pipeline on a tiny budget (report, caching, validation)."""

import pytest
import torch

from moevision.data.shapeworld import ShapeWorld
from moevision.errors import ConfigError
from moevision.techniques import mousi as MS
from moevision.techniques import mousi_experiment as X

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cell_targets_name_each_cells_colour_and_shape():
    from moevision.data.shapeworld import COLOURS, SHAPES
    from moevision.train.vlm_data import cell_labels

    scenes = ShapeWorld(5, image_size=32).scenes(30, "train")
    colour, shape = X.cell_targets(cell_labels(scenes))
    for i, sc in enumerate(scenes):
        want_c, want_s = torch.zeros(16, dtype=torch.long), torch.zeros(16, dtype=torch.long)
        for o in sc["objects"]:
            want_c[4 * o["row"] + o["col"]] = 1 + list(COLOURS).index(o["colour"])
            want_s[4 * o["row"] + o["col"]] = 1 + SHAPES.index(o["shape"])
        assert torch.equal(colour[i], want_c) and torch.equal(shape[i], want_s)


def test_shape_expert_is_colour_blind_and_grids_match_the_fusion():
    torch.manual_seed(0)
    S = X.MouSiSettings(expert_dim=8)
    colour, shape = X.ColourExpert(8), X.ShapeExpert(8)
    img = torch.rand(2, 3, 32, 32)
    perm = img[:, [2, 0, 1]]  # the same grey levels, other colours
    assert torch.allclose(shape(img), shape(perm), atol=1e-6)
    assert not torch.allclose(colour(img), colour(perm), atol=1e-3)
    feats = X.expert_features(colour, shape, img)
    assert feats["colour"].shape == (2, 64, 8) and feats["shape"].shape == (2, 16, 8)
    for row, tokens in (("colour", 16), ("shape", 16), ("both", 32)):  # 8x8 grouped 2x2 -> 16
        fusion = MS.PolyExpertFusion(X.fusion_config(S, row))
        out = fusion([feats[e] for e in X.EXPERTS[row]])
        assert out.shape == (2, tokens, S.dim) and sum(fusion.tokens_per_expert()) == tokens


def test_miniature_pipeline_runs_and_reports_every_row(tmp_path):
    S = X.MouSiSettings(seeds=1, train_scenes=30, test_scenes=6, dim=32, heads=2, ffn_hidden=32, expert_dim=8,
                        batch_size=8, expert_steps=2, lm_steps=2, vlm_steps=2)
    rep = X.run_mousi(S, out=tmp_path / "m.md", work=tmp_path / "work", log=lambda s: None)
    run = rep["results"][0]
    assert set(run["rows"]) == set(X.ROWS)
    for row in X.ROWS:
        assert all(0.0 <= run["rows"][row][q] <= 1.0 for q in X.QTYPES + ("all",))
    assert run["rows"]["both"]["prefix_tokens"] == 32 and run["rows"]["shape"]["prefix_tokens"] == 16
    text = (tmp_path / "m.md").read_text()
    assert "MouSi miniature" in text and (tmp_path / "m.json").is_file()
    again = X.run_mousi(S, out=None, work=tmp_path / "work", log=lambda s: None)  # cached per seed
    assert again["results"][0]["rows"] == run["rows"]
    with pytest.raises(ConfigError, match="vlm_steps"):
        X.run_mousi(X.MouSiSettings(vlm_steps=-1))
    with pytest.raises(ConfigError, match="colour_group"):
        X.run_mousi(X.MouSiSettings(colour_group=3))
