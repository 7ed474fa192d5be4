"""Exact recovery when the baseline depends on the input linearly (the blurred input, ``b(z) = B z``).

Ray plans need a fixed baseline: with ``b(z) = B z`` a query at ``b + c (x - b)``
gets the baseline ``B (b + c (x - b))``, not ``b``, and the points of
different queries no longer coincide. What still coincides: for a rule whose
smallest table has exactly two nodes, the top one at 1 (``riemann_right``
{1/2, 1}, trapezoids and PAIR's ``saliency`` {0, 1}), the answer at ``z`` is

    T(z) = A(z) / (z - B z) = w_lo g(M z) + w_hi g(z),     M z = B z + a_lo (z - B z),

so querying the CHAIN ``z_0 = x``, ``z_{k+1} = M z_k`` (the service's own lower
point of the previous query, computed the way the service computes it) gives

    g(x) = sum_{k<K} rho^k T(z_k) / w_hi + rho^K g(z_K),     rho = -w_lo / w_hi.

``M`` averages ``z`` with its blur, so the chain converges to the blur's fixed
points (constant images) and consecutive points end up in one linear region:
there ``T(z_{K-1}) = T(z_K) = (w_lo + w_hi) g(z_K)``, which closes the sum
exactly (accepted once ``confirm`` consecutive answers agree). No step is approximate; the cost is the chain's length (how fast the
blur smooths ``x`` and how far the limit lies from a region boundary).
Coordinates where ``x = B x`` (to round-off) get no information from the first
answer and are masked.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..explainers import RULES, num_evaluations
from ..explainers.baselines import is_input_dependent
from .result import RecoveryReport, as_recovery

__all__ = ["recover_input_baseline", "ChainReport"]


@dataclasses.dataclass
class ChainReport(RecoveryReport):
    """What :func:`recover_input_baseline` spent, per example.

    Attributes:
      queries: IG queries per example (the chain's length).
      evaluations: gradient evaluations the service spent per example.
      closed: whether the chain closed (two consecutive answers equal) within ``max_queries``.
      steps: the step count used for every query.
    """

    queries: list[int]
    evaluations: list[int]
    closed: list[bool]
    steps: int


def _chain_rule(service):
    """``(m, a_lo, w_lo, w_hi)`` of the service's smallest two-node table with its top node at 1."""
    m = max(2, RULES[service.rule].min_steps)
    nodes, weights = (np.asarray(v, np.float64) for v in service.quadrature(m))
    if nodes.size != 2 or nodes.max() != 1.0:
        raise ValueError(f"recover_input_baseline needs a rule whose {m}-step table has two nodes, the top one at 1 "
                         f"(riemann_right, trapezoids, saliency); {service.rule!r} has nodes {nodes.tolist()}")
    lo, hi = int(np.argmin(nodes)), int(np.argmax(nodes))
    return m, float(nodes[lo]), float(weights[lo]), float(weights[hi])


@as_recovery("chain (input-dependent baseline)")
def recover_input_baseline(service, x, target, *, max_queries: int = 2000, tol: float | None = None,
                           confirm: int = 4, progress: bool = False):
    """Recover VG from a service whose baseline is a linear function of the input (e.g. ``BlurBaseline``).

    Args:
      service: an :class:`jaxrecover.attacks.IGService` with a callable linear baseline and a free step count.
      x: ``[N, ...]`` inputs in the service's dtype; target: ``[N]`` classes.
      max_queries: the longest chain per example; examples whose chain has not closed by then are reported
        (``closed`` False) and masked entirely.
      tol: two answers whose difference is below ``tol * max|T|`` count as equal (default sqrt of the
        dtype's eps).
      confirm: how many consecutive answers must equal the previous one before the chain closes (one
        equality is not proof: a max-pool net's chain tends to a constant image, where pooling windows
        tie, and its answers can repeat and then change again).
      progress: a progress bar over the chain.

    Returns:
      ``(vg, mask, report)``: gradients in the service's dtype, the mask of recovered coordinates, and a
      :class:`ChainReport`.
    """
    if not is_input_dependent(service.baseline):
        raise ValueError("this service has a fixed baseline: use best_plan(service) and attack (cheaper)")
    if not getattr(service.baseline, "linear", False):
        raise ValueError(f"the chain needs a LINEAR baseline function b(x) = B x (e.g. BlurBaseline); "
                         f"this service's is {service.baseline}")
    if service.fixed_steps:
        raise ValueError(f"the chain needs the 2-step table but this service fixes m = {service.steps}")
    m, a_lo, w_lo, w_hi = _chain_rule(service)
    x = jnp.asarray(x)
    if x.dtype != service.dtype:
        raise TypeError(f"x is {x.dtype} but the service answers in {service.dtype}; cast x")
    target = jnp.asarray(target).reshape(-1)
    eps = float(np.finfo(np.dtype(x.dtype)).eps)
    rel_tol = tol if tol is not None else float(np.sqrt(eps))
    n = x.shape[0]
    rho = -w_lo / w_hi
    z = x
    total = np.zeros(x.shape, np.float64)
    coef = np.ones(n)                       # rho^k per example
    active = np.ones(n, bool)
    closed = np.zeros(n, bool)
    run = np.zeros(n, int)
    candidate = np.zeros(x.shape, np.float64)
    queries = np.zeros(n, int)
    prev = None
    mask = np.ones(x.shape, bool)
    bar = tqdm(total=max_queries, disable=not progress, desc="baseline chain", unit="query")
    for k in range(max_queries):
        idx = np.flatnonzero(active)
        zb = service.baseline_for(z[idx])
        d = np.asarray(z[idx], np.float64) - np.asarray(zb, np.float64)
        ans = np.asarray(service(z[idx], target[idx], steps=m), np.float64)
        queries[idx] += 1
        small = np.abs(d) <= 64 * eps * np.max(np.abs(np.asarray(z[idx], np.float64)), axis=tuple(range(1, x.ndim)),
                                               keepdims=True)
        t_k = np.where(small, 0.0, ans / np.where(small, 1.0, d))
        mask[idx] &= ~small
        if prev is not None:
            scale = np.maximum(np.max(np.abs(t_k), axis=tuple(range(1, x.ndim))), 1e-300)
            same = np.max(np.abs(t_k - prev[idx]), axis=tuple(range(1, x.ndim))) <= rel_tol * scale
        else:
            same = np.zeros(idx.size, bool)
        # a run of equal answers: g(z_k) = T(z_k) / (w_lo + w_hi) where it began, if it lasts ``confirm`` answers
        for j, i in enumerate(idx):
            if same[j]:
                if run[i] == 0:
                    candidate[i] = total[i] + coef[i] * t_k[j] / (w_lo + w_hi)
                run[i] += 1
                if run[i] >= confirm:
                    total[i], active[i], closed[i] = candidate[i], False, True
                    continue
            else:
                run[i] = 0
            total[i] += coef[i] * t_k[j] / w_hi
            coef[i] *= rho
        # the next point of the chain: the service's lower node of this query, computed as it computes it
        zb_full = jnp.asarray(np.asarray(zb))
        nxt = zb_full + jnp.asarray(a_lo, x.dtype) * (z[idx] - zb_full)
        z = z.at[idx].set(nxt)
        if prev is None:
            prev = np.zeros(x.shape, np.float64)
        prev[idx] = t_k
        bar.update(1)
        bar.set_postfix(open=int(active.sum()), refresh=False)
        if not active.any():
            break
    bar.close()
    mask = mask & closed.reshape((-1,) + (1,) * (x.ndim - 1))
    vg = np.where(mask, total, np.nan)
    evals = [int(q) * num_evaluations(service.rule, m) for q in queries]
    return (jnp.asarray(vg, x.dtype), jnp.asarray(mask),
            ChainReport(queries.tolist(), evals, closed.tolist(), m))
