"""Orbax checkpoints with a JSON metadata record, written atomically.

Layout of a checkpoint directory ``DIR``::

    DIR/checkpoint/state/        Orbax StandardCheckpointer tree (variables, opt_state, step, epoch)
    DIR/checkpoint/metadata.json model, dataset, split, seed, epochs, test accuracy, version, ...

A save writes ``DIR/checkpoint.tmp-*`` completely (``metadata.json`` last, so a
temporary folder with metadata is complete) and then swaps it in with two
renames. A kill at any point leaves the old or the new checkpoint: between the
two renames ``DIR/checkpoint`` is briefly missing, and the next access restores
it from the complete new one (or the old one) and removes leftovers.

The metadata holds a SHA-256 of the saved state (:func:`tree_sha256`), checked
on every load: a flipped bit is an error naming the file, never silently
damaged weights.

Concurrency: every save, load and repair of ``DIR`` holds the exclusive lock
``DIR/.checkpoint.lock`` (:func:`jaxrecover.fileio.folder_lock`), so a reader never
sees, and never "repairs" away, a save in progress. A run that WRITES a series of
checkpoints (training) also holds ``DIR/.writer.lock`` for its whole length
(:func:`writer`): a second trainer with the same folder refuses (or waits) with
one line naming the holder's pid, instead of two models overwriting each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from .fileio import FolderBusy, folder_lock

import jax
import numpy as np

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_metadata", "checkpoint_exists",
           "tree_sha256", "writer"]

REQUIRED_METADATA = ("model", "dataset", "split", "seed", "epochs", "test_accuracy", "version")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def tree_sha256(tree) -> str:
    """SHA-256 of a pytree: its structure and every leaf's dtype, shape and bytes."""
    h = hashlib.sha256(str(jax.tree.structure(tree)).encode())
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _root(path: str | os.PathLike) -> Path:
    if str(path) == "":
        raise CheckpointError("the checkpoint path is empty; give a folder, e.g. --out checkpoints/lenet")
    return Path(path).expanduser().absolute()


@contextlib.contextmanager
def _guard(root: Path):
    """The folder's save/load lock (exclusive), with a killed save repaired first; a no-op for a missing folder."""
    if not root.is_dir():
        yield
        return
    with folder_lock(root, "checkpoint"):
        _repair(root)
        yield


@contextlib.contextmanager
def writer(path: str | os.PathLike, *, wait: bool = False, on_wait=None):
    """Hold ``path``'s writer lock for a run that writes checkpoints there (training).

    Raises:
      CheckpointError: another run holds it and ``wait`` is False.
    """
    root = _root(path)
    root.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(root, "writer", wait=wait, on_wait=on_wait):
            yield root
    except FolderBusy as e:
        raise CheckpointError(f"checkpoint folder {root} is being written by another run ({str(e).rsplit('(', 1)[-1]}; "
                              "wait for it to finish, or use another --out") from None


def _repair(root: Path) -> None:
    """Finish or undo a save that was killed between its renames, and remove leftovers of killed saves."""
    if not root.is_dir():
        return
    final = root / "checkpoint"
    tmps = sorted(root.glob("checkpoint.tmp-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    olds = sorted(root.glob("checkpoint.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not final.exists():
        complete = [p for p in tmps + olds if (p / "metadata.json").exists() and (p / "state").is_dir()]
        if complete:  # the newest complete new one, else the old one
            os.replace(complete[0], final)
    for p in tmps + olds:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)


def checkpoint_exists(path: str | os.PathLike) -> bool:
    root = _root(path)
    with _guard(root):
        c = root / "checkpoint"
        return (c / "metadata.json").exists() and (c / "state").is_dir()


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_checkpoint(path: str | os.PathLike, state: Any, metadata: dict,
                    required: tuple[str, ...] = REQUIRED_METADATA) -> Path:
    """Save a pytree ``state`` and ``metadata`` atomically under ``path/checkpoint``.

    ``required``: metadata keys that must be present (a trained model's by default; other states, e.g. fitted
    patterns, name their own)."""
    missing = [k for k in required if k not in metadata]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    root = _root(path)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"checkpoint path {root} is a file, not a directory; choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    state = jax.device_get(state)
    metadata = {**metadata, "state_sha256": tree_sha256(state)}
    with _guard(root):
        final = root / "checkpoint"
        tmp = root / f"checkpoint.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            ckptr = _checkpointer()
            try:
                ckptr.save(tmp / "state", state)
                ckptr.wait_until_finished()
            finally:
                ckptr.close()
            # metadata last: a temporary folder holding it is complete (see _repair)
            (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True,
                                                          default=_json_default))
            old = root / f"checkpoint.old-{uuid.uuid4().hex[:8]}"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def load_metadata(path: str | os.PathLike, required: tuple[str, ...] = REQUIRED_METADATA) -> dict:
    """The metadata of the checkpoint in ``path`` (a clear error when missing or corrupt)."""
    root = _root(path)
    with _guard(root):
        return _read_metadata(root, path, required)


def _read_metadata(root: Path, path, required) -> dict:
    meta = root / "checkpoint" / "metadata.json"
    if not meta.exists():
        raise CheckpointError(f"no checkpoint in {Path(path)} (missing {meta}); train one with "
                              f"'python train.py --model NAME --out {path}'")
    try:
        metadata = json.loads(meta.read_text())
        if not isinstance(metadata, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata {meta} is corrupt ({e}); retrain or restore it") from e
    missing = [k for k in required if k not in metadata]
    if missing:
        raise CheckpointError(f"checkpoint metadata {meta} lacks {missing}; it was not written by jaxrecover")
    bad = [k for k in ("model", "kind", "dataset") if k in metadata and not isinstance(metadata[k], str)]
    if bad:
        raise CheckpointError(f"checkpoint metadata {meta} is corrupt ({bad[0]!r} is {metadata[bad[0]]!r}, "
                              "not a name); retrain or restore it")
    return metadata


def load_checkpoint(path: str | os.PathLike, target: Any,
                    required: tuple[str, ...] = REQUIRED_METADATA) -> tuple[Any, dict]:
    """Restore ``(state, metadata)``; ``target`` gives the tree structure, shapes and dtypes.

    Raises:
      CheckpointError: the checkpoint is missing, or its state is corrupt or does
        not fit ``target`` (e.g. another model).
    """
    root = _root(path)
    with _guard(root):
        metadata = _read_metadata(root, path, required)
        state_dir = root / "checkpoint" / "state"
        if not state_dir.is_dir():
            raise CheckpointError(f"checkpoint {path} has metadata but no state directory {state_dir}")
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), target)
        try:
            ckptr = _checkpointer()
            try:
                state = ckptr.restore(state_dir, abstract)
            finally:
                ckptr.close()
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
            raise CheckpointError(
                f"checkpoint state in {state_dir} could not be restored ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''}); it is corrupt or belongs to another model; "
                "retrain it") from None
    want = metadata.get("state_sha256")
    if want is None:  # written before jaxrecover 0.2: usable, but say that it is unchecked
        import warnings

        warnings.warn(f"checkpoint {state_dir.parent} predates state checksums (jaxrecover < 0.2): its integrity "
                      "is not checked; retrain it to add one", RuntimeWarning, stacklevel=2)
    elif tree_sha256(state) != want:
        raise CheckpointError(f"checkpoint state in {state_dir} does not match its SHA-256 (a damaged file); "
                              "retrain it or restore it from a backup")
    return state, metadata
