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


# ---------------------------------------------------------------------------------------------------------------
# Service-aware plans: exact on the nodes and weights a service ACTUALLY uses
# ---------------------------------------------------------------------------------------------------------------

#: Two points of a plan count as one when they agree to this many float64 ulps (the round-off of the query input
#: ``b + c (x - b)`` itself); float32-rounded nodes that should coincide are ~1e8 ulps apart and are rejected.
COINCIDENCE_ULPS = 16


def _same_point(t1: float, t2: float, eps: float = float(np.finfo(np.float64).eps)) -> bool:
    return abs(t1 - t2) <= COINCIDENCE_ULPS * eps * max(abs(t1), abs(t2), 1e-300)


def realise_plan(plan: QueryPlan, quad, name: str | None = None, dtype=np.float64) -> QueryPlan | None:
    """``plan`` re-solved on the nodes and weights ``quad(steps) -> (nodes, weights)`` a service really uses.

    Keeps the plan's queries and step counts; moves each query's scale so that
    the points the ideal plan makes coincide still coincide on the actual
    nodes (to :data:`COINCIDENCE_ULPS`), then solves the coefficients from the
    actual weights by least squares. Returns None when the actual nodes cannot
    keep the ideal coincidences with one scale per query (e.g. Captum's float32
    ``linspace`` for most step counts) or the solve leaves a residual.
    ``dtype``: points count as one within :data:`COINCIDENCE_ULPS` ulps of
    this dtype (float32 for a float32 service, whose query inputs are rounded
    to float32 anyway).
    """
    eps = float(np.finfo(dtype).eps)
    same = functools.partial(_same_point, eps=eps)
    qs = plan.queries
    ideal = [np.asarray(quadrature(plan.rule, q.steps)[0]) * q.scale for q in qs]
    actual = [np.asarray(quad(q.steps)[0], np.float64) for q in qs]
    weights = [np.asarray(quad(q.steps)[1], np.float64) for q in qs]
    # which ideal points coincide (between queries), and where t = 1 sits
    edges = []
    anchor = None
    for q in range(len(qs)):
        for j, t in enumerate(ideal[q]):
            if anchor is None and abs(t - 1.0) <= 1e-12 and actual[q][j] != 0:
                anchor = (q, j)
            for r in range(q + 1, len(qs)):
                for k, u in enumerate(ideal[r]):
                    if abs(t - u) <= 1e-12 * max(1.0, abs(t)) and t != 0:
                        edges.append((q, j, r, k))
    if anchor is None:
        return None
    scale = [None] * len(qs)
    scale[anchor[0]] = 1.0 / actual[anchor[0]][anchor[1]]
    changed = True
    while changed:  # propagate scales along coincidences (a spanning forest suffices)
        changed = False
        for q, j, r, k in edges:
            for a, i, b, l in ((q, j, r, k), (r, k, q, j)):
                if scale[a] is not None and scale[b] is None and actual[b][l] != 0:
                    scale[b] = scale[a] * actual[a][i] / actual[b][l]
                    changed = True
    if any(s is None for s in scale):
        return None
    pts = [scale[q] * actual[q] for q in range(len(qs))]
    for q, j, r, k in edges:
        if not same(pts[q][j], pts[r][k]):
            return None
    # group the actual points and solve sum_q lam_q w_q(t) = [t == 1] at every distinct point
    flat = sorted((float(t), q, float(w)) for q in range(len(qs)) for t, w in zip(pts[q], weights[q]))
    groups: list[list] = []
    for t, q, w in flat:
        if groups and same(groups[-1][0], t):
            groups[-1][1].append((q, w))
        else:
            groups.append([t, [(q, w)]])
    a_mat = np.zeros((len(groups), len(qs)))
    rhs = np.zeros(len(groups))
    for g, (t, members) in enumerate(groups):
        for q, w in members:
            a_mat[g, q] += w
        rhs[g] = 1.0 if same(t, 1.0) else 0.0
    lam, *_ = np.linalg.lstsq(a_mat, rhs, rcond=None)
    if np.max(np.abs(a_mat @ lam - rhs)) > 1e-12:
        return None
    queries = tuple(Query(float(s), q.steps) for s, q in zip(scale, qs))
    return QueryPlan(plan.rule, queries, tuple(float(v) for v in lam), True, name or f"{plan.name}@service",
                     "the service's actual nodes and weights")


