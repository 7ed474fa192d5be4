"""Batched, jitted comparison metrics between explanations.

All functions take ``[N, ...]`` arrays and return one value per example
(reduced over every non-batch axis). Coordinates excluded by ``mask`` (False)
are left out of both vectors, so a recovered gradient with NaN at
unrecoverable coordinates can be compared on the rest.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["normalized_distance", "cosine_similarity", "relative_error", "spearman", "top_fraction_overlap",
           "summarize"]


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


def _ranks(a):
    """Average ranks (ties share the mean of their positions) along the last axis of ``a[N, D]``, 0-based."""
    order = jnp.argsort(a, axis=-1)
    srt = jnp.take_along_axis(a, order, axis=-1)
    first = jax.vmap(lambda s: jnp.searchsorted(s, s, side="left"))(srt).astype(a.dtype)
    last = jax.vmap(lambda s: jnp.searchsorted(s, s, side="right"))(srt).astype(a.dtype) - 1
    rows = jnp.arange(a.shape[0])[:, None]
    return jnp.zeros_like(a).at[rows, order].set((first + last) / 2)


@jax.jit
def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
    """Spearman rank correlation per example (ties get average ranks; NaN where one side is constant)."""
    ra, rb = _ranks(a.reshape(a.shape[0], -1)), _ranks(b.reshape(b.shape[0], -1))
    ra, rb = ra - ra.mean(axis=1, keepdims=True), rb - rb.mean(axis=1, keepdims=True)
    return jnp.sum(ra * rb, axis=1) / (jnp.linalg.norm(ra, axis=1) * jnp.linalg.norm(rb, axis=1))


@functools.partial(jax.jit, static_argnames=("fraction",))
def top_fraction_overlap(a: jax.Array, b: jax.Array, fraction: float = 0.1) -> jax.Array:
    """Share of the top ``fraction`` coordinates by magnitude of ``b`` that are also top in ``a``, per example."""
    a, b = jnp.abs(a.reshape(a.shape[0], -1)), jnp.abs(b.reshape(b.shape[0], -1))
    k = max(1, int(round(fraction * a.shape[1])))
    top_a = jax.lax.top_k(a, k)[1]
    top_b = jax.lax.top_k(b, k)[1]
    hit = jnp.any(top_a[:, :, None] == top_b[:, None, :], axis=2)
    return jnp.mean(hit.astype(a.dtype), axis=1)


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
