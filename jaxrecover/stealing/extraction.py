"""Exact extraction of a two-layer ReLU net ``f(x) = W2 relu(W1 x + b1) + b2`` from an IG service.

The service's answers give the Vanilla Gradient exactly (:func:`jaxrecover.attacks.best_plan`), and
deployed services report ``f(x)`` with each explanation. Along a line ``x(t) = p + t d`` the gradient
of class ``k`` is piecewise constant: it jumps by ``+-W2[k, j] W1[j]`` where the line crosses unit
``j``'s hyperplane ``W1[j] x + b1[j] = 0``, and every line crosses every unit's hyperplane somewhere
(unless parallel to it), so a long line finds units that are never active on the data too.

1. Search (one detection class per line): between two points with different gradients the crossing
   is where the two linear pieces of ``f_k(x(t))`` meet, ``t* = (f_b - f_a + s_a a - s_b b) / (s_a - s_b)``
   with slopes ``s = g . d``. One query at ``t*`` checks it: if ``f_k(t*)`` lies on both pieces there is
   exactly one crossing (exact, not a bisection to a tolerance); otherwise ``t*`` (or the midpoint)
   splits the interval. All open intervals of a line are asked in one batched call per round.
2. Jumps of all classes: for each NEW crossing, every class's gradient at a point of each neighbouring
   piece; the jump matrix ``J`` (classes x inputs) must be rank one, ``J = W2[:, j] W1[j]`` up to the
   side on which the unit is active (a crossing whose jump is not rank one hides another, unseen
   crossing and is left to another line).
3. Which side is active (the local jumps cannot tell a unit from its mirror ``(-W1, -b1, W2)`` plus a
   linear term): the all-class gradients on the line are the sum of the active units' contributions,
   a least-squares problem whose solution is 0 or 1 per new unit (checked).
4. Output bias from the reported outputs: ``b2 = f(x) - W2 relu(W1 x + b1)``.

The result is canonical (hidden units scaled to ``|W1[j]| = 1``, their output weights scaled
inversely; positive scaling and permutation are the net's symmetries; see :func:`canonical_two_layer`).
Lines are drawn until one finds no new unit and the model reproduces every all-class answer asked.
Units inactive on every point of the attacker's ``data`` are reported as ``dead`` (they are found
anyway, on the far parts of the lines).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm

from ..services import QueryBudgetExceeded
from .lines import prepare, search_line, tolerances

__all__ = ["extract_two_layer", "Extraction", "ExtractionIncomplete", "canonical_two_layer", "two_layer_logits",
           "two_layer_variables", "extraction_fidelity"]


# ---------------------------------------------------------------------------------------------- the result
def two_layer_logits(params: dict, x) -> np.ndarray:
    """Logits ``[N, K]`` of ``params = {"W1": [h, d], "b1": [h], "W2": [K, h], "b2": [K]}`` for inputs ``x[N, ...]``
    (numpy, float64)."""
    x = np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
    h = np.maximum(x @ params["W1"].T + params["b1"], 0.0)
    return h @ params["W2"].T + params["b2"]


def canonical_two_layer(params: dict, seed: int = 0) -> dict:
    """The canonical form of a two-layer ReLU net under its symmetries.

    Each hidden unit is scaled to ``|W1[j]| = 1`` (its bias with it, its output weights by the inverse
    factor: ``relu(c z) = c relu(z)`` for ``c > 0``), units whose output weights are all zero are
    dropped (they change nothing), and the units are sorted by a fixed random projection of
    ``(W1[j], b1[j])``. Two nets computing the same function on every input (with no unit whose
    hyperplane is empty) have the same canonical form up to round-off.
    """
    W1, b1 = np.asarray(params["W1"], np.float64), np.asarray(params["b1"], np.float64)
    W2, b2 = np.asarray(params["W2"], np.float64), np.asarray(params["b2"], np.float64)
    if W1.ndim != 2 or W2.ndim != 2 or W1.shape[0] != W2.shape[1] or b1.shape != (W1.shape[0],) \
            or b2.shape != (W2.shape[0],):
        raise ValueError(f"expected W1 [h, d], b1 [h], W2 [K, h], b2 [K]; got {W1.shape}, {b1.shape}, {W2.shape}, "
                         f"{b2.shape}")
    norm = np.linalg.norm(W1, axis=1)
    keep = (norm > 0) & (np.abs(W2).max(axis=0) > 0)
    W1, b1, W2, norm = W1[keep] / norm[keep, None], b1[keep] / norm[keep], W2[:, keep] * norm[keep], norm[keep]
    r = np.random.default_rng(seed).standard_normal(W1.shape[1] + 1)
    order = np.argsort(W1 @ r[:-1] + b1 * r[-1])
    return {"W1": W1[order], "b1": b1[order], "W2": W2[:, order], "b2": b2.copy()}


def two_layer_variables(params: dict, dtype=np.float32) -> dict:
    """``params`` as Flax variables of :class:`jaxrecover.models.nets.TwoLayerNet` (``hidden`` = number of units)."""
    return {"params": {"Dense_0": {"kernel": np.asarray(params["W1"].T, dtype), "bias": np.asarray(params["b1"], dtype)},
                       "Dense_1": {"kernel": np.asarray(params["W2"].T, dtype), "bias": np.asarray(params["b2"], dtype)}}}


def extraction_fidelity(params: dict, reference, x) -> float:
    """``max |logit difference| / max |logit|`` of ``params`` against ``reference`` (params of the same
    form, or a function ``x -> logits``) over the inputs ``x``."""
    ref = reference(x) if callable(reference) else two_layer_logits(reference, x)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(two_layer_logits(params, x) - ref)) / np.max(np.abs(ref)))


@dataclasses.dataclass
class Extraction:
    """What :func:`extract_two_layer` found and spent.

    Attributes:
      params: the extracted net in canonical form, ``{"W1": [h, d], "b1": [h], "W2": [K, h], "b2": [K]}``
        (float64); :func:`two_layer_logits` runs it, :func:`two_layer_variables` makes Flax variables.
      units: hidden units found (``h``).
      dead: indices (into ``params``) of units inactive on every row of the attacker's ``data``.
      queries, evaluations: IG queries spent (explanations, including those whose only use is the
        reported output) and gradient evaluations the service spent.
      lines: lines searched.
      plan: name of the plan that turned answers into gradients (queries per gradient in brackets).
      rejected: crossings whose all-class jump was not rank one or whose active side was ambiguous
        (each hides another crossing; the unit is taken from another line).
      consistency: max relative error of the model on every all-class gradient and output it was
        built from (round-off when complete).
      complete: the last line found no new unit and the model reproduces every answer asked.
      message: what stopped the extraction.
    """

    params: dict
    units: int
    dead: list[int]
    queries: int
    evaluations: int
    lines: int
    plan: str
    rejected: int
    consistency: float
    complete: bool
    message: str

    def logits(self, x) -> np.ndarray:
        """The extracted net's logits ``[N, K]`` (float64)."""
        return two_layer_logits(self.params, x)