def bitwise_shared(plan: QueryPlan, quad, dtype=np.float64, baseline=None, samples: int = 4096, seed: int = 0) -> bool:
    """Whether the points the plan shares between queries are BIT-identical in a service's arithmetic.

    A service evaluates ``p = b + a (x_q - b)`` with ``x_q = b + c (x - b)`` (the
    attacker's query), all in ``dtype`` (Captum, PAIR and this library's IG
    compute their points so). Points that coincide only to an ulp are different
    inputs to the model: where the model's own round-off breaks ties (PyTorch's
    convolutions make equal patches differ by an ulp, so max-pool windows on a
    constant background pick by round-off) their gradients differ, and the plan
    fails. Checked on ``samples`` random inputs (and the baseline), so it is
    evidence, not proof; dyadic relations between scales and nodes pass for every input.
    """
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(samples) * np.exp(rng.uniform(-3, 3, samples))).astype(dtype)
    b = np.zeros(samples, dtype) if baseline is None else np.resize(np.asarray(baseline, dtype).ravel(), samples)
    pts = []
    for q in plan.queries:
        xq = b + dtype.type(q.scale) * (x - b)
        nodes = np.asarray(quad(q.steps)[0], np.float64)
        pts.append([(float(a) * q.scale, b + dtype.type(a) * (xq - b)) for a in nodes])
    for i in range(len(pts)):
        for j in range(i + 1, len(pts)):
            for t1, p1 in pts[i]:
                for t2, p2 in pts[j]:
                    if _same_point(t1, t2, eps=1e-6) and not np.array_equal(p1, p2):
                        return False
    return True


def actual_measure(plan: QueryPlan, quad) -> list[tuple[float, float]]:
    """:func:`plan_measure` on the service's actual nodes and weights ``quad(steps)`` (no tolerance
    beyond :data:`COINCIDENCE_ULPS`): what the plan really combines."""
    flat = []
    for q, lam in zip(plan.queries, plan.coeffs):
        nodes, weights = quad(q.steps)
        flat += [(float(q.scale * t), float(lam * w)) for t, w in zip(nodes, weights)]
    flat.sort()
    out: list[tuple[float, float]] = []
    for t, w in flat:
        if out and _same_point(out[-1][0], t):
            out[-1] = (out[-1][0], out[-1][1] + w)
        else:
            out.append((t, w))
    return out


def actual_residual(plan: QueryPlan, quad) -> float:
    """``max_t |combined weight(t) - [t == 1]|`` on the actual nodes and weights; also counts split points."""
    meas = actual_measure(plan, quad)
    res = max((abs(w - (1.0 if _same_point(t, 1.0) else 0.0)) for t, w in meas), default=1.0)
    return res if any(_same_point(t, 1.0) for t, _ in meas) else max(res, 1.0)


