"""What a BIG service leaks: :func:`estimate_boundary_point` and :func:`recover_from_big` recover VG from it.

(Boundary Attribution run on a model is :func:`jaxrecover.search.boundary_attributions`; BIG as a service is
:class:`jaxrecover.services.BoundaryBaseline`.)

**What BIG leaks.** A BIG service answers IG at ``x`` from ``x'``, the nearest point of the decision boundary, which it searches
itself for every query (:class:`BoundaryBaseline`). Ray plans need the baseline, and two
facts give it to the attacker:

1. **The segment shares it.** Every ``z = x' + c (x - x')``, ``0 < c <= 1``, has ``x'`` as its own nearest
   boundary point (triangle inequality), so the plan's queries on that segment are answered from ``x'``
   (:class:`jaxrecover.attacks.AssumedBaseline` runs any plan as if the baseline were known).
2. **Probes reveal it.** Near ``x`` the nearest point lies on one affine facet ``{u : w.u + b = 0}``, so
   ``x - x' = s w`` with ``s = (w.x + b) / |w|^2``, and a query at ``x + h e_i`` gets the baseline
   ``x' + h e_i - (h w_i / |w|^2) w``: its path points move with it, so while none crosses a ReLU boundary the
   answer is the SAME vector scaled by ``1 + h v_i``, ``v = w / (w.x + b)``. One probe per input coordinate
   reads ``v``, and ``x - x' = v / |v|^2``, exactly (for a piecewise-linear net, up to round-off).

:func:`estimate_boundary_point` is fact 2 (``d + 1`` queries per input of ``d`` coordinates; each probe's answer
must be proportional to the answer at ``x``, which is checked); :func:`recover_from_big` adds fact 1 and the
service's best plan. Both are exact only where the service's search returns the true nearest point: a search
that stops at a farther local point from ``x`` can find another point from a query on the segment.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..services import AssumedBaseline, attack_inputs
from .plans import best_plan
from .recovery import attack
from .result import RecoveryReport, as_recovery

__all__ = ["estimate_boundary_point", "recover_from_big", "BoundaryPointReport"]


@dataclasses.dataclass
class BoundaryPointReport(RecoveryReport):
    """Per input: ``queries`` spent on the estimate, ``misfit`` (the largest relative residual of a probe's
    answer against the scaled answer at ``x``: round-off where every probe stayed in the linear regime)."""

    queries: list[int]
    misfit: list[float]
    points: Any = None  # recover_from_big: the estimated boundary points [N, ...]


def estimate_boundary_point(service, x, target, *, h: float | None = None, progress: bool = False):
    """The nearest boundary point ``x'`` each BIG answer was integrated from, from ``d + 1`` queries per input.

    Args:
      service: an IG service whose baseline is the input's nearest boundary point (a BIG service).
      x: ``[N, ...]`` inputs in the service's dtype; target: ``[N]`` the explained classes.
      h: the probe step (model units; default ``1e-4`` in float64, ``1e-2`` in float32).

    Returns:
      ``(points [N, ...], BoundaryPointReport)``; NaN rows where the answer at ``x`` is zero or not finite.
    """
    x, target = attack_inputs(service, x, target)
    dtype = np.dtype(service.dtype)
    h = h if h is not None else (1e-4 if dtype == np.float64 else 1e-2)
    d = int(np.prod(x.shape[1:]))
    out = np.full(x.shape, np.nan, np.float64)
    report = BoundaryPointReport([], [])
    for i in tqdm(range(x.shape[0]), disable=not progress, desc="boundary point from probes", unit="input"):
        probes = np.repeat(x[i][None], d + 1, axis=0).reshape(d + 1, d)
        probes[1:] += h * np.eye(d, dtype=dtype)
        answers = np.asarray(service(jnp.asarray(probes.reshape((d + 1,) + x.shape[1:]), dtype),
                                     jnp.full((d + 1,), int(target[i]), jnp.int32)), np.float64).reshape(d + 1, d)
        a0, rest = answers[0], answers[1:]
        norm2 = float(a0 @ a0)
        report.queries.append(d + 1)
        if not (np.isfinite(norm2) and norm2 > 0) or not np.all(np.isfinite(rest)):
            report.misfit.append(float("nan"))
            continue
        ratio = rest @ a0 / norm2                       # 1 + h v_i
        fit = rest - ratio[:, None] * a0[None]
        report.misfit.append(float(np.max(np.abs(fit)) / np.max(np.abs(a0))))
        v = (ratio - 1.0) / h
        out[i] = (x[i].reshape(d) - v / (v @ v)).reshape(x.shape[1:])
    return out.astype(dtype), report


@as_recovery("BIG: boundary point, then a plan")
def recover_from_big(service, x, target, *, plan=None, h: float | None = None, progress: bool = False):
    """VG from a BIG service: :func:`estimate_boundary_point`, then ``plan`` (default: the service's
    :func:`best_plan`) on the segment from that point (:class:`AssumedBaseline`). Returns
    a :class:`Recovery` ``(vg, mask, report)`` (the estimated points in ``report.points``); the queries are the estimate's plus the plan's (one per plan query and
    input). A plan whose scales stay near 1 (e.g. ``exact_plan(rule, 50)``: scales 1 and 0.98) keeps its
    queries near ``x``, where the service's search is likelier to find the same point as from ``x``."""
    points, report = estimate_boundary_point(service, x, target, h=h, progress=progress)
    view = AssumedBaseline(service, points)
    vg, mask, _ = attack(view, best_plan(view) if plan is None else plan, jnp.asarray(x), jnp.asarray(target))
    report.points = points
    return vg, mask, report
