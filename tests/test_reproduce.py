"""Corruptions and the reproduce command (shortened)."""

import torch

import moevision.recipes.reproduce as R
from moevision.cli import main
from moevision.data.corruptions import contrast, gaussian_blur, gaussian_noise, impulse_noise, make_corruption


def test_corruptions_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(gaussian_noise(x, 0.0, g), x)
    torch.testing.assert_close(contrast(x, 1.0), x)
    y = contrast(x, 0.0)
    torch.testing.assert_close(y, x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x))
    flat = torch.full((2, 1, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 1.0), flat)
    imp = impulse_noise(x, 1.0, g)
    assert set(imp.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(impulse_noise(x, 0.0, g), x)
    for fn in (make_corruption("gaussian_noise", 0.3), make_corruption("gaussian_blur", 1.0)):
        out = fn(x)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(make_corruption("gaussian_noise", 0.2, seed=1)(x), make_corruption("gaussian_noise", 0.2, seed=1)(x))


def test_reproduce_writes_table(tmp_path, monkeypatch, capsys):
    orig = R.base_config

    def short(seed):
        cfg = orig(seed)
        cfg.train.epochs = 1
        cfg.data.train_subset = 256
        return cfg

    monkeypatch.setattr(R, "base_config", short)
    assert main(["reproduce", "moh", "--seeds", "2", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "reproduce_moh.md").read_text()
    assert "moevision reproduce moh --seeds 2" in text
    rows = [l for l in text.splitlines() if l.startswith("| ") and "±" in l]
    assert len(rows) == 7 and all(l.count("±") == 1 for l in rows)
    assert main(["reproduce", "nope"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
