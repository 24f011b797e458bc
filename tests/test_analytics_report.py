"""``moevision analyze`` end to end on a tiny run, and the report rendered in headless Chromium.

Chromium is the Debian package ``chromium``: ``make test`` installs it, and the ``chromium`` fixture
installs it with apt-get when it is missing and root (or password-less sudo) is available; otherwise the
rendering test is skipped with the reason.
"""

import html
import json
import os
import re
import shutil
import subprocess

import pytest

from moevision.cli import main

pytest.importorskip("matplotlib", reason="the plots extra (matplotlib) is not installed")

SECTIONS = ["summary", "load", "classes", "expert-maps", "drops", "similarity", "training"]
PLOTS = ["load", "class_expert", "expert_maps", "dropped_tokens", "expert_similarity", "training_curves"]


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A few training steps of the tiny MoE ViT on synthetic data; eval capacity 0.5 so tokens drop."""
    run = tmp_path_factory.mktemp("analyze") / "run"
    assert main(["train", "--recipe", "smoke_synthetic", "--out", str(run), "--no-progress", "--set",
                 "train.max_steps=8", "--set", "train.log_every=2", "--set", "model.eval_capacity_factor=0.5"]) == 0
    return run


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    md = out / "docs" / "routing.md"
    assert main(["analyze", str(run_dir), "--out", str(out / "an"), "--no-progress", "--samples", "3",
                 "--markdown", str(md)]) == 0
    return out / "an", md


def test_analyze_writes_plots_summary_and_html(report, run_dir):
    out, md = report
    for name in PLOTS:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000, name
    s = json.loads((out / "routing_summary.json").read_text())
    L = s["layers"][0]
    assert s["images"] == 512 and L["block"] == 1 and L["kind"] == "token"
    assert sum(L["load_share"]) == pytest.approx(1.0)
    assert L["assignment_drop_rate"] > 0  # eval capacity 0.5 with top-2
    assert len(L["patch_mode"]) == 16 and len(L["class_expert"]) == 4
    # the interpretation quotes the numbers it was computed from
    assert any(f"{L['mi_class_bits']:.3f} bits" in n for n in s["notes"]["classes"])
    page = (out / "report.html").read_text()
    assert all(f"<section id='{k}'>" in page for k in SECTIONS)
    assert page.count("src='data:image/png;base64,") == len(PLOTS)  # self-contained: images embedded
    assert "<img" in page and "src='" not in page.replace("src='data:", "")  # no external file referenced
    # the Markdown copy links the images in --out, relative to where it lives
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())
    assert len(links) == len(PLOTS) and all((md.parent / l).resolve().is_file() for l in links)


def test_analyze_model_dir_dense_model_and_errors(run_dir, tmp_path, capsys):
    code, out, err = _run(["analyze", str(run_dir / "model"), "--dataset", "synthetic", "--max-images", "64",
                           "--out", str(tmp_path / "m"), "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "routing_summary.json").read_text())["images"] == 64
    assert "routing report:" in out and str(tmp_path / "m" / "report.html") in out
    # a dense model has no routing: the report says so instead of failing
    from moevision import create_model
    create_model("vit_tiny_test").save_pretrained(tmp_path / "dense")
    code, out, err = _run(["analyze", str(tmp_path / "dense"), "--dataset", "synthetic", "--out", str(tmp_path / "d"),
                           "--no-progress"], capsys)
    assert code == 0, err
    assert "no MoE layer" in (tmp_path / "d" / "report.html").read_text()
    for argv, match in [(["analyze", str(tmp_path / "nope")], "does not exist"),
                        (["analyze", str(run_dir), "--max-images", "0"], "--max-images must be >= 1"),
                        (["analyze", str(run_dir), "--dead-threshold", "2"], "--dead-threshold"),
                        (["analyze", str(run_dir), "--dataset", "digits"], "differs from the run's")]:
        code, _, err = _run(argv + ["--out", str(tmp_path / "x")], capsys)
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, (argv, err)


# ------------------------------------------------------------------ headless Chromium
def _find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium():
    path = _find_chromium()
    if path is None:
        sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") and subprocess.run(
            ["sudo", "-n", "true"], capture_output=True).returncode == 0 else None)
        if sudo is None or shutil.which("apt-get") is None:
            pytest.skip("headless Chromium is not installed and cannot be installed here (needs apt-get and root "
                        "or password-less sudo): apt-get install chromium")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(sudo + ["apt-get", "update", "-qq"], capture_output=True, timeout=120, env=env)
            r = subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=300,
                               env=env)
        except subprocess.TimeoutExpired:
            pytest.skip("apt-get install chromium timed out")
        path = _find_chromium()
        if path is None:
            pytest.skip(f"apt-get install chromium failed: {r.stderr.decode(errors='replace').strip()[-300:]}")
    return path


_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
          "--no-first-run", "--disable-extensions"]

# appended to a copy of the report: after load, write what the browser rendered into the DOM
_PROBE = """<img alt='broken-control' src='data:image/png;base64,AAAA'>
<script>window.addEventListener('load', () => {
  const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({
    sections: [...document.querySelectorAll('section')].map(s => [s.id, s.querySelector('h2').textContent,
                                                                   s.querySelectorAll('li').length]),
    images: [...document.images].map(i => [i.alt, i.naturalWidth, i.naturalHeight]),
    tables: document.querySelectorAll('table').length});
  document.body.appendChild(pre);
});</script></body>"""


def test_report_renders_in_headless_chromium(report, chromium, tmp_path):
    out, _ = report
    page = tmp_path / "probe.html"
    page.write_text((out / "report.html").read_text().replace("</body>", _PROBE))
    r = subprocess.run([chromium, *_FLAGS, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                       capture_output=True, timeout=60, text=True)
    m = re.search(r"<pre id=\"probe\">(.*?)</pre>", r.stdout, re.S)
    assert m, f"no rendered DOM from chromium (exit {r.returncode}): {r.stderr[-500:]}"
    dom = json.loads(html.unescape(m.group(1)))
    assert [s[0] for s in dom["sections"]] == SECTIONS
    assert all(n_notes >= 1 for _, _, n_notes in dom["sections"])  # every section has its interpretation
    images = {alt: (w, h) for alt, w, h in dom["images"]}
    assert images.pop("broken-control") == (0, 0)  # the check tells a broken image from a decoded one
    assert sorted(images) == sorted(PLOTS)
    assert all(w > 100 and h > 100 for w, h in images.values()), images
    assert dom["tables"] >= 2
    # and the page as painted is not blank: a screenshot has dark (text, plots) and coloured pixels
    shot = tmp_path / "shot.png"
    r = subprocess.run([chromium, *_FLAGS, "--window-size=1100,1800", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, timeout=60, text=True)
    assert shot.is_file(), r.stderr[-500:]
    import matplotlib.image

    px = matplotlib.image.imread(shot)[..., :3]  # (H, W, 3) floats in [0, 1]
    assert px.shape[:2] == (1800, 1100)
    dark = (px.max(-1) < 0.3).mean()
    colour = (px.max(-1) - px.min(-1) > 0.3).mean()
    assert dark > 0.002 and colour > 0.01, (dark, colour)