class ExtractionIncomplete(QueryBudgetExceeded):
    """The service's query budget ran out during an extraction; ``.partial`` is the :class:`Extraction`
    built from the units found so far (``complete=False``)."""

    def __init__(self, message: str, partial: Extraction):
        super().__init__(message)
        self.partial = partial


class _Units:
    """Units found so far: unit normals, biases, output weights."""

    def __init__(self, d, classes):
        self.W1 = np.zeros((0, d))
        self.b1 = np.zeros(0)
        self.W2 = np.zeros((classes, 0))

    def add(self, w, b, w2):
        self.W1 = np.vstack([self.W1, w[None]])
        self.b1 = np.append(self.b1, b)
        self.W2 = np.hstack([self.W2, w2[:, None]])

    def gradients(self, z):
        """All-class gradients ``[N, K, d]`` of the units found so far at the points ``z[N, d]``."""
        active = (z @ self.W1.T + self.b1 > 0).astype(np.float64)
        return np.einsum("kj,nj,jd->nkd", self.W2, active, self.W1)

    def known(self, x_star, jump, tol):
        """Whether a crossing at ``x_star`` with class-jump direction ``jump`` is a unit found before."""
        if not len(self.b1):
            return False
        jn = jump / np.linalg.norm(jump)
        cos = np.abs(self.W1 @ jn)
        pos = np.abs(self.W1 @ x_star + self.b1) / (1.0 + np.linalg.norm(x_star))
        return bool(np.any((cos > 1 - tol) & (pos < tol)))


