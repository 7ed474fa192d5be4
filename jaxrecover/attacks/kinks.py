"""Exact recovery with a fixed step count from the kinks of the reported output values.

A deployed service reports ``f(z)`` with every explanation. For a piecewise-linear
net (ReLU, max-pool, BatchNorm in inference) ``phi(t) = f(b + t d)``, ``d = x - b``,
is piecewise linear and its slope ``g(t) . d`` changes where the gradient
``g(t)`` along the ray changes. So the output values alone (forward passes,
no attributions) locate the gradient's breakpoints:

1. ``phi`` on a grid of ``t`` in ``[0, 1]``: where consecutive slopes differ
   beyond round-off, a run of grid points holds one or more kinks.
2. Each run: the two clean lines beside it intersect at ``t*``; when
   ``phi(t* -+ delta)`` lie on the left / right line the run is ONE kink,
   bracketed by ``[t* - delta, t* + delta]``; otherwise the run is resampled
   on a finer grid and searched again (batched per level).

Between the brackets the gradient is constant. The answer with the service's
fixed ``m`` at the scale that puts its top node at ``t = s`` is
``T(s) = sum_j w_j g(s r_j)`` (``r_j = a_j / a_top``). Each jump ``Delta_k`` of
``g`` across bracket ``k`` is read from two answers whose scales put one heavy
node's echo below and above the bracket while no other echo crosses a bracket
or lies inside one:

    Delta_k = (T(s_hi) - T(s_lo)) / w_j,

so no error is carried from one jump to the next (solving for the gradient
gap after gap instead, ``G_k = (T(s_k) - lower echoes) / w_top``, is a
deconvolution whose errors grow by ``sum w_j / w_top`` per step: 49x for
riemann_right, ~690x for gausslegendre's small end weights; measured unstable
on a small conv net). Where every pair has other echoes crossing, brackets
below ``k`` are allowed and their (already read) jumps subtracted. Then
``VG = g(0+) + sum_{t_k < 1} Delta_k`` with ``g(0+) = T(s_0) / sum_j w_j`` for
``s_0`` below the first kink (a bracket holding ``t = 1`` itself is read from
the answer at ``s = 1`` through its top node instead). Cost: about
``2 K + 2`` explanations for ``K`` kinks plus the output values of the grid and
its refinement.

The two echoes are placed as far into the gaps beside the bracket as the
other echoes allow (up to 45 % of each gap): their difference holds every
breakpoint between them, also one that ``phi`` does not show (on trained
LeNet, a weak breakpoint just below a strong kink, missed by a window of a
quarter of the bracket's width).

Checks (in :class:`KinkReport`): the decoded ``G_k . d`` must equal the slope of
``phi`` on every grid segment inside gap ``k`` (``slope_residual``), and
``checks`` extra answers at random scales must equal what the decoded profile
predicts (``check_residual``). A breakpoint that ``phi`` does not show (a
gradient change with ``Delta . d = 0`` leaves no kink) and that no window holds
is caught by the second when a check's echoes straddle it (not by the first:
it changes ``G`` but not ``G . d``); one showing a kink the grid missed, by
both. Hidden breakpoints are not generic: where one unit ``u`` switches (a
ReLU, or a max-pool's argmax), ``Delta = (df/du) grad u`` and the slope of
``phi`` changes by ``(df/du) (du/dt)``, zero only when the switch changes
nothing; hiding one needs several units switching at about the same ``t`` with
cancelling effects on ``phi``, or effects below round-off. Assumptions: the
baseline is inside a linear region (``g(b) = g(0+)``; see :mod:`.fixed_steps`
for why this is needed by any fixed-m recovery) and no breakpoint lies in
``t < 2^-40 / grid`` (the grid is geometric towards the baseline, uniform after ``1 / grid``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .linearity import RecoveryIncomplete, check_piecewise_linear
from .outputs import output_values
from ..services import QueryBudgetExceeded, attack_inputs
from .result import Recovery, RecoveryReport, as_recovery

__all__ = ["recover_fixed_steps_from_kinks", "KinkReport", "audit_kinks", "KinkAudit"]


@dataclasses.dataclass
class KinkReport(RecoveryReport):
    """What :func:`recover_fixed_steps_from_kinks` spent and found, per example.

    Attributes:
      queries: queries spent per example (explanations + output values; each value is one query).
      explanations: explanation queries whose attributions were used (each costs the service ``m`` gradients).
      values: output values read (one query each, the attributions unused).
      kinks: brackets of breakpoints found on ``(0, 1]``.
      gaps_used: gaps between kinks whose gradient was decoded.
      merged: neighbouring kinks read as one jump because no pair of queries separated them.
      searched: brackets too wide for any pair whose breakpoints were located with answers (their answers are
        counted in ``explanations``).
      linearity: explanations spent by the piecewise-linearity check (counted in ``explanations``).
      slope_residual: max over grid segments of ``|G . d - slope of phi|`` relative to ``max |slope|``
        (NaN when no grid segment lies in a decoded gap: nothing was checked).
      check_residual: max over the check answers of ``|T - predicted T|`` relative to ``max |T|`` (NaN when
        every check scale put an echo inside a bracket).
      assumptions: what the recovery assumed.
      stopped: None when every example was recovered, else why and where the recovery stopped (a budget
        ran out); the lists then cover the finished examples only.
    """

    queries: list[int]
    explanations: list[int]
    values: list[int]
    kinks: list[int]
    gaps_used: list[int]
    merged: list[int]
    slope_residual: list[float]
    check_residual: list[float]
    searched: list[int] = dataclasses.field(default_factory=list)
    linearity: list[int] = dataclasses.field(default_factory=list)
    assumptions: str = ""
    stopped: str | None = None


class _RayValues:
    """``phi(t) = f(b + t d)`` for one example, read from the service (one query per value)."""

    def __init__(self, service, b, d, target, chunk, cap=None):
        self.service, self.b, self.d, self.target, self.chunk, self.cap = service, b, d, target, chunk, cap
        self.count = 0

    def __call__(self, t) -> np.ndarray:
        t = np.asarray(t, np.float64)
        out = np.empty(t.size)
        for k in range(0, t.size, self.chunk):
            tk = t[k:k + self.chunk]
            _spend(self.service, tk.size, self.cap)
            z = (self.b[None] + tk.reshape((-1,) + (1,) * self.d.ndim) * self.d[None]).astype(self.service.dtype)
            out[k:k + tk.size] = output_values(self.service, jnp.asarray(z), jnp.full((tk.size,), self.target))
        self.count += t.size
        return out


def _runs(t, phi, tol):
    """Maximal runs ``(p, q)`` of grid points whose two neighbouring slopes differ beyond round-off."""
    h = np.diff(t)
    slope = np.diff(phi) / h
    jump = np.abs(np.diff(slope))
    flag = jump > 4 * tol * (1 / h[:-1] + 1 / h[1:])
    idx = np.flatnonzero(flag) + 1  # junction i sits at t[i], between segments i-1 and i
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return list(zip(starts.tolist(), ends.tolist()))


def _isolate(phi_of, problems, tol, *, parents=None, subdivisions=16, max_depth=12, max_reach=64.0):
    """Brackets of the kinks in each problem ``(t, phi)`` (sorted samples whose first and last segments are
    clean), as ``(lo, hi)``. ``parents[i]``: the bracket to report when problem ``i`` shows no kink
    (known to hold one, e.g. from a coarser look)."""
    brackets = []
    problems = [(tt, ff, None if parents is None else parents[i]) for i, (tt, ff) in enumerate(problems)]
    for depth in range(max_depth + 1):
        cand = []  # (t, phi, p, q, t_star, delta, slope_left, slope_right)
        for tt, ff, parent in problems:
            runs = _runs(tt, ff, tol)
            if not runs and parent is not None:  # finer segments hide a weak kink that the coarser ones showed
                brackets.append(parent)
            for p, q in runs:
                sa = (ff[p] - ff[p - 1]) / (tt[p] - tt[p - 1])
                sc = (ff[q + 1] - ff[q]) / (tt[q + 1] - tt[q])
                ds = sa - sc
                width = tt[q + 1] - tt[p - 1]
                t_star = np.nan
                if abs(ds) > 0:
                    t_star = (ff[q + 1] - ff[p - 1] + sa * tt[p - 1] - sc * tt[q + 1]) / ds
                ok = np.isfinite(t_star) and tt[p - 1] < t_star < tt[q + 1]
                # line errors after extrapolating across the run: round-off ``tol`` times this reach
                reach = 1 + width / min(tt[p] - tt[p - 1], tt[q + 1] - tt[q])
                # the intersection is off by about 2 tol reach / |ds|: the bracket is 4x wider than that
                delta = (8 * tol * reach / abs(ds) + 1e-13 * max(abs(t_star), width)) if ok else 0.0
                # lines extrapolated far beyond the segments that define them (large reach) would accept several
                # kinks as one: such runs are resampled instead
                ok = ok and reach <= max_reach and tt[p - 1] < t_star - delta and t_star + delta < tt[q + 1]
                cand.append((tt, ff, p, q, t_star if ok else np.nan, delta, sa, sc))
        if not cand:
            break
        tests = np.concatenate([[c[4] - c[5], c[4] + c[5]] for c in cand if np.isfinite(c[4])] or [np.zeros(0)])
        vals = iter(phi_of(tests) if tests.size else [])
        children, new_points = [], []
        for tt, ff, p, q, t_star, delta, sa, sc in cand:
            lo_t, hi_t = tt[p - 1], tt[q + 1]
            extra_t, extra_f = np.zeros(0), np.zeros(0)
            if np.isfinite(t_star):
                f_lo, f_hi = next(vals), next(vals)
                line_a = ff[p - 1] + sa * (t_star - delta - tt[p - 1])
                line_c = ff[q + 1] + sc * (t_star + delta - tt[q + 1])
                reach = 1 + (hi_t - lo_t) / min(tt[p] - tt[p - 1], tt[q + 1] - tt[q])
                if abs(f_lo - line_a) <= 2 * tol * reach and abs(f_hi - line_c) <= 2 * tol * reach:
                    brackets.append((t_star - delta, t_star + delta))
                    continue
                extra_t, extra_f = np.array([t_star - delta, t_star + delta]), np.array([f_lo, f_hi])
            if depth == max_depth or hi_t - lo_t <= 1e-12 * max(hi_t, 1e-300):
                brackets.append((tt[p], tt[q]) if q > p else (tt[p - 1], tt[q + 1]))
                continue
            # every segment of the run (or both beside a lone point) cut into `subdivisions`
            knots = tt[p:q + 1] if q > p else tt[p - 1:q + 2]
            frac = np.arange(1, subdivisions) / subdivisions
            fresh = (knots[:-1, None] + frac[None] * np.diff(knots)[:, None]).reshape(-1)
            children.append((tt[p - 1:q + 2], ff[p - 1:q + 2], extra_t, extra_f, fresh,
                             (tt[p], tt[q]) if q > p else (lo_t, hi_t)))
            new_points.append(fresh)
        if not children:
            problems = []
            break
        fresh_vals = phi_of(np.concatenate(new_points))
        problems, k = [], 0
        for tt, ff, et, ef, fresh, parent in children:
            fv = fresh_vals[k:k + fresh.size]
            k += fresh.size
            ts = np.concatenate([tt, et, fresh])
            fs = np.concatenate([ff, ef, fv])
            order = np.argsort(ts, kind="stable")
            ts, fs = ts[order], fs[order]
            keep = np.concatenate([[True], np.diff(ts) > 0])
            problems.append((ts[keep], fs[keep], parent))
    return brackets


def _locate_kinks(phi_of, t, phi, tol, *, samples=4, passes=12):
    """Brackets ``(lo, hi)`` (sorted, disjoint) of the kinks of ``phi`` sampled on the grid ``t``.

    After the grid's runs are isolated, every gap between brackets is checked for linearity at its own scale
    (``samples + 1`` values; the junction test on a fine subdivision is blind to a weak kink next to a strong
    one, as round-off over a short segment swamps it): a gap off its chord becomes a new problem, with points
    geometrically closer to each bracket, until every gap is straight."""
    brackets = _isolate(phi_of, [(t, phi)], tol)
    tested = set()  # gaps already checked (a gap off its chord where no kink was isolated is not retried)
    for _ in range(passes):
        brackets.sort(key=lambda b: b[0])
        ends = [0.0] + [b[1] for b in brackets]
        starts = [b[0] for b in brackets] + [float(t[-1])]
        gaps = [(a, c) for a, c in zip(ends, starts) if c > a and (a, c) not in tested]
        tested.update(gaps)
        if not gaps:
            break
        frac = np.arange(samples + 1) / samples
        pts = np.concatenate([a + frac * (c - a) for a, c in gaps])
        vals = phi_of(pts).reshape(len(gaps), samples + 1)
        problems = []
        for (a, c), f in zip(gaps, vals):
            chord = f[0] + frac * (f[-1] - f[0])
            if np.max(np.abs(f - chord)) <= 4 * tol:
                continue
            u = (c - a) / samples  # points geometrically closer to both brackets: first and last segments tiny
            new_t = np.concatenate([a + u * 2.0 ** -np.arange(1, 13), c - u * 2.0 ** -np.arange(1, 13)])
            problems.append((a + frac * (c - a), f, new_t, (a, c)))
        if not problems:
            break
        new_all = np.concatenate([pr[2] for pr in problems])
        new_vals = phi_of(new_all) if new_all.size else np.zeros(0)
        ready, k = [], 0
        for kt, kf, nt, _ in problems:
            tt = np.concatenate([kt, nt])
            ff = np.concatenate([kf, new_vals[k:k + nt.size]])
            k += nt.size
            order = np.argsort(tt, kind="stable")
            ready.append((tt[order], ff[order]))
        # a gap off its chord holds a kink even where no junction shows it: then the gap itself is the bracket
        brackets += _isolate(phi_of, ready, tol, parents=[pr[3] for pr in problems])
    if not brackets:
        return np.zeros(0), np.zeros(0)
    br = np.asarray(sorted((b[0], b[1]) for b in brackets))
    lo, hi = [br[0, 0]], [br[0, 1]]
    for a, c in br[1:]:  # merge overlapping brackets
        if a <= hi[-1]:
            hi[-1] = max(hi[-1], c)
        else:
            lo.append(a)
            hi.append(c)
    return np.asarray(lo), np.asarray(hi)


def _gap_of(points, lo, hi):
    """Gap index of each point (gap ``k`` lies between bracket ``k-1`` and bracket ``k``) and whether the point
    is inside a bracket."""
    points = np.asarray(points, np.float64)
    k = np.searchsorted(hi, points, side="left")  # brackets whose hi < point
    if lo.size == 0:
        return k, np.zeros(points.shape, bool)
    inside = (k < lo.size) & (points >= lo[np.clip(k, 0, lo.size - 1)])
    return k, inside


def _heavy_nodes(nodes, weights):
    """Nodes that may read a jump: those with at least half the largest weight, the one nearest the top first
    (a smaller reach past ``t = 1``), then the lighter ones from the top down.

    A light node divides the round-off of two answers by its small weight (gausslegendre's end nodes at
    m = 50: about 1/690 of the largest, so ~1e-13 per jump in float64), but it is the only reader for a jump
    where every heavy node's pair would move the echo of a node ABOVE it across another bracket (seen on trained
    LeNet with gausslegendre, where merging such brackets into neighbours only moved the conflict). The top
    node's other echoes all lie below it."""
    top = float(nodes.max())
    pos = nodes > 0
    heavy = np.flatnonzero((weights >= 0.5 * weights.max()) & pos)
    light = np.flatnonzero((weights < 0.5 * weights.max()) & pos & (weights > 0))
    return np.concatenate([heavy[np.argsort(-nodes[heavy], kind="stable")],
                           light[np.argsort(-nodes[light], kind="stable")]]), top


