"""Guards shared by the iterative recoveries: a piecewise-linearity check and a query budget with partial results.

The fixed-m recoveries (:func:`jaxrecover.attacks.recover_fixed_steps`,
:func:`jaxrecover.attacks.recover_fixed_steps_from_kinks`) decode the jumps of a
piecewise-constant answer profile ``T(s)`` along the ray. For a net that is not
piecewise linear (tanh, softplus, GELU) ``T`` is smooth, every interval holds a
"jump", and their bisections would spend any budget without an answer. The check
here tells the two apart from a few dozen answers before any decoding:

* a step function has, in an interval holding one jump, its midpoint value equal
  to one END value: the midpoint's deviation from the chord is half the change;
* a smooth function has it on the chord up to ``w^2 T'' / 8``: the deviation,
  relative to the change, halves with every halving of the interval.

The check halves an interval ``streak``-times in a row towards the larger change;
relative deviations all below ``ratio`` (1 %) while the change stays well above
round-off mean smooth. Two jumps whose vectors make the midpoint fall on the chord
to 1 % in every coordinate at four consecutive levels do not occur in practice.
"""

from __future__ import annotations

import numpy as np

from ..services import QueryBudgetExceeded

__all__ = ["NotPiecewiseLinear", "RecoveryIncomplete", "check_piecewise_linear"]


class NotPiecewiseLinear(ValueError):
    """The answers along the ray change smoothly: the model is not piecewise linear (tanh, softplus, ...), so
    jump decoding cannot apply. Use finite differences of reported outputs or a free step count instead."""


class RecoveryIncomplete(QueryBudgetExceeded):
    """A recovery's query budget ran out. ``partial`` holds a :class:`Recovery` ``(vg, mask, report)`` with every example finished
    before it (the unfinished ones NaN and masked out); ``report.stopped`` says where it stopped; ``cause`` is the
    service's own :class:`QueryBudgetExceeded` that stopped it (e.g. an endpoint's HTTP 429), or None."""

    def __init__(self, message: str, partial, cause: BaseException | None = None):
        super().__init__(message)
        self.partial = partial
        self.cause = cause


def check_piecewise_linear(answer_of, lo: float, hi: float, floor: float, *, levels: int = 24, streak: int = 4,
                           ratio: float = 0.01) -> int:
    """Raise :class:`NotPiecewiseLinear` when ``answer_of`` is smooth on ``[lo, hi]``; the queries spent.

    Args:
      answer_of: ``list of s -> list of answer vectors`` (one service call per list).
      lo, hi: the interval of ``s`` to probe.
      floor: the answers' round-off (absolute): changes below ``64 floor`` are not judged.
      levels: at most this many halvings (one query each).
      streak: consecutive chord-like midpoints that mean smooth.
      ratio: a midpoint within ``ratio`` of the change from the chord counts as chord-like.
    """
    a_lo, a_hi = (np.asarray(a, np.float64).ravel() for a in answer_of([lo, hi]))
    spent, run, stepped, where = 2, 0, 0, (lo, hi)
    for _ in range(levels):
        change = float(np.max(np.abs(a_hi - a_lo)))
        if change <= 64 * floor:
            return spent  # nothing left to judge at this resolution: no evidence against a step function
        mid = 0.5 * (lo + hi)
        (a_mid,) = answer_of([mid])
        a_mid = np.asarray(a_mid, np.float64).ravel()
        spent += 1
        dev = float(np.max(np.abs(a_mid - 0.5 * (a_lo + a_hi)))) / change
        if dev < ratio:
            run, stepped = run + 1, 0
            if run >= streak:
                raise NotPiecewiseLinear(
                    f"the answers change smoothly along the ray ({spent} queries: at {streak} successive halvings of "
                    f"[{where[0]:.3g}, {where[1]:.3g}] the midpoint sat within {100 * ratio:g} % of the chord): the model is not piecewise "
                    "linear (tanh, softplus, ...), so fixed-m jump decoding cannot apply; use "
                    "jaxrecover.attacks.recover_from_outputs or a service with a free step count")
        else:
            run = 0
            stepped = stepped + 1 if dev > 0.4 else 0
            if stepped >= 3:
                return spent  # a lone jump seen three times over: a step function here
        if np.max(np.abs(a_mid - a_lo)) >= np.max(np.abs(a_hi - a_mid)):
            hi, a_hi = mid, a_mid
        else:
            lo, a_lo = mid, a_mid
    return spent
