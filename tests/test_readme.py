"""The README's code examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_layer_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    layer = next(b for b in blocks if "moevision.MoE(" in b)
    ns: dict = {}
    exec(compile(layer, "README.md", "exec"), ns)
    assert tuple(ns["out"].out.shape) == (4, 50, 192)


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
