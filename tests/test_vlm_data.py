"""easy-VQA reader, the ShapeWorld generator (spec §0.4.1) and the VLM CLI (train smoke run, vqa)."""

import json

import numpy as np
import pytest
import torch

from moevision.cli import main
from moevision.data.shapeworld import MASKS, OBJECTS, RELATIONS, ShapeWorld, render, to_vqa_set


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shapeworld_rasterisation_follows_the_spec():
    assert int(MASKS["square"].sum()) == 36 and int(MASKS["cross"].sum()) == 20
    # |u - 3.5| <= (v - 0.5) / 2 on rows 1..6: row 1 admits no integer column; apex up
    assert [int(r.sum()) for r in MASKS["triangle"]] == [0, 0, 2, 2, 4, 4, 6, 0]
    img = render([{"shape": "square", "colour": "yellow", "row": 1, "col": 2}])
    assert img.shape == (3, 32, 32)
    assert (img[:2, 9:15, 17:23] == 1).all() and (img[2] == 0).all()  # yellow = (1, 1, 0), pixels 1..6 of cell
    assert (img[0] > 0).sum() == 36 and img[0, 8, 16] == 0  # border of the cell stays black
    big = render([{"shape": "circle", "colour": "white", "row": 3, "col": 0}], image_size=64)
    assert big.shape == (3, 64, 64) and np.array_equal(big[:, ::2, ::2], render([{"shape": "circle", "colour": "white",
                                                                                   "row": 3, "col": 0}]))


def test_shapeworld_is_seeded_and_answers_are_right():
    a, b = ShapeWorld(3, noise_std=0.02).scenes(20), ShapeWorld(3, noise_std=0.02).scenes(20)
    assert all(torch.equal(x["image"], y["image"]) and x["objects"] == y["objects"] for x, y in zip(a, b))
    assert not torch.equal(a[0]["image"], ShapeWorld(4, noise_std=0.02).scenes(1)[0]["image"])
    w = ShapeWorld(5)
    scenes = w.scenes(200)
    for sc in scenes:
        cells = [(o["row"], o["col"]) for o in sc["objects"]]
        assert 1 <= len(cells) <= 4 and len(set(cells)) == len(cells)
    recs = w.vqa_records(scenes)
    for r in recs:
        names = [f"{o['colour']} {o['shape']}" for o in r["objects"]]
        q = r["question"]
        if r["qtype"] == "exist":
            obj = q[len("is there a "):-len(" in the image ?")]
            assert obj in OBJECTS and (obj in names) == (r["answer"] == "yes")
        elif r["qtype"] == "count":
            shape = {"squares": "square", "circles": "circle", "triangles": "triangle", "crosses": "cross"}[q.split()[2]]
            assert int(r["answer"]) == sum(o["shape"] == shape for o in r["objects"])
        elif r["qtype"] == "colour_mcq":
            shape = r["stem"].split()[4]
            (obj,) = [o for o in r["objects"] if o["shape"] == shape]
            assert r["options"]["ABCD".index(r["answer"])] == obj["colour"] and len(set(r["options"])) == 4
        elif r["qtype"] == "spatial":
            rel = next(x for x in RELATIONS if f" {x} " in q)
            a_name, b_name = q[len("is the "):].split(f" {rel} the ")
            oa = r["objects"][names.index(a_name)]
            ob = r["objects"][names.index(b_name.rstrip(" ?"))]
            truth = {"left of": oa["col"] < ob["col"], "right of": oa["col"] > ob["col"],
                     "above": oa["row"] < ob["row"], "below": oa["row"] > ob["row"]}[rel]
            assert truth == (r["answer"] == "yes")
    assert {r["qtype"] for r in recs} == {"exist", "colour_mcq", "count", "spatial"}
    vs = to_vqa_set(scenes, recs)
    assert vs.images.dtype == torch.uint8 and len(vs) == len(recs) and vs.qtypes[0] == "exist"
    leaky = w.colour_mcq(scenes[0], leaky=True) or w.colour_mcq(scenes[1], leaky=True)
    assert leaky["stem"].startswith("the ")  # the question states its own answer (MMStar leakage items)


def test_easy_vqa_reader_and_implied_attributes():
    pytest.importorskip("easy_vqa")
    from moevision.data.easy_vqa import COLORS, SHAPES, image_attributes, load_easy_vqa

    ds = load_easy_vqa("test")
    assert ds.images.shape == (1000, 3, 64, 64) and len(ds) == 9673 and ds.images.dtype == torch.uint8
    shape, colour = image_attributes(ds)
    assert (shape >= 0).float().mean() > 0.8 and (colour >= 0).float().mean() > 0.8
    # every "what ..." answer agrees with the implied attributes of its image
    for q, a, i in zip(ds.questions, ds.answers, ds.image_index.tolist()):
        if a in SHAPES:
            assert SHAPES[shape[i]] == a
        elif a in COLORS:
            assert COLORS[colour[i]] == a


def test_vlm_cli_train_and_vqa(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--recipe", "vlm_smoke", "--out", str(run), "--no-progress", "--set",
            "data.shapeworld_train_images=24", "--set", "eval.pope_images=3", "--set", "eval.mcq_items=2"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "POPE" in out and "CircularEval" in out and "MoE layer 0: image tokens" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kind"] == "vlm" and set(summary["stages"]) == {"vision", "lm", "1", "2", "3"}
    assert summary["stages"]["1"]["trainable_params"] < summary["stages"]["2"]["trainable_params"]
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(img)
    assert main(["vqa", str(run), "--image", str(img), "--question", "is there a red circle in the image ?",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["answers"]) == 1 and res["model"].endswith("model")
    # resuming a finished run retrains nothing
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "resumed" in capsys.readouterr().out
    for bad, msg in ([["vqa", str(run), "--image", str(tmp_path / "nope.png"), "--question", "q"], "does not exist"],
                     [["vqa", str(tmp_path), "--image", str(img), "--question", "q"], "neither"],
                     [["vlm-results", "--seeds", "0"], "--seeds"], [["eval", str(run)], "vision-language"]):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
