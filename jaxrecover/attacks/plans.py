"""Query plans: which IG answers to ask for, and how they combine into the Vanilla Gradient.

The paper's formulas (x' = 0) are plans: eq. (2) is :func:`nobias_plan`, eq. (3)
:func:`approx_plan`, eq. (4) :func:`paper_plan`. Generalised to every rule of
:data:`jaxrecover.explainers.RULES` and to a
baseline ``b`` known to the attacker: an answer to the query ``(x_q, n_q)``
with ``x_q = b + c_q (x - b)``, divided by ``x_q - b``, is

    T_q = sum_j w_j(n_q) grad f(b + c_q a_j(n_q) (x - b)),

a weighted sum of gradients at the points ``t = c_q a_j`` of the ray from b
through x. A :class:`QueryPlan` lists the queries ``(c_q, n_q)`` and
coefficients ``lambda_q`` with ``sum_q lambda_q T_q = grad f(x)`` (``t = 1``)
as an identity of the quadrature sums; the derivations are in
``docs/RECOVERY.md`` and :func:`plan_residual` checks any plan numerically.
Plans are pure data (hashable, static under ``jax.jit``);
:mod:`jaxrecover.attacks.recovery` applies them.
"""

from __future__ import annotations

import dataclasses
import functools
from fractions import Fraction

import numpy as np

from ..explainers import RULES, get_rule, num_evaluations, quadrature

__all__ = [
    "Query",
    "QueryPlan",
    "exact_plan",
    "minimal_plan",
    "nobias_plan",
    "approx_plan",
    "paper_plan",
    "plan_residual",
    "plan_measure",
]


@dataclasses.dataclass(frozen=True)
class Query:
    """One IG query: input ``b + scale (x - b)`` answered with ``steps`` steps."""

    scale: float
    steps: int


@dataclasses.dataclass(frozen=True)
class QueryPlan:
    """Which IG answers to ask for and how to combine them into ``grad f(x)``.

    Attributes:
      rule: the service's quadrature rule.
      queries: the queries, in order.
      coeffs: ``lambda_q`` applied to ``T_q = IG_q / (x_q - b)``.
      exact: True when ``sum lambda_q T_q = grad f(x)`` is an identity of the
        quadrature sums (any f, any baseline); False for approximations.
      name: a short label.
      assumption: what must hold for the plan to be right (``""`` for none).
    """

    rule: str
    queries: tuple[Query, ...]
    coeffs: tuple[float, ...]
    exact: bool
    name: str
    assumption: str = ""

    @property
    def evaluations(self) -> int:
        """Gradient evaluations the service spends answering the plan."""
        return sum(num_evaluations(self.rule, q.steps) for q in self.queries)

    def __str__(self) -> str:
        qs = ", ".join(f"{lam:+.6g}*T(c={q.scale:.6g}, n={q.steps})" for q, lam in zip(self.queries, self.coeffs))
        return f"{self.name}[{self.rule}]: grad f(x) = {qs}"


def _plan(rule, pairs, name, exact=True, assumption=""):
    """Build a plan from ``[(scale, steps, coeff), ...]``, merging equal queries."""
    merged: dict[tuple[Fraction, int], Fraction] = {}
    order = []
    for c, n, lam in pairs:
        key = (Fraction(c).limit_denominator(10**9), int(n))
        if key not in merged:
            order.append(key)
            merged[key] = Fraction(0)
        merged[key] += Fraction(lam).limit_denominator(10**12)
    keep = [k for k in order if merged[k] != 0]
    min_steps = RULES[rule].min_steps
    for c, n in keep:
        if n < min_steps or c <= 0:
            raise ValueError(f"plan {name} for {rule} needs steps >= {min_steps} and scale > 0, got ({c}, {n})")
    return QueryPlan(rule, tuple(Query(float(c), n) for c, n in keep), tuple(float(merged[k]) for k in keep),
                     exact, name, assumption)


def exact_plan(rule: str, steps: int = 50) -> QueryPlan:
    """An exact plan whose first query is the service's default step count ``steps``.

    It needs the attacker to choose the step count of the other queries (the
    paper's eq. 4 is ``exact_plan("riemann_right", m)``). For ``gausslegendre``
    the first query is of no use: the plan is the single query ``(c=2, n=1)``.

    Raises:
      ValueError: no exact plan of this form for so few steps (see ``docs/RECOVERY.md``).
    """
    get_rule(rule)
    m = int(steps)
    F = Fraction
    if rule == "gausslegendre":
        return _plan(rule, [(2, 1, 1)], "gl-midpoint")
    need = {"ig_original": 2, "saliency": 2}.get(rule, 3)
    if m < need:
        raise ValueError(f"exact_plan({rule!r}) needs steps >= {need}, got {m}")
    if rule == "riemann_right":
        pairs = [(1, m, m), (F(m - 1, m), m - 1, -(m - 1))]
    elif rule == "riemann_left":
        pairs = [(F(m, m - 1), m, m), (1, m - 1, -(m - 1))]
    elif rule == "riemann_middle":
        pairs = [(F(2 * m, 2 * m - 1), m, m), (F(2 * m - 2, 2 * m - 1), m - 1, -(m - 1))]
    elif rule == "saliency":
        pairs = [(1, m, m), (F(m - 2, m - 1) if m > 2 else 1, m - 1, -(m - 1))]
    elif rule in ("riemann_trapezoid", "trapezoid"):
        r = F(m - 2, m - 1)
        s = 1 if rule == "trapezoid" else 0  # trapezoid's T is n/(n-1) times Captum's
        pairs = [(1, m, m - s), (r, m - 1, -(m - 1 - s)), (1, 2, 2 - s), (r, 2, -(2 - s))]
    elif rule == "ig_original":
        r = F(m - 1, m)
        pairs = [(1, m, m), (r, m - 1, -(m - 1)), (1, 1, 1), (r, 1, -1)]
    else:  # pragma: no cover - RULES and this table move together
        raise NotImplementedError(rule)
    return _plan(rule, pairs, f"paired-m{m}")


