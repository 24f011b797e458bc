"""`moevision reproduce-upcycling`: the whole job graph on tiny synthetic settings, resumability, report."""

import json

import pytest
import torch

import moevision as mv
from moevision.cli import main
from moevision.recipes import get_recipe
from moevision.recipes.upcycling import Settings
from moevision.recipes.upcycling_report import paired, plan, reproduce_upcycling


pytestmark = pytest.mark.usefixtures("one_thread")


def test_whole_pipeline_on_tiny_settings(tmp_path):
    dino = tmp_path / "dino"
    mv.create_model("vit_tiny_test").save_pretrained(dino)  # stands in for the converted DINOv2 directory
    S = Settings.smoke(dino_dir=str(dino))
    out = tmp_path / "upcycling.md"
    logs = []
    reproduce_upcycling(S, work=tmp_path / "work", out=out, workers=1, log=logs.append)
    text = out.read_text()
    assert not any("FAILED" in l for l in logs), logs
    for section in ("## (a)", "## (b)", "## (c)", "## (d)"):
        assert section in text
    rows = [l for l in text.splitlines() if l.startswith("| ") and "±" in l]
    assert len(rows) == 6 + 2 + 3 + 3 and not any("n/a" in r for r in rows)
    assert text.count("paired seeds") == 8
    res = json.loads((tmp_path / "work" / "results" / "own-upcycled-s0.json").read_text())["result"]
    parent = json.loads((tmp_path / "work" / "results" / "parent.json").read_text())["result"]
    assert res["step0_accuracy"] == parent["test_accuracy"]  # upcycling is exact at step 0
    assert res["step0_max_logit_gap"] <= 1e-5
    clip = json.loads((tmp_path / "work" / "results" / "clip-upcycle-s0.json").read_text())["result"]
    assert clip["accuracy_before_router_training"] == parent["test_accuracy"] == clip["test_accuracy"]
    assert clip["expert_diversity"] == 0.0
    dmu = json.loads((tmp_path / "work" / "results" / "clip-dmu-s1.json").read_text())["result"]
    assert dmu["expert_diversity"] > 0 and len(dmu["stages"]) == 2
    # a second invocation finds every job done and only rewrites the document
    logs.clear()
    reproduce_upcycling(S, work=tmp_path / "work", out=out, workers=1, log=logs.append)
    assert "0 to run" in logs[0]


def test_plan_dependencies_and_verdicts():
    jobs = plan(Settings(seeds=2, dino_dir="x"), ("own", "dinov2", "clip", "m2mkd"))
    ids = [j.id for j in jobs]
    assert ids[:2] == ["parent", "meta"] and len(ids) == len(set(ids))
    for j in jobs:  # every dependency comes earlier
        assert all(ids.index(d) < ids.index(j.id) for d in j.deps)
    done = {f"m2m-{a}-s{s}": {"result": {"test_accuracy": v}} for a, s, v in
            [("m2mkd", 0, 0.80), ("scratch", 0, 0.78), ("m2mkd", 1, 0.81), ("scratch", 1, 0.80)]}
    d, text = paired(done, "m2m", "m2mkd", "scratch", 2)
    assert d == pytest.approx([2.0, 1.0]) and "agrees" in text
    d, text = paired(done, "m2m", "scratch", "m2mkd", 2)
    assert "disagrees" in text
    done["m2m-m2mkd-s1"]["result"]["test_accuracy"] = 0.79
    assert "inconclusive" in paired(done, "m2m", "m2mkd", "scratch", 2)[1]


def test_recipes_and_cli_errors(capsys):
    assert get_recipe("fmnist_dense_parent").train.max_steps == Settings().parent_steps
    assert get_recipe("fmnist_continue").train.max_steps == Settings().ft_steps
    assert get_recipe("fmnist_moe_student").model.moe_layers == "all"
    assert main(["reproduce-upcycling", "--parts", "own,nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
    assert main(["reproduce-upcycling", "--dinov2", "/nonexistent"]) == 2
    assert "not a model directory" in capsys.readouterr().err


@pytest.mark.slow  # spawns two worker processes (each imports torch)
def test_worker_processes(tmp_path):
    S = Settings.smoke(seeds=1, optimizer_rows=False, ft_long_steps=0)
    logs = []
    out = reproduce_upcycling(S, work=tmp_path / "w", out=tmp_path / "u.md", parts=("own",), workers=2,
                              log=logs.append)
    assert not any("FAILED" in l for l in logs), logs
    assert sum(l.strip().startswith("done") for l in logs) == 3
    assert "upcycled MoE" in out.read_text()