def _line(oracle, units, p, d, k, classes, span, tol, grid, min_width, cache):
    """Search one line, add its new units to ``units``; returns (new units, rejected, unresolved)."""
    crossings, points, unresolved = search_line(oracle, p, d, k, span, tol, grid, min_width)
    if not crossings:
        return 0, 0, unresolved
    # one point per piece, in its middle (far from both crossings: the model's activities there do not hinge
    # on round-off in the crossings' positions)
    edges = [-span] + [t for t, _, _ in crossings] + [span]
    piece_t = [0.5 * (lo + hi) for lo, hi in zip(edges[:-1], edges[1:])]
    new = []
    for i, (t, a, b) in enumerate(crossings):
        jump = points[b][0] - points[a][0]
        if not units.known(p + t * d, jump, tol["match"]):
            new.append(i)
    if not new:
        return 0, 0, unresolved
    need = sorted({i for c in new for i in (c, c + 1)})
    ask = [piece_t[i] for i in need if piece_t[i] not in cache]
    if ask:
        z = np.repeat(p + np.array(ask)[:, None] * d, classes, axis=0)
        g, f, _ = oracle(z, np.tile(np.arange(classes), len(ask)))
        for j, t in enumerate(ask):
            cache[t] = (p + t * d, g[j * classes:(j + 1) * classes], f[j * classes:(j + 1) * classes])
    # rank-one jumps of every class
    good, jumps, rejected = [], [], 0
    for c in new:
        J = cache[piece_t[c + 1]][1] - cache[piece_t[c]][1]
        _, s, vt = np.linalg.svd(J, full_matrices=False)
        if s[0] == 0 or (len(s) > 1 and s[1] > tol["rank"] * s[0]):
            rejected += 1
            continue
        good.append(c)
        jumps.append((J, vt[0]))  # the jump and its unit direction (up to sign)
    if not good:
        return 0, rejected, unresolved
    # which side is active: at each all-class point P of this line,
    #   G(P) - known(P) + sum_i J_i [t_P < t_i] = sum_i s_i J_i,   s_i = 1 when unit i switches on along +t
    ts = np.array([crossings[c][0] for c in good])
    rows_lhs, rows_A = [], []
    for t in sorted({piece_t[i] for c in good for i in (c, c + 1)}):
        z, G, _ = cache[t]
        lhs = G - units.gradients(z[None])[0] + sum(J * (t < ti) for (J, _), ti in zip(jumps, ts))
        rows_lhs.append(lhs.reshape(-1))
        rows_A.append(np.stack([J.reshape(-1) for J, _ in jumps], axis=1))
    s, *_ = np.linalg.lstsq(np.concatenate(rows_A), np.concatenate(rows_lhs), rcond=None)
    added = 0
    for c, (J, v), si in zip(good, jumps, s):
        if abs(si - round(si)) > tol["binary"] or round(si) not in (0, 1):
            rejected += 1
            continue
        on = round(si) == 1
        w = v * (1.0 if (v @ d > 0) == on else -1.0)  # W1 row: grows towards the active side
        contribution = J if on else -J  # W2[:, j] W1[j]
        t = crossings[c][0]
        units.add(w, -float(w @ (p + t * d)), contribution @ w)
        added += 1
    return added, rejected, unresolved