def _jump_queries(lo, hi, ratios, weights, candidates, t_max,
                  fractions=(0.45, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0)):
    """For each bracket ``k``: two scales below and above it in the frame of one heavy node ``j`` (its echo
    crosses bracket ``k``), as ``(s_lo, s_hi, j, crossings)``; None where none fits. No echo may fall inside a
    bracket; the other echoes should cross none, else only brackets below ``k``, listed in ``crossings`` as
    ``(w_i, c)`` so that their jumps, read before, are subtracted.

    The pair reads ``g(s_hi r_j) - g(s_lo r_j)``: every breakpoint between its two echoes, including one that
    ``phi`` does not show (a unit switching with almost no effect on ``f``, seen next to a strong kink on trained
    LeNet), so the WIDEST clean window is taken: margins of ``fractions`` of the gaps beside the bracket, the
    largest first (the last, 0, is a quarter of the bracket's width). The narrowest window that has other echoes
    crossing only lower brackets is the fallback (the fewest jumps subtracted)."""
    out = []
    cand = np.asarray(candidates)
    for k in range(lo.size):
        width = hi[k] - lo[k]
        below = lo[k] - (hi[k - 1] if k else 0.0)
        above = lo[k + 1] - hi[k] if k + 1 < lo.size else max(1.0 - hi[k], width)  # the last: up to t = 1
        chosen, fallback = None, None
        for f in fractions:
            if f == 0:
                near = 0.25 * width + 1e-15 * hi[k]
                m_lo, m_hi = min(near, 0.5 * below), min(near, 0.5 * above)
            else:
                m_lo, m_hi = f * below, f * above
            with np.errstate(invalid="ignore", over="ignore"):
                s_lo, s_hi = (lo[k] - m_lo) / ratios[cand], (hi[k] + m_hi) / ratios[cand]
            ok = np.isfinite(s_hi) & (s_hi <= t_max)
            if not ok.any():
                continue
            c_ok = cand[ok]
            ga, ia = _gap_of(s_lo[ok, None] * ratios[None], lo, hi)  # [candidates, nodes]
            gb, ib = _gap_of(s_hi[ok, None] * ratios[None], lo, hi)
            rows = np.arange(c_ok.size)
            own_a, own_b = ga[rows, c_ok], gb[rows, c_ok]
            valid = ~ia.any(1) & ~ib.any(1) & (own_a == k) & (own_b == k + 1)
            moved = ga != gb
            moved[rows, c_ok] = False
            clean = valid & ~moved.any(1)
            if clean.any():
                r = int(np.argmax(clean))
                chosen = (s_lo[ok][r], s_hi[ok][r], int(c_ok[r]), [])
                break
            low = valid & np.all(~moved | (gb <= k), axis=1)
            if low.any():  # narrower windows come later and replace it
                r = int(np.argmax(low))
                fallback = (s_lo[ok][r], s_hi[ok][r], int(c_ok[r]),
                            [(weights[i], c) for i in np.flatnonzero(moved[r]) for c in range(ga[r, i], gb[r, i])])
        if chosen is None and fallback is None:
            chosen = _wider_pair(k, lo, hi, ratios, weights, candidates, t_max, below, above)
        out.append(chosen if chosen is not None else fallback)
    return out


