"""IG services as objects: what an attacker queries, and what defences wrap.

A service answers Integrated Gradients for a batch, ``service(x, target,
steps=None) -> IG[N, ...]``, and declares what an attacker may know or infer:
its quadrature ``rule``, its step policy (``steps`` is the default, and with
``fixed_steps`` the only step count it accepts), its ``baseline``, ``dtype``,
explained ``output`` and ``arithmetic``. It counts ``queries`` (one per
example answered) and ``evaluations`` (gradient evaluations spent), and
refuses to answer past an optional query ``budget``.

Every answer of every service, wrappers included, is checked once where it
leaves the service (``__call__`` and ``outputs`` of each class are wrapped by
:meth:`IGService.__init_subclass__`): one answer per example of the request's
shape, in the service's dtype, all finite. A NaN or inf from a broken model, a
defence or a remote endpoint is a :class:`ServiceAnswerError` naming the
example, never a value an attack computes with (a NaN answer once made a
bisection split forever, and an extraction finish "successfully" with no unit).

:class:`jaxrecover.services.SimulatedIGService` (``simulated.py``) is this library's own IG run by the batch engine.
:class:`ServiceWrapper` is the base of objects that wrap a service (defences,
logging) and stay services themselves.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..engine import check_input_dtype
from ..explainers import OUTPUTS, get_rule, num_evaluations, quadrature
from ..explainers.baselines import is_input_dependent

__all__ = ["IGService", "ServiceWrapper", "AssumedBaseline", "QueryBudgetExceeded", "StepCountRefused",
           "ServiceAnswerError", "check_answers", "attack_inputs"]


def attack_inputs(service, x, target) -> tuple[np.ndarray, np.ndarray]:
    """``(x, target)`` as numpy arrays for an attack on ``service``; a clear error when ``x`` is not in the
    service's dtype or ``target`` does not have one class per example."""
    x = np.asarray(x)
    if np.dtype(x.dtype) != np.dtype(service.dtype):
        raise TypeError(f"x is {x.dtype} but the service answers in {np.dtype(service.dtype)}; cast x")
    target = np.asarray(target).reshape(-1)
    if target.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but target has {target.shape[0]}")
    return x, target

class QueryBudgetExceeded(RuntimeError):
    """A service refused a request that would exceed its query budget (nothing was answered)."""


class StepCountRefused(ValueError):
    """A service with a fixed step count was asked for another one."""


class ServiceAnswerError(ValueError):
    """A service answered something no attack can use: the wrong shape or dtype, or NaN/inf values."""


def check_answers(service, x, answers, what: str = "answers"):
    """``answers`` unchanged when they fit the request ``x`` (same shape, the service's dtype, all finite);
    else a :class:`ServiceAnswerError` naming the problem (used at every service's boundary)."""
    name = type(service).__name__
    shape = tuple(np.shape(x))
    got = tuple(np.shape(answers))
    if got != shape:
        raise ServiceAnswerError(f"{name} returned {what} of shape {got} for a request of shape {shape}; "
                                 "the service or its transport is broken")
    dtype = np.dtype(getattr(answers, "dtype", np.asarray(answers).dtype))
    if dtype != np.dtype(service.dtype):
        raise ServiceAnswerError(f"{name} returned {dtype} {what} but declares {np.dtype(service.dtype)}; "
                                 "the service or its transport is broken")
    finite = np.isfinite(np.asarray(answers)).reshape(shape[0], -1) if shape and shape[0] else np.ones((0, 1), bool)
    if not finite.all():
        rows = np.flatnonzero(~finite.all(axis=1))
        raise ServiceAnswerError(
            f"{name} returned {int((~finite).sum())} NaN/inf value(s) in its {what} (example(s) "
            f"{', '.join(map(str, rows[:5]))}{' ...' if rows.size > 5 else ''} of {shape[0]}); no attack can use "
            "them: check the model's weights and the service")
    return answers


def _checked_call(call):
    @functools.wraps(call)
    def checked(self, x, target, *, steps: int | None = None):
        return check_answers(self, x, call(self, x, target, steps=steps))

    checked.__wrapped_check__ = True
    return checked


def _checked_outputs(outputs):
    @functools.wraps(outputs)
    def checked(self, x, target):
        fx, fb = outputs(self, x, target)
        n = (int(np.shape(x)[0]),) if np.ndim(x) else ()
        for name, v in (("f(x)", fx), ("f(baseline)", fb)):
            if tuple(np.shape(v)) != n or not np.isfinite(np.asarray(v)).all():
                raise ServiceAnswerError(f"{type(self).__name__} reported output values {name} of shape "
                                         f"{tuple(np.shape(v))} (want {n}) or with NaN/inf; no attack can use them")
        return fx, fb

    checked.__wrapped_check__ = True
    return checked


