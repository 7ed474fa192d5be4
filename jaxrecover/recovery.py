"""Recovering the Vanilla Gradient from Integrated Gradients answers.

The paper's formulas (x' = 0), as jit-compiled pure transforms:

* :func:`recover_eq2` - no-bias nets, one query: ``VG = IG(x) / x``.
* :func:`recover_eq3` - two queries at x and a*x: ``VG = (IG(x) - IG(ax)) / ((1-a) x)``.
* :func:`recover_eq4` - two step counts: ``VG = m (IG_m(x) - IG_{m-1}((m-1)/m x)) / x``.

Generalised to every rule of :data:`jaxrecover.attribution.RULES` and to a
baseline ``b`` known to the attacker: an answer to the query ``(x_q, n_q)``
with ``x_q = b + c_q (x - b)``, divided by ``x_q - b``, is

    T_q = sum_j w_j(n_q) grad f(b + c_q a_j(n_q) (x - b)),

a weighted sum of gradients at the points ``t = c_q a_j`` of the ray from b
through x. A :class:`QueryPlan` lists the queries ``(c_q, n_q)`` and
coefficients ``lambda_q`` with ``sum_q lambda_q T_q = grad f(x)`` (``t = 1``)
as an identity of the quadrature sums; the derivations are in
``docs/RECOVERY.md`` and :func:`plan_residual` checks any plan numerically.

Coordinates where ``x_i == b_i`` carry no information (every answer is 0
there): recovery returns NaN there and a boolean mask of valid coordinates,
never inf and never a silent number.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from .attribution import RULES, _rule, attribute, num_evaluations, quadrature

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
    "recover",
    "recover_eq2",
    "recover_eq3",
    "recover_eq4",
    "query_inputs",
    "attack",
    "ig_oracle",
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
    _rule(rule)
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
    _rule(rule)
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


# --------------------------------------------------------------------------- applying plans


def query_inputs(plan: QueryPlan, x: jax.Array, baseline: jax.Array | None = None) -> list[jax.Array]:
    """The inputs ``b + c_q (x - b)`` the attacker sends, one per query (dtype of ``x``)."""
    b = jnp.zeros_like(x) if baseline is None else baseline
    return [b + jnp.asarray(q.scale, x.dtype) * (x - b) for q in plan.queries]


def _safe_divide(num, den):
    mask = den != 0
    return jnp.where(mask, num / jnp.where(mask, den, 1), jnp.nan), mask


@functools.partial(jax.jit, static_argnames=("plan",))
def recover(plan: QueryPlan, answers: Sequence[jax.Array], x: jax.Array, baseline: jax.Array | None = None):
    """Combine IG answers into the recovered VG: ``sum_q lambda_q IG_q / (x_q - b)``.

    Args:
      plan: the plan whose queries ``answers`` answer, in order.
      answers: one IG answer per query, each shaped like ``x`` (any batch shape).
      x: the attacked input(s); baseline: the service's baseline (default zeros).

    Returns:
      ``(vg, mask)``: the recovered gradient (NaN where ``x_i == b_i``) and the
      boolean mask of recoverable coordinates.
    """
    if len(answers) != len(plan.queries):
        raise ValueError(f"plan {plan.name} has {len(plan.queries)} queries but {len(answers)} answers were given")
    b = jnp.zeros_like(x) if baseline is None else baseline
    total = jnp.zeros_like(x)
    mask = (x - b) != 0
    for x_q, ans, lam in zip(query_inputs(plan, x, b), answers, plan.coeffs):
        d_q = x_q - b
        total = total + jnp.asarray(lam, x.dtype) * (ans / jnp.where(d_q != 0, d_q, 1))
        mask = mask & (d_q != 0)
    return jnp.where(mask, total, jnp.nan), mask


@jax.jit
def recover_eq2(ig: jax.Array, x: jax.Array):
    """Eq. (2), no-bias nets: ``VG = IG(x) / x``. Returns ``(vg, mask)``."""
    return _safe_divide(ig, x)


@jax.jit
def recover_eq3(ig_x: jax.Array, ig_ax: jax.Array, x: jax.Array, a: float):
    """Eq. (3): ``VG = (IG(x) - IG(a x)) / ((1 - a) x)``. Returns ``(vg, mask)``."""
    return _safe_divide(ig_x - ig_ax, (1 - a) * x)


@functools.partial(jax.jit, static_argnames=("m",))
def recover_eq4(ig_m: jax.Array, ig_m1: jax.Array, x: jax.Array, m: int):
    """Eq. (4): ``VG = m (IG_m(x) - IG_{m-1}((m-1)/m x)) / x``. Returns ``(vg, mask)``."""
    return _safe_divide(m * (ig_m - ig_m1), x)


# --------------------------------------------------------------------------- attack helpers

Oracle = Callable[[jax.Array, int], jax.Array]


def ig_oracle(logit_fn, params, target, *, rule: str = "riemann_right", baseline=None, output: str = "logit",
              chunk_size: int | str | None = "auto") -> Oracle:
    """A simulated IG service: ``oracle(x_batch, steps) -> IG answers`` for fixed targets."""

    def oracle(xq, steps):
        return attribute(logit_fn, params, xq, target, method="ig", steps=steps, rule=rule, baseline=baseline,
                         output=output, chunk_size=chunk_size)

    return oracle


def attack(oracle: Oracle, plan: QueryPlan, x: jax.Array, baseline: jax.Array | None = None):
    """Ask ``oracle`` the plan's queries about ``x`` and recover ``(vg, mask)``."""
    answers = [oracle(xq, q.steps) for xq, q in zip(query_inputs(plan, x, baseline), plan.queries)]
    return recover(plan, answers, x, baseline)