def _judge_pair(k, j, s_lo, ga, s_hi, gb, others, weights, want_fallback):
    """``(pair, clean)`` for node ``j``'s pair ``(s_lo, s_hi)`` around bracket ``k`` (``ga``/``gb``: the gaps of
    every echo at the two scales): clean when no other echo moves across a bracket; else, when
    ``want_fallback`` and every moved echo crosses only brackets below ``k``, the pair with those crossings
    ``(w_i, c)`` (their jumps, read before, are subtracted); else ``(None, False)``."""
    moved = np.flatnonzero(others[j] & (ga != gb))
    if moved.size == 0:
        return (s_lo, s_hi, int(j), []), True
    if want_fallback and np.all(gb[moved] <= k):
        return (s_lo, s_hi, int(j), [(weights[i], c) for i in moved for c in range(ga[i], gb[i])]), False
    return None, False


def _wider_pair(k, lo, hi, ratios, weights, candidates, t_max, below, above, steps=24):
    """A pair for bracket ``k`` with the two scales chosen apart: any scale below and any above that put no echo
    inside a bracket, the closest first (the symmetric margins of :func:`_jump_queries` can all be spoiled by
    some echo landing inside one of thousands of brackets). Same conditions; None if none fits."""
    fr = np.linspace(0.5 / steps, 0.5, steps)
    others = [np.arange(ratios.size) != j for j in range(ratios.size)]
    for j in candidates:
        room = min(above, t_max * ratios[j] - hi[k])  # the last bracket: up to t_max in node j's frame
        if room <= 0:
            continue
        los = [(lo[k] - f * below) / ratios[j] for f in fr]
        his = [(hi[k] + f * room) / ratios[j] for f in fr]
        ok_lo = []
        for s_lo in los:
            ga, ia = _gap_of(s_lo * ratios, lo, hi)
            if not ia.any() and ga[j] == k:
                ok_lo.append((s_lo, ga))
        if not ok_lo:
            continue
        fallback = None
        for s_hi in his:
            if s_hi > t_max or not np.isfinite(s_hi):
                continue
            gb, ib = _gap_of(s_hi * ratios, lo, hi)
            if ib.any() or gb[j] != k + 1:
                continue
            for s_lo, ga in ok_lo:
                pair, clean = _judge_pair(k, j, s_lo, ga, s_hi, gb, others, weights, fallback is None)
                if clean:
                    return pair
                fallback = fallback or pair
        if fallback is not None:
            return fallback
    return None


