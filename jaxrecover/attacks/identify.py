"""Service identification: infer a service's baseline, step policy, rule and step count from its answers.

An attacker facing an undocumented IG service learns what the plans need
from a handful of answers (the queries each step costs are counted):

* **baseline** (5 queries): the answer ``A(x) = (x - b) T(x)`` with ``T``
  piecewise constant in ``x`` for a piecewise-linear net, so ``x`` and
  ``x + eps`` give ``T = (A(x + eps) - A(x)) / eps`` and ``b = x - A(x) / T``
  wherever ``T != 0`` (checked with a second ``eps``).
* **step policy** (1 query): ask for another step count; a refusal means it is fixed.
* **rule, free step count**: the first breakpoint ``t_1`` of the ray makes the
  answers with ``n`` steps jump at scale ``c = t_1 / a_top(n)`` by
  ``w_top(n) Delta``; located for n = 2, 3, 4 (bisection), only the right
  rule's table makes ``c a_top(n)`` and ``jump / w_top(n)`` the same for all n.
* **rule and m, fixed step count**: the first breakpoint of the ray makes a
  jump in the answers at ``s_1`` (top node) and echoes at ``s_1 a_top / a_j``
  with sizes in the ratio ``w_j / w_top``: the nearest echo's position and
  size ratio match one (rule, m) of the table.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ..explainers import RULES, quadrature
from ..services import ServiceAnswerError, StepCountRefused

__all__ = ["Identification", "identify_service", "infer_baseline"]


@dataclasses.dataclass
class Identification:
    """What :func:`identify_service` inferred and what it cost.

    Attributes:
      rule: the inferred rule (None if no candidate fits).
      steps: the inferred step count (the fixed one, or None for a free service).
      fixed_steps: whether the service refuses other step counts.
      baseline: the inferred baseline (array, shape of one example), max error of its check.
      dtype: the answers' dtype.
      queries: {step: queries spent}.
      evidence: {candidate: mismatch} (smaller is better).
      note: "identified", or why the rule and step count were left unidentified (no candidate fits:
        the best mismatch is above ``max_mismatch``, e.g. a service that ignores the requested step count).
    """

    rule: str | None
    steps: int | None
    fixed_steps: bool
    baseline: np.ndarray | None
    baseline_check: float
    dtype: str
    queries: dict
    evidence: dict
    note: str = "identified"

    @property
    def identified(self) -> bool:
        """Whether a rule (and, for a fixed step count, m) was identified."""
        return self.rule is not None


def _answers(service, xs, target, steps=None):
    xs = jnp.asarray(np.stack(xs), service.dtype)
    return np.asarray(service(xs, jnp.full((xs.shape[0],), target), steps=steps), np.float64)


def infer_baseline(service, x, target, eps: float | None = None):
    """The baseline per coordinate from answers at ``x`` and ``x + eps``, polished by one answer at the
    estimate itself (it is ``(b_est - b) T``): ``(b, check, queries)``.

    ``check`` is the max disagreement with a third answer at ``x + eps / 2``
    (0 up to round-off when no path point crossed a region boundary);
    coordinates with ``T = 0`` get NaN.
    """
    x = np.asarray(x, np.float64)
    eps = eps if eps is not None else (1e-6 if np.dtype(service.dtype) == np.float64 else 1e-2)
    a0, a1, a2 = _answers(service, [x, x + eps, x + eps / 2], target)
    t1, t2 = (a1 - a0) / eps, (a2 - a0) / (eps / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(t1 != 0, x - a0 / t1, np.nan)
        b2 = np.where(t2 != 0, x - a0 / t2, np.nan)
    check = float(np.nanmax(np.abs(b - b2))) if np.isfinite(b).any() else float("inf")
    # polish: the answer AT the estimate is (b_est - b) T near the baseline; T there from a point just beside it
    b_est = np.where(np.isfinite(b), b, x)
    step = 1e-5 * (x - b_est)
    a_b, a_c = _answers(service, [b_est, b_est + step], target)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_c = np.where(step != 0, a_c / np.where(step != 0, step, 1), 0.0)
        fix = np.where(t_c != 0, a_b / np.where(t_c != 0, t_c, 1), 0.0)
    return np.where(np.isfinite(b), b_est - fix, np.nan), check, 5


def _first_jumps(service, x, b, target, count: int = 2, resolution: float = 1e-9, steps=None, stop=None):
    """Positions (scale c) and answer jumps (flattened) of the first ``count`` jumps of ``T(c)`` on the ray
    (fewer where ``stop(jumps)`` says enough)."""
    d = x - b
    spent = 0

    def t_at(cs):
        nonlocal spent
        cs = np.atleast_1d(cs)
        ans = _answers(service, [b + c * d for c in cs], target, steps=steps)
        spent += len(cs)
        with np.errstate(divide="ignore", invalid="ignore"):
            return [np.where(d != 0, a / np.where(d != 0, c * d, 1), 0.0).ravel() for a, c in zip(ans, cs)]

    jumps = []
    lo = 1e-4
    t_lo, t_check = t_at([lo, lo / 4])
    scale = np.max(np.abs(t_lo)) + 1e-300
    tol = np.sqrt(np.finfo(np.dtype(service.dtype)).eps) * scale
    while np.max(np.abs(t_lo - t_check)) > tol and lo > 1e-12:  # a breakpoint below lo: start closer to b
        lo /= 16
        t_lo, t_check = t_at([lo, lo / 4])
    while len(jumps) < count:
        hi = lo * 1.25  # gallop to the next change
        while True:
            (t_hi,) = t_at([hi])
            if np.max(np.abs(t_hi - t_lo)) > tol:
                break
            lo, t_lo, hi = hi, t_hi, min(hi * 2, 1e3)
            if lo >= 1e3:
                return jumps, spent
        while hi - lo > resolution * hi:
            mid = 0.5 * (lo + hi)
            (t_mid,) = t_at([mid])
            if np.max(np.abs(t_mid - t_lo)) > tol:
                hi, t_hi = mid, t_mid
            else:
                lo, t_lo = mid, t_mid
        jumps.append((hi, t_hi - t_lo))
        lo, t_lo = hi, t_hi
        if stop is not None and stop(jumps):
            break
    return jumps, spent


def _echo_tiebreak(service, x, b, target, first, tied, evidence):
    """Among rules with the same top node and weight, the one whose second node at n = 2 echoes the first jump.

    The first breakpoint ``t1`` seen by the top node at ``c`` (jump ``w_top Delta``)
    is seen again by the second node ``a_2`` at ``c = t1 / a_2`` with jump
    ``w_2 Delta``; a rule whose second node is 0 (or absent) predicts no jump
    there. Two answers bracketing each predicted position decide (2 queries each).
    """
    c1, jump = first
    d = x - b
    preds = {}
    for cand in tied:
        nodes, weights = quadrature(cand, 2)
        top = int(np.argmax(nodes))
        delta = jump / weights[top]
        t1 = c1 * nodes[top]
        others = [j for j in range(nodes.size) if j != top and nodes[j] > 0]
        preds[cand] = [(t1 / nodes[j], weights[j] * delta) for j in others]
    points = sorted({round(c, 12) for p in preds.values() for c, _ in p})
    measured = {}
    for c in points:
        lo, hi = c * (1 - 1e-7), c * (1 + 1e-7)
        a_lo, a_hi = _answers(service, [b + lo * d, b + hi * d], target, steps=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_lo = np.where(d != 0, np.asarray(a_lo, np.float64) / np.where(d != 0, lo * d, 1), 0.0).ravel()
            t_hi = np.where(d != 0, np.asarray(a_hi, np.float64) / np.where(d != 0, hi * d, 1), 0.0).ravel()
        measured[c] = t_hi - t_lo
    scale = float(np.max(np.abs(jump))) + 1e-300
    best, rule = np.inf, tied[0]
    for cand in tied:
        predicted = {round(c, 12): v for c, v in preds[cand]}
        mis = sum(float(np.max(np.abs(measured[c] - predicted.get(c, 0.0)))) for c in points) / scale
        evidence[f"{cand} (echo)"] = mis
        if mis < best:
            best, rule = mis, cand
    return rule


def identify_service(service, x, target, *, max_steps: int = 256, candidates=None,
                     max_jumps: int = 32, max_mismatch: float = 0.05) -> Identification:
    """Infer the baseline, step policy, rule and step count of ``service`` from answers about one example.

    Uses only answers (``service(x, target, steps=...)``), not what the
    service declares. ``x``: one example (no batch axis) in the service's dtype.
    ``candidates``: baselines to try besides zeros and the constant ``x.min()``
    (the estimate snaps to one whose own answer is exactly 0; otherwise the
    per-coordinate estimate is used, good to about 1e-9). ``max_jumps``: with a fixed
    step count, how many jumps of the ray to locate (about 30 queries each) while
    looking for the first one's echo. ``max_mismatch``: the best candidate is named only when its mismatch
    is at most this (else ``rule`` and ``steps`` are None and ``note`` says "unidentified": a service outside
    the candidates is never given a wrong name).
    """
    x = np.asarray(x, np.float64)
    spent: dict[str, int] = {}
    q0 = service.queries
    try:
        b, check, _ = infer_baseline(service, x, target)
    except (TypeError, ValueError) as e:
        if isinstance(e, (StepCountRefused, ServiceAnswerError)):
            raise
        raise ValueError(f"identify_service takes ONE example without a batch axis (got x of shape {x.shape}); "
                         f"the service could not answer it ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "pass x[0] for a batch") from None
    b_use = np.where(np.isfinite(b), b, 0.0)
    # snap to a candidate whose own answer is exactly 0 (x = b answers 0 everywhere, one query each)
    cands = [np.zeros_like(x), np.full_like(x, x.min())] + [np.asarray(c, np.float64) for c in (candidates or [])]
    for cand in cands:
        cand = np.broadcast_to(cand, x.shape)
        if np.nanmax(np.abs(cand - b_use)) > 1e-6:
            continue
        if np.max(np.abs(_answers(service, [cand], target))) == 0.0:
            b_use = np.array(cand)
            break
    spent["baseline"] = service.queries - q0
    q0 = service.queries
    try:
        _answers(service, [x], target, steps=int(service.steps) + 7)
        fixed = False
    except StepCountRefused:
        fixed = True
    spent["step policy"] = service.queries - q0
    evidence: dict[str, float] = {}
    rule = steps = None
    if not fixed:
        q0 = service.queries
        # the first breakpoint t1 of the ray, seen at n = 2, 3, 4 steps: at c = t1 / a_top(n) with an answer jump
        # w_top(n) * Delta; the right rule makes c * a_top and jump / w_top the same for every n
        seen = {n: _first_jumps(service, x, b_use, target, count=1, steps=n)[0] for n in (2, 3, 4)}
        # near the baseline every node sees g(0+): T = (sum of the weights) g(0+), which tells rules whose top
        # weights are proportional apart (saliency 1/n vs Captum's riemann_trapezoid 1/(2n), weights summing to < 1)
        d0 = x - b_use
        low = {}
        for n in (2, 3, 4):
            (a0,) = _answers(service, [b_use + 1e-4 * d0], target, steps=n)
            with np.errstate(divide="ignore", invalid="ignore"):
                low[n] = np.where(d0 != 0, a0 / np.where(d0 != 0, 1e-4 * d0, 1), 0.0).ravel()
        if all(seen.values()):
            best = np.inf
            for cand, r in RULES.items():
                if r.min_steps > 2:
                    continue
                t1, dl = [], []
                for n, ((c, jump),) in seen.items():
                    nodes, weights = quadrature(cand, n)
                    top = int(np.argmax(nodes))
                    t1.append(c * nodes[top])
                    dl.append(jump / weights[top])
                g0 = [low[n] / quadrature(cand, n)[1].sum() for n in (2, 3, 4)]
                mis = float(np.ptp(t1) / np.mean(t1)
                            + max(np.max(np.abs(v - dl[0])) for v in dl) / (np.max(np.abs(dl[0])) + 1e-300)
                            + max(np.max(np.abs(v - g0[0])) for v in g0) / (np.max(np.abs(g0[0])) + 1e-300))
                evidence[cand] = mis
                if mis < best:
                    best, rule = mis, cand
            tied = [c for c, v in evidence.items() if v <= best + 1e-6]
            if len(tied) > 1:  # same top node and weight at every n (riemann_right, saliency): test the echo
                rule = _echo_tiebreak(service, x, b_use, target, seen[2][0], tied, evidence)
        spent["rule"] = service.queries - q0
    else:
        q0 = service.queries

        def echo_of_first(jumps):
            """The first later jump parallel to the first one (its echo at the second node), or None."""
            c1, j1 = jumps[0]
            for c2, j2 in jumps[1:]:
                cos = float(np.dot(j1, j2) / (np.linalg.norm(j1) * np.linalg.norm(j2) + 1e-300))
                if abs(cos) > 1 - 1e-6:
                    return c2, j2
            return None

        jumps, _ = _first_jumps(service, x, b_use, target, count=max_jumps,
                                stop=lambda js: echo_of_first(js) is not None)
        spent["rule and m"] = service.queries - q0
        echo = echo_of_first(jumps) if jumps else None
        if jumps:
            c1, j1 = jumps[0]
        if echo is not None:
            c2, j2 = echo
            ratio = c1 / c2
            k = np.argmax(np.abs(j1))
            wratio = j2[k] / j1[k]
            best = np.inf
            for cand in RULES:
                for m in range(RULES[cand].min_steps, max_steps + 1):
                    nodes, weights = quadrature(cand, m)
                    pos = np.flatnonzero(nodes > 0)
                    if pos.size < 2:
                        continue
                    order = pos[np.argsort(nodes[pos])]
                    r = nodes[order[-2]] / nodes[order[-1]]
                    wr = weights[order[-2]] / weights[order[-1]]
                    mis = abs(r - ratio) + abs(wr - wratio)
                    if mis < best:
                        best, rule, steps = mis, cand, m
                    evidence[f"{cand}/{m}"] = mis
            evidence = dict(sorted(evidence.items(), key=lambda kv: kv[1])[:5])
    note = "identified"
    # the chosen candidate's own mismatch (an echo tie-break only orders candidates that fit equally well)
    key = None if rule is None else (rule if not fixed else f"{rule}/{steps}")
    best_mis = float(evidence.get(key, np.inf)) if key is not None else (min(evidence.values()) if evidence
                                                                         else np.inf)
    if key is not None and f"{rule} (echo)" in evidence:
        best_mis = max(best_mis, float(evidence[f"{rule} (echo)"]))
    if rule is None or not best_mis <= max_mismatch:
        note = ("unidentified: " + (f"no candidate rule fits (best mismatch {best_mis:.3g} > {max_mismatch:g}; "
                                    "e.g. a service that ignores the requested step count, or an unknown rule)"
                                    if np.isfinite(best_mis) else "no jump of the answers was found to compare "
                                    "the rules with"))
        rule = steps = None
    return Identification(rule, steps, fixed, b_use, check, np.dtype(service.dtype).name, spent, evidence, note)
