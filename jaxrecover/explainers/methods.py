"""Explainer objects: what the batch engine runs, one example at a time.

An explainer is a small frozen dataclass registered as a pytree. Its settings
(steps, rule, ...) are static pytree metadata, so ``jax.jit`` compiles once per
setting; array-valued state (e.g. learned patterns) would be pytree data. Its
``__call__`` explains ONE example:

    explainer(model, params, x, target, baseline, output) -> attribution  (shape and dtype of x)

with ``model`` a :class:`jaxrecover.models.Model` (``model(params, x) -> logits``).
It is a pure function of arrays, usable under ``jax.vmap``/``jax.jit`` directly;
:func:`jaxrecover.engine.explain` runs any explainer over a batch.

A new explainer: subclass :class:`Explainer`, implement ``__call__`` (and
``evaluations`` if it differentiates the model more than once), decorate with
:func:`explainer_dataclass`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from .. import native
from .gradients import (integrated_gradients, integrated_gradients_affine_stem, integrated_gradients_relu_conv,
                        select_output, vanilla_gradient)
from .quadrature import get_rule, num_evaluations, quadrature

__all__ = ["Explainer", "VG", "IG", "explainer_dataclass"]


def explainer_dataclass(cls=None, *, data_fields: tuple[str, ...] = ()):
    """Make ``cls`` a frozen dataclass and a pytree: ``data_fields`` are arrays, every other field static."""

    def wrap(c):
        c = dataclasses.dataclass(frozen=True)(c)
        names = [f.name for f in dataclasses.fields(c)]
        return jax.tree_util.register_dataclass(c, data_fields=list(data_fields),
                                                meta_fields=[n for n in names if n not in data_fields])

    return wrap if cls is None else wrap(cls)


class Explainer:
    """Base class of explainers (see the module docstring)."""

    name: str = "explainer"

    @property
    def evaluations(self) -> int:
        """Model gradient evaluations one example costs (the engine sizes chunks by it)."""
        return 1

    def __call__(self, model, params: Any, x: jax.Array, target, baseline: jax.Array, output: str = "logit"
                 ) -> jax.Array:
        raise NotImplementedError

    @staticmethod
    def scalar(model, params, target, output: str):
        """``z -> the explained output of model(params, z)``: the scalar function of one example."""
        return lambda z: select_output(model(params, z), target, output)


@explainer_dataclass
class VG(Explainer):
    """Vanilla Gradient: ``grad f(x)`` (Captum ``Saliency`` without ``abs``)."""

    name = "vg"

    def __call__(self, model, params, x, target, baseline=None, output="logit"):
        return vanilla_gradient(self.scalar(model, params, target, output), x)


@explainer_dataclass
class IG(Explainer):
    """Integrated Gradients under a quadrature ``rule`` with ``steps`` steps.

    Attributes:
      steps: the step count (Captum ``n_steps``).
      rule: one of :data:`jaxrecover.explainers.RULES` (Captum ``method``).
      factor_stem: when the model has an affine first layer (``model.affine_stem``;
        every built-in model does), compute it once per example instead of once
        per path point (:func:`integrated_gradients_affine_stem`): the same IG up
        to round-off. False differentiates the whole model at every point.
      sparse_path: when the model's stem is followed by ReLU -> convolution
        (``model.relu_conv``: LeNet) and the native kernels are available
        (:func:`jaxrecover.native.available`: the CPU backend and a C++ compiler),
        carry that convolution along the path from ReLU switch to switch
        (:func:`integrated_gradients_relu_conv`): the same IG up to round-off,
        several times faster on CPU. Needs ``factor_stem``.
    """

    steps: int = 50
    rule: str = "riemann_right"
    factor_stem: bool = True
    sparse_path: bool = True
    name = "ig"

    def __post_init__(self):
        get_rule(self.rule)
        quadrature(self.rule, self.steps)  # validates steps

    @property
    def evaluations(self) -> int:
        return num_evaluations(self.rule, self.steps)

    def __call__(self, model, params, x, target, baseline=None, output="logit"):
        split = getattr(model, "affine_stem", None) if self.factor_stem else None
        relu_conv = getattr(model, "relu_conv", None) if split is not None and self.sparse_path else None
        if relu_conv is not None and native.available():
            kernel, bias = relu_conv.conv(params)
            return integrated_gradients_relu_conv(
                lambda z: split.stem(params, z), kernel, bias,
                lambda u: select_output(relu_conv.head(params, u), target, output),
                x, baseline, steps=self.steps, rule=self.rule, pool=relu_conv.pool)
        if split is not None:
            return integrated_gradients_affine_stem(
                lambda z: split.stem(params, z), lambda h: select_output(split.body(params, h), target, output),
                x, baseline, steps=self.steps, rule=self.rule)
        return integrated_gradients(self.scalar(model, params, target, output), x, baseline, steps=self.steps,
                                    rule=self.rule)
