"""BIG as a service: the nearest decision-boundary point of each query as its IG baseline.

``SimulatedIGService(model, params, rule="riemann_trapezoid", steps=10, baseline=BoundaryBaseline(model, params))``
is a Boundary-IG (BIG) service; what such a service leaks is :func:`jaxrecover.attacks.recover_from_big`.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..models import as_model
from ..search import InputBox, boundary_search

__all__ = ["BoundaryBaseline"]


def _rows(mask, x):
    return mask.reshape((-1,) + (1,) * (x.ndim - 1))


class BoundaryBaseline:
    """The nearest boundary point of each input (for the model's prediction there) as an input-dependent IG
    baseline: ``SimulatedIGService(model, params, rule="riemann_trapezoid", steps=10,
    baseline=BoundaryBaseline(model, params))`` is a BIG service. Inputs whose search fails get a NaN baseline
    (so NaN answers), never another one; ``last`` holds the latest :class:`BoundaryResult`.

    Args:
      model, params: the model whose boundary is searched (the service's own).
      methods, box, search kwargs: as :func:`boundary_search` (default: the exact facet search).
    """

    def __init__(self, model, params, methods=("facet",), box: InputBox | None = None, **search_kwargs):
        self.model, self.params = as_model(model), params
        self.methods, self.box, self.search_kwargs = tuple(methods), box, search_kwargs
        self.last = None

    def __call__(self, x):
        x = jnp.asarray(x)
        labels = jnp.argmax(self.model.batched(self.params, x), axis=1).astype(jnp.int32)
        self.last = boundary_search(self.model, self.params, x, labels, methods=self.methods, box=self.box,
                                    **self.search_kwargs)
        return jnp.where(_rows(self.last.success, x), self.last.point, jnp.nan)

    def __str__(self) -> str:
        return f"boundary({'+'.join(self.methods)})"
