"""Batched, jitted comparison metrics between explanations.

All functions take ``[N, ...]`` arrays and return one value per example
(reduced over every non-batch axis). Coordinates excluded by ``mask`` (False)
are left out of both vectors, so a recovered gradient with NaN at
unrecoverable coordinates can be compared on the rest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["normalized_distance", "cosine_similarity", "relative_error", "summarize"]


def _flat(a, mask):
    a = a.reshape(a.shape[0], -1)
    if mask is None:
        return a
    return jnp.where(mask.reshape(a.shape), a, 0)


@jax.jit
def normalized_distance(a: jax.Array, b: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The paper's metric: ``|| a/|a| - b/|b| ||_2`` per example, in [0, 2].

    sqrt(2) is what unrelated (orthogonal) vectors give. A zero vector has no
    direction: its distance is NaN.
    """
    a, b = _flat(a, mask), _flat(b, mask)
    ua = a / jnp.linalg.norm(a, axis=1, keepdims=True)
    ub = b / jnp.linalg.norm(b, axis=1, keepdims=True)
    return jnp.linalg.norm(ua - ub, axis=1)


@jax.jit
def cosine_similarity(a: jax.Array, b: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``<a, b> / (|a| |b|)`` per example."""
    a, b = _flat(a, mask), _flat(b, mask)
    return jnp.sum(a * b, axis=1) / (jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1))


@jax.jit
def relative_error(estimate: jax.Array, truth: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``|estimate - truth| / |truth|`` per example (L2 over the example)."""
    e, t = _flat(estimate, mask), _flat(truth, mask)
    return jnp.linalg.norm(e - t, axis=1) / jnp.linalg.norm(t, axis=1)


def summarize(values) -> dict:
    """Mean, population variance (as the paper), median, max and count of finite values."""
    v = np.asarray(values, np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return {"mean": float("nan"), "var": float("nan"), "median": float("nan"), "max": float("nan"),
                "n": 0, "n_nonfinite": int(v.size)}
    return {
        "mean": float(finite.mean()),
        "var": float(finite.var()),
        "median": float(np.median(finite)),
        "max": float(finite.max()),
        "n": int(finite.size),
        "n_nonfinite": int(v.size - finite.size),
    }
