"""Atomic file writes: a temporary file in the same directory, then one rename.

A reader sees either the old file or the complete new one, never a half-written
file, even when the writer is interrupted.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["atomic_write", "atomic_write_text", "atomic_save_npz", "atomic_savefig", "write_marked_block"]


def atomic_write(path: str | os.PathLike, write: Callable, mode: str = "wb") -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_save_npz(path: str | os.PathLike, compressed: bool = False, **arrays) -> Path:
    """``numpy.savez[_compressed]`` to ``path`` atomically."""
    save = np.savez_compressed if compressed else np.savez
    return atomic_write(path, lambda f: save(f, **arrays))


def atomic_savefig(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG to ``path`` atomically, then close it."""
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def write_marked_block(path: str | os.PathLike, name: str, text: str) -> Path:
    """Replace the text between ``<!-- {name}:begin -->`` and ``<!-- {name}:end -->`` in the file ``path``
    (atomically; the rest of the file is kept).

    Raises:
      ValueError: the file has no such block.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = Path(path).read_text()
    if begin not in doc or end not in doc.split(begin, 1)[1]:
        raise ValueError(f"{path} has no {begin} ... {end} block to fill; add the two markers where the table goes")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    return atomic_write_text(path, head + begin + "\n" + text + "\n" + end + tail)