def telescoping_plan(rule: str, quad=None, tau: float = 1e-12) -> QueryPlan:
    """Exact up to the baseline's neighbourhood, on any rule whose 2-step table has exact nodes.

    With two positive nodes ``a < b`` (weights ``w_a, w_b``; a node at 0 with
    weight ``w_0`` sees the gradient at the baseline), queries at scales
    ``c_i = (a/b)^i / b`` give ``T_i = w_0 g_b + w_a g(s_{i+1}) + w_b g(s_i)``
    with ``s_i = (a/b)^i``; unrolled, ``g(1)`` is a finite signed sum of them
    plus ``g`` at ``s_k <= tau``. That last term is read from one more query
    whose points all lie below ``tau``: right when no linear-region boundary
    crosses the ray within ``t < tau`` of the baseline (and the gradient at the
    baseline equals the one just beside it). Used where one scale per query
    cannot keep an exact plan's coincidences on the service's nodes (Captum's
    ``riemann_middle``: float32 ``linspace`` nodes for every odd step count).

    ``tau`` trades queries (``log(tau) / log(a/b)``, 27 for Captum's middle rule
    at the default) for safety: with a zero baseline, a hidden unit whose bias
    is tiny puts a boundary at ``t = -bias / (w . x)``; trained MNIST nets have
    such units (twolayer: one at ``t ~ 5e-7`` on 3 of 64 test images, which
    broke ``tau = 1e-6``).
    """
    get_rule(rule)
    quad = quad or (lambda n: quadrature(rule, n))
    n = max(2, RULES[rule].min_steps)
    nodes, weights = (np.asarray(v, np.float64) for v in quad(n))
    pos = nodes > 0
    if pos.sum() != 2:
        raise ValueError(f"telescoping_plan needs two positive nodes at {n} steps, {rule} has {int(pos.sum())}")
    (a, b), (w_a, w_b) = nodes[pos], weights[pos]
    w_0 = float(weights[~pos].sum())
    total = float(weights.sum())
    rho, k = -w_a / w_b, int(np.ceil(np.log(tau) / np.log(a / b)))
    queries = [Query(float((a / b) ** i / b), n) for i in range(k + 1)]
    coeffs = [rho ** i / w_b for i in range(k)]
    coeffs.append((rho ** k - (w_0 / w_b) * sum(rho ** i for i in range(k))) / total)
    return QueryPlan(rule, tuple(queries), tuple(float(c) for c in coeffs), False, f"telescoping-{k + 1}q",
                     f"no linear-region boundary on the ray within t < {tau:.2g} of the baseline")


def _is_power_of_two(r: Fraction) -> bool:
    return r > 0 and r.numerator & (r.numerator - 1) == 0 and r.denominator & (r.denominator - 1) == 0


def _weight_system(cols, idx):
    """``(A, e)``: ``A[p, j]`` the weight column ``idx[j]`` puts on point ``p``, ``e`` 1 at ``t = 1`` (key 1)."""
    keys = sorted({k for i in idx for k in cols[i]}, key=str)
    row = {k: r for r, k in enumerate(keys)}
    a_mat = np.zeros((len(keys), len(idx)))
    for j, i in enumerate(idx):
        for k, w in cols[i].items():
            a_mat[row[k], j] = w
    rhs = np.zeros(len(keys))
    rhs[row[Fraction(1)]] = 1.0
    return a_mat, rhs


def _l1_support(cols, idx, costs):
    """Columns of the basic solution of ``min sum cost |lambda|`` s.t. weight 1 at ``t = 1``, 0 elsewhere (an LP)."""
    from scipy.optimize import linprog

    a_mat, rhs = _weight_system(cols, idx)
    c = np.asarray(costs, np.float64)
    res = linprog(np.concatenate([c, c]), A_eq=np.hstack([a_mat, -a_mat]), b_eq=rhs, bounds=(0, None),
                  method="highs")
    if not res.success:
        return None
    lam = res.x[:len(idx)] - res.x[len(idx):]
    return [i for i, v in zip(idx, lam) if abs(v) > 1e-12]


