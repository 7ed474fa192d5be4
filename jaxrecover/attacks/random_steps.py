"""Recovery against a service that draws the step count at random for every query.

A service that draws ``m`` uniformly from ``low..high`` per query
(:class:`~jaxrecover.attacks.RandomSteps`) refuses the attacker's choice of m,
and it does not say which m it used. But its answers are deterministic given
the input and m, and an exact two-query plan (:func:`~jaxrecover.attacks.exact_plan`
with first step count ``c``: queries ``(s_1, c)`` and ``(s_2, c - 1)``) only
needs its two queries to have BEEN answered with those step counts. So the
attacker estimates the m's instead of choosing them:

1. every round, ask once each scale that a plan of some ``c`` in ``low + 1..high``
   uses (both step counts in range), and keep the distinct answers per scale;
2. combine every pair of answers at a plan's two scales as if their m's were
   the plan's: pairs with the right m's give ``grad f(x)`` up to the service's
   round-off, whichever c; pairs with wrong m's give other vectors (off-by-one
   pairs come close: about ``1/c`` away in the paper's distance);
3. the tightest agreement between the estimates of two different plans
   (smallest relative distance, through a random projection, confirmed in full)
   identifies the m's; accepted when below ``tol``, which sits between the
   round-off of right pairs and the spread of off-by-one pairs.

Rounds go on until every example has an accepted agreement or ``max_rounds``
is spent; an example without one is NaN and reported, never a guess. With
``high - low + 1 = K`` possible m's a right pair for a given c turns up with
probability about ``(1/K)^2`` per round, and ``K - 1`` plans run side by side,
so the attack needs about ``K / 2`` rounds of ``K`` queries: ``~K^2 / 2``
queries per example (about 1,900 for 20..80).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .plans import exact_plan, realise_plan
from ..services import attack_inputs
from .result import RecoveryReport, as_recovery

__all__ = ["recover_random_steps", "RandomStepsReport"]


@dataclasses.dataclass
class RandomStepsReport(RecoveryReport):
    """What :func:`recover_random_steps` spent and found.

    Attributes:
      queries: IG queries spent per example.
      rounds: rounds asked per example (one query per scale per round).
      steps: the step counts ``(c, c')`` the accepted pair was identified as, per example (None: not found).
      agreement: relative distance of the accepted agreement per example (NaN: none).
      found: per example, whether an agreement below ``tol`` was found (False: the row is NaN).
    """

    queries: list[int]
    rounds: list[int]
    steps: list
    agreement: list[float]
    found: list[bool]


def _plans(service, low, high):
    """``{c: plan}``: two-query exact plans realised on the service's nodes, both step counts in low..high."""
    rule = service.rule
    dtypes = [np.float64] + ([np.float32] if np.dtype(service.dtype) == np.float32 else [])
    plans = {}
    for c in range(low, high + 1):
        try:
            ideal = exact_plan(rule, c)
        except ValueError:
            continue
        if len(ideal.queries) != 2 or any(not low <= q.steps <= high for q in ideal.queries):
            continue
        for dt in dtypes:
            plan = realise_plan(ideal, service.quadrature, dtype=dt)
            if plan is not None:
                plans[c] = plan
                break
    if len(plans) < 2:
        raise ValueError(f"rule {rule!r} with m drawn from {low}..{high}: fewer than two exact two-query plans have "
                         "both step counts in that range (gausslegendre, trapezoid and ig_original plans need m of "
                         "1 or 2); use recover_from_outputs if the service reports f(x)")
    return plans


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


@as_recovery("random-m pairing")
def recover_random_steps(service, x, target, *, low: int, high: int, tol: float | None = None,
                         max_rounds: int = 32, support: int = 4, dims: int = 32, seed: int = 0, progress: bool = False):
    """Recover VG from a service that answers every query with a step count drawn from ``low..high``.

    Args:
      service: an IG service with a random step policy (:class:`~jaxrecover.attacks.RandomSteps`, or any
        service whose m the caller cannot set); queried without a step request.
      x: ``[N, ...]`` inputs in the service's dtype; target: ``[N]`` classes.
      low, high: the range the step count is drawn from (as the service documents it; a wider range only
        costs more queries).
      tol: accept an agreement whose relative distance is below this (default 1e-4 for float32
        services, 1e-9 for float64: right pairs agree to round-off, off-by-one pairs to about
        ``|1/c - 1/c'|``).
      max_rounds: give up on an example after this many rounds (NaN row, ``found`` False).
      dims: random projection size used to search for agreements (candidates are confirmed in full).
      progress: a progress bar over rounds.

    Returns:
      ``(vg, mask, report)``: the recovered gradients (NaN where ``x == b`` or not found), the mask of
      recovered coordinates, and a :class:`RandomStepsReport`.
    """
    x, target = attack_inputs(service, x, target)
    if not (isinstance(low, (int, np.integer)) and isinstance(high, (int, np.integer)) and 1 <= low < high):
        raise ValueError(f"need integers 1 <= low < high, got {low!r}, {high!r}")
    tol = tol if tol is not None else (1e-4 if np.dtype(service.dtype) == np.float32 else 1e-9)
    plans = _plans(service, int(low), int(high))
    scales = sorted({q.scale for p in plans.values() for q in p.queries})
    where = {s: k for k, s in enumerate(scales)}
    n = x.shape[0]
    b = np.asarray(service.fixed_baseline(jnp.asarray(x)))
    d = x[0].size
    proj = np.random.default_rng(seed).standard_normal((d, dims)) / np.sqrt(dims)
    den = {s: (np.asarray(b + np.asarray(s, x.dtype) * (x - b), np.float64) - b.astype(np.float64)).reshape(n, d)
           for s in scales}
    mask = (x != b).reshape(n, d)
    # per example, per scale: distinct answers (bytes -> index), their T = answer / (x_q - b) and projections
    seen = [[{} for _ in scales] for _ in range(n)]
    tvec = [[[] for _ in scales] for _ in range(n)]
    tproj = [[[] for _ in scales] for _ in range(n)]
    out = np.full((n, d), np.nan)
    rep = RandomStepsReport([0] * n, [0] * n, [None] * n, [float("nan")] * n, [False] * n)
    active = np.arange(n)
    bar = tqdm(total=max_rounds, disable=not progress, desc="random-m recovery", unit="round")
    for _ in range(max_rounds):
        if active.size == 0:
            break
        for s in scales:
            xq = jnp.asarray(b[active] + np.asarray(s, x.dtype) * (x[active] - b[active]), x.dtype)
            ans = np.asarray(service(xq, target[active])).reshape(active.size, d)
            for row, i in enumerate(active):
                key = ans[row].tobytes()
                k = where[s]
                if key in seen[i][k]:
                    continue
                seen[i][k][key] = len(tvec[i][k])
                t = np.where(mask[i], ans[row].astype(np.float64) / np.where(mask[i], den[s][i], 1.0), 0.0)
                tvec[i][k].append(t)
                tproj[i][k].append(t @ proj)
        still = []
        for i in active:
            rep.queries[i] += len(scales)
            rep.rounds[i] += 1
            hit = _agreement(plans, where, tvec[i], tproj[i], tol, support)
            if hit is None:
                still.append(i)
                continue
            v, steps, rel = hit
            out[i] = np.where(mask[i], v, np.nan)
            rep.steps[i], rep.agreement[i], rep.found[i] = steps, rel, True
        active = np.asarray(still, int)
        bar.update(1)
        bar.set_postfix(open=int(active.size), refresh=False)
    bar.close()
    found = np.asarray(rep.found)
    return (out.reshape(x.shape), (mask & found[:, None]).reshape(x.shape), rep)


def _agreement(plans, where, tvec, tproj, tol, support, margin=2.0):
    """The best-supported value: ``(v, plans, spread)`` or None.

    Every pair of answers at a plan's two scales is a candidate. Two candidates of DIFFERENT plans that use
    no answer in common and lie within ``tol`` (relative, in the random projection) support each other;
    the candidate supported by the most plans wins when they number at least ``support``. Exact
    coincidences between wrong candidates do happen (for a gradient with few pieces on the ray, two grids
    can put the same number of nodes on every piece), but only among a few plans; the right value is
    supported by every plan whose two step counts were drawn. The value is the median of the winning
    group, confirmed in full (each member within ``2 tol`` of it).
    """
    cand_p, cand_id = [], []
    for c, plan in plans.items():
        (qa, qb) = plan.queries
        (la, lb) = plan.coeffs
        sa, sb = where[qa.scale], where[qb.scale]
        pa, pb = tproj[sa], tproj[sb]
        if not pa or not pb:
            continue
        pa, pb = np.asarray(pa), np.asarray(pb)
        cand_p.append((la * pa[:, None, :] + lb * pb[None, :, :]).reshape(-1, pa.shape[1]))
        cand_id += [(c, (sa, i), (sb, j)) for i in range(pa.shape[0]) for j in range(pb.shape[0])]
    if len(cand_p) < support:
        return None
    p = np.concatenate(cand_p)
    plan_of = np.asarray([c for c, _, _ in cand_id])
    norms = np.linalg.norm(p, axis=1)
    order = np.argsort(p[:, 0])
    first = p[order, 0]
    best, scores = None, []
    for rank, a in enumerate(order):  # sweep along the first coordinate: only a window can be within tol
        thr = tol * norms[a]
        hi = np.searchsorted(first, first[rank] + thr * 1.0001, side="right")
        lo = np.searchsorted(first, first[rank] - thr * 1.0001, side="left")
        win = order[lo:hi]
        win = win[plan_of[win] != plan_of[a]]
        if win.size + 1 < support:
            continue
        rel = np.linalg.norm(p[win] - p[a], axis=1) / np.maximum(np.maximum(norms[win], norms[a]), 1e-300)
        used, plans_in, group = {cand_id[a][1], cand_id[a][2]}, {plan_of[a]}, []
        close = win[rel <= tol]
        for k in close[np.argsort(rel[rel <= tol])]:  # greedily: members share no answer with each other
            k = int(k)
            if plan_of[k] not in plans_in and not used & {cand_id[k][1], cand_id[k][2]}:
                used |= {cand_id[k][1], cand_id[k][2]}
                plans_in.add(plan_of[k])
                group.append(k)
        n_plans = len(plans_in)
        scores.append((n_plans, int(a)))
        if n_plans >= support and (best is None or n_plans > best[0]):
            best = (n_plans, [int(a)] + group)
    if best is None:
        return None
    centre = p[best[1][0]]
    rival = max([n for n, k in scores if np.linalg.norm(p[k] - centre) > 10 * tol * norms[k]], default=0)
    if best[0] < margin * rival:  # another value is nearly as well supported: ask more rounds
        return None

    def full(k):
        c, (sa, i), (sb, j) = cand_id[k]
        la, lb = plans[c].coeffs
        return la * tvec[sa][i] + lb * tvec[sb][j]

    members = best[1]
    vs = np.stack([full(k) for k in members])
    v = np.median(vs, axis=0)
    ok = [k for k, row in zip(members, vs) if _rel(row, v) <= 2 * tol]
    if len({plan_of[k] for k in ok}) < support:
        return None
    spread = max(_rel(full(k), v) for k in ok)
    return v, tuple(sorted({int(plan_of[k]) for k in ok})), spread