def _split_by_answers(answer_of, lo, hi, k, ratios, weights, top, rel=1e-12, max_events=256):
    """The breakpoints inside bracket ``k``, located with answers instead of output values, as tiny brackets
    ``[(lo, hi), ...]``; None where this fails.

    For a bracket too wide for any pair (a run of kinks the output values could not separate, wider than the
    spacing of the rule's echoes): the top node's echo is moved up through it (``answer_of(s)``: answers at the
    scales that put the top node at ``t = s``). Each change of the answer that the breakpoints found so far do
    not explain is located by bisection in ``s`` to a few ulps: an echo crossing a breakpoint. It is the top
    echo crossing the next breakpoint of the bracket, unless another echo is then inside another bracket (its
    breakpoints are crossed on the way too): then the one whose position, put under a heavy node's echo in two
    more answers just below and above it, changes the answer there. Its jump, ``(T(s+) - T(s-)) / w``, explains the
    same breakpoint's later crossings by the other echoes, and the scan goes on until the answer above the
    bracket is explained. A change is one beyond ``rel max |T|``. Two breakpoints crossed at the same scale
    (measure zero) would be read as one. Every breakpoint found this way is read again by a jump pair
    afterwards; a wrong attribution shows in the checks. Cost: about 45 answers per change."""
    below = lo[k] - (hi[k - 1] if k else 0.0)
    above = lo[k + 1] - hi[k] if k + 1 < lo.size else max(1.0 - hi[k], hi[k] - lo[k])
    mu = 0.25 * min(below, above, hi[k] - lo[k])
    s_a, s_b = (lo[k] - mu) / ratios[top], (hi[k] + mu) / ratios[top]
    others = np.flatnonzero(np.arange(ratios.size) != top)
    events, inside_k = [], []  # (t_lo, t_hi, jump) located so far; the brackets they give inside bracket k

    def explained(s_ref, t_ref, s):
        e = t_ref.copy()
        for a, c, jump in events:  # echoes that moved across a located breakpoint between s_ref and s
            crossed = (s_ref * ratios < 0.5 * (a + c)) & (s * ratios > 0.5 * (a + c))
            e += np.sum(weights[crossed]) * jump
        return e

    s_ref, t_ref = s_a, answer_of([s_a])[0]
    t_end = answer_of([s_b])[0]
    thr = rel * max(float(np.max(np.abs(t_ref))), float(np.max(np.abs(t_end))), 1e-300)
    while np.max(np.abs(t_end - explained(s_ref, t_ref, s_b))) > thr:
        if len(events) == max_events:
            return None
        s_lo, s_hi, r_hi = s_ref, s_b, t_end
        while s_hi - s_lo > 4 * np.spacing(s_hi):
            s_mid = 0.5 * (s_lo + s_hi)
            r_mid = answer_of([s_mid])[0]
            if np.max(np.abs(r_mid - explained(s_ref, t_ref, s_mid))) > thr:
                s_hi, r_hi = s_mid, r_mid
            else:
                s_lo = s_mid
        # where a unit switches depends on the round-off of its pre-activation, so on how the query point was
        # rounded: seen to move by 1e-13..1e-12 of t between frames on trained LeNet; checked and kept with a pad
        pad = max(4 * np.spacing(s_hi), 1e-10 * s_hi)
        e_lo, e_hi = (s_lo - pad) * ratios[others], (s_hi + pad) * ratios[others]
        c = np.searchsorted(hi, e_lo, "left")
        in_other = (c < lo.size) & (c != k) & (lo[np.minimum(c, lo.size - 1)] <= e_hi)
        owner = top
        if in_other.any():  # which echo crossed: a breakpoint at its position changes an answer in another frame
            owner = None
            for o in [top] + others[in_other].tolist():
                j = next(n for n in np.argsort(-weights) if n != o and ratios[n] > 0)
                probe = answer_of(np.array([s_lo - pad, s_hi + pad]) * ratios[o] / ratios[j])
                if np.max(np.abs(probe[1] - probe[0])) > thr:
                    owner = o
                    break
            if owner is None:
                return None
        if owner == top and not lo[k] - mu < s_lo * ratios[top] < hi[k] + mu:
            return None
        jump = (r_hi - explained(s_ref, t_ref, s_hi)) / weights[owner]
        events.append(((s_lo - pad) * ratios[owner], (s_hi + pad) * ratios[owner], jump))
        if owner == top:
            inside_k.append(events[-1][:2])
        s_ref, t_ref = s_hi, r_hi
    return inside_k or None


