"""This library's own IG as a service: :class:`SimulatedIGService`, the victim every table starts from."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..engine import explain
from ..explainers import IG, select_output
from ..models import as_model, float_dtype
from .base import IGService

__all__ = ["SimulatedIGService"]


class SimulatedIGService(IGService):
    """This library's own IG as a service: :class:`jaxrecover.explainers.IG` run by the batch engine.

    Args:
      model: a :class:`jaxrecover.models.Model` or ``logit_fn(params, x_one)``.
      params: the model's variables; their float dtype is the service's dtype.
      rule, steps, fixed_steps, baseline, output, budget: see :class:`IGService`.
      chunk_size: passed to :func:`jaxrecover.engine.explain`.
      factor_stem: IG's affine-stem factorisation (same values up to round-off).
      sparse_path: IG's native sparse ReLU -> convolution path for LeNet (:class:`jaxrecover.explainers.IG`;
        same values up to round-off, several times faster on CPU). Off by default: the service tables of
        docs/SERVICES.md were computed with the dense path, and round-off is what some of them measure.
    """

    def __init__(self, model, params, *, rule: str = "riemann_right", steps: int = 50, fixed_steps: bool = False,
                 baseline=None, output: str = "logit", budget: int | None = None,
                 chunk_size: int | str | None = "auto", factor_stem: bool = True, sparse_path: bool = False):
        dtype = float_dtype(params, what="the service's params")
        super().__init__(rule=rule, steps=steps, fixed_steps=fixed_steps, baseline=baseline, dtype=dtype,
                         output=output, budget=budget,
                         arithmetic={"nodes": f"float64, rounded once to {dtype.name}",
                                     "weights": f"float64, rounded once to {dtype.name}",
                                     "accumulation": dtype.name})
        self.model = as_model(model)
        self.params = params
        self.chunk_size = chunk_size
        self.factor_stem = bool(factor_stem)
        self.sparse_path = bool(sparse_path)

    def outputs(self, x, target):
        x = jnp.asarray(x, self.dtype)
        b = self.baseline_for(x)
        f = _output_fn(self.model, self.output)
        t = jnp.asarray(target)
        return f(self.params, x, t), f(self.params, b, t)

    def _answer(self, x, target, steps):
        ig = IG(steps=steps, rule=self.rule, factor_stem=self.factor_stem, sparse_path=self.sparse_path)
        return explain(ig, self.model, self.params, x,
                       target, baseline=self.baseline_for(x), output=self.output, chunk_size=self.chunk_size)


@functools.lru_cache(maxsize=32)
def _output_fn(model, output):
    return jax.jit(jax.vmap(lambda params, x, t: select_output(model(params, x), t, output), in_axes=(None, 0, 0)))