def bitwise_plan(rule: str, quad=None, max_steps: int = 8, odd_factors=(1, 3, 5, 7),
                 exponents=range(-3, 5)) -> QueryPlan | None:
    """A cheapest exact plan whose shared points are bit-identical by construction, or None.

    A service evaluates the point ``a * x_q`` with ``x_q = fl(c x)`` (zero
    baseline): ONE rounding of ``(a c) x`` when the scale ``c`` or the node ``a``
    is a power of two, so two such points with equal ``a c`` are the same
    float64 vector for every ``x``; any other point is rounded twice and is
    shared by no other query. Searches the queries ``(c, n)`` with
    ``c = (p / q) 2^e`` (``p, q`` in ``odd_factors``, ``e`` in ``exponents``) and ``n <= max_steps``
    on the nodes and weights ``quad(n)`` (default: the rule's ideal ones), for
    coefficients giving weight 1 at ``t = 1`` and 0 at every other point: the
    support of the cost-weighted L1 solution (a linear programme), then of greedy
    removals (most gradient evaluations first; large, small or far-from-1 scales
    first), the cheapest kept.

    This finds plans the paired plans miss: Captum's ``riemann_left`` (no
    paired plan shares its points bit-identically) has ``g(x) = T(2, 2) +
    2 T(4, 4) - T(4, 2) - T(6, 2)`` (10 evaluations; ``fl(0.75 * 4x) = fl(3x) =
    0.5 * fl(6x)``). ``riemann_middle`` has none, whatever the search space: the
    LARGEST point of a plan must be ``x`` itself (a largest point is another
    query's only if both have the same top node and scale), it is its query's
    top node ``(2n - 1) / (2n)``, never a power of two, so its scale
    ``2n / (2n - 1)`` is not one either and ``fl(a fl(c x)) != x`` in general.
    Bit-identity with a non-zero baseline is not implied: check with :func:`bitwise_shared`.
    """
    get_rule(rule)
    quad = quad or (lambda n: quadrature(rule, n))
    scales = sorted({Fraction(o, q) * Fraction(2) ** e for o in odd_factors for q in odd_factors for e in exponents})
    cols: list[dict] = []
    queries: list[tuple[Fraction, int]] = []
    for n in range(RULES[rule].min_steps, max_steps + 1):
        nodes, weights = (np.asarray(v, np.float64) for v in quad(n))
        for c in scales:
            col: dict = {}
            for a, w in zip(nodes, weights):
                fa = Fraction(float(a))
                key = Fraction(0) if fa == 0 else (c * fa if _is_power_of_two(c) or _is_power_of_two(fa)
                                                   else ("twice", c, fa))
                col[key] = col.get(key, 0.0) + float(w)
            if Fraction(1) in col or any(isinstance(k, Fraction) for k in col):
                cols.append(col)
                queries.append((c, n))
    # a point no other candidate shares forces its query's coefficient to 0: prune to a fixed point
    alive = list(range(len(cols)))
    while True:
        owners: dict = {}
        for i in alive:
            for k in cols[i]:
                owners.setdefault(k, []).append(i)
        drop = {i for k, own in owners.items() if len(own) == 1 and k != Fraction(1) for i in own}
        if not drop:
            break
        alive = [i for i in alive if i not in drop]

    def solve(idx):
        if not idx or not any(Fraction(1) in cols[i] for i in idx):
            return None
        a_mat, rhs = _weight_system(cols, idx)
        lam, *_ = np.linalg.lstsq(a_mat, rhs, rcond=None)
        return lam if np.max(np.abs(a_mat @ lam - rhs)) <= 1e-12 else None

    if solve(alive) is None:
        return None
    cost = lambda idx: sum(num_evaluations(rule, queries[i][1]) for i in idx)  # noqa: E731
    best = _l1_support(cols, alive, [num_evaluations(rule, queries[i][1]) for i in alive])
    best = best if best is not None and solve(best) is not None else None
    orders = (lambda c: -c, lambda c: c, lambda c: -abs(np.log2(float(c))))  # large, small, far-from-1 scales first
    for order in orders:  # greedy removal, costliest queries first; keep the cheapest result
        left = list(alive)
        for i in sorted(alive, key=lambda i: (-num_evaluations(rule, queries[i][1]), order(queries[i][0]))):
            trial = [j for j in left if j != i]
            if solve(trial) is not None:
                left = trial
        if best is None or cost(left) < cost(best):
            best = left
    lam = solve(best)
    keep = [(queries[i], float(v)) for i, v in zip(best, lam) if abs(v) > 1e-14]
    return QueryPlan(rule, tuple(Query(float(c), n) for (c, n), _ in keep), tuple(v for _, v in keep), True,
                     "bitwise", "zero baseline (with another baseline, check bitwise_shared)")


def _quadrature_table(quad, rule, max_steps: int = 8) -> tuple:
    out = []
    for n in range(RULES[rule].min_steps, max_steps + 1):
        nodes, weights = quad(n)
        out.append((tuple(float(v) for v in nodes), tuple(float(v) for v in weights)))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _bitwise_plan_cached(rule: str, table: tuple) -> QueryPlan | None:
    first = RULES[rule].min_steps
    return bitwise_plan(rule, lambda n: table[n - first], max_steps=first + len(table) - 1)


