"""Over-determined recovery: many queries whose points all lie on one grid, solved by least squares.

Against answers that are rounded or noisy, one exact plan carries the error of
its few answers times its coefficients. Here every query ``(c, m)`` is chosen
so that all its points ``c a_j`` fall on the grid ``t = k / N`` (k = 0..N); each
answer is then a known linear combination ``T = sum_j w_j g(k_j / N)`` of the
N + 1 unknown gradients on the grid, and the least-squares solution of the
over-determined system gives ``g(1) = g(N / N)`` with the noise averaged over
all answers. It is exact on exact answers (any piecewise-linear net: no
assumption about regions), like the plans. ``amplification`` is the factor
from the answers' independent noise to the error of ``g(1)`` (the same factor
for a plan is the norm of its coefficients).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ..explainers import RULES
from .recovery import query_input
from .result import RecoveryReport, as_recovery

__all__ = ["lattice_queries", "lattice_attack", "LatticeReport"]


@dataclasses.dataclass
class LatticeReport(RecoveryReport):
    """Queries (per example), the system's rank and the noise amplification of ``g(1)``."""

    queries: list[int]
    evaluations: int
    rank: int
    unknowns: int
    amplification: float


def lattice_queries(service, grid: int = 12, max_steps: int = 24):
    """``[(c, m, {k: weight})]``: every query whose points all lie on ``t = k / grid`` (service's actual nodes)."""
    out = []
    # a node on the grid to the service's round-off (float32 services round j/m to float32; their query
    # inputs are float32 anyway)
    tol = 64 * float(np.finfo(np.dtype(service.dtype)).eps) * grid
    for m in range(max(RULES[service.rule].min_steps, 1), max_steps + 1):
        nodes, weights = (np.asarray(v, np.float64) for v in service.quadrature(m))
        top = float(nodes.max())
        if top <= 0:
            continue
        for k_top in range(1, grid + 1):
            c = k_top / grid / top
            ks = nodes * c * grid
            kr = np.round(ks)
            if np.max(np.abs(ks - kr)) > tol or kr.max() > grid:
                continue
            entry: dict[int, float] = {}
            for k, w in zip(kr.astype(int), weights):
                entry[int(k)] = entry.get(int(k), 0.0) + float(w)
            out.append((c, m, entry))
    return out


@as_recovery("lattice least squares")
def lattice_attack(service, x, target, *, grid: int = 12, max_steps: int = 24):
    """Recover VG by least squares over every grid query (see the module docstring).

    Returns ``(vg, mask, report)``. Raises ValueError when the system does not determine ``g(1)``
    (e.g. a rule whose nodes are irrational, such as gausslegendre).
    """
    qs = lattice_queries(service, grid, max_steps)
    if not qs:
        raise ValueError(f"no query of rule {service.rule!r} puts all its points on the grid k/{grid}")
    cols = sorted({k for _, _, e in qs for k in e})
    if grid not in cols:
        raise ValueError(f"no query of rule {service.rule!r} reaches t = 1 on the grid k/{grid}")
    a = np.zeros((len(qs), len(cols)))
    for i, (_, _, e) in enumerate(qs):
        for k, w in e.items():
            a[i, cols.index(k)] = w
    # g(1) is determined iff e_1 lies in the row space of A
    pinv = np.linalg.pinv(a)
    e1 = np.zeros(len(cols))
    e1[cols.index(grid)] = 1.0
    row = e1 @ pinv  # coefficients on the answers
    if np.max(np.abs(row @ a - e1)) > 1e-9:
        raise ValueError(f"the grid queries of {service.rule!r} do not determine g(1); try another grid")
    x = jnp.asarray(x)
    b = None if service.baseline is None else service.fixed_baseline(x)
    total = 0.0
    for coef, (c, m, _) in zip(row, qs):
        xq = query_input(c, x, b)
        ans = np.asarray(service(xq, target, steps=m), np.float64)
        d = np.asarray(xq, np.float64) - (0.0 if b is None else np.asarray(b, np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            total = total + coef * np.where(d != 0, ans / np.where(d != 0, d, 1.0), np.nan)
    mask = np.asarray(x, np.float64) != (0.0 if b is None else np.asarray(b, np.float64))
    evals = sum(int(np.asarray(service.quadrature(m)[0]).size) for _, m, _ in qs)
    rep = LatticeReport([len(qs)] * int(np.shape(x)[0]), evals, int(np.linalg.matrix_rank(a)), len(cols), float(np.linalg.norm(row)))
    return jnp.asarray(np.where(mask, total, np.nan), x.dtype), jnp.asarray(mask), rep
