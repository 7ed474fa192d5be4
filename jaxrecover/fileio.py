"""Atomic file writes (a temporary file in the same directory, then one rename) and folder locks.

A reader sees either the old file or the complete new one, never a half-written
file, even when the writer is interrupted.

:func:`folder_lock` is an advisory ``fcntl.flock`` on a lock file inside a folder, re-entrant within one
process (a nested acquisition of the same lock by the same process succeeds at once: flock itself would
deadlock on a second open file description). Written here because the standard library has flock but no
re-entrant, named, multi-process folder lock, and the lock libraries on PyPI (filelock, portalocker) are
not re-entrant across the nested calls a checkpoint save and load make. The lock is released when its
holder exits or dies, so a killed run never leaves a folder locked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

__all__ = ["atomic_write", "atomic_write_text", "atomic_save_npz", "atomic_savefig", "write_marked_block",
           "folder_lock", "FolderBusy", "load_rows"]


class FolderBusy(RuntimeError):
    """Another process holds a folder's lock and the caller asked not to wait."""


_held: dict[str, list] = {}  # lock file -> [fd, depth, exclusive] of this process
_held_guard = threading.RLock()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str, *, exclusive: bool = True, wait: bool = True,
                on_wait: Callable[[str], None] | None = None) -> Iterator[bool]:
    """Hold the lock ``folder/.{name}.lock`` (exclusive or shared) for the ``with`` block.

    Yields True when locked, False when the folder cannot hold a lock file (read-only: nobody can write
    there either). ``wait=False``: raise :class:`FolderBusy` (with the holder's pid) instead of waiting.
    ``on_wait(holder)`` is called once before a wait starts (e.g. to say who is being waited for).
    Re-entrant within this process; a nested request for an exclusive lock while a shared one is held
    is an error (it could never be granted without a deadlock).
    """
    import fcntl

    folder = Path(folder)
    path = str((folder / f".{name}.lock").absolute())
    with _held_guard:
        entry = _held.get(path)
        if entry is not None:
            if exclusive and not entry[2]:
                raise RuntimeError(f"{path}: an exclusive lock was requested while this process holds it shared")
            entry[1] += 1
    if entry is not None:
        try:
            yield True
        finally:
            with _held_guard:
                entry[1] -= 1
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            yield False  # a read-only folder without a lock file: no writer can be there
            return
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                raise FolderBusy(f"{folder} is in use by another run ({holder})") from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(fd, mode)
        if exclusive:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()}\n".encode())
            except OSError:
                pass
        with _held_guard:
            _held[path] = [fd, 1, exclusive]
        try:
            yield True
        finally:
            with _held_guard:
                del _held[path]
    finally:
        os.close(fd)  # releases the flock


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


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


def load_rows(path: str | os.PathLike) -> list[dict]:
    """The ``rows`` of a study's ``rows.json`` (``{"command": ..., "rows": [...]}``); [] when it does not exist.

    Raises:
      ValueError: the file is truncated, not JSON, or not a rows file (one line naming it and the fix).
    """
    import json

    path = Path(path)
    if not path.exists():
        return []
    fix = "delete it to recompute its rows (or restore it from git)"
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is truncated or not JSON ({e}); {fix}") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} is not a rows file (no list of row objects under 'rows'); {fix}")
    return rows
