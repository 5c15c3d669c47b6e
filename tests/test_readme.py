"""The README's example runs as printed and prints a sensible noise scale."""

import contextlib
import io
import math
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_example_runs_as_printed():
    (block,) = python_blocks(README.read_text())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(README), "exec"), {})
    (value,) = re.findall(r"B_simple = (\S+)", out.getvalue())
    # y = x·1 + N(0, 1) noise: tr Σ ≈ d(|δ|² + 1) stays O(d) while |G|² = |δ|² shrinks as w -> 1,
    # so after 100 steps the noise scale is finite, positive and well above d = 8.
    assert math.isfinite(float(value)) and float(value) > 8
