"""Exact recovery when the service fixes the step count: locate the jumps of the answers along the ray.

For a piecewise-linear net (ReLU, max-pool, BatchNorm in inference) the
gradient along the ray ``g(t) = grad f(b + t (x - b))`` is piecewise constant:
``g(t) = g(0+) + sum_k Delta_k [t > t_k]``. An answer with the service's fixed
``m`` at the scale that puts its top node at ``t = s`` is

    T(s) = sum_j w_j g(s r_j),        r_j = a_j / a_top <= 1,

a step function of ``s``: it jumps by ``w_j Delta_k`` at ``s = t_k / r_j``.
The top node sees each breakpoint first, at ``s = t_k``. So, sweeping ``s``
from near the baseline up to 1 in waves ``(p, p / r_2]`` (``r_2`` the second
largest ratio), every echo ``s r_j`` of a query in the wave lies in the part
of the ray already decoded, and the residual

    R(s) = T(s) - [T(s_0) + sum_known Delta_k sum_j w_j [s r_j > t_k]]

is ``w_top`` times the new jumps of ``g`` in ``(p, s]``. (Where the residual
far ahead is still 0 there is no jump at all up to there, echoes included:
the sweep gallops over such stretches, doubling its stride.) Bisection on ``s``
(one batched service call per level) brackets each new jump to a relative
width ``resolution`` and reads ``Delta = (R(hi) - R(lo)) / w_top`` there, a
difference of two answers: no error grows from one wave to the next. Then
``VG = g(1) = g(0+) + sum_k Delta_k`` with ``g(0+) = T(s_0) / sum_j w_j``.

Assumptions (stated in :class:`FixedStepsReport`): no breakpoint in ``t < s_0``
(checked: ``T(s_0) = T(s_0 / 4)``); a node at 0 sees ``g`` at the baseline,
which must equal ``g(0+)`` (baseline inside a linear region; otherwise ``g(0+)``
is not identifiable from fixed-m answers at all: adding ``v`` to ``g(b)`` and
``-v w_0 / W_+`` to ``g`` on ``t > 0`` changes no answer); and no pair of
jumps inside one bisection interval cancels exactly (their sum is 0, so
``g(1)`` is unaffected, but their echoes are then unexplained; the check of
the residual at ``s = 1`` catches it).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .linearity import RecoveryIncomplete, check_piecewise_linear
from ..services import QueryBudgetExceeded, attack_inputs
from .result import Recovery, RecoveryReport, as_recovery

__all__ = ["recover_fixed_steps", "FixedStepsReport"]


@dataclasses.dataclass
class FixedStepsReport(RecoveryReport):
    """What :func:`recover_fixed_steps` spent and found, per example.

    Attributes:
      queries: IG queries spent per example.
      evaluations: gradient evaluations the service spent per example.
      breakpoints: jumps of the gradient found on the ray per example (bracketed groups).
      waves: sweeps of the ray per example.
      final_residual: max |R(1)| / max |T(1)| per example: 0 up to round-off when every jump was explained.
      assumptions: what the recovery assumed.
      stopped: None when every example was recovered, else why the recovery stopped (a budget ran out) and
        at which example; the lists then cover the finished examples only.
    """

    queries: list[int]
    evaluations: list[int]
    breakpoints: list[int]
    waves: list[int]
    final_residual: list[float]
    assumptions: str
    stopped: str | None = None


class _Ray:
    """Answers ``T(s)`` along one example's ray, with the decoded jumps so far."""

    def __init__(self, service, x, b, target, nodes, weights, budget=None):
        self.service, self.x, self.b, self.target, self.budget = service, x, b, target, budget
        self.d = np.asarray(x, np.float64) - np.asarray(b, np.float64)
        self.mask = self.d != 0
        pos = nodes > 0
        self.top = int(np.argmax(nodes))
        self.a_top, self.w_top = float(nodes[self.top]), float(weights[self.top])
        others = [j for j in np.flatnonzero(pos) if j != self.top]
        self.ratios = np.asarray([nodes[j] / self.a_top for j in others], np.float64)
        self.other_w = np.asarray([weights[j] for j in others], np.float64)
        self.r2 = float(self.ratios.max()) if self.ratios.size else 0.0
        self.total_w = float(weights.sum())
        self.lo = np.zeros(0)
        self.hi = np.zeros(0)
        self.deltas: list[np.ndarray] = []
        self.queries = 0

    def answer(self, s_values) -> list[np.ndarray]:
        """``T(s)`` for each ``s`` (one service call for all)."""
        s_values = np.atleast_1d(np.asarray(s_values, np.float64))
        if self.budget is not None and self.queries + len(s_values) > self.budget:
            raise QueryBudgetExceeded(f"the recovery's budget of {self.budget} queries per example ran out "
                                      f"({self.queries} spent)")
        dtype = self.service.dtype
        c = (s_values / self.a_top).reshape((-1,) + (1,) * self.x.ndim)
        xq = jnp.asarray(np.asarray(self.b, np.float64)[None] + c * self.d[None], dtype)
        ans = np.asarray(self.service(xq, jnp.full((len(s_values),), self.target), steps=self.service.steps),
                         np.float64)
        self.queries += len(s_values)
        dq = np.asarray(xq, np.float64) - np.asarray(self.b, np.float64)[None]
        with np.errstate(divide="ignore", invalid="ignore"):
            return list(np.where(dq != 0, ans / np.where(dq != 0, dq, 1), 0.0))

    def _inside(self, s: float):
        """For each echo ``s r_j``: the bracket it falls strictly inside (its side of the jump unknown), or -1."""
        pts = s * self.ratios
        i = np.searchsorted(self.lo, pts, side="left") - 1
        ic = np.clip(i, 0, None)
        bad = (i >= 0) & (pts > self.lo[ic]) & (pts <= self.hi[ic])
        return np.where(bad, i, -1)

    def ambiguous(self, s: float) -> bool:
        """Whether some echo ``s r_j`` falls inside a bracket."""
        return bool(self.lo.size) and bool(np.any(self._inside(s) >= 0))

    def clear(self, s: float, floor: float) -> float:
        """``s`` or the nearest point below it (above ``floor``) whose echoes are unambiguous."""
        for _ in range(64):
            if not self.ambiguous(s):
                return s
            inside = self._inside(s)
            bad = inside >= 0
            s = float(np.min(self.lo[inside[bad]] / self.ratios[bad]))
            if s <= floor:
                break
        return s

    def expected_jumps(self, s: float) -> np.ndarray:
        """``sum_known Delta_k sum_j w_j [s r_j > t_k]`` (top node included)."""
        out = np.zeros_like(self.d)
        if not self.deltas:
            return out
        wsum = np.zeros(self.lo.size)
        wsum += self.w_top * (s > self.hi)
        for r, w in zip(self.ratios, self.other_w):
            wsum += w * (s * r > self.hi)
        for k in np.flatnonzero(wsum):
            out = out + wsum[k] * self.deltas[k]
        return out

    def add(self, groups) -> None:
        for lo, hi, delta in groups:
            self.deltas.append(delta)
        lo = np.concatenate([self.lo, [g[0] for g in groups]])
        hi = np.concatenate([self.hi, [g[1] for g in groups]])
        order = np.argsort(lo, kind="stable")
        self.lo, self.hi = lo[order], hi[order]
        self.deltas = [self.deltas[i] for i in order]


