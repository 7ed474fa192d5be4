"""VG from the output values a deployed service reports beside each explanation: finite differences.

Deployed IG services report ``f(x)`` with every explanation (Vertex AI's
``instanceOutputValue``). For a piecewise-linear net (ReLU, max-pool,
BatchNorm in inference) ``f`` is linear on the region around ``x``, so

    g_i = (f(x + h e_i) - f(x)) / h        exactly, when no region boundary lies within h of x along e_i,

up to the round-off of the reported values (about ``eps |f| / h``). Each
reported value costs one explanation query, whatever the step count: this
attack ignores the attributions, so a fixed step count does not slow it.
Both one-sided differences are taken (``2 d + 1`` queries for ``d`` input
coordinates); where they disagree a boundary lies within ``h`` and that
coordinate is retried with ``h / 16`` (up to ``retries`` times). Unlike the
IG-based recoveries it also gives the coordinates where ``x`` equals the
baseline.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..services import attack_inputs
from .result import RecoveryReport, as_recovery

__all__ = ["recover_from_outputs", "OutputsReport", "output_values"]


@dataclasses.dataclass
class OutputsReport(RecoveryReport):
    """What :func:`recover_from_outputs` spent, per example.

    Attributes:
      queries: explanation queries spent (one per reported output value).
      retried: coordinates whose two one-sided differences disagreed at the first ``h``.
      unresolved: coordinates that still disagreed after every retry (their mean is returned, mask False).
    """

    queries: list[int]
    retried: list[int]
    unresolved: list[int]


def output_values(service, z, target):
    """``f(z)`` for each row of ``z``, as a deployed service returns it with an explanation (one query each)."""
    service.charge(int(z.shape[0]))  # the explanations the values come with: counted, budget enforced
    fz, _ = service.outputs(z, target)
    return np.asarray(fz, np.float64)


@as_recovery("finite differences of outputs")
def recover_from_outputs(service, x, target, *, h: float | None = None, tol: float | None = None,
                         retries: int = 3, chunk: int = 512, progress: bool = False):
    """Recover VG from the output values reported with explanations (finite differences; any step policy).

    Args:
      service: an :class:`jaxrecover.attacks.IGService` that implements ``outputs``.
      x: ``[N, ...]`` inputs in the service's dtype; target: ``[N]`` classes.
      h: the first step (default ``2**-8`` float64, ``2**-4`` float32; inputs are O(1)): large steps cut the
        round-off ``eps |f| / h``, and a boundary within ``h`` is caught by the two differences disagreeing.
      tol: the largest disagreement of the two one-sided differences, relative to
        ``max |g|``, that still counts as agreement (default ``64 eps max(|f|, 1) / (h max|g|)``: round-off).
      retries: how many times a disagreeing coordinate is retried with ``h / 16``.
      chunk: queries per service call.
      progress: a progress bar over the examples.

    Returns:
      ``(vg, mask, report)``: gradients ``[N, ...]`` in the service's dtype, the mask of coordinates whose
      two differences agreed, and an :class:`OutputsReport`.
    """
    x, target = attack_inputs(service, x, target)
    eps = float(np.finfo(x.dtype).eps)
    h0 = h if h is not None else (2.0 ** -8 if eps < 1e-10 else 2.0 ** -4)
    d = int(np.prod(x.shape[1:]))
    out = np.empty((x.shape[0], d), np.float64)
    mask = np.ones((x.shape[0], d), bool)
    rep = OutputsReport([], [], [])
    for i in tqdm(range(x.shape[0]), disable=not progress, desc="finite differences", unit="example"):
        q0 = service.queries
        xi = x[i].reshape(-1)

        def diffs(coords, step):
            """Forward and backward differences of f along ``e_k`` for ``k`` in ``coords``."""
            n = coords.size
            pts = np.repeat(xi[None], 2 * n, axis=0)
            pts[np.arange(n), coords] = xi[coords] + step
            pts[n + np.arange(n), coords] = xi[coords] - step
            actual = pts[np.arange(2 * n), np.concatenate([coords, coords])].astype(np.float64) \
                - xi[np.concatenate([coords, coords])].astype(np.float64)  # the steps after rounding
            vals = np.concatenate([
                output_values(service, jnp.asarray(pts[k:k + chunk].reshape((-1,) + x.shape[1:])),
                        jnp.full((min(chunk, 2 * n - k),), target[i])) for k in range(0, 2 * n, chunk)])
            slopes = (vals - f0) / actual
            return slopes[:n], slopes[n:]

        f0 = output_values(service, jnp.asarray(x[i:i + 1]), jnp.asarray(target[i:i + 1]))[0]
        coords, step, retried = np.arange(d), h0, 0
        g = np.zeros(d)
        for attempt in range(retries + 1):
            fwd, bwd = diffs(coords, step)
            g[coords] = 0.5 * (fwd + bwd)
            scale = max(float(np.max(np.abs(g))), 1e-300)
            tol_i = tol if tol is not None else 64 * eps * max(abs(f0), 1.0) / (step * scale)
            bad = np.abs(fwd - bwd) > tol_i * scale
            if attempt == 0:
                retried = int(bad.sum())
            coords, step = coords[bad], step / 16
            if coords.size == 0:
                break
        mask[i, coords] = False
        out[i] = g
        rep.queries.append(service.queries - q0)
        rep.retried.append(retried)
        rep.unresolved.append(int(coords.size))
    return (jnp.asarray(out.reshape(x.shape), x.dtype), jnp.asarray(mask.reshape(x.shape)), rep)