def paper_plan(steps: int = 50) -> QueryPlan:
    """The paper's eq. (4) as a plan: ``exact_plan("riemann_right", steps)``."""
    return exact_plan("riemann_right", steps)


@functools.lru_cache(maxsize=None)
def minimal_plan(rule: str) -> QueryPlan:
    """The exact plan with the fewest gradient evaluations, step counts free.

    Searches :func:`exact_plan` over the first query's step count (2..64).
    """
    get_rule(rule)
    best = None
    for m in range(2, 65):
        try:
            p = exact_plan(rule, m)
        except ValueError:
            continue
        if best is None or p.evaluations < best.evaluations:
            best = p
    return dataclasses.replace(best, name="minimal")


def nobias_plan(rule: str, steps: int = 50) -> QueryPlan:
    """Eq. (2) generalised: one query, for positively homogeneous nets and a zero baseline.

    For a ReLU net without biases ``grad f(t x) = grad f(x)`` for ``t > 0`` and
    autodiff gives ``grad f(0) = 0`` (ReLU'(0) = 0 in JAX and PyTorch), so
    ``IG(x)/x = W+ grad f(x)`` with ``W+`` the weight on nodes ``a_i > 0``.
    """
    nodes, weights = quadrature(rule, steps)
    w_pos = float(weights[nodes > 0].sum())
    return _plan(rule, [(1, steps, Fraction(1) / Fraction(w_pos).limit_denominator(10**12))], f"nobias-m{steps}",
                 exact=False, assumption="no-bias ReLU net (positively homogeneous), zero baseline, grad f(0) = 0")


def approx_plan(rule: str, steps: int = 50, a: float = 0.98) -> QueryPlan:
    """Eq. (3) generalised: two queries at x and a*x with the SAME step count.

    With a fixed step count no exact plan exists for any rule with two or more
    positive nodes (``docs/RECOVERY.md``, "fixed step counts"); this plan is
    right when ``f`` is linear on the segment between ``b + a (x - b)`` and ``x``
    and the integral is exact, and its error is what the experiments measure.
    Divides by the rule's weight sum, so Captum's trapezoid is not off by
    ``(n-1)/n``.
    """
    if not 0 < a < 1:
        raise ValueError(f"a must lie in (0, 1), got {a}")
    w = float(quadrature(rule, steps)[1].sum())
    lam = 1.0 / ((1.0 - a) * w)
    return QueryPlan(rule, (Query(1.0, steps), Query(float(a), steps)), (lam, -a * lam), False, f"eq3-a{a:g}",
                     "f linear between b + a (x - b) and x, and quadrature error negligible")


def plan_measure(plan: QueryPlan, tol: float = 1e-9) -> list[tuple[float, float]]:
    """The combined weight ``sum_q lambda_q w_j`` at each distinct point ``t = c_q a_j``.

    An exact plan has weight 1 at ``t = 1`` and 0 everywhere else.
    """
    pts, wts = [], []
    for q, lam in zip(plan.queries, plan.coeffs):
        nodes, weights = quadrature(plan.rule, q.steps)
        pts.append(q.scale * nodes)
        wts.append(lam * weights)
    pts, wts = np.concatenate(pts), np.concatenate(wts)
    order = np.argsort(pts, kind="stable")
    pts, wts = pts[order], wts[order]
    out: list[tuple[float, float]] = []
    for t, w in zip(pts, wts):
        if out and abs(t - out[-1][0]) <= tol * max(1.0, abs(t)):
            out[-1] = (out[-1][0], out[-1][1] + w)
        else:
            out.append((float(t), float(w)))
    return out


def plan_residual(plan: QueryPlan) -> float:
    """``max_t |combined weight(t) - [t == 1]|``: 0 (to round-off) for an exact plan."""
    res = 0.0
    for t, w in plan_measure(plan):
        res = max(res, abs(w - (1.0 if abs(t - 1.0) <= 1e-9 else 0.0)))
    if not any(abs(t - 1.0) <= 1e-9 for t, _ in plan_measure(plan)):
        res = max(res, 1.0)
    return res
