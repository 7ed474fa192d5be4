"""Boundary Attribution run on a model: BSM / BIG / BSG with each example's boundary point from the search."""

from __future__ import annotations

import jax.numpy as jnp

from ..engine import explain
from ..explainers import Explainer
from .boundary import BoundaryResult

__all__ = ["boundary_attributions"]


def _rows(mask, x):
    return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def boundary_attributions(explainer: Explainer, model, params, x, target, result: BoundaryResult, **kwargs):
    """Run a boundary explainer (``jr.BSM``, ``jr.BIG``, ``jr.BSG``) with each example's boundary point;
    rows whose search failed (``result.success`` False) are NaN. ``kwargs`` go to
    :func:`jaxrecover.engine.explain`."""
    out = explain(explainer, model, params, x, target, baseline=result.point, **kwargs)
    return jnp.where(_rows(result.success, out), out, jnp.nan)
