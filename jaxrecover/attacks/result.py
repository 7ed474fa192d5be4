"""One result type for every recovery: ``Recovery(vg, mask, report)``.

Every function that recovers VG from a service (``attack`` with a plan, the fixed-m recoveries, the chain for
input-dependent baselines, the lattice least squares, finite differences of outputs, random-m pairing, BIG)
returns a :class:`Recovery`, a named tuple, so ``vg, mask, report = recover_...(service, x, target)`` and
``res.vg`` both work. Each report is a :class:`RecoveryReport`: ``queries`` per example (IG answers or output
values, each charged as one query), and, filled by the same wrapper for every method, ``evaluations_total``
(gradient evaluations the service spent on the call, where it counts them), ``seconds`` (wall time of the call)
and ``method``; per-method fields sit beside them in the subclasses.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

__all__ = ["Recovery", "RecoveryReport", "PlanReport", "as_recovery"]


@dataclasses.dataclass
class RecoveryReport:
    """The common part of every recovery's report (subclasses add their own fields)."""

    queries: list[int]
    evaluations_total: int | None = dataclasses.field(default=None, kw_only=True)
    seconds: float = dataclasses.field(default=0.0, kw_only=True)
    method: str = dataclasses.field(default="", kw_only=True)


@dataclasses.dataclass
class PlanReport(RecoveryReport):
    """:func:`jaxrecover.attacks.attack`: the plan asked (its queries go to every example)."""

    plan: str = ""


class Recovery(NamedTuple):
    """``(vg, mask, report)``: the recovered gradient ``[N, ...]``, where it is determined (``mask``, bool), and
    the method's :class:`RecoveryReport`."""

    vg: Any
    mask: Any
    report: RecoveryReport


def as_recovery(method: str):
    """Decorator of a recovery ``fn(service, x, target, ...) -> (vg, mask, report)``: returns a :class:`Recovery`
    with the report's ``method``, ``seconds`` and ``evaluations_total`` (the service's counter delta) filled."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(service, x, target, *args, **kwargs):
            before = getattr(service, "evaluations", None)
            t0 = time.perf_counter()
            vg, mask, report = fn(service, x, target, *args, **kwargs)
            report.seconds = time.perf_counter() - t0
            report.method = method
            after = getattr(service, "evaluations", None)
            if report.evaluations_total is None and isinstance(before, int) and isinstance(after, int):
                report.evaluations_total = after - before
            return Recovery(vg, mask, report)

        return run

    return wrap