def _merge(lo, hi, bad):
    """Each bracket of ``bad`` merged into its nearer neighbour (their jumps are then read as one), in one pass.

    From the top down, so the indices below a merge keep their meaning; a bracket next to one merged in this
    pass is left for the next (its pairs are recomputed first). Returns ``(lo, hi, merges)``.
    """
    merges, floor = 0, lo.size
    for k in sorted(bad, reverse=True):
        if k >= floor or lo.size < 2:
            continue
        left = lo[k] - hi[k - 1] if k > 0 else np.inf
        right = lo[k + 1] - hi[k] if k + 1 < lo.size else np.inf
        other = k - 1 if left <= right else k + 1
        if other >= floor:
            continue
        a, c = min(k, other), max(k, other)
        lo, hi = np.delete(lo, c), np.delete(hi, a)
        merges, floor = merges + 1, a
    return lo, hi, merges


@as_recovery("fixed-m kinks + jump pairs")
def recover_fixed_steps_from_kinks(service, x, target, *, grid: int = 16384, tol: float | None = None,
                                   checks: int = 4, chunk: int = 2048, seed: int = 0, budget: int | None = 2**20,
                                   progress: bool = False):
    """Recover VG exactly from a service that fixes its step count and reports output values.

    Args:
      service: an :class:`jaxrecover.attacks.IGService` that implements ``outputs`` (any rule;
        :meth:`~jaxrecover.attacks.IGService.quadrature` gives its nodes and weights) with a fixed baseline.
      x: ``[N, ...]`` inputs in the service's dtype; target: ``[N]`` classes.
      grid: segments of the first grid of ``phi`` (a few per breakpoint is enough; runs of several kinks are
        resampled).
      tol: round-off of one output value, relative to ``max |phi|`` (default ``16 eps``, a few times the round-off of phi's second differences away from kinks on trained LeNet).
      checks: extra answers at random scales that verify the decoded profile.
      chunk: output values per service call.
      seed: seed of the check scales.
      budget: queries per example, explanations and output values together (None: only the service's own
        budget bounds it).
      progress: a progress bar over the examples.

    Returns:
      ``(vg, mask, report)``: the recovered gradients (NaN where ``x == b``), the mask of recoverable
      coordinates, and a :class:`KinkReport`.

    Raises:
      ValueError: the rule has no positive node with weight, or a kink admits no pair of queries that
        isolates its jump even after its bracket was searched with answers (:func:`_split_by_answers`, for
        brackets wider than the spacing of the rule's echoes) and merged with a few neighbours.
      NotPiecewiseLinear: the answers change smoothly along the ray (tanh, softplus), found from a few dozen
        answers before any output value is read.
      RecoveryIncomplete: this budget or the service's ran out; ``.partial`` holds ``(vg, mask, report)``
        with every example finished before (the rest NaN, masked out).
    """
    x, target = attack_inputs(service, x, target)
    eps = float(np.finfo(np.dtype(service.dtype)).eps)
    rel_tol = tol if tol is not None else 16 * eps
    nodes, weights = (np.asarray(v, np.float64) for v in service.quadrature(service.steps))
    keep = weights != 0
    nodes, weights = nodes[keep], weights[keep]
    if not np.any(nodes > 0):
        raise ValueError(f"rule {service.rule} with {service.steps} steps has no positive node with weight")
    candidates, a_top = _heavy_nodes(nodes, weights)
    ratios = nodes / a_top
    top = int(np.argmax(nodes))
    t_max = 1.0 / ratios[candidates[0]]  # the first candidate reads a jump at t = 1 with its top node here
    b_all = np.asarray(service.fixed_baseline(x), np.float64)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1):
        raise ValueError(f"budget must be a positive number of queries per example or None, got {budget!r}")
    rng = np.random.default_rng(seed)
    out = np.full(x.shape, np.nan, np.float64)
    rep = KinkReport([], [], [], [], [], [], [], [])
    rep.assumptions = ("piecewise-linear net; output values reported with each explanation; baseline inside a "
                       "linear region and no breakpoint in t < 2^-40 / grid; every breakpoint shows as a "
                       "kink of f along the ray (checked by slope_residual and check_residual)")
    mask_all = np.asarray(x, np.float64) != b_all
    for i in tqdm(range(x.shape[0]), disable=not progress, desc="fixed-m recovery (kinks)", unit="example"):
        try:
            cap = None if budget is None else service.queries + budget
            out[i] = _recover_one(service, x[i], b_all[i], int(target[i]), rep, i, cap, grid=grid, rel_tol=rel_tol,
                                  eps=eps, checks=checks, chunk=chunk, rng=rng, nodes=nodes, weights=weights,
                                  candidates=candidates, a_top=a_top, ratios=ratios, top=top, t_max=t_max,
                                  progress=progress)
        except QueryBudgetExceeded as e:
            done = np.zeros(x.shape[0], bool)
            done[:i] = True
            rep.stopped = f"example {i} of {x.shape[0]}: {e}"
            part = Recovery(jnp.asarray(out, x.dtype),
                    jnp.asarray(mask_all & done.reshape((-1,) + (1,) * (x.ndim - 1))), rep)
            raise RecoveryIncomplete(f"query budget ran out at example {i} of {x.shape[0]} ({e}); the {i} "
                                     "finished example(s) are in .partial", part, cause=e) from None
    return jnp.asarray(out, x.dtype), jnp.asarray(mask_all), rep


