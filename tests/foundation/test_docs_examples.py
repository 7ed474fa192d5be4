"""The ten-line examples of docs/ARCHITECTURE.md run as written (each block in a fresh namespace)."""

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_architecture_has_an_example_for_each_new_piece():
    text = DOC.read_text()
    for piece in ("An explainer", "A service", "A defence", "A recovery", "A stealing method", "A study"):
        assert f"{piece}:" in text, piece
    assert len(BLOCKS) == 6 and all(len(b.strip().splitlines()) <= 20 for b in BLOCKS)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_architecture_example_runs(code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "example"})
    assert out.getvalue().strip()  # each example prints what it made
