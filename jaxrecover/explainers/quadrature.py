"""The quadrature rules public IG implementations use: one table of nodes and weights.

Every public IG implementation approximates

    IG(x; b) = (x - b) * sum_i w_i * grad f(b + a_i (x - b))

with nodes ``a_i`` and weights ``w_i`` of a quadrature rule. :data:`RULES` is
the one table of those rules (``docs/RECOVERY.md``, ``REFERENCES.md``):

=====================  ===========================================  ==========================  =========
rule                   nodes a_i                                    weights w_i                 min steps
=====================  ===========================================  ==========================  =========
riemann_right          i/n, i=1..n (the paper's eq. 1; Captum)      1/n                         2
riemann_left           i/n, i=0..n-1 (Captum; iNNvestigate 1.x)     1/n                         2
riemann_middle         (2i-1)/(2n), i=1..n (Captum)                 1/n                         2
riemann_trapezoid      i/(n-1), i=0..n-1 (Captum)                   1/n, ends 1/(2n); sum (n-1)/n  2
trapezoid              i/(n-1), i=0..n-1 (a correct trapezoid)      1/(n-1), ends 1/(2(n-1))   2
gausslegendre          (1+t_i)/2, numpy leggauss(n) (Captum default)  v_i/2                     1
saliency               k/(n-1), k=0..n-1, linspace (PAIR saliency)   1/n                         1
ig_original            k/n, k=0..n (n+1 points; Sundararajan code)   1/n, ends 1/(2n)            1
=====================  ===========================================  ==========================  =========

The minimum step counts are those the reference libraries accept (Captum
asserts ``n > 1`` for its Riemann rules).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

__all__ = ["RULES", "QuadratureRule", "get_rule", "quadrature", "num_evaluations"]


@dataclasses.dataclass(frozen=True)
class QuadratureRule:
    """Where a rule puts its nodes in [0, 1] and how it weights them.

    Attributes:
      name: the rule's name in this library.
      build: ``n -> (nodes, weights)``, float64 numpy arrays (nodes ascending).
      min_steps: the smallest step count the reference implementation accepts.
      source: where the rule comes from.
    """

    name: str
    build: Callable[[int], tuple[np.ndarray, np.ndarray]]
    min_steps: int
    source: str


def _uniform(nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return nodes, np.full(nodes.shape, 1.0 / nodes.size)


def _trapezoid_weights(n_points: int, total: float) -> np.ndarray:
    w = np.full(n_points, total / max(n_points - 1, 1))
    w[0] /= 2
    w[-1] /= 2
    return w


def _captum_trapezoid(n):
    w = np.full(n, 1.0 / n)
    w[0] /= 2
    w[-1] /= 2
    return np.arange(n) / (n - 1), w


def _gauss_legendre(n):
    t, v = np.polynomial.legendre.leggauss(n)
    return (1.0 + t) / 2.0, v / 2.0


def _ig_original(n):
    return np.arange(n + 1) / n, _trapezoid_weights(n + 1, 1.0)


RULES: dict[str, QuadratureRule] = {
    r.name: r
    for r in (
        QuadratureRule("riemann_right", lambda n: _uniform(np.arange(1, n + 1) / n), 2,
                       "the paper's eq. (1); Captum riemann_right"),
        QuadratureRule("riemann_left", lambda n: _uniform(np.arange(n) / n), 2,
                       "Captum riemann_left; iNNvestigate 1.x"),
        QuadratureRule("riemann_middle", lambda n: _uniform((2 * np.arange(1, n + 1) - 1) / (2 * n)), 2,
                       "Captum riemann_middle"),
        QuadratureRule("riemann_trapezoid", _captum_trapezoid, 2,
                       "Captum riemann_trapezoid (weights sum to (n-1)/n, as Captum has it)"),
        QuadratureRule("trapezoid", lambda n: (np.arange(n) / (n - 1), _trapezoid_weights(n, 1.0)), 2,
                       "a correct trapezoid rule on n points (weights sum to 1)"),
        QuadratureRule("gausslegendre", _gauss_legendre, 1, "Captum gausslegendre (Captum's default)"),
        QuadratureRule("saliency", lambda n: _uniform(np.linspace(0.0, 1.0, n)), 1,
                       "PAIR saliency IntegratedGradients (linspace with both ends)"),
        QuadratureRule("ig_original", _ig_original, 1,
                       "original IG code (ankurtaly/Integrated-Gradients): n+1 points, trapezoid"),
    )
}


def get_rule(rule: str) -> QuadratureRule:
    """The :class:`QuadratureRule` named ``rule`` (a clear error naming the choices otherwise)."""
    try:
        return RULES[rule]
    except (KeyError, TypeError):
        raise ValueError(f"unknown IG rule {rule!r}; choose one of: {', '.join(RULES)}") from None


@functools.lru_cache(maxsize=256)
def _quadrature_cached(rule: str, steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    nodes, weights = get_rule(rule).build(steps)
    return tuple(float(v) for v in nodes), tuple(float(v) for v in weights)


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of ``rule`` with ``steps`` steps, float64 numpy arrays.

    Raises:
      ValueError: unknown rule, or ``steps`` not an integer at least the rule's minimum.
    """
    r = get_rule(rule)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < r.min_steps:
        raise ValueError(f"rule {rule!r} needs an integer steps >= {r.min_steps}, got {steps!r}")
    nodes, weights = _quadrature_cached(rule, int(steps))
    return np.array(nodes, np.float64), np.array(weights, np.float64)


def num_evaluations(rule: str, steps: int) -> int:
    """Gradient evaluations one IG answer of ``rule`` with ``steps`` steps costs."""
    return quadrature(rule, steps)[0].size
