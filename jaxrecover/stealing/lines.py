"""What the extractions share: gradients through a service's answers, and the exact crossing search on a line.

``search_line`` finds where a ReLU net's gradient of one class changes along a line, exactly (each crossing is
the intersection of two linear pieces of the reported output, checked by two queries beside it, not a bisection
to a tolerance). Written here because no library reads a network's region boundaries from gradient queries.
"""

from __future__ import annotations

import numpy as np

from ..attacks import attack, best_plan

__all__ = ["GradientOracle", "search_line", "tolerances", "differ", "prepare"]


# ---------------------------------------------------------------------------------------------- the oracle
class GradientOracle:
    """Gradients and reported outputs of one class at points (rows of ``z``), through the service's answers."""

    def __init__(self, service, plan, shape):
        self.service, self.plan, self.shape = service, plan, tuple(shape)
        # the output reported with the answer at scale 1 is f(z) itself; otherwise a separate query buys it
        self.free_value = any(q.scale == 1.0 for q in plan.queries)

    def __call__(self, z: np.ndarray, classes):
        z = np.atleast_2d(np.asarray(z, np.float64))
        n = z.shape[0]
        classes = np.broadcast_to(np.asarray(classes, np.int32), (n,))
        x = z.astype(self.service.dtype).reshape(n, *self.shape)
        if not self.free_value:
            self.service.check_budget(n + n * len(self.plan.queries))
        vg, mask, _ = attack(self.service, self.plan, x, classes)
        if not bool(np.all(np.asarray(mask))):
            raise RuntimeError("a query point has a coordinate equal to the baseline, where IG gives no gradient; "
                               "use another seed")
        if not self.free_value:  # an explanation at the plan's smallest step count, for its reported output
            self.service.charge(n, min(q.steps for q in self.plan.queries))
        f, _ = self.service.outputs(x, classes)
        return (np.asarray(vg, np.float64).reshape(n, -1), np.asarray(f, np.float64),
                x.reshape(n, -1).astype(np.float64))


def tolerances(dtype) -> dict:
    if np.dtype(dtype) == np.float64:
        return {"grad": 1e-9, "rank": 1e-7, "match": 1e-6, "binary": 0.05, "check": 1e-7,
                "side": 1e-6}
    return {"grad": 1e-4, "rank": 2e-2, "match": 1e-2, "binary": 0.2, "check": 1e-2, "side": 1e-3}


def differ(ga, gb, tol, scale):
    """Whether two gradients differ by more than ``tol`` times ``scale`` (the largest gradient norm on the line:
    round-off is relative to it, also in pieces where the gradient is about 0)."""
    return np.linalg.norm(ga - gb) > tol * scale


def search_line(oracle, p, d, k, span, tol, grid, min_width, interval=None):
    """Crossings of class ``k``'s gradient on ``x(t) = p + t d``, ``t`` in ``[-span, span]`` (or ``interval``).

    Returns (crossings, points, unresolved): crossings ``(t*, a, b)`` with ``a < t* < b`` queried points
    on either side and no other crossing of class ``k`` in ``(a, b)``; points ``{t: (g_k, f_k)}``.
    """
    eps = float(np.finfo(oracle.service.dtype).eps)
    ts = np.linspace(*(interval or (-span, span)), grid)
    g, f, _ = oracle(p + ts[:, None] * d, k)
    points = {float(t): (g[i], f[i]) for i, t in enumerate(ts)}
    gscale = max(float(np.max(np.linalg.norm(g, axis=1))), np.finfo(np.float64).tiny)
    todo = [(float(a), float(b)) for a, b in zip(ts[:-1], ts[1:])]
    crossings, unresolved = [], 0
    while todo:
        asks = []
        for a, b in todo:
            (ga, fa), (gb, fb) = points[a], points[b]
            if not differ(ga, gb, tol["grad"], gscale):
                continue
            if b - a < min_width:
                unresolved += 1
                continue
            sa, sb = float(ga @ d), float(gb @ d)
            t = (fb - fa + sa * a - sb * b) / (sa - sb) if sa != sb else np.nan
            inside = np.isfinite(t) and a + 1e-3 * (b - a) < t < b - 1e-3 * (b - a)
            asks.append((a, b, t if inside else 0.5 * (a + b), inside))
        if not asks:
            break
        # a crossing candidate t* is asked on both sides, t* -+ delta: exactly one crossing in (a, b) iff the
        # gradients there are g_a and g_b (f(t*) alone cannot tell: t* beyond every crossing also lies on both lines)
        ts = []
        for a, b, t, inside in asks:
            if inside:
                (ga, fa), (gb, fb) = points[a], points[b]
                sa, sb = float(ga @ d), float(gb @ d)
                # t* is known to about eps |f| / |s_a - s_b| (the reported values' round-off): never ask closer
                precision = 16 * eps * max(abs(fa), abs(fb), abs(sa * t), abs(sb * t)) / abs(sa - sb)
                delta = max(tol["side"] * (b - a), precision, 64 * np.finfo(np.float64).eps * abs(t))
                ts += [max(t - delta, 0.5 * (a + t)), min(t + delta, 0.5 * (t + b))]
            else:
                ts.append(t)
        g, f, _ = oracle(p + np.array(ts)[:, None] * d, k)
        i, todo = 0, []
        for a, b, t, inside in asks:
            if inside:
                (lo, hi), (glo, ghi), (flo, fhi) = ts[i:i + 2], g[i:i + 2], f[i:i + 2]
                i += 2
                points[lo], points[hi] = (glo, flo), (ghi, fhi)
                if not (differ(glo, points[a][0], tol["grad"], gscale) or differ(ghi, points[b][0], tol["grad"], gscale)):
                    # the same intersection from the two near points: smaller values, less round-off than from (a, b)
                    slo, shi = float(glo @ d), float(ghi @ d)
                    near = (fhi - flo + slo * lo - shi * hi) / (slo - shi) if slo != shi else t
                    crossings.append((near if lo < near < hi else t, lo, hi))
                else:
                    todo += [(a, lo), (lo, hi), (hi, b)]
            else:
                points[ts[i]] = (g[i], f[i])
                todo += [(a, ts[i]), (ts[i], b)]
                i += 1
    crossings.sort()
    return crossings, points, unresolved




def prepare(service, data, classes, plan, min_classes=1):
    """The checks and set-up every extraction starts with: ``(data, plan, tolerances, flat float64 data, oracle)``.

    Raises ValueError (one line, naming the fix) for a service that explains something other than logits, bad
    ``data`` or ``classes``, or an input-dependent baseline."""
    if getattr(service, "output", "logit") != "logit":
        raise ValueError(f"extraction reads logits but the service explains {service.output!r}; "
                         "use a service with output='logit'")
    data = np.asarray(data)
    if data.ndim < 2 or data.shape[0] < 1:
        raise ValueError(f"data must be [N, ...] inputs with N >= 1, got shape {data.shape}")
    if not (isinstance(classes, (int, np.integer)) and classes >= min_classes):
        raise ValueError(f"classes must be an int >= {min_classes}, got {classes!r}")
    plan = best_plan(service) if plan is None else plan
    service.fixed_baseline(data[:1].astype(service.dtype))  # clear error for input-dependent baselines
    flat = data.reshape(data.shape[0], -1).astype(np.float64)
    return data, plan, tolerances(service.dtype), flat, GradientOracle(service, plan, data.shape[1:])
