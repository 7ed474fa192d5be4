"""Orbax checkpoints with a JSON metadata record, written atomically.

Layout of a checkpoint directory ``DIR``::

    DIR/checkpoint/state/        Orbax StandardCheckpointer tree (variables, opt_state, step, epoch)
    DIR/checkpoint/metadata.json model, dataset, split, seed, epochs, test accuracy, version, ...

A save writes ``DIR/checkpoint.tmp-*`` completely and then swaps it in with
renames, so an interrupted save leaves the previous checkpoint intact and never
a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_metadata", "checkpoint_exists"]

REQUIRED_METADATA = ("model", "dataset", "split", "seed", "epochs", "test_accuracy", "version")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _ckpt(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().absolute() / "checkpoint"


def checkpoint_exists(path: str | os.PathLike) -> bool:
    c = _ckpt(path)
    return (c / "metadata.json").exists() and (c / "state").is_dir()


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_checkpoint(path: str | os.PathLike, state: Any, metadata: dict) -> Path:
    """Save a pytree ``state`` and ``metadata`` atomically under ``path/checkpoint``."""
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    root = Path(path).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    final = _ckpt(root)
    tmp = root / f"checkpoint.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        ckptr = _checkpointer()
        ckptr.save(tmp / "state", jax.device_get(state))
        ckptr.wait_until_finished()
        ckptr.close()
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=_json_default))
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


def load_metadata(path: str | os.PathLike) -> dict:
    """The metadata of the checkpoint in ``path`` (a clear error when missing or corrupt)."""
    c = _ckpt(path)
    meta = c / "metadata.json"
    if not meta.exists():
        raise CheckpointError(f"no checkpoint in {Path(path)} (missing {meta}); train one with "
                              f"'python train.py --model NAME --out {path}'")
    try:
        metadata = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata {meta} is corrupt ({e}); retrain or restore it") from e
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise CheckpointError(f"checkpoint metadata {meta} lacks {missing}; it was not written by jaxrecover")
    return metadata


def load_checkpoint(path: str | os.PathLike, target: Any) -> tuple[Any, dict]:
    """Restore ``(state, metadata)``; ``target`` gives the tree structure, shapes and dtypes.

    Raises:
      CheckpointError: the checkpoint is missing, or its state is corrupt or does
        not fit ``target`` (e.g. another model).
    """
    metadata = load_metadata(path)
    state_dir = _ckpt(path) / "state"
    if not state_dir.is_dir():
        raise CheckpointError(f"checkpoint {path} has metadata but no state directory {state_dir}")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), target)
    try:
        ckptr = _checkpointer()
        state = ckptr.restore(state_dir, abstract)
        ckptr.close()
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(
            f"checkpoint state in {state_dir} could not be restored ({type(e).__name__}: {str(e)[:300]}); "
            "it is corrupt or belongs to another model; retrain it"
        ) from e
    return state, metadata
