"""Boundary Attribution (Wang, Fredrikson, Datta, ICML 2022): explanations at the nearest decision boundary.

A classification is explained by the normal of the decision boundary closest to the input: find a point ``x'``
on it (:func:`jaxrecover.search.boundary_search`), then

* BSM (boundary saliency map): the gradient at ``x'`` (:class:`BSM`);
* BIG (boundary IG): IG at ``x`` with ``x'`` as the baseline (:class:`BIG`, Captum ``riemann_trapezoid`` with
  10 steps as the reference's defaults);
* BSG: SmoothGrad at ``x'`` (:class:`BSG`).

The three are single-example explainers that take the boundary point in the baseline slot; run them with
:func:`jaxrecover.attacks.big_attributions`, which passes each example's point and masks the examples
whose search failed (NaN rows, never a silent fallback to another baseline).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .gradients import vanilla_gradient
from .methods import IG, Explainer, explainer_dataclass

__all__ = ["BSM", "BIG", "BSG"]

@explainer_dataclass
class BSM(Explainer):
    """Boundary saliency map: the gradient of the explained class's output at the boundary point, which the
    engine passes as ``baseline`` (use :func:`boundary_attributions`)."""

    name = "bsm"

    def __call__(self, model, params, x, target, baseline=None, output="logit"):
        return vanilla_gradient(self.scalar(model, params, target, output), baseline)


@explainer_dataclass
class BIG(IG):
    """Boundary IG: IG at ``x`` with the boundary point as the baseline (reference: Captum
    ``riemann_trapezoid``, 10 steps). ``sparse_path`` is off by default here: docs/BOUNDARY.md's tables were
    computed with the dense path (True: same values up to round-off, faster for LeNet on CPU)."""

    steps: int = 10
    rule: str = "riemann_trapezoid"
    factor_stem: bool = True
    sparse_path: bool = False
    name = "big"


@explainer_dataclass
class BSG(Explainer):
    """SmoothGrad at the boundary point: the mean gradient over ``samples`` points ``x' + N(0, stdev^2)``
    (``stdev`` in model units; the reference's 0.15). The noise is drawn from ``seed`` (the same for every
    example: the explainer is a deterministic function)."""

    samples: int = 16
    stdev: float = 0.15
    seed: int = 0
    name = "bsg"

    @property
    def evaluations(self) -> int:
        return self.samples

    def __call__(self, model, params, x, target, baseline=None, output="logit"):
        f = self.scalar(model, params, target, output)
        noise = self.stdev * jax.random.normal(jax.random.key(self.seed), (self.samples, *x.shape), x.dtype)
        return jnp.mean(jax.vmap(jax.grad(f))(baseline[None] + noise), axis=0)
