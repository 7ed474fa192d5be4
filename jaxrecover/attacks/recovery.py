"""Applying query plans: the inputs an attacker sends, and the recovered Vanilla Gradient.

The paper's formulas (x' = 0), as jit-compiled pure transforms:

* :func:`recover_eq2` - no-bias nets, one query: ``VG = IG(x) / x``.
* :func:`recover_eq3` - two queries at x and a*x: ``VG = (IG(x) - IG(ax)) / ((1-a) x)``.
* :func:`recover_eq4` - two step counts: ``VG = m (IG_m(x) - IG_{m-1}((m-1)/m x)) / x``.

and :func:`recover` for any :class:`jaxrecover.attacks.QueryPlan`;
:func:`attack` asks an IG service a plan's queries and recovers.

Coordinates where ``x_i == b_i`` carry no information (every answer is 0
there): recovery returns NaN there and a boolean mask of valid coordinates,
never inf and never a silent number.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .plans import QueryPlan
from .result import PlanReport, as_recovery

__all__ = ["query_input", "query_inputs", "recover", "recover_eq2", "recover_eq3", "recover_eq4", "attack"]


def query_input(scale: float, x: jax.Array, baseline: jax.Array | None = None) -> jax.Array:
    """The input ``b + scale (x - b)`` of one query (dtype of ``x``; ``x`` itself for scale 1)."""
    b = jnp.zeros_like(x) if baseline is None else baseline
    return b + jnp.asarray(scale, x.dtype) * (x - b)


def query_inputs(plan: QueryPlan, x: jax.Array, baseline: jax.Array | None = None) -> list[jax.Array]:
    """The inputs ``b + c_q (x - b)`` the attacker sends, one per query (dtype of ``x``)."""
    return [query_input(q.scale, x, baseline) for q in plan.queries]


def _safe_divide(num, den):
    mask = den != 0
    return jnp.where(mask, num / jnp.where(mask, den, 1), jnp.nan), mask


def _check_answers(plan: QueryPlan, answers, x, baseline) -> None:
    if len(answers) != len(plan.queries):
        raise ValueError(f"plan {plan.name} has {len(plan.queries)} queries but {len(answers)} answers were given")
    for i, a in enumerate(answers):
        if tuple(a.shape) != tuple(x.shape) or a.dtype != x.dtype:
            raise ValueError(f"answer {i} of plan {plan.name} is {tuple(a.shape)} {a.dtype} but x is "
                             f"{tuple(x.shape)} {x.dtype}: every answer must have the shape and dtype of x "
                             "(cast float32 answers explicitly if you mean to)")
    if baseline is not None and (tuple(baseline.shape) != tuple(x.shape) or baseline.dtype != x.dtype):
        raise ValueError(f"baseline is {tuple(baseline.shape)} {baseline.dtype} but x is {tuple(x.shape)} {x.dtype}")


@functools.partial(jax.jit, static_argnames=("plan",))
def recover(plan: QueryPlan, answers: Sequence[jax.Array], x: jax.Array, baseline: jax.Array | None = None):
    """Combine IG answers into the recovered VG: ``sum_q lambda_q IG_q / (x_q - b)``.

    Args:
      plan: the plan whose queries ``answers`` answer, in order.
      answers: one IG answer per query, each with the shape and dtype of ``x``.
      x: the attacked input(s), any batch shape; baseline: the service's
        baseline, shaped like ``x`` (default zeros).

    Returns:
      ``(vg, mask)``: the recovered gradient (NaN where ``x_i == b_i``) and the
      boolean mask of recoverable coordinates.
    """
    _check_answers(plan, answers, x, baseline)
    b = jnp.zeros_like(x) if baseline is None else baseline
    total = jnp.zeros_like(x)
    mask = (x - b) != 0
    for x_q, ans, lam in zip(query_inputs(plan, x, b), answers, plan.coeffs):
        d_q = x_q - b
        total = total + jnp.asarray(lam, x.dtype) * (ans / jnp.where(d_q != 0, d_q, 1))
        mask = mask & (d_q != 0)
    return jnp.where(mask, total, jnp.nan), mask


@jax.jit
def recover_eq2(ig: jax.Array, x: jax.Array):
    """Eq. (2), no-bias nets: ``VG = IG(x) / x``. Returns ``(vg, mask)``."""
    return _safe_divide(ig, x)


@jax.jit
def recover_eq3(ig_x: jax.Array, ig_ax: jax.Array, x: jax.Array, a: float):
    """Eq. (3): ``VG = (IG(x) - IG(a x)) / ((1 - a) x)``. Returns ``(vg, mask)``."""
    return _safe_divide(ig_x - ig_ax, (1 - a) * x)


@functools.partial(jax.jit, static_argnames=("m",))
def recover_eq4(ig_m: jax.Array, ig_m1: jax.Array, x: jax.Array, m: int):
    """Eq. (4): ``VG = m (IG_m(x) - IG_{m-1}((m-1)/m x)) / x``. Returns ``(vg, mask)``."""
    return _safe_divide(m * (ig_m - ig_m1), x)


@as_recovery("plan")
def attack(service, plan: QueryPlan, x, target):
    """Ask ``service`` the plan's queries about ``x`` and recover VG: a :class:`Recovery` ``(vg, mask, report)``.

    The baseline, rule and step policy are the service's own: a plan for
    another rule, or one that needs step counts a fixed-step service refuses,
    is an error before any query is spent.

    Args:
      service: an :class:`jaxrecover.attacks.IGService`.
      plan: a :class:`QueryPlan` for ``service.rule``.
      x: ``[N, ...]`` inputs in the service's dtype; target: ``[N]`` classes.
    """
    if plan.rule != service.rule:
        raise ValueError(f"plan {plan.name} is for rule {plan.rule!r} but the service uses {service.rule!r}; "
                         f"build the plan for {service.rule!r}")
    service.check_steps([q.steps for q in plan.queries], what=f"plan {plan.name}")
    x = jnp.asarray(x)
    if x.dtype != service.dtype:
        raise TypeError(f"x is {x.dtype} but the service answers in {service.dtype}; cast x")
    b = None if service.baseline is None else service.fixed_baseline(x)
    answers = [service(xq, target, steps=q.steps) for xq, q in zip(query_inputs(plan, x, b), plan.queries)]
    vg, mask = recover(plan, answers, x, b)
    return vg, mask, PlanReport([len(plan.queries)] * int(x.shape[0]), plan=plan.name)
