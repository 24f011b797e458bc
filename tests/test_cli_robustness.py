"""Bad input and leftovers through main(argv): nothing is overwritten without --overwrite, a fresh run
over an old one leaves none of its files, and every user error is one line (no traceback)."""

import json
import shutil
import warnings
from pathlib import Path

import pytest

from moevision.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-step smoke run (copy it before changing it)."""
    run = tmp_path_factory.mktemp("robust") / "run"
    assert main(["train", "--recipe", "smoke_synthetic", "--out", str(run), "--no-progress",
                 "--set", "train.max_steps=2"]) == 0
    return run


def _run(argv, capsys):
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _error(argv, capsys, *match):
    """Run argv; it must fail with one line naming every string in ``match``."""
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for m in match:
        assert m in err, (m, err)
    return err


def _files(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_merge_and_compress_never_overwrite_without_asking(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _files(run)
    other = tmp_path / "other"  # someone's directory: never written without --overwrite
    other.mkdir()
    (other / "config.json").write_text("mine")
    for cmd in (["merge"], ["compress", "--method", "prune", "--keep", "2", "--no-progress"]):
        _error([cmd[0], str(run), "--out", str(run), *cmd[1:]], capsys, "source directory", str(run))
        _error([cmd[0], str(run), "--out", str(run), "--overwrite", *cmd[1:]], capsys, "source directory")
        _error([cmd[0], str(run), "--out", str(run / "model"), "--overwrite", *cmd[1:]], capsys, "final model/")
        _error([cmd[0], str(run), "--out", str(run / ".." / "run"), "--overwrite", *cmd[1:]], capsys, "source")
        _error([cmd[0], str(run), "--out", str(other), *cmd[1:]], capsys, "not empty", "--overwrite")
        assert (other / "config.json").read_text() == "mine"
    assert _files(run) == before  # the run directory is untouched
    code, _, err = _run(["merge", str(run), "--out", str(other), "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((other / "config.json").read_text())["architecture"]
    # upcycle and convert: a regular file as --out is refused, --overwrite or not
    (tmp_path / "file").write_text("keep")
    _error(["upcycle", str(other), "--out", str(tmp_path / "file"), "--overwrite", "--experts", "2", "--top-k", "1"],
           capsys, "is a file")
    _error(["upcycle", str(other), "--out", str(other), "--overwrite", "--experts", "2", "--top-k", "1"],
           capsys, "source directory")
    assert (tmp_path / "file").read_text() == "keep"


def test_overwrite_starts_clean_and_divergence_is_one_line(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "analysis").mkdir()
    (run / "analysis" / "report.html").write_text("old")
    (run / "eval.json").write_text("{}")
    (run / "notes.txt").write_text("mine")  # not a run artifact: kept
    with warnings.catch_warnings():  # no UserWarning from float() of a tensor that requires grad
        warnings.simplefilter("error", UserWarning)
        err = _error(["train", "--recipe", "smoke_synthetic", "--out", str(run), "--overwrite", "--no-progress",
                      "--set", "train.lr=1e4"], capsys, "diverged", "lower train.lr (now 10000)", "train.grad_clip")
    assert "enable" not in err  # grad_clip is on (1.0): lowering it is the advice
    # the new run died before its first checkpoint: none of the old run's files may pass for its own
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "notes.txt"]
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 1e4
    _error(["eval", str(run)], capsys, "neither model/ nor checkpoint")
    _error(["train", "--resume", str(run)], capsys, "nothing to resume", "--overwrite")
    _error(["train", "--recipe", "smoke_synthetic", "--out", str(run)], capsys, "no checkpoint", "--overwrite")
    err = _error(["train", "--recipe", "smoke_synthetic", "--out", str(tmp_path / "r2"), "--no-progress",
                  "--set", "train.lr=1e4", "--set", "train.grad_clip=none"], capsys, "diverged")
    assert "--set train.grad_clip=1.0" in err


def test_resume_rejects_out_and_overwrite(trained, capsys, tmp_path):
    _error(["train", "--resume", str(trained), "--out", str(tmp_path / "elsewhere")], capsys, "drop --out")
    _error(["train", "--resume", str(trained), "--overwrite"], capsys, "drop --overwrite")
    _error(["train", "--init", str(trained), "--recipe", "smoke_synthetic", "--out", str(tmp_path / "i")], capsys,
           "run directory", str(trained / "model"))
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _error(["train", "--init", str(run / "model"), "--recipe", "smoke_synthetic", "--out", str(run), "--overwrite"],
           capsys, "part of", "a fresh run there deletes")
    assert (run / "model" / "model.safetensors").is_file()
    # the same guard where fit() (the API) clears a fresh run's directory
    from moevision.errors import ConfigError
    from moevision.train.engine import clear_run_artifacts
    with pytest.raises(ConfigError, match="part of"):
        clear_run_artifacts(run, run / "model")
    assert (run / "model" / "model.safetensors").is_file() and (run / "checkpoint.safetensors").is_file()
    clear_run_artifacts(run, trained / "model")  # weights from elsewhere: the old run's files go
    assert not (run / "model").exists() and not (run / "checkpoint.safetensors").exists()


@pytest.mark.parametrize("argv,match", [
    (["train", "--recipe", "smoke_synthetic", "--set", "train.lr=inf"], "train.lr=inf"),
    (["train", "--recipe", "smoke_synthetic", "--set", "train.grad_clip=inf"], "train.grad_clip=inf"),
    (["train", "--recipe", "smoke_synthetic", "--set", "model.moe_layers=[99]"], "model.moe_layers=[99]"),
    (["train", "--recipe", "smoke_synthetic", "--set", "train.device=tpu"], "train.device='tpu'"),
    (["train", "--recipe", "smoke_synthetic", "--set", "train.device=cudafoo"], "train.device='cudafoo'"),
    (["train", "--recipe", "smoke_synthetic", "--out", "/proc/moevision-x"], "cannot create the run directory"),
    (["convert", "x.pth", "--out", "o", "--ignore-keys", "("], "--ignore-keys '('"),
])
def test_bad_arguments_are_one_line_errors(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _error(argv + (["--no-progress"] if argv[0] == "train" else []), capsys, match)


def test_bad_paths_and_devices_are_one_line_errors(trained, tmp_path, capsys):
    (tmp_path / "file").write_text("keep")
    _error(["train", "--recipe", "smoke_synthetic", "--out", str(tmp_path / "file")], capsys, "is a file")
    _error(["train", "--recipe", "smoke_synthetic", "--out", str(tmp_path / "file"), "--overwrite"], capsys, "is a file")
    assert (tmp_path / "file").read_text() == "keep"
    for cmd in (["eval", str(trained)], ["compress", str(trained), "--out", str(tmp_path / "c")]):
        _error(cmd + ["--device", "tpu"], capsys, "'tpu'", "auto, cpu, cuda or cuda:N")
    _error(["analyze", str(trained), "--out", str(tmp_path / "an"), "--device", "tpu"], capsys, "'tpu'")
    assert not (tmp_path / "an").exists()  # nothing written before the device is checked
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02garbage, not a pickle")
    err = _error(["convert", str(tmp_path / "garbage.pth"), "--out", str(tmp_path / "d")], capsys, "garbage.pth")
    assert "weights_only" not in err
    for flag, value in (("--batch", "-5"), ("--repeats", "0")):
        with pytest.raises(SystemExit) as e:
            main(["bench", "model", flag, value])
        assert e.value.code == 2 and f"{flag}: must be >= 1, got {value}" in capsys.readouterr().err


def test_corrupt_run_files_name_the_file(trained, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(trained / "checkpoint.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(meta["state"])

    def broken(name, tensors=tensors, state=state):
        run = tmp_path / name
        shutil.copytree(trained, run)
        save_file(tensors, str(run / "checkpoint.safetensors"), metadata={**meta, "state": json.dumps(state)})
        return run

    ckpt = "checkpoint.safetensors"
    run = broken("norng", tensors={k: v for k, v in tensors.items() if k != "rng.torch"})
    _error(["train", "--resume", str(run), "--no-progress"], capsys, str(run / ckpt), "rng.torch")
    run = broken("nostep", state={k: v for k, v in state.items() if k != "step"})
    _error(["train", "--resume", str(run), "--no-progress"], capsys, str(run / ckpt), "corrupt", "step")
    run = broken("list", state=[1, 2])
    _error(["train", "--resume", str(run), "--no-progress"], capsys, str(run / ckpt), "corrupt")
    run = broken("other")  # a checkpoint of a different model: counts and a few names, not every key
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["depth"] = 4
    (run / "config.json").write_text(json.dumps(cfg))
    err = _error(["train", "--resume", str(run), "--no-progress"], capsys, "does not match the model", "keys missing",
                 "different model config")
    assert len(err) < 600
    (run / "config.json").write_text("[1, 2]")
    _error(["eval", str(run)], capsys, str(run / "config.json"), "corrupt", "list")


def test_a_config_section_that_is_not_a_mapping_is_named_without_a_stray_dot():
    from moevision.errors import ConfigError
    from moevision.train.run_config import RunConfig

    with pytest.raises(ConfigError, match=r"^model must be a mapping, got int$"):
        RunConfig.from_dict({"model": 3})