class IGService:
    """Base of IG services (see the module docstring). Subclasses implement :meth:`_answer`."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, wrap in (("__call__", _checked_call), ("outputs", _checked_outputs)):
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "__wrapped_check__", False):
                setattr(cls, name, wrap(fn))

    def __init__(self, *, rule: str = "riemann_right", steps: int = 50, fixed_steps: bool = False, baseline=None,
                 dtype=jnp.float32, output: str = "logit", budget: int | None = None,
                 arithmetic: dict[str, str] | None = None):
        get_rule(rule)
        quadrature(rule, steps)  # validates the default step count
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; choose one of: {', '.join(OUTPUTS)}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer))
                                   or budget < 0):
            raise ValueError(f"budget must be a non-negative int or None, got {budget!r}")
        self.rule = rule
        self.steps = int(steps)
        self.fixed_steps = bool(fixed_steps)
        self.dtype = jnp.dtype(dtype)
        self.baseline = (baseline if baseline is None or is_input_dependent(baseline)
                         else jnp.asarray(baseline, self.dtype))
        self.output = output
        self.budget = budget
        self.arithmetic = dict(arithmetic or {})
        self.queries = 0
        self.evaluations = 0

    # ------------------------------------------------------------------ declared properties
    def describe(self) -> dict[str, Any]:
        """What the service declares: rule, step policy, baseline, dtype, output, arithmetic, budget."""
        return {"service": type(self).__name__, "rule": self.rule, "steps": self.steps,
                "fixed_steps": self.fixed_steps,
                "baseline": ("zeros" if self.baseline is None else str(self.baseline)
                             if is_input_dependent(self.baseline) else f"array{tuple(self.baseline.shape)}"),
                "dtype": self.dtype.name, "output": self.output, "arithmetic": dict(self.arithmetic),
                "budget": self.budget, "queries": self.queries, "evaluations": self.evaluations}

    @property
    def remaining(self) -> int | None:
        """Queries left before the budget runs out (None: no budget)."""
        return None if self.budget is None else self.budget - self.queries

    def check_steps(self, steps_list, what: str = "request") -> None:
        """A clear error when the step counts are refused (fixed step count) or invalid for the rule."""
        for s in steps_list:
            if self.fixed_steps and s != self.steps:
                raise StepCountRefused(
                    f"{what} asks for {s} steps but this service fixes the step count at {self.steps}; "
                    f"use a plan that keeps m = {self.steps} (e.g. approx_plan({self.rule!r}, {self.steps}))")
            quadrature(self.rule, s)

    def quadrature(self, steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The nodes and weights this service ACTUALLY multiplies with, as exact float64 values.

        The rule's ideal nodes and weights rounded where the service rounds
        them (here: to the service's dtype, as :func:`jaxrecover.explainers.path_points`
        and :func:`jaxrecover.explainers.integrate` do). Service-aware plans
        (:func:`jaxrecover.attacks.service_plan`) are built on these values.
        """
        steps = self.steps if steps is None else int(steps)
        nodes, weights = quadrature(self.rule, steps)
        return (nodes.astype(self.dtype).astype(np.float64), weights.astype(self.dtype).astype(np.float64))

    def baseline_for(self, x) -> jax.Array:
        """The baselines ``[N, ...]`` this service integrates from for the inputs ``x[N, ...]`` (its dtype)."""
        x = jnp.asarray(x, self.dtype)
        if self.baseline is None:
            return jnp.zeros_like(x)
        if is_input_dependent(self.baseline):
            b = jnp.asarray(self.baseline(x), self.dtype)
            if b.shape != x.shape:
                raise ValueError(f"the baseline function {self.baseline} returned {tuple(b.shape)} for inputs "
                                 f"{tuple(x.shape)}; it must return one baseline per input")
            return b
        return jnp.broadcast_to(self.baseline, x.shape)

    def fixed_baseline(self, x) -> jax.Array:
        """:meth:`baseline_for`, for attacks that move along the ray from a FIXED baseline.

        Raises:
          ValueError: the baseline depends on the input (e.g. the blurred input): queries off the ray
            get other baselines, so ray plans do not apply.
        """
        if is_input_dependent(self.baseline):
            raise ValueError(f"this service's baseline depends on the input ({self.baseline}): ray plans and "
                             "fixed-m decoding need a fixed baseline; use jaxrecover.attacks.recover_input_baseline "
                             "(rules with a node at 1) or recover_from_outputs")
        return self.baseline_for(x)

    def outputs(self, x, target) -> tuple[jax.Array, jax.Array]:
        """``(f(x), f(baseline))`` of the explained output, as deployed services report them
        (Vertex AI's ``instanceOutputValue`` and ``baselineOutputValue``). Costs no query."""
        raise NotImplementedError(f"{type(self).__name__} does not report output values")

    def reset_counters(self) -> None:
        """Zero ``queries`` and ``evaluations`` (a new client)."""
        self.queries = 0
        self.evaluations = 0

    # ------------------------------------------------------------------ answering
    def __call__(self, x, target, *, steps: int | None = None) -> jax.Array:
        """IG answers ``[N, ...]`` for inputs ``x[N, ...]`` and classes ``target[N]``.

        Raises:
          StepCountRefused: ``steps`` differs from a fixed step count.
          QueryBudgetExceeded: the batch would exceed the budget (nothing is answered or counted).
          TypeError: ``x`` is not in the service's dtype.
        """
        steps = self.steps if steps is None else steps
        self.check_steps([steps])
        x = jnp.asarray(x)
        if check_input_dtype(x) != self.dtype:
            raise TypeError(f"this service answers {self.dtype} inputs, got {x.dtype}; cast x")
        n = int(x.shape[0]) if x.ndim else 0
        self.check_budget(n)
        answers = self._answer(x, target, int(steps))
        self.charge(n, steps)
        return answers

    __call__ = _checked_call(__call__)

    def check_budget(self, n: int) -> None:
        """Raise :class:`QueryBudgetExceeded` if ``n`` more queries would pass the budget (nothing is counted)."""
        if self.budget is not None and self.queries + n > self.budget:
            raise QueryBudgetExceeded(
                f"query budget exhausted: {self.queries} of {self.budget} queries used, this request needs {n}; "
                "nothing was answered (results so far stay valid)")

    def charge(self, n: int, steps: int | None = None) -> None:
        """Count ``n`` explanation queries (budget enforced) whose attributions an attack does not use.

        Attacks that read only the output values reported with each explanation
        (:func:`jaxrecover.attacks.recover_from_outputs`) pay the full query
        price without making this simulation compute the attributions.
        """
        steps = self.steps if steps is None else int(steps)
        self.check_budget(int(n))
        self.queries += int(n)
        self.evaluations += int(n) * num_evaluations(self.rule, steps)

    def _answer(self, x: jax.Array, target, steps: int) -> jax.Array:
        raise NotImplementedError

    def __repr__(self) -> str:
        d = self.describe()
        return f"{d.pop('service')}({', '.join(f'{k}={v!r}' for k, v in d.items() if k != 'arithmetic')})"