def _spend(service, n: int, cap: int | None) -> None:
    """Refuse ``n`` more queries past ``cap`` (the service's query count at which this example's budget ends)."""
    if cap is not None and service.queries + n > cap:
        raise QueryBudgetExceeded(f"the recovery's budget per example ran out ({service.queries} queries counted "
                                  f"by the service, this example may go up to {cap})")


def _recover_one(service, x, b, target, rep, i, cap, *, grid, rel_tol, eps, checks, chunk, rng, nodes, weights,
                 candidates, a_top, ratios, top, t_max, progress):
    """One example's VG (NaN where ``x == b``); appends its counts and checks to ``rep``."""
    q0 = service.queries
    d = np.asarray(x, np.float64) - b
    mask = d != 0
    phi_of = _RayValues(service, b, d, target, chunk, cap)

    def answer_of(s):
        s = np.asarray(s, np.float64)
        return np.asarray(_answers(service, b, d, target, s / a_top, cap=cap)).reshape(s.size, -1)

    t_one = answer_of([1.0])[0]
    checked = 1 + check_piecewise_linear(answer_of, 0.25, 1.0, 256 * eps * max(float(np.max(np.abs(t_one))), 1e-300))
    h = t_max / grid
    # uniform grid past t_max (a kink there gets a clean right side), geometric towards the baseline
    t = np.concatenate([[0.0], h * 2.0 ** -np.arange(40, 0, -1), np.arange(1, grid + 3) * h])
    phi = phi_of(t)
    tol_i = rel_tol * max(float(np.max(np.abs(phi))), 1e-300)
    lo, hi = _locate_kinks(phi_of, t, phi, tol_i)
    merged, found, split, searched, tried = 0, lo.size, 0, 0, set()

    while True:  # rounds: every bracket no pair isolates is split or merged, then the pairs are recomputed once
        pairs = _jump_queries(lo, hi, ratios, weights, candidates, t_max * (1 + 2 / grid))
        needed = hi < 1.0  # the jumps g(1) is made of (a bracket holding 1 is read from the answer at 1)
        bad = [k for k in range(lo.size) if needed[k] and pairs[k] is None]
        if not bad:
            break
        q_split = service.queries
        parts = {k: _split_by_answers(answer_of, lo, hi, k, ratios, weights, top)
                 for k in bad if (lo[k], hi[k]) not in tried}
        tried.update((lo[k], hi[k]) for k in bad)
        split += service.queries - q_split
        searched += sum(v is not None for v in parts.values())
        if any(v is not None for v in parts.values()):  # too wide for a pair: located with answers instead
            for k in sorted(parts, reverse=True):
                if parts[k] is not None:
                    sub = np.asarray(parts[k])
                    lo = np.concatenate([lo[:k], sub[:, 0], lo[k + 1:]])
                    hi = np.concatenate([hi[:k], sub[:, 1], hi[k + 1:]])
            continue
        if lo.size < 2 or merged > max(8, found // 100):  # merging widens a bracket: it must settle quickly
            raise ValueError(
                f"example {i}: the kink bracket [{lo[bad[0]]:.6g}, {hi[bad[0]]:.6g}] admits no pair of queries "
                f"that isolates its jump (searching it with answers and {merged} merges of neighbouring "
                "brackets did not help: other nodes' echoes fall inside it); raise grid or lower tol")
        lo, hi, n_merged = _merge(lo, hi, bad)  # read neighbouring jumps as one
        merged += n_merged
    use = [k for k in range(lo.size) if needed[k]]
    at_one = bool(np.any((lo <= 1.0) & (hi >= 1.0)))
    s0 = 0.5 * (lo[0] if lo.size else 1.0)  # all echoes below the first kink: T = W g(0+)
    check_s = np.exp(rng.uniform(np.log(2.0 / grid), 0.0, size=checks))
    check_s = np.asarray([s for s in check_s if not _gap_of(s * ratios, lo, hi)[1].any()])
    scales = np.concatenate([[s0, 1.0], [pairs[k][0] for k in use], [pairs[k][1] for k in use], check_s])
    answers = np.asarray(_answers(service, b, d, target, scales / a_top, cap=cap,
                                  desc=f"example {i}: {scales.size} explanations" if progress else None))
    n = len(use)
    g0 = answers[0] / weights.sum()
    deltas = answers[2 + n:2 + 2 * n] - answers[2:2 + n]
    for k in use:  # in order of t: a pair's other echoes cross only brackets read before
        _, _, j, crossings = pairs[k]
        for w_c, c in crossings:
            deltas[k] -= w_c * deltas[c]
        deltas[k] /= weights[j]
    cum = np.concatenate([g0[None], g0[None] + np.cumsum(deltas, axis=0)])  # G on gap k = cum[k] (k <= n)
    if at_one:  # a kink within the bracket around t = 1: the answer at 1 gives g(1) through its top node
        gaps = _gap_of(ratios, lo, hi)[0]
        rest = np.arange(ratios.size) != top
        vg = (answers[1] - np.tensordot(weights[rest], cum[gaps[rest]], axes=1)) / weights[top]
    else:
        vg = cum[n]
    # checks: the decoded slopes against phi on the grid segments, and fresh answers against the profile
    dd = np.where(mask, d, 0.0).reshape(-1)
    slopes_G = cum.reshape(n + 1, -1) @ dd
    k_lo, in_lo = _gap_of(t[:-1], lo, hi)
    k_hi, in_hi = _gap_of(t[1:], lo, hi)
    clean = (k_lo == k_hi) & ~in_lo & ~in_hi & (k_lo <= n) & (np.diff(t) >= 0.5 * h)  # uniform part
    seg_slope = np.diff(phi) / np.diff(t)
    # NaN where a check covers nothing (e.g. merges swallowed the grid): no evidence is not a pass
    slope_res = (float(np.max(np.abs(slopes_G[k_lo[clean]] - seg_slope[clean]))
                       / max(float(np.max(np.abs(seg_slope))), 1e-300)) if clean.any() else float("nan"))
    check_res = float("nan")
    for s, T in zip(check_s, answers[2 + 2 * n:]):
        gk = _gap_of(s * ratios, lo, hi)[0]
        if np.any(gk > n):
            continue
        pred = np.tensordot(weights, cum[gk], axes=1)
        scale = max(float(np.max(np.abs(np.where(mask, T, 0.0)))), 1e-300)
        check_res = np.nanmax([check_res, float(np.max(np.abs(np.where(mask, T - pred, 0.0)))) / scale])
    rep.queries.append(service.queries - q0)
    rep.explanations.append(int(scales.size) + split + checked)
    rep.linearity.append(checked)
    rep.values.append(phi_of.count)
    rep.kinks.append(int(lo.size))
    rep.gaps_used.append(n + 1)
    rep.merged.append(merged)
    rep.searched.append(searched)
    rep.slope_residual.append(slope_res)
    rep.check_residual.append(check_res)
    return np.where(mask, vg, np.nan)


def _answers(service, b, d, target, c_values, chunk=256, desc=None, cap=None):
    """``T`` at the query points ``b + c d``: attributions divided by the query's offset (one query each)."""
    rows = []
    for k in tqdm(range(0, c_values.size, chunk), disable=desc is None, desc=desc, leave=False):
        c = c_values[k:k + chunk].reshape((-1,) + (1,) * d.ndim)
        _spend(service, c.shape[0], cap)
        xq = jnp.asarray(b[None] + c * d[None], service.dtype)
        ans = np.asarray(service(xq, jnp.full((c.shape[0],), target), steps=service.steps), np.float64)
        dq = np.asarray(xq, np.float64) - b[None]
        with np.errstate(divide="ignore", invalid="ignore"):
            rows += list(np.where(dq != 0, ans / np.where(dq != 0, dq, 1), 0.0))
    return rows


@dataclasses.dataclass
class KinkAudit:
    """What :func:`audit_kinks` found on one ray: brackets, output values spent, gaps checked, the gaps where the
    gradient still changes (``[(t_lo, t_hi, max change, change of phi's slope, change between the jump pairs'
    windows)]``), and how many / how large such changes fall between the windows (what the recovery cannot read)."""

    brackets: int
    values: int
    seconds: float
    gaps: int
    scale: float
    bad_gaps: list
    unread: int
    unread_max: float


def audit_kinks(model, variables, x, target: int, *, grid: int = 16384) -> KinkAudit:
    """White-box audit of the kink location behind :func:`recover_fixed_steps_from_kinks` (float64, zero baseline).

    Locates the kinks of f along the ray of ``x`` (one example, no batch axis) from output values exactly as the
    recovery does (a riemann_right service, m = 50 fixed), then checks with autodiff that the gradient is constant
    inside every gap between brackets (three points per gap, plus the two points a quarter of a bracket's width
    outside each bracket), and reports the gaps where it is not, with the size of the change there and the part of
    it between the windows where the recovery's jump pairs read the gradient (a change inside a window is read with
    that bracket's jump; one between two windows is missed).
    """
    import time

    import jax
    import jax.numpy as jnp

    from ..services import SimulatedIGService

    x = np.asarray(x, np.float64)
    v = variables
    t_start = time.time()
    svc = SimulatedIGService(model, v, rule="riemann_right", steps=50, fixed_steps=True)
    phi_of = _RayValues(svc, np.zeros_like(x), x, target, 2048)
    h = 1.0 / grid
    t = np.concatenate([[0.0], h * 2.0 ** -np.arange(40, 0, -1), np.arange(1, grid + 3) * h])
    phi = phi_of(t)
    tol = 16 * np.finfo(np.float64).eps * float(np.max(np.abs(phi)))
    lo, hi = _locate_kinks(phi_of, t, phi, tol)
    seconds = time.time() - t_start
    grad = jax.jit(jax.vmap(jax.grad(lambda z: model(v, z)[target])))

    def g(ts):
        return np.concatenate([np.asarray(grad(jnp.asarray(ts[k:k + 1024, None, None, None] * x[None])))
                               .reshape(min(1024, ts.size - k), -1) for k in range(0, ts.size, 1024)])

    a = np.concatenate([[0.0], hi])
    c = np.concatenate([lo, [1.0]])
    # the points next to each bracket, a quarter of its width outside it (the narrowest window a jump pair uses)
    width = hi - lo
    m_a = np.concatenate([[0.0], 0.25 * width + 1e-15 * hi])
    m_c = np.concatenate([0.25 * width + 1e-15 * hi, [0.0]])
    # where the recovery's jump pairs actually read the gradient (the widest window the other echoes allow)
    nodes, weights = (np.asarray(q, np.float64) for q in svc.quadrature(svc.steps))
    candidates, a_top = _heavy_nodes(nodes, weights)
    ratios = nodes / a_top
    pairs = _jump_queries(lo, hi, ratios, weights, candidates, 1.0 / ratios[candidates[0]] * (1 + 2 / grid))
    read_lo = np.array([p[0] * ratios[p[2]] if p else np.nan for p in pairs])  # t below bracket k
    read_hi = np.array([p[1] * ratios[p[2]] if p else np.nan for p in pairs])  # t above bracket k
    w_a = np.concatenate([[0.0], read_hi])  # gap k is read from w_a[k] (above bracket k-1) to w_c[k]
    w_c = np.concatenate([read_lo, [1.0]])
    keep = c > a
    a, c, m_a, m_c, w_a, w_c = a[keep], c[keep], m_a[keep], m_c[keep], w_a[keep], w_c[keep]
    m_a, m_c = np.minimum(m_a, 0.5 * (c - a)), np.minimum(m_c, 0.5 * (c - a))
    m_a = np.where(a == 0.0, 1e-3 * (c - a), m_a)  # not the baseline itself: the recovery reads g(0+) mid-gap
    w_a = np.where(a == 0.0, a + m_a, w_a)
    fr = np.array([0.001, 0.5, 0.999])
    pts = np.concatenate([(a + m_a)[:, None], a[:, None] + fr[None] * (c - a)[:, None], (c - m_c)[:, None],
                          w_a[:, None], w_c[:, None]], axis=1)
    G = g(np.nan_to_num(pts.reshape(-1), nan=0.5)).reshape(a.size, pts.shape[1], -1)
    change = np.max(np.abs(G[:, :5] - G[:, :1]), axis=(1, 2))
    scale = float(np.max(np.abs(G)))
    # between the windows: w_a, w_c and the interior samples inside [w_a, w_c]
    within = np.concatenate([np.ones((a.size, 1), bool), (pts[:, 1:4] >= pts[:, 5:6]) & (pts[:, 1:4] <= pts[:, 6:7]),
                             np.ones((a.size, 1), bool)], axis=1)
    inner = G[:, [5, 1, 2, 3, 6]]
    diff = np.where(within[..., None], np.abs(inner - inner[:, :1]), 0.0)
    unread = np.where(np.isfinite(w_a) & np.isfinite(w_c), np.max(diff, axis=(1, 2)), np.nan)
    bad = np.flatnonzero(change > 1e-9 * scale)
    gaps = [(float(a[k]), float(c[k]), float(change[k]), abs(float((G[k, 4] - G[k, 0]) @ x.reshape(-1))),
             float(unread[k])) for k in bad]
    worst = float(np.nanmax(unread)) if np.isfinite(unread).any() else float("nan")
    return KinkAudit(int(lo.size), int(phi_of.count), seconds, int(a.size), scale, gaps,
                     int(np.sum(unread > 1e-9 * scale)), worst)
