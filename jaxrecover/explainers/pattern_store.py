"""Fitted PatternNet patterns stored beside a checkpoint (Orbax, atomic), tied to the weights and images.

``fitted_patterns(path, model, variables, images)`` loads the patterns stored in ``path`` when they were fitted
for these weights and these images, and otherwise fits them (:func:`jaxrecover.explainers.fit_patterns`, one
pass) and stores them: a changed input is refitted, never reused. Metadata: the model, SHA-256 of the weights
and of the images, their number.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np

from ..checkpoint import (CheckpointError, checkpoint_exists, load_checkpoint, load_metadata, save_checkpoint,
                         tree_sha256)
from .patterns import ESTIMATORS, fit_patterns
from ..validate import float_dtype

__all__ = ["save_patterns", "load_patterns", "fitted_patterns", "PATTERN_METADATA"]

PATTERN_METADATA = ("kind", "model", "weights_sha256", "images_sha256", "n_images", "version")


def _pattern_key(model, variables, images) -> dict:
    images = np.ascontiguousarray(np.asarray(images))
    return {"kind": "patterns", "model": model.name, "weights_sha256": tree_sha256(variables),
            "images_sha256": hashlib.sha256(f"{images.dtype}{images.shape}".encode() + images.tobytes()).hexdigest(),
            "n_images": int(images.shape[0]), "version": 1}


def _refuse_other_kinds(path) -> None:
    """A clear error when ``path`` holds a checkpoint that is not a pattern store (e.g. a trained model)."""
    if not checkpoint_exists(path):
        return
    try:
        meta = load_metadata(path, required=())
    except CheckpointError:
        return  # a damaged store: refitting replaces it
    if meta.get("kind") != "patterns":
        what = f"a trained {meta['model']!r} model" if "model" in meta else "another kind of checkpoint"
        raise CheckpointError(f"{path} holds {what}, not fitted patterns; store the patterns in another folder "
                              f"(e.g. {path}/patterns) so the model is not overwritten")


def save_patterns(path, patterns, model, variables, images):
    """Store ``patterns`` (Orbax, atomically) under ``path/checkpoint`` with metadata tying them to the weights
    (SHA-256 of ``variables``) and the images they were fitted on (SHA-256 of ``images``).

    Raises:
      CheckpointError: ``path`` holds another kind of checkpoint (a trained model is never overwritten).
    """
    _refuse_other_kinds(path)
    return save_checkpoint(path, jax.device_get(patterns), _pattern_key(model, variables, images),
                           required=PATTERN_METADATA)


def load_patterns(path, model, variables, images=None):
    """The patterns stored by :func:`save_patterns` in ``path``, checked against ``variables`` (and ``images``
    when given).

    Raises:
      jaxrecover.checkpoint.CheckpointError: nothing stored there, damaged files, or patterns fitted for other
        weights or images (refit them with :func:`fit_patterns`).
    """
    meta = load_metadata(path, PATTERN_METADATA)
    key = _pattern_key(model, variables, images if images is not None else np.zeros((0,), np.float32))
    if meta["kind"] != "patterns" or meta["model"] != model.name or meta["weights_sha256"] != key["weights_sha256"]:
        raise CheckpointError(f"the patterns in {path} were fitted for other weights ({meta['model']}, "
                              f"{meta['weights_sha256'][:12]}...); refit them with jaxrecover.fit_patterns")
    if images is not None and meta["images_sha256"] != key["images_sha256"]:
        raise CheckpointError(f"the patterns in {path} were fitted on other images ({meta['n_images']} images, "
                              f"{meta['images_sha256'][:12]}...); refit them with jaxrecover.fit_patterns")
    dtype = float_dtype(variables)
    target = {k: {e: np.zeros(v.shape, dtype) for e in (*ESTIMATORS, "relu_neg")}
              for k, v in model.kernels(variables).items()}
    patterns, _ = load_checkpoint(path, target, required=PATTERN_METADATA)
    return patterns


def fitted_patterns(path, model, variables, images, **fit_kwargs):
    """The patterns of ``model`` for ``images``: loaded from ``path`` when stored there for these weights and
    images, else fitted (:func:`fit_patterns`) and stored (a changed input is refitted, never reused).

    Raises:
      CheckpointError: ``path`` holds another kind of checkpoint, e.g. the model's own (before any fitting).
    """
    _refuse_other_kinds(path)
    try:
        return load_patterns(path, model, variables, images)
    except CheckpointError:
        patterns = fit_patterns(model, variables, images, **fit_kwargs)
        save_patterns(path, patterns, model, variables, images)
        return patterns