class ServiceWrapper(IGService):
    """A service that wraps another (defences, logging); by default it answers as the inner one does.

    Declared properties and counters are the inner service's unless a
    subclass overrides them; ``__call__`` delegates to the inner service.
    """

    def __init__(self, inner: IGService):
        if not isinstance(inner, IGService):
            raise TypeError(f"ServiceWrapper wraps an IGService, got {type(inner).__name__}")
        self.__dict__["inner"] = inner

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name, value):
        if name in ("queries", "evaluations") and name not in self.__dict__:
            setattr(self.inner, name, value)
        else:
            self.__dict__[name] = value

    def describe(self) -> dict[str, Any]:
        d = self.inner.describe()
        d["wrapped_by"] = [type(self).__name__] + d.get("wrapped_by", [])
        return d

    def __call__(self, x, target, *, steps: int | None = None):
        return self.inner(x, target, steps=steps)

    def quadrature(self, steps=None):
        return self.inner.quadrature(steps)

    def outputs(self, x, target):
        return self.inner.outputs(x, target)


class AssumedBaseline(ServiceWrapper):
    """The attacker's view of a service whose baseline it does not know: plans run as if the baseline were
    ``baseline`` (fixed, per example ``[N, ...]`` or one array for all). Answers stay the inner service's own.

    For a BIG service (:class:`jaxrecover.attacks.BoundaryBaseline`) the right guess is each input's
    nearest boundary point ``x'``: every query ``x' + c (x - x')`` then has ``x'`` as its own nearest boundary
    point, so the ray plans apply; a wrong guess (e.g. zeros) shows what an unaware attacker gets.
    """

    def __init__(self, inner: IGService, baseline):
        super().__init__(inner)
        baseline = jnp.asarray(baseline, inner.dtype)
        if is_input_dependent(baseline):
            raise TypeError("AssumedBaseline takes an array, not a function of the input")
        self.__dict__["baseline"] = baseline

    def fixed_baseline(self, x) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        try:
            return jnp.broadcast_to(self.baseline, x.shape)
        except ValueError:
            raise ValueError(f"the assumed baseline {tuple(self.baseline.shape)} does not fit queries "
                             f"{tuple(x.shape)}: give one per example, or one for all") from None

    baseline_for = fixed_baseline

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["assumed_baseline"] = f"array{tuple(self.baseline.shape)}"
        return d