def service_plan(service, max_steps: int = 64) -> QueryPlan:
    """The cheapest plan that is exact on ``service``'s ACTUAL nodes and weights (:meth:`IGService.quadrature`).

    Tries :func:`exact_plan` for every first step count up to ``max_steps``,
    re-solved on the service's nodes by :func:`realise_plan`, and returns the
    one with the fewest gradient evaluations whose shared points are
    bit-identical in the service's arithmetic (:func:`bitwise_shared`), or, when
    none is, the :func:`bitwise_plan` of the service's nodes; else
    the cheapest whose points coincide to float64 round-off; next the cheapest whose points coincide to float32
    round-off (a float32 service's query inputs are float32 anyway; on a float64 service such a plan is exact
    unless a linear-region boundary falls between two points that float32 nodes split, ~1e-7 apart in ``t``, so
    it is marked ``exact=False`` with that assumption); and only when no plan survives the service's rounding,
    the :func:`telescoping_plan` (it splits more points, about one per query, and also assumes no boundary near
    the baseline: on Captum's float64 ``riemann_middle`` with a black baseline, docs/SERVICES.md measures 4.1e-16
    on the trained LeNet with the 5-evaluation float32-tolerance plan, where the telescoping plan gave 3.1e-3).

    Raises:
      ValueError: the service fixes its step count (use :func:`jaxrecover.attacks.recover_fixed_steps`),
        or no plan survives its arithmetic.
    """
    if getattr(service, "fixed_steps", False):
        raise ValueError(f"{type(service).__name__} does not let the caller choose m "
                         f"({service.describe().get('steps')}): no query plan applies; use "
                         "jaxrecover.attacks.recover_fixed_steps (a known fixed m) or recover_from_outputs")
    rule = service.rule
    baseline = None if service.baseline is None or callable(service.baseline) else np.asarray(service.baseline)
    candidates = {}
    for dtype in (np.float64, np.float32):
        for m in range(1, max_steps + 1):
            try:
                ideal = exact_plan(rule, m)
            except ValueError:
                continue
            if any(q.steps < RULES[rule].min_steps for q in ideal.queries):
                continue
            plan = realise_plan(ideal, service.quadrature, name=f"{ideal.name}@service", dtype=dtype)
            if plan is not None:
                candidates.setdefault(np.dtype(dtype).name, []).append(plan)
            if rule == "gausslegendre":
                break
    # tiers: shared points bit-identical in the service's arithmetic, then equal to 16 float64 ulps, then (a
    # float32 service) to float32 round-off
    f64 = sorted(candidates.get("float64", []), key=lambda p: p.evaluations)
    f32 = sorted(candidates.get("float32", []), key=lambda p: p.evaluations)
    bitwise = [p for p in f64 if bitwise_shared(p, service.quadrature, service.dtype, baseline)]
    if not bitwise:  # no paired plan shares its points bit-identically: search the single-rounding plans
        found = _bitwise_plan_cached(rule, _quadrature_table(service.quadrature, rule))
        if found is not None and bitwise_shared(found, service.quadrature, service.dtype, baseline):
            bitwise = [dataclasses.replace(found, name="bitwise@service", assumption="the service's actual nodes "
                                           "and weights; shared points bit-identical")]
    if np.dtype(service.dtype) != np.float32:  # split points: exact only where no boundary falls between them
        f32 = [dataclasses.replace(p, name=f"{p.name}~f32", exact=False, assumption=(
            "the service's actual nodes and weights; points its float32 nodes split (~1e-7 apart in t) have one "
            "gradient (no linear-region boundary between them)")) for p in f32]
    tiers = [bitwise, f64,
             [p for p in f32 if bitwise_shared(p, service.quadrature, service.dtype, baseline)], f32]
    for tier in tiers:
        if tier:
            return tier[0]
    try:
        return telescoping_plan(rule, service.quadrature)
    except ValueError as e:
        raise ValueError(f"no plan is exact on the nodes and weights of {type(service).__name__} ({rule}): {e}") \
            from None


def best_plan(service) -> QueryPlan:
    """The library's choice of plan against ``service``: :func:`service_plan` (see there)."""
    return service_plan(service)
