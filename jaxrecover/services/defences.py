"""Defences: wrappers that change what an IG service answers (composable, each still a service).

Each defence is a :class:`~jaxrecover.attacks.ServiceWrapper`: it wraps any
service (or another defence), keeps the service's dtype, and appears in
``describe()["wrapped_by"]``. Answer-changing defences also change the output
values a service reports (``outputs``) unless ``outputs=False``: those leak VG
too (:func:`jaxrecover.attacks.recover_from_outputs`).

* :class:`RoundAnswers`: k significant decimal digits, or float16.
* :class:`GaussianNoise`, :class:`LaplaceNoise`: additive noise, absolute or relative to each answer's max.
* :class:`TopK`: only the k largest attributions (by magnitude) of each answer, the rest 0.
* :class:`FixSteps`: the caller cannot choose m.
* :class:`RandomSteps`: every query gets a step count drawn at random.
* :class:`ClientBudget`: a per-client query budget in front of the service.
* :class:`SmoothGradIG`: the mean of the service's answers at ``samples`` noisy copies of the input.
* :class:`ExpectedGradients`: the mean of ``samples`` answers of a service whose baseline is a
  :class:`~jaxrecover.explainers.RandomBaseline` (a fresh random reference per answer).

And on the attacker's side, :class:`Averaged`: the mean of ``repeats`` identical queries (against noise).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from ..explainers import quadrature
from .base import IGService, QueryBudgetExceeded, ServiceWrapper, StepCountRefused

__all__ = ["RoundAnswers", "GaussianNoise", "LaplaceNoise", "TopK", "FixSteps", "RandomSteps", "ClientBudget",
           "SmoothGradIG", "ExpectedGradients", "round_significant"]


def round_significant(a, digits: int):
    """``a`` rounded to ``digits`` significant decimal digits (numpy, float64 arithmetic; 0 stays 0)."""
    a = np.asarray(a, np.float64)
    nz = a != 0
    exp = np.floor(np.log10(np.abs(np.where(nz, a, 1.0))))
    scale = 10.0 ** (digits - 1 - exp)
    return np.where(nz, np.round(a * scale) / scale, 0.0)


class _AnswerDefence(ServiceWrapper):
    """A defence that transforms each answer (and, with ``outputs``, the reported output values)."""

    def __init__(self, inner: IGService, *, outputs: bool = True):
        super().__init__(inner)
        self.__dict__["transform_outputs"] = bool(outputs)

    def _transform(self, a: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {"outputs": self.transform_outputs}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.setdefault("defences", []).insert(0, {"defence": type(self).__name__, **self.settings()})
        return d

    def __call__(self, x, target, *, steps: int | None = None):
        ans = self.inner(x, target, steps=steps)
        return jnp.asarray(self._transform(np.asarray(ans)), ans.dtype)

    def outputs(self, x, target):
        fx, fb = self.inner.outputs(x, target)
        if not self.transform_outputs:
            return fx, fb
        return (jnp.asarray(self._transform(np.asarray(fx)), fx.dtype),
                jnp.asarray(self._transform(np.asarray(fb)), fb.dtype))


class RoundAnswers(_AnswerDefence):
    """Round every attribution to ``digits`` significant decimal digits, or to float16 (``digits="float16"``)."""

    def __init__(self, inner: IGService, digits: int | str = 3, *, outputs: bool = True):
        if digits != "float16" and not (isinstance(digits, (int, np.integer)) and 1 <= digits <= 17):
            raise ValueError(f"digits must be an int in 1..17 or 'float16', got {digits!r}")
        super().__init__(inner, outputs=outputs)
        self.__dict__["digits"] = digits

    def settings(self):
        return {"digits": self.digits, **super().settings()}

    def _transform(self, a):
        if self.digits == "float16":
            return a.astype(np.float16).astype(a.dtype)
        return round_significant(a, int(self.digits)).astype(a.dtype)


class _Noise(_AnswerDefence):
    def __init__(self, inner: IGService, scale: float, *, relative: bool = True, seed: int = 0,
                 outputs: bool = True):
        if not scale >= 0:
            raise ValueError(f"noise scale must be >= 0, got {scale!r}")
        super().__init__(inner, outputs=outputs)
        self.__dict__.update(scale=float(scale), relative=bool(relative), seed=int(seed),
                             _rng=np.random.default_rng(seed))

    def settings(self):
        return {"scale": self.scale, "relative": self.relative, "seed": self.seed, **super().settings()}

    def _draw(self, shape) -> np.ndarray:
        raise NotImplementedError

    def _transform(self, a):
        a64 = np.asarray(a, np.float64)
        if self.relative and a64.ndim > 1:  # per answer: scale * max |a|
            ref = np.max(np.abs(a64.reshape(a64.shape[0], -1)), axis=1).reshape((-1,) + (1,) * (a64.ndim - 1))
        elif self.relative:
            ref = np.abs(a64)
        else:
            ref = 1.0
        return (a64 + self.scale * ref * self._draw(a64.shape)).astype(a.dtype)


class GaussianNoise(_Noise):
    """Add ``N(0, sigma^2)`` noise, ``sigma = scale`` (absolute) or ``scale * max|answer|`` per answer (relative).

    The generator is seeded once (``seed``): the same client sees a reproducible stream of fresh noise.
    """

    def _draw(self, shape):
        return self._rng.standard_normal(shape)


class LaplaceNoise(_Noise):
    """Add Laplace noise of scale ``b = scale`` (absolute) or ``scale * max|answer|`` (relative): std ``sqrt(2) b``."""

    def _draw(self, shape):
        return self._rng.laplace(0.0, 1.0, shape)


class TopK(_AnswerDefence):
    """Return only the ``k`` largest attributions by magnitude of each answer (the others 0); outputs untouched."""

    def __init__(self, inner: IGService, k: int):
        if not (isinstance(k, (int, np.integer)) and k >= 1):
            raise ValueError(f"k must be a positive int, got {k!r}")
        super().__init__(inner, outputs=False)
        self.__dict__["k"] = int(k)

    def settings(self):
        return {"k": self.k}

    def _transform(self, a):
        flat = a.reshape(a.shape[0], -1)
        k = min(self.k, flat.shape[1])
        keep = np.argpartition(-np.abs(flat), k - 1, axis=1)[:, :k]
        out = np.zeros_like(flat)
        np.put_along_axis(out, keep, np.take_along_axis(flat, keep, axis=1), axis=1)
        return out.reshape(a.shape)


class FixSteps(ServiceWrapper):
    """The caller cannot choose m: every query uses ``steps`` (another request raises :class:`StepCountRefused`)."""

    def __init__(self, inner: IGService, steps: int | None = None):
        super().__init__(inner)
        steps = inner.steps if steps is None else int(steps)
        quadrature(inner.rule, steps)
        self.__dict__.update(steps=steps, fixed_steps=True)

    def describe(self):
        d = super().describe()
        d.update(steps=self.steps, fixed_steps=True)
        return d

    def __call__(self, x, target, *, steps: int | None = None):
        self.check_steps([self.steps if steps is None else steps])
        return self.inner(x, target, steps=self.steps)


class RandomSteps(ServiceWrapper):
    """Every query (each example) gets a step count drawn uniformly from ``low..high``; requests for m are refused.

    ``last_steps`` holds the counts used by the latest call (for experiments; an attacker does not see it).
    """

    def __init__(self, inner: IGService, low: int = 20, high: int = 80, *, seed: int = 0):
        if not (isinstance(low, (int, np.integer)) and isinstance(high, (int, np.integer)) and 1 <= low <= high):
            raise ValueError(f"need integers 1 <= low <= high, got {low!r}, {high!r}")
        quadrature(inner.rule, int(low))
        super().__init__(inner)
        self.__dict__.update(low=int(low), high=int(high), seed=int(seed), fixed_steps=True,
                             _rng=np.random.default_rng(seed), last_steps=None)

    def describe(self):
        d = super().describe()
        d.update(steps=f"random {self.low}..{self.high}", fixed_steps=True)
        return d

    def check_steps(self, steps_list, what: str = "request") -> None:
        for s in steps_list:
            raise StepCountRefused(f"{what} asks for {s} steps but this service draws the step count at random "
                                   f"({self.low}..{self.high}) and refuses requests for m; use "
                                   f"jaxrecover.attacks.recover_random_steps(service, x, target, low={self.low}, "
                                   f"high={self.high}) or recover_from_outputs")

    def __call__(self, x, target, *, steps: int | None = None):
        if steps is not None:
            self.check_steps([steps])
        x = jnp.asarray(x)
        target = jnp.asarray(target).reshape(-1)
        ms = self._rng.integers(self.low, self.high + 1, size=x.shape[0])
        out = [None] * x.shape[0]
        for m in np.unique(ms):
            idx = np.flatnonzero(ms == m)
            ans = self.inner(x[idx], target[idx], steps=int(m))
            for j, i in enumerate(idx):
                out[i] = ans[j]
        self.__dict__["last_steps"] = ms
        return jnp.stack(out) if out else jnp.zeros_like(x)


class ClientBudget(ServiceWrapper):
    """A per-client query budget in front of ``inner`` (its own counter; the inner service counts as before)."""

    def __init__(self, inner: IGService, budget: int):
        if not (isinstance(budget, (int, np.integer)) and budget >= 0):
            raise ValueError(f"budget must be a non-negative int, got {budget!r}")
        super().__init__(inner)
        self.__dict__.update(budget=int(budget), queries=0)

    def describe(self):
        d = super().describe()
        d.update(budget=self.budget, queries=self.queries)
        return d

    @property
    def remaining(self):
        return self.budget - self.queries

    def reset_counters(self):
        self.__dict__["queries"] = 0

    def _take(self, n: int):
        if self.queries + n > self.budget:
            raise QueryBudgetExceeded(f"client budget exhausted: {self.queries} of {self.budget} queries used, this "
                                      f"request needs {n}; nothing was answered (results so far stay valid)")
        self.__dict__["queries"] = self.queries + n

    def charge(self, n: int, steps: int | None = None):
        self._take(int(n))
        self.inner.charge(n, steps)

    def __call__(self, x, target, *, steps: int | None = None):
        x = jnp.asarray(x)
        n = int(x.shape[0]) if x.ndim else 0
        if self.queries + n > self.budget:
            self._take(n)
        ans = self.inner(x, target, steps=steps)
        self._take(n)
        return ans



class SmoothGradIG(ServiceWrapper):
    """SmoothGrad over IG: the mean of the inner answers at ``x + N(0, (sigma * (max x - min x))^2)`` copies.

    Each query costs ``samples`` inner queries (the inner service counts them). The noise is drawn in float64
    from a generator seeded once, then the inputs are cast to the service's dtype.
    """

    def __init__(self, inner: IGService, samples: int = 16, sigma: float = 0.15, *, seed: int = 0):
        if not (isinstance(samples, (int, np.integer)) and samples >= 1) or not sigma >= 0:
            raise ValueError(f"need samples >= 1 and sigma >= 0, got {samples!r}, {sigma!r}")
        super().__init__(inner)
        self.__dict__.update(samples=int(samples), sigma=float(sigma), seed=int(seed),
                             _rng=np.random.default_rng(seed))

    def describe(self):
        d = super().describe()
        d.setdefault("defences", []).insert(0, {"defence": "SmoothGradIG", "samples": self.samples,
                                                "sigma": self.sigma, "seed": self.seed})
        return d

    def __call__(self, x, target, *, steps: int | None = None):
        x = jnp.asarray(x)
        x64 = np.asarray(x, np.float64)
        span = (x64.reshape(x64.shape[0], -1).max(1) - x64.reshape(x64.shape[0], -1).min(1))
        span = span.reshape((-1,) + (1,) * (x64.ndim - 1))
        total = np.zeros(x64.shape)
        for _ in range(self.samples):
            noisy = x64 + self.sigma * span * self._rng.standard_normal(x64.shape)
            total += np.asarray(self.inner(jnp.asarray(noisy, x.dtype), target, steps=steps), np.float64)
        return jnp.asarray(total / self.samples, x.dtype)


class ExpectedGradients(ServiceWrapper):
    """Expected gradients as a defence: the mean of ``samples`` answers, each from a fresh random baseline.

    ``inner`` must have a :class:`~jaxrecover.explainers.RandomBaseline`; each query costs ``samples``
    inner queries. (Its ``outputs`` report ``f`` at one more random baseline.)
    """

    def __init__(self, inner: IGService, samples: int = 8):
        from ..explainers.baselines import RandomBaseline
        if not isinstance(inner.baseline, RandomBaseline):
            raise ValueError("ExpectedGradients wraps a service whose baseline is a RandomBaseline(references); "
                             f"this one's is {inner.baseline}")
        if not (isinstance(samples, (int, np.integer)) and samples >= 1):
            raise ValueError(f"samples must be a positive int, got {samples!r}")
        super().__init__(inner)
        self.__dict__["samples"] = int(samples)

    def describe(self):
        d = super().describe()
        d.setdefault("defences", []).insert(0, {"defence": "ExpectedGradients", "samples": self.samples})
        return d

    def __call__(self, x, target, *, steps: int | None = None):
        x = jnp.asarray(x)
        total = sum(np.asarray(self.inner(x, target, steps=steps), np.float64) for _ in range(self.samples))
        return jnp.asarray(total / self.samples, x.dtype)