def _find_jumps(ray: _Ray, c0, p, q, r_p, r_q, tol, resolution):
    """All new jumps of the residual in ``(p, q]``, by bisection batched per level."""
    found = []
    level = [(p, q, r_p, r_q)]
    while level:
        split, mids = [], []
        for lo, hi, rlo, rhi in level:
            if np.max(np.abs(rhi - rlo)) <= tol:
                continue
            if hi - lo <= resolution * hi:
                found.append((lo, hi, (rhi - rlo) / ray.w_top))
                continue
            mid = ray.clear(0.5 * (lo + hi), lo)
            if not lo < mid < hi:
                mid = 0.5 * (lo + hi)
            split.append((lo, hi, rlo, rhi))
            mids.append(mid)
        if not mids:
            break
        answers = ray.answer(mids)
        level = []
        for (lo, hi, rlo, rhi), mid, t_mid in zip(split, mids, answers):
            r_mid = t_mid - c0 - ray.expected_jumps(mid)
            level += [(lo, mid, rlo, r_mid), (mid, hi, r_mid, rhi)]
    return found


@as_recovery("fixed-m jump decoding")
def recover_fixed_steps(service, x, target, *, s0: float = 1e-4, resolution: float | None = None,
                        tol: float | None = None, budget: int | None = 2**20, progress: bool = False):
    """Recover VG exactly from a service that fixes its step count (piecewise-linear nets).

    Args:
      service: an :class:`jaxrecover.attacks.IGService` (any rule; its
        :meth:`~jaxrecover.attacks.IGService.quadrature` gives the nodes and weights).
      x: ``[N, ...]`` inputs in the service's dtype; target: ``[N]`` classes.
      s0: the start of the sweep (``t = s0``): no breakpoint is assumed below it (checked by
        ``T(s0) = T(s0 / 4)``; moved closer to the baseline by factors of 16 while that fails).
      resolution: relative width to which jumps are bracketed (default 1e-8
        float64, 1e-5 float32).
      tol: a residual change below ``tol * max|T|`` counts as no jump (default
        sqrt of the dtype's eps).
      budget: queries per example (None: only the service's own budget bounds it).
      progress: a progress bar over the examples, and one per example over the sweep of the ray
        (log scale from ``s0`` to 1; conv nets have thousands of jumps on a ray, minutes per example).

    Returns:
      ``(vg, mask, report)``: the recovered gradients (NaN where ``x == b``),
      the mask of recoverable coordinates, and a :class:`FixedStepsReport`.

    Raises:
      NotPiecewiseLinear: the answers change smoothly along the ray (a tanh or softplus net), found
        within a few dozen queries (:func:`jaxrecover.attacks.linearity.check_piecewise_linear`).
      RecoveryIncomplete: this budget or the service's ran out; ``.partial`` holds ``(vg, mask, report)``
        with every example finished before (the rest NaN, masked out).
      ServiceAnswerError: the service answered NaN/inf (checked where answers leave every service).
    """
    x, target = attack_inputs(service, x, target)
    eps = float(np.finfo(np.dtype(service.dtype)).eps)
    if eps > 1e-10:
        warnings.warn(f"recover_fixed_steps reads single jumps against a sqrt(eps) tolerance and rarely finishes on "
                      f"{np.dtype(service.dtype).name} answers (issue 35); use recover_fixed_steps_lsq for float32 "
                      "services (docs/SERVICES.md, 'Fixed step count in float32')", RuntimeWarning, stacklevel=2)
    resolution = resolution if resolution is not None else (1e-8 if eps < 1e-10 else 1e-5)
    rel_tol = tol if tol is not None else float(np.sqrt(eps))
    nodes, weights = (np.asarray(v, np.float64) for v in service.quadrature(service.steps))
    b_all = np.asarray(service.fixed_baseline(x))
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1):
        raise ValueError(f"budget must be a positive number of queries per example or None, got {budget!r}")
    out = np.full(x.shape, np.nan, np.float64)
    rep = FixedStepsReport([], [], [], [], [], "")
    rep.assumptions = (f"piecewise-linear net; no gradient change for t < {s0:g} (checked); "
                       "gradient at the baseline = gradient just beside it (rules with a node at 0)")
    mask = np.asarray(x, np.float64) != np.asarray(b_all, np.float64)
    for i in tqdm(range(x.shape[0]), disable=not progress, desc="fixed-m recovery", unit="example"):
        try:
            out[i] = _recover_one(service, x[i], b_all[i], int(target[i]), nodes, weights, rep, i, s0=s0,
                                  resolution=resolution, rel_tol=rel_tol, eps=eps, budget=budget, progress=progress)
        except QueryBudgetExceeded as e:
            done = np.zeros(x.shape[0], bool)
            done[:i] = True
            rep.stopped = f"example {i} of {x.shape[0]}: {e}"
            part = Recovery(jnp.asarray(out, x.dtype), jnp.asarray(mask & done.reshape((-1,) + (1,) * (x.ndim - 1))), rep)
            raise RecoveryIncomplete(f"query budget ran out at example {i} of {x.shape[0]} ({e}); the {i} "
                                     "finished example(s) are in .partial", part, cause=e) from None
    return jnp.asarray(out, x.dtype), jnp.asarray(mask), rep


