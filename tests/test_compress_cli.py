"""``moevision compress`` end to end on a tiny trained model: QMoE and pruning write checkpoints that
``moevision eval`` runs, the report's figures are consistent, bad input is a one-line error."""

import json

import pytest

from moevision.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("compress") / "run"
    assert main(["train", "--recipe", "smoke_synthetic", "--out", str(run), "--no-progress",
                 "--set", "train.max_steps=3"]) == 0
    return run


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_qmoe_compress_then_eval(run_dir, tmp_path, capsys):
    capsys.readouterr()
    q = tmp_path / "q"
    code, out, err = _run(["compress", str(run_dir), "--out", str(q), "--calib-images", "32", "--timing-images", "16",
                           "--no-progress"], capsys)
    assert code == 0, err
    assert "bits per expert param" in out and "test accuracy" in out and "ms/image" in out
    rep = json.loads((q / "compress_report.json").read_text())
    assert rep["expert_bytes"] * 8 == pytest.approx(rep["bits_per_expert_param"] * rep["expert_params"])
    assert rep["expert_bytes"] < rep["expert_bytes_bf16"] / 4
    assert rep["test_kl_to_original"] >= 0 and 0 < rep["test_agreement"] <= 1
    # the checkpoint runs under `moevision eval` with the accuracy the compress command measured
    code, out, err = _run(["eval", str(q), "--dataset", "synthetic", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((q / "eval.json").read_text())["test_accuracy"] == rep["accuracy_after"]


def test_prune_and_merge_write_plain_models(run_dir, tmp_path, capsys):
    capsys.readouterr()
    for extra in (["--method", "prune", "--keep", "2"], ["--method", "merge", "--merge-to", "2", "--bits", "2"]):
        out_dir = tmp_path / extra[1]
        code, out, err = _run(["compress", str(run_dir), "--out", str(out_dir), "--calib-images", "32",
                               "--test-subset", "32", "--timing-images", "16", "--no-progress", *extra], capsys)
        assert code == 0, err
        rep = json.loads((out_dir / "compress_report.json").read_text())
        assert rep["bits_per_expert_param"] == pytest.approx(16.0)  # fp32 experts, half of them left
        code, _, err = _run(["eval", str(out_dir), "--dataset", "synthetic", "--no-progress"], capsys)
        assert code == 0, err
        assert json.loads((out_dir / "config.json").read_text())["config"]["num_experts"] == 2


@pytest.mark.parametrize("extra,match", [
    (["--method", "prune", "--out", "x"], "needs keep"),
    (["--method", "merge", "--out", "x"], "needs merge_to"),
    (["--method", "prune", "--keep", "4", "--out", "x"], "--keep"),
    ([], "--out DIR is required"),
    (["--out", "x", "--zero-threshold", "2"], "zero_threshold=2.0"),
])
def test_bad_input_is_one_line_error(run_dir, extra, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code, _, err = _run(["compress", str(run_dir), "--no-progress", "--calib-images", "16", *extra], capsys)
    assert code == 2 and match in err
    assert len(err.strip().splitlines()) == 1


def test_dense_model_is_refused(tmp_path, capsys):
    from moevision import create_model

    create_model("vit_tiny_test").save_pretrained(tmp_path / "dense")
    code, _, err = _run(["compress", str(tmp_path / "dense"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "dense model" in err


def test_table_sweep_writes_markdown_with_its_command(run_dir, tmp_path, capsys, monkeypatch):
    from moevision.techniques.qmoe import sweep

    monkeypatch.setattr(sweep, "variants", lambda E: [("RTN ternary", {"method": "rtn"}),
                                                      ("prune", {"method": "prune", "keep": E - 1})])
    capsys.readouterr()
    table = tmp_path / "qmoe.md"
    code, out, err = _run(["compress", str(run_dir), "--table", str(table), "--seeds", "2", "--calib-images", "16",
                           "--test-subset", "32", "--timing-images", "8", "--no-progress"], capsys)
    assert code == 0, err
    text = table.read_text()
    assert f"`moevision compress {run_dir} --table {table} --seeds 2 --calib-images 16 --test-subset 32" in text
    rows = [line for line in text.splitlines() if line.startswith("| RTN") or line.startswith("| prune")]
    assert [r.split(" | ")[1] for r in rows] == ["1", "2"]  # RTN needs no data: one run; prune: one per seed
    raw = json.loads(table.with_suffix(".json").read_text())
    assert len(raw["rows"]["prune"]) == 2 and raw["rows"]["prune"][1]["seed"] == 1