# ---------------------------------------------------------------------------------------------- the attack
def extract_two_layer(service, data, *, classes: int, plan=None, span: float = 1e3, max_lines: int = 12,
                      grid: int = 9, seed: int = 0, progress: bool = True) -> Extraction:
    """Extract a two-layer ReLU net (dense, with biases) from an IG service, exactly up to its symmetries.

    Args:
      service: an :class:`jaxrecover.attacks.IGService` whose model is ``W2 relu(W1 x + b1) + b2`` on the
        flattened input, with a fixed baseline, explaining logits and reporting ``outputs``.
      data: ``[N, ...]`` inputs the attacker holds (lines pass through them; ``dead`` is measured on them).
      classes: number of classes ``K``.
      plan: the query plan that turns answers into gradients (default :func:`best_plan` of the service).
      span: lines run over ``t`` in ``[-span, span]`` times the largest norm in ``data`` (far enough to
        cross the hyperplanes of units never active on the data).
      max_lines: lines before giving up (the result is then ``complete=False``).
      grid: first points per line.
      seed: draws the lines.

    Raises:
      ExtractionIncomplete: the query budget ran out; ``.partial`` holds what was found.
      ValueError: the service explains something other than logits, or its step count is fixed.
    """
    data, plan, tol, flat, oracle = prepare(service, data, classes, plan)
    scale = float(np.max(np.linalg.norm(flat, axis=1)))
    units = _Units(flat.shape[1], classes)
    rng = np.random.default_rng(seed)
    q0, e0 = service.queries, service.evaluations
    cache: dict = {}
    lines = rejected = 0
    message, stale = "", False
    bar = tqdm(total=max_lines, desc="extract lines", unit="line", disable=not progress)
    try:
        for lines in range(1, max_lines + 1):
            p = flat[rng.integers(flat.shape[0])]
            d = rng.standard_normal(flat.shape[1])
            d /= np.linalg.norm(d)
            added, rej, unresolved = _line(oracle, units, p, d, (lines - 1) % classes, classes, span * scale, tol,
                                           grid, 1e-12 * span * scale, cache)
            rejected += rej
            bar.update(1)
            bar.set_postfix(units=len(units.b1), queries=service.queries - q0)
            if added == 0 and rej == 0 and lines > 1 and _consistency(units, cache)[0] <= tol["check"]:
                message = f"line {lines} found no new unit and the model reproduces every answer asked"
                break
        else:
            message = f"max_lines={max_lines} reached with new units or unexplained answers on the last line"
            stale = True
    except QueryBudgetExceeded as e:
        bar.close()
        partial = _result(units, cache, flat, service, q0, e0, lines, plan, rejected, False,
                          f"query budget ran out on line {lines}: {e}")
        raise ExtractionIncomplete(f"query budget ran out after {partial.queries} queries on line {lines}: "
                                   f"{partial.units} units found so far (partial result in .partial)",
                                   partial) from None
    bar.close()
    return _result(units, cache, flat, service, q0, e0, lines, plan, rejected, not stale, message)


def _output_bias(units, cache):
    if not cache:
        return np.full(units.W2.shape[0], np.nan), np.inf
    z = np.stack([v[0] for v in cache.values()])
    f = np.stack([v[2] for v in cache.values()])
    rest = f - np.maximum(z @ units.W1.T + units.b1, 0.0) @ units.W2.T
    # the round-off of a reported value grows with |f|: take the median over the quarter of points with the
    # smallest outputs (near the data, not far out on the lines)
    small = np.argsort(np.max(np.abs(f), axis=1))[:max(1, len(f) // 4)]
    b2 = np.median(rest[small], axis=0)
    return b2, float(np.max(np.abs(rest - b2)) / max(np.max(np.abs(f)), 1e-300))


def _consistency(units, cache):
    """Max relative error of the model on every all-class gradient and output asked; and the output bias."""
    if not cache:
        return np.inf, None
    b2, value_err = _output_bias(units, cache)
    z = np.stack([v[0] for v in cache.values()])
    G = np.stack([v[1] for v in cache.values()])
    grad_err = float(np.max(np.abs(units.gradients(z) - G)) / max(np.max(np.abs(G)), 1e-300))
    return max(grad_err, value_err), b2


def _result(units, cache, flat, service, q0, e0, lines, plan, rejected, complete, message):
    consistency, b2 = _consistency(units, cache)
    if b2 is None:
        b2 = np.full(units.W2.shape[0], np.nan)
    tol = tolerances(service.dtype)
    if complete and consistency > tol["check"]:
        complete = False
        message += f"; but the model misses some answers (consistency {consistency:.2g})"
    params = canonical_two_layer({"W1": units.W1, "b1": units.b1, "W2": units.W2, "b2": b2})
    dead = np.flatnonzero(~np.any(flat @ params["W1"].T + params["b1"] > 0, axis=0)).tolist()
    return Extraction(params=params, units=int(params["b1"].shape[0]), dead=dead,
                      queries=service.queries - q0, evaluations=service.evaluations - e0, lines=lines,
                      plan=f"{plan.name} ({len(plan.queries)} queries)", rejected=rejected,
                      consistency=float(consistency), complete=bool(complete), message=message)