def _recover_one(service, x, b, target, nodes, weights, rep, i, *, s0, resolution, rel_tol, eps, budget, progress):
    """One example's VG (NaN where ``x == b``); appends its counts to ``rep``."""
    ray = _Ray(service, x, b, target, nodes, weights, budget)
    if ray.w_top == 0 or ray.a_top <= 0:
        raise ValueError(f"rule {service.rule} with {service.steps} steps has no positive top node with weight")
    t_start, t_check, t_one = ray.answer([s0, s0 / 4, 1.0])
    scale = max(float(np.max(np.abs(t_one))), float(np.max(np.abs(t_start))), 1e-300)
    tol_i = rel_tol * scale
    check_piecewise_linear(ray.answer, 0.25, 1.0, 256 * eps * scale)
    s_start = s0
    while np.max(np.abs(t_start - t_check)) > tol_i:  # a boundary below s_start: start closer to b
        if s_start < 1e-12:
            raise ValueError(f"example {i}: the gradient keeps changing down to t = {s_start:g} on the ray "
                             "(the baseline sits on a region boundary); fixed-m recovery cannot start")
        s_start /= 16
        t_start, t_check = ray.answer([s_start, s_start / 4])
    c0 = t_start
    p, r_p, waves = s_start, np.zeros_like(ray.d), 0
    stride = 1
    sweep = tqdm(total=1000, disable=not progress, desc=f"example {i}: sweep of the ray", leave=False,
                 bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
    while p < 1.0:
        sweep.update(int(1000 * np.log(p / s_start) / np.log(1 / s_start)) - sweep.n)
        sweep.set_postfix(t=f"{p:.3g}", jumps=len(ray.deltas), queries=ray.queries, refresh=False)
        if stride > 1:  # gallop: no jump at all in (p, q_far] leaves the residual at 0 there
            q_far = min(1.0, p / ray.r2 ** stride)
            q_far = ray.clear(q_far, p) if q_far < 1.0 else q_far
            if q_far > p:
                t_far = t_one if q_far == 1.0 else ray.answer([q_far])[0]
                r_far = t_far - c0 - ray.expected_jumps(q_far)
                if np.max(np.abs(r_far - r_p)) <= tol_i:
                    p, r_p, stride, waves = q_far, r_far, stride * 2, waves + 1
                    continue
            stride = 1
        q = 1.0 if ray.r2 == 0 else min(1.0, p / ray.r2)
        q = ray.clear(q, p) if q < 1.0 else q
        if q <= p:
            q = min(1.0, p / ray.r2)
        t_q = t_one if q == 1.0 else ray.answer([q])[0]
        r_q = t_q - c0 - ray.expected_jumps(q)
        groups = _find_jumps(ray, c0, p, q, r_p, r_q, tol_i, resolution)
        if groups:
            ray.add(groups)
        stride = 1 if groups else 2
        p, r_p, waves = q, t_q - c0 - ray.expected_jumps(q), waves + 1
    sweep.close()
    g0 = c0 / ray.total_w
    g1 = g0 + (np.sum(ray.deltas, axis=0) if ray.deltas else 0.0)
    rep.queries.append(ray.queries)
    rep.evaluations.append(ray.queries * nodes.size)
    rep.breakpoints.append(len(ray.deltas))
    rep.waves.append(waves)
    rep.final_residual.append(float(np.max(np.abs(r_p)) / scale))
    return np.where(ray.mask, g1, np.nan)
