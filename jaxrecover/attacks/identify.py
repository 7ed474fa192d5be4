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
import functools

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
      equivalent: with a fixed step count, every ``"rule/m"`` that fits exactly as well as the one named.
        Answers alone cannot tell ``riemann_right`` m, ``riemann_left`` m+1 and ``saliency`` m+1 apart:
        ``riemann_right`` m on ``f'(y) = g(b).(y - b)/(m+1) + f(b + (m/(m+1))(y - b))`` gives the second's
        answers on ``f``, and on ``f'(y) = g(b).(y - b)/(m+1) + f(y) m/(m+1)`` the third's (a node at the
        baseline is a linear term of another ReLU net; tested exactly). The one named has a round m and a
        deployed rule; with the service's outputs beside the answers the model itself would tell them apart.
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
    equivalent: tuple = ()

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

    ``check`` is the median disagreement with a third answer at ``x + eps / 2``
    (0 up to round-off when no path point crossed a region boundary); without ``eps``, float32 services
    try 1e-3 and 3e-4 and keep the one that agrees best;
    coordinates with ``T = 0`` get NaN.
    """
    x = np.asarray(x, np.float64)
    if eps is None:  # float32: the smallest step whose answers still resolve T; 1e-2 moves path points across
        eps_list = [1e-6] if np.dtype(service.dtype) == np.float64 else [1e-3, 3e-4]  # boundaries too often
    else:
        eps_list = [eps]
    best = None
    for e in eps_list:
        a0, a1, a2 = _answers(service, [x, x + e, x + e / 2], target)
        t1, t2 = (a1 - a0) / e, (a2 - a0) / (e / 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.where(t1 != 0, x - a0 / t1, np.nan)
            b2 = np.where(t2 != 0, x - a0 / t2, np.nan)
        check = float(np.nanmedian(np.abs(b - b2))) if np.isfinite(b).any() else float("inf")
        if best is None or check < best[1]:
            best = (b, check)
    b, check = best
    # polish: the answer AT the estimate is (b_est - b) T near the baseline; T there from a point just beside it
    b_est = np.where(np.isfinite(b), b, x)
    step = 1e-5 * (x - b_est)
    a_b, a_c = _answers(service, [b_est, b_est + step], target)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_c = np.where(step != 0, a_c / np.where(step != 0, step, 1), 0.0)
        fix = np.where(t_c != 0, a_b / np.where(t_c != 0, t_c, 1), 0.0)
    return np.where(np.isfinite(b), b_est - fix, np.nan), check, 3 * len(eps_list) + 2


def answer_noise(t_a, t_b, dtype, floor: float = 1e-6) -> np.ndarray:
    """Per-coordinate bound on how much two readings ``T = A / (q - b)`` of the SAME linear regions can differ.

    Inside a region a ReLU net's gradient is bitwise constant (the backward pass multiplies by masks and
    weights only), so a service's sum ``S`` of weighted gradients has the same bits for every query whose path
    points stay in the same regions; ``T`` differs from ``S`` only by the rounding of ``q - b`` and of the
    product (under 2 ulps each, measured 1.8 ulps on trained float32 LeNet). The bound is 8 ulps of the larger
    reading, plus 8 ulps of ``floor`` times the largest one. For telling same from different regions the
    default floor (1e-6) is right; a jump's VALUE is a difference of two sums whose terms may be far larger than
    the sum (cancellation), so comparisons of jumps use ``floor=1e-2`` (:data:`JUMP_FLOOR`).
    """
    eps = float(np.finfo(np.dtype(dtype)).eps)
    big = np.maximum(np.abs(t_a), np.abs(t_b))
    return 8 * eps * (big + floor * (float(np.max(big)) if big.size else 0.0))


JUMP_FLOOR = 1e-2


def _ray_reader(service, b, d, target, steps=None):
    """``read(cs) -> [T(c)]``: answers at ``b + c d`` divided by the query actually sent (``q - b`` in the
    service's dtype), so that readings of the same regions agree to a few ulps; ``read.spent`` counts. One query
    per call: the bits of a float32 answer depend on the batch shape (XLA's reduction order; 3.5e-7 relative
    between batches of 1 and 3 on trained TwoLayerNet), which would break that agreement."""

    def read(cs):
        cs = np.atleast_1d(np.asarray(cs, np.float64))
        q = jnp.asarray(np.stack([b + c * d for c in cs]), service.dtype)
        ans = np.concatenate([np.asarray(service(q[n:n + 1], jnp.full((1,), target), steps=steps), np.float64)
                              for n in range(len(cs))])
        read.spent += len(cs)
        dq = np.asarray(q, np.float64) - b[None]
        with np.errstate(divide="ignore", invalid="ignore"):
            return [np.where(dqi != 0, a / np.where(dqi != 0, dqi, 1), 0.0).ravel() for a, dqi in zip(ans, dq)]

    read.spent = 0
    return read


def _constant_baseline(service, x, target, b_est, rounds: int = 8):
    """A constant baseline ``c`` where the per-coordinate estimate looks constant, else ``b_est`` unchanged.

    Starts from the estimate's median; unless most coordinates of the estimate are within 1e-3 of it (float32
    estimates are off where a path point crossed a region boundary), only a constant whose answer is exactly
    0 is taken. Secant steps on constant images: the answer at ``c 1`` is
    ``(c - c_true) S`` with ``S`` the gradient sum on the short ray from the baseline along the all-ones
    direction, the same for two nearby ``c`` on one side (a max-pool net's constant baseline sits on a region
    boundary, so ``S`` must come from that direction), so two of them give ``c_true`` per coordinate (the
    median is taken); the last few ulps are searched for an answer of exactly 0.
    """
    finite = np.isfinite(b_est) & (x != b_est)
    if not finite.any():
        return b_est
    c = float(np.median(b_est[finite]))
    scale = max(1.0, abs(c), float(np.max(np.abs(x))))
    agree = np.mean(np.abs(b_est[finite] - c) <= 1e-3 * scale) >= 0.5  # most coordinates agree on one c
    dtype = np.dtype(service.dtype)

    def rounded(v):
        return float(np.asarray(v, dtype))

    def at(v):
        return _answers(service, [np.full_like(x, v)], target)[0]

    c = rounded(c)
    a_c = at(c)
    c_prev = rounded(c + 1e-4 * scale)
    a_prev = at(c_prev)
    for _ in range(rounds):
        if np.max(np.abs(a_c)) == 0.0:
            return np.full_like(x, c)
        da = a_c - a_prev
        with np.errstate(divide="ignore", invalid="ignore"):
            steps = np.where(da != 0, a_c * (c - c_prev) / da, np.nan)
        if not np.isfinite(steps).any():
            break
        c_new = rounded(c - np.nanmedian(steps))
        if c_new == c:
            break
        c_prev, a_prev, c = c, a_c, c_new
        a_c = at(c)
    if np.max(np.abs(a_c)) == 0.0:
        return np.full_like(x, c)
    for k in range(1, 9):  # the last ulps
        up = float(np.asarray(c, dtype) + k * np.spacing(np.asarray(c, dtype)))
        down = float(np.asarray(c, dtype) - k * np.spacing(np.asarray(c, dtype)))
        for v in (up, down):
            if np.max(np.abs(at(v))) == 0.0:
                return np.full_like(x, v)
    return np.full_like(x, c) if agree else b_est


def _first_jumps(service, x, b, target, count: int = 2, resolution: float | None = None, steps=None, stop=None,
                 start: str = "down"):
    """Positions (scale c) and answer jumps (flattened) of the first ``count`` jumps of ``T(c)`` on the ray
    (fewer where ``stop(jumps)`` says enough), each with its per-coordinate noise bound: ``(c, jump, noise)``.

    A change counts only beyond :func:`answer_noise`; jumps are bracketed to ``resolution`` (relative; default
    1e-9 in float64, 4 ulps of the service's dtype otherwise: finer brackets are not representable).
    """
    d = x - b
    dtype = np.dtype(service.dtype)
    eps = float(np.finfo(dtype).eps)
    resolution = resolution if resolution is not None else max(1e-9, 4 * eps)
    read = _ray_reader(service, b, d, target, steps=steps)

    def changed(ta, tb):
        return bool(np.any(np.abs(ta - tb) > answer_noise(ta, tb, dtype)))

    jumps = []
    lo = 1e-4
    t_lo, t_check = read([lo, lo / 4])
    if start == "down":
        while changed(t_lo, t_check) and lo > 1e-12:  # a breakpoint below lo: start closer to b
            lo /= 16
            t_lo, t_check = read([lo, lo / 4])
    else:  # "up": in float32, very near the baseline the answers can change with the rounding of the path points
        while changed(t_lo, t_check) and lo < 0.05:  # (a service that factors its stem subtracts two nearly
            lo *= 8  # equal pre-activations), so a second try starts further out
            t_lo, t_check = read([lo, lo / 4])
    while len(jumps) < count:
        hi = lo * 1.25  # gallop to the next change
        while True:
            (t_hi,) = read([hi])
            if changed(t_hi, t_lo):
                break
            lo, t_lo, hi = hi, t_hi, min(hi * 2, 1e3)
            if lo >= 1e3:
                return jumps, read.spent
        while hi - lo > resolution * hi:
            mid = 0.5 * (lo + hi)
            (t_mid,) = read([mid])
            if changed(t_mid, t_lo):
                hi, t_hi = mid, t_mid
            else:
                lo, t_lo = mid, t_mid
        jumps.append((hi, t_hi - t_lo, answer_noise(t_hi, t_lo, dtype, JUMP_FLOOR)))
        lo, t_lo = hi, t_hi
        if stop is not None and stop(jumps):
            break
    return jumps, read.spent


def _echo_pair(jumps):
    """The earliest jump with a later jump parallel to it within round-off (the top node's jump at a breakpoint
    and the second node's echo of it), as ``(first, echo)``, or None. A jump without an echo (a change made by
    round-off, or the echo of a breakpoint below the sweep's start) is passed over."""
    for i, (c1, j1, n1) in enumerate(jumps):
        for c2, j2, n2 in jumps[i + 1:]:
            rho = float(np.dot(j1, j2) / (np.dot(j1, j1) + 1e-300))
            if rho != 0 and np.all(np.abs(j2 - rho * j1) <= 4 * (n2 + abs(rho) * n1)):
                return jumps[i], (c2, j2, n2)
    return None


@functools.lru_cache(maxsize=4)
def _node_pairs(max_steps: int):
    """Every ``(rule, m, k)`` of the table with ``m <= max_steps`` and its k-th and (k+1)-th largest positive
    nodes: arrays ``keys (rule/m), k, ratio a_{k+1} / a_k, weight ratio w_{k+1} / w_k``."""
    keys, ks, rs, wrs = [], [], [], []
    for cand in RULES:
        for m in range(RULES[cand].min_steps, max_steps + 1):
            nodes, weights = quadrature(cand, m)
            pos = np.flatnonzero(nodes > 0)
            order = pos[np.argsort(-nodes[pos])]
            if order.size < 2:
                continue
            a, w = nodes[order], weights[order]
            keys += [f"{cand}/{m}"] * (order.size - 1)
            ks.append(np.arange(order.size - 1))
            rs.append(a[1:] / a[:-1])
            wrs.append(w[1:] / np.where(w[:-1] != 0, w[:-1], np.nan))
    return np.array(keys), np.concatenate(ks), np.concatenate(rs), np.concatenate(wrs)


def _members(key: str):
    """Positive nodes (descending) and their weights of ``rule/m``."""
    rule, m = key.split("/")
    nodes, weights = quadrature(rule, int(m))
    pos = np.flatnonzero(nodes > 0)
    order = pos[np.argsort(-nodes[pos])]
    return nodes[order], weights[order]


#: The fixed-step configurations services deploy (TorchServe's VisionHandler: gausslegendre 15; Alibi:
#: gausslegendre 50; Azure AutoML: riemann_middle 50; Captum's riemann_right 50; PAIR saliency 25): where
#: contiguous jumps never reach an echo, an echo is looked for where each of these predicts one.
DEPLOYED_FIXED = (("gausslegendre", 15), ("gausslegendre", 50), ("riemann_middle", 50), ("riemann_right", 50),
                  ("saliency", 25))


def _probe_deployed_echo(service, x, b, target, jump):
    """An echo of ``jump = (c1, j1, n1)`` (a jump of the answers at scale ``c1``) at a position a deployed
    configuration predicts for it: if node k of ``rule/m`` made it, node k + 1 sees the same breakpoint at
    ``c1 a_k / a_{k+1}`` with the jump ``(w_{k+1} / w_k) j1``. Two answers bracket each predicted position
    (shared between configurations); the first position whose jump is parallel to ``j1`` within round-off
    with the predicted size gives ``(jump, echo)`` for :func:`_fixed_rule`'s check of every candidate, or None.
    About 2 x 190 queries."""
    c1, j1, n1 = jump
    eps = float(np.finfo(np.dtype(service.dtype)).eps)
    half = max(1e-7, 16 * eps)
    preds = {}
    for rule, m in DEPLOYED_FIXED:
        a, w = _members(f"{rule}/{m}")
        for k in range(a.size - 1):
            if w[k] != 0:
                preds.setdefault(round(c1 * a[k] / a[k + 1], 12), set()).add(float(w[k + 1] / w[k]))
    positions = sorted(preds)
    read = _ray_reader(service, b, x - b, target)
    readings = read([v for c in positions for v in (c * (1 - half), c * (1 + half))])
    for i, c in enumerate(positions):
        lo, hi = readings[2 * i], readings[2 * i + 1]
        j2 = hi - lo
        n2 = answer_noise(lo, hi, service.dtype, JUMP_FLOOR)
        rho = float(np.dot(j1, j2) / (np.dot(j1, j1) + 1e-300))
        if rho == 0 or not np.all(np.abs(j2 - rho * j1) <= 4 * (n2 + abs(rho) * n1)):
            continue
        tol = 4 * float(np.linalg.norm(n2 + abs(rho) * n1) / (np.linalg.norm(j1) + 1e-300)) + 1e-12
        if any(abs(rho - r) <= tol for r in preds[c]):
            return jump, (c, j2, n2)
    return None


def _fixed_rule(service, x, b, target, max_steps, max_jumps, max_sigma, max_hypotheses: int = 24,
                start: str = "down"):
    """``(rule, m, evidence, equivalent)`` of a fixed-step service from one ray (rule None if nothing fits).

    The sweep collects jumps of ``T(c)`` until two are parallel within round-off: two echoes of one
    breakpoint ``t`` (at ``c = t / a_k`` and ``t / a_l``, sizes ``w_k Delta``, ``w_l Delta``). Every
    ``(rule, m, k)`` of the table whose consecutive nodes ``a_{k+1} / a_k`` and weights ``w_{k+1} / w_k``
    match them within round-off (the jump may be any node's echo, not only the top node's: trained nets have
    breakpoints so near the baseline that the sweep starts among their echoes) is a hypothesis. Each one
    predicts where the same breakpoint's top-node jump and next echoes are and how large they are; two
    answers bracketing each predicted position (shared between hypotheses) measure them, and a hypothesis
    survives only if every measured position shows what it predicts: the jump where it has a node, no
    parallel jump where it has none. ``evidence`` holds each hypothesis' worst miss in noise units.
    """
    jumps, _ = _first_jumps(service, x, b, target, count=max_jumps, stop=lambda js: _echo_pair(js) is not None,
                            start=start)
    pair = _echo_pair(jumps) if jumps else None
    result = (None, None, {}, ())
    if pair is not None:
        result = _check_echo_pair(service, x, b, target, max_steps, max_sigma, max_hypotheses, pair)
    return (*result, jumps)


def _probe_fixed_rule(service, x, b, target, jumps, max_steps, max_sigma, max_hypotheses: int = 24):
    """:func:`_fixed_rule` for a ray whose contiguous jumps reached no true echo (dense breakpoints: LeNet has
    ~21k first-layer units): an echo is looked for where each deployed configuration puts it
    (:func:`_probe_deployed_echo`), for the last jump found and then the clearest ones (largest against their
    round-off); a probed pair must pass the same check of every candidate (:func:`_check_echo_pair`)."""
    result = (None, None, {}, ())
    clear = sorted(jumps[:-1], key=lambda j: -float(np.linalg.norm(j[1]) / (np.linalg.norm(j[2]) + 1e-300)))
    for jump in ([jumps[-1]] + clear)[:3] if jumps else []:
        pair = _probe_deployed_echo(service, x, b, target, jump)
        if pair is None:
            continue
        result = _check_echo_pair(service, x, b, target, max_steps, max_sigma, max_hypotheses, pair)
        if result[0] is not None and _no_echo_between(service, x, b, target, pair, result):
            break
        result = (None, None, result[2], ())
    return result


def _no_echo_between(service, x, b, target, pair, result) -> bool:
    """A probed pair may be two echoes of one breakpoint that are NOT adjacent (riemann_right 50's nodes 2j-1
    and 2j+1 look like riemann_middle 25's adjacent ones): False when an echo parallel to the pair shows up
    strictly between them where another deployed configuration puts one and the named ``rule/m`` has no node
    (2 answers per position)."""
    (c1, j1, n1), (c2, _, _) = pair
    rule, m = result[0], result[1]
    eps = float(np.finfo(np.dtype(service.dtype)).eps)
    half = max(1e-7, 16 * eps)
    a, _ = _members(f"{rule}/{m}")
    # the named configuration's own echoes of this breakpoint, as multiples of c1 (its node k made the jump)
    k = int(np.argmin(np.abs(a[:-1] / a[1:] - c1 / c2)))
    mine = c1 * a[k] / a
    lo, hi = sorted((c1, c2))
    between = set()
    for r, mm in DEPLOYED_FIXED:
        if (r, mm) == (rule, m):
            continue
        ar, _ = _members(f"{r}/{mm}")
        for kk in range(ar.size - 1):
            c = c1 * ar[kk] / ar[kk + 1]
            if lo * (1 + 4 * half) < c < hi * (1 - 4 * half) and np.all(np.abs(mine - c) > 4 * half * c):
                between.add(round(c, 12))
    if not between:
        return True
    positions = sorted(between)
    read = _ray_reader(service, b, x - b, target)
    readings = read([v for c in positions for v in (c * (1 - half), c * (1 + half))])
    for i in range(len(positions)):
        j2 = readings[2 * i + 1] - readings[2 * i]
        n2 = answer_noise(readings[2 * i], readings[2 * i + 1], service.dtype, JUMP_FLOOR)
        rho = float(np.dot(j1, j2) / (np.dot(j1, j1) + 1e-300))
        # loose on purpose (measured: riemann_right 50's skipped echo at rho 1.004 with 5 % of other jumps in
        # its bracket): naming a wrong configuration is worse than naming none
        if 0.25 < abs(rho) < 4 and np.max(np.abs(j2 - rho * j1)) <= 0.25 * abs(rho) * np.max(np.abs(j1)):
            return False
    return True


def _check_echo_pair(service, x, b, target, max_steps, max_sigma, max_hypotheses, pair):
    """:func:`_fixed_rule` for one echo pair ``(jump, echo)``: every candidate it fits, checked at the
    positions each predicts; ``(rule, m, evidence, equivalent)``."""
    (c1, j1, n1), (c2, j2, n2) = pair
    ratio = c1 / c2
    wratio = float(np.dot(j1, j2) / np.dot(j1, j1))
    eps = float(np.finfo(np.dtype(service.dtype)).eps)
    sd_r = 2 * max(1e-9, 4 * eps)  # positions bracketed to `resolution` (relative)
    sd_w = float(np.linalg.norm(n2 + abs(wratio) * n1) / np.linalg.norm(j1)) + 1e-12
    keys, ks, rs, wrs = _node_pairs(max_steps)
    score = np.maximum(np.abs(rs - ratio) / sd_r, np.abs(wrs - wratio) / sd_w)
    fit = np.flatnonzero(score <= max_sigma)
    evidence = {}
    if fit.size == 0:
        best = int(np.nanargmin(score))
        return None, None, {f"{keys[best]} (node {ks[best] + 1})": float(score[best])}, ()
    hyps = sorted(((str(keys[i]), int(ks[i]), float(score[i])) for i in fit), key=lambda h: (h[2], _preference(h[0])))
    half = max(1e-7, 16 * eps)
    read = _ray_reader(service, b, x - b, target)

    def along_j1(c):
        """The part along ``j1`` of the jump of ``T`` across ``c`` (2 answers), as a multiple of ``j1``, and its
        noise in the same unit."""
        t_lo, t_hi = read([c * (1 - half), c * (1 + half)])
        jump = t_hi - t_lo
        scale = float(np.dot(jump, j1) / np.dot(j1, j1))
        noise = float(np.linalg.norm(answer_noise(t_lo, t_hi, service.dtype, JUMP_FLOOR)) / np.linalg.norm(j1))
        return scale, noise

    if len(hyps) > max_hypotheses:
        # rules with evenly spaced nodes fit for every m above some count: the pair's ratio only says how far
        # the pair is from the bottom. How many members of the family come BEFORE the pair (k, the number of
        # nodes above it) decides m: where every hypothesis with k >= i predicts the same position for the
        # member i places back, the member is there iff the true k >= i: bisect on i (2 answers a probe)
        kept = []
        for rule_name in dict.fromkeys(h[0].split("/")[0] for h in hyps):
            group = [h for h in hyps if h[0].split("/")[0] == rule_name]
            if len(group) <= 4:
                kept += group
                continue

            def position(h, i):
                a, _ = _members(h[0])
                return c1 * a[h[1]] / a[h[1] - i]

            lo_i, hi_i = 0, max(h[1] for h in group) + 1  # member lo_i back is there, hi_i back is not
            while hi_i - lo_i > 1:
                mid = (lo_i + hi_i) // 2
                cands = [h for h in group if h[1] >= mid]
                pos = [position(h, mid) for h in cands]
                if np.ptp(pos) > 1e-9 * np.mean(pos):
                    break  # not evenly spaced: keep the group's best few for the direct check
                size, noise = along_j1(float(np.mean(pos)))
                if abs(size) > 4 * noise:
                    lo_i = mid
                else:
                    hi_i = mid
            else:
                kept += [h for h in group if h[1] == lo_i]
                continue
            kept += group[:4]
        hyps = sorted(kept, key=lambda h: (h[2], _preference(h[0])))
    hyps = hyps[:max_hypotheses]
    # each hypothesis: the breakpoint t = c1 a_k; its members at t / a_j with jumps (w_j / w_k) j1
    preds = {}
    for key, k, _ in hyps:
        a, w = _members(key)
        t = c1 * a[k]
        near = [0, k - 1, k + 2, k + 3]  # the top node, the node before the pair and the two after it
        preds[(key, k)] = {j: (t / a[j], w[j] / w[k]) for j in near if 0 <= j < a.size and j not in (k, k + 1)}
        if a.size >= 2:  # where a node above the top would see t, evenly spaced: nothing may jump there
            preds[(key, k)][-1] = (t / (a[0] + (a[0] - a[1])), 0.0)
    positions = sorted({round(c, 12) for p in preds.values() for c, _ in p.values()})
    readings = read([v for c in positions for v in (c * (1 - half), c * (1 + half))])
    measured = {c: (readings[2 * i + 1] - readings[2 * i], answer_noise(readings[2 * i], readings[2 * i + 1],
                                                                        service.dtype, JUMP_FLOOR))
                for i, c in enumerate(positions)}
    survivors = []
    for key, k, sc in hyps:
        mine = {round(c, 12): r for c, r in preds[(key, k)].values()}
        worst = sc
        for c, (jump, noise) in measured.items():
            want = mine.get(c, 0.0) * j1
            # a jump of another breakpoint in the bracket is not parallel to j1: only the part along j1 counts
            along = float(np.dot(jump, j1) / np.dot(j1, j1)) * j1
            tol = 4 * (noise + abs(mine.get(c, 0.0)) * n1)
            worst = max(worst, float(np.max(np.abs(along - want) / tol)))
        evidence[f"{key} (node {k + 1})"] = worst
        if worst <= max_sigma:
            survivors.append(key)
    evidence = dict(sorted(evidence.items(), key=lambda kv: kv[1])[:8])
    if not survivors:
        return None, None, evidence, ()
    # answers alone cannot tell riemann_right m, riemann_left m+1 and saliency m+1 apart (each is the other on
    # a changed model, see Identification.equivalent): name the deployed-looking one, list all
    tied = sorted(set(survivors), key=_preference)
    rule, steps = tied[0].split("/")[0], int(tied[0].split("/")[1])
    evidence[f"{rule}/{steps}"] = min(v for kk, v in evidence.items() if kk.startswith(f"{rule}/{steps} "))
    return rule, steps, evidence, tuple(tied) if len(tied) > 1 else ()


def _echo_tiebreak(service, x, b, target, first, tied, evidence):
    """Among rules with the same top node and weight, the one whose second node at n = 2 echoes the first jump.

    The first breakpoint ``t1`` seen by the top node at ``c`` (jump ``w_top Delta``)
    is seen again by the second node ``a_2`` at ``c = t1 / a_2`` with jump
    ``w_2 Delta``; a rule whose second node is 0 (or absent) predicts no jump
    there. Two answers bracketing each predicted position decide (2 queries each).
    """
    c1, jump = first[0], first[1]
    d = x - b
    eps = float(np.finfo(np.dtype(service.dtype)).eps)
    half = max(1e-7, 16 * eps)
    read = _ray_reader(service, b, d, target, steps=2)
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
        t_lo, t_hi = read([c * (1 - half), c * (1 + half)])
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
                     max_jumps: int = 32, max_mismatch: float = 0.05,
                     max_sigma: float = 3.0, rays: int = 4, max_queries: int = 500) -> Identification:
    """Infer the baseline, step policy, rule and step count of ``service`` from answers about one example.

    Uses only answers (``service(x, target, steps=...)``), not what the
    service declares. ``x``: one example (no batch axis) in the service's dtype.
    ``candidates``: baselines to try besides zeros and the constant ``x.min()``
    (the estimate snaps to one whose own answer is exactly 0; otherwise the
    per-coordinate estimate is used, good to about 1e-9). ``max_jumps``: with a fixed
    step count, how many jumps of the ray to locate (about 30 queries each) while
    looking for the first one's echo. ``max_mismatch``: the best candidate is named only when its mismatch
    is at most this (else ``rule`` and ``steps`` are None and ``note`` says "unidentified": a service outside
    the candidates is never given a wrong name). ``max_sigma``: the same for a fixed step count, where the
    mismatch of a candidate ``rule/m`` is its distance from the measured echo (position ratio and jump ratio of
    the first breakpoint's top-node jump and second-node echo) in units of what round-off allows; the best
    one must also predict the third node's echo. ``rays``: with a fixed step count, how many rays to try
    (``x`` swept from the baseline out, ``x`` swept from ``c = 1e-4`` up, then ``x`` scaled per pixel at
    random) before saying "unidentified"; no new ray starts once half of ``max_queries`` is spent.

    Float32 services: every reading is ``answer / (q - b)`` with ``q`` the query as sent, and a change counts
    only beyond a few ulps per coordinate (:func:`answer_noise`): inside a linear region the service's sum of
    gradients is bitwise constant, so jumps far below float32's relative precision of the answers' largest
    coordinate are still seen.
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
        if np.max(np.abs(_answers(service, [cand], target))) == 0.0:
            b_use = np.array(cand)
            break
    else:
        b_use = _constant_baseline(service, x, target, b_use)
    spent["baseline"] = service.queries - q0
    q0 = service.queries
    try:
        # a step count the service is unlikely to fix (its declared one + 7; 57 when it declares none, e.g. remote)
        _answers(service, [x], target, steps=int(service.steps or 50) + 7)
        fixed = False
    except StepCountRefused:
        fixed = True
    spent["step policy"] = service.queries - q0
    evidence: dict[str, float] = {}
    rule = steps = None
    equivalent: tuple = ()
    if not fixed:
        q0 = service.queries
        # the first breakpoint t1 of the ray, seen at n = 2, 3, 4 steps: at c = t1 / a_top(n) with an answer jump
        # w_top(n) * Delta; the right rule makes c * a_top and jump / w_top the same for every n
        seen = {n: _first_jumps(service, x, b_use, target, count=1, steps=n)[0] for n in (2, 3, 4)}
        # near the baseline every node sees g(0+): T = (sum of the weights) g(0+), which tells rules whose top
        # weights are proportional apart (saliency 1/n vs Captum's riemann_trapezoid 1/(2n), weights summing to < 1)
        # (below the first breakpoint: at c < c_n, where n steps first jump, even the top node is below t1;
        # LeNet's first breakpoint can sit at t1 ~ 1e-10, so a fixed c = 1e-4 would read a mix of regions)
        d0 = x - b_use
        low = {}
        for n in (2, 3, 4):
            c_low = min(1e-4, 0.5 * seen[n][0][0]) if seen[n] else 1e-4
            q = (b_use + c_low * d0).astype(np.dtype(service.dtype)).astype(np.float64)
            (a0,) = _answers(service, [q], target, steps=n)
            sent = q - b_use  # what the service integrates over: the query as sent, rounded to its dtype
            with np.errstate(divide="ignore", invalid="ignore"):
                low[n] = np.where(sent != 0, a0 / np.where(sent != 0, sent, 1), 0.0).ravel()
        if all(seen.values()):
            best = np.inf
            for cand, r in RULES.items():
                if r.min_steps > 2:
                    continue
                t1, dl = [], []
                for n, ((c, jump, _),) in seen.items():
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
        rng = np.random.default_rng(0)
        swept = []
        for attempt in range(rays):  # the attacker picks the ray: x (from the baseline out, then from 1e-4
            # up: float32 round-off near the baseline), then x scaled per pixel at random
            x_ray = x if attempt < 2 else b_use + (x - b_use) * rng.uniform(0.5, 1.5, x.shape)
            rule, steps, evidence, equivalent, jumps = _fixed_rule(service, x_ray, b_use, target, max_steps,
                                                                   max_jumps, max_sigma,
                                                                   start="up" if attempt == 1 else "down")
            swept.append((x_ray, jumps))
            if rule is not None and evidence.get(f"{rule}/{steps}", np.inf) <= max_sigma:
                break
            if service.queries - q0 > max_queries // 2:  # another ray would not fit in max_queries
                break
        else:
            rule = None
        if rule is None:  # no ray's contiguous jumps reached an echo that fits: probe where deployed ones are
            for x_ray, jumps in swept:
                found = _probe_fixed_rule(service, x_ray, b_use, target, jumps, max_steps, max_sigma)
                if found[0] is not None:
                    rule, steps, evidence, equivalent = found
                    break
                if service.queries - q0 > 3 * max_queries:
                    break
        spent["rule and m"] = service.queries - q0
    note = "identified"
    # the chosen candidate's own mismatch (an echo tie-break only orders candidates that fit equally well)
    key = None if rule is None else (rule if not fixed else f"{rule}/{steps}")
    best_mis = float(evidence.get(key, np.inf)) if key is not None else (min(evidence.values()) if evidence
                                                                         else np.inf)
    if key is not None and f"{rule} (echo)" in evidence:
        best_mis = max(best_mis, float(evidence[f"{rule} (echo)"]))
    if rule is None or not best_mis <= (max_sigma if fixed else max_mismatch):
        limit = max_sigma if fixed else max_mismatch
        note = ("unidentified: " + (f"no candidate rule fits (best mismatch {best_mis:.3g} > {limit:g}; "
                                    "e.g. a service that ignores the requested step count, or an unknown rule)"
                                    if np.isfinite(best_mis) else "no jump of the answers was found to compare "
                                    "the rules with"))
        rule = steps = None
        equivalent = ()
    return Identification(rule, steps, fixed, b_use, check, np.dtype(service.dtype).name, spent, evidence, note,
                          equivalent)


_DEPLOYED = ("gausslegendre", "riemann_right", "riemann_middle", "saliency", "riemann_trapezoid", "riemann_left",
             "trapezoid", "ig_original")


def _preference(key: str):
    """Order of equally fitting fixed-m candidates ``"rule/m"``: a round step count (a multiple of 5, as
    deployed: 15, 25, 50) first, then the rules deployed services use."""
    rule, m = key.split("/")
    return (int(m) % 5 != 0, _DEPLOYED.index(rule) if rule in _DEPLOYED else len(_DEPLOYED), int(m))
