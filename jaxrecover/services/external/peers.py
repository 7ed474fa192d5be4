"""Real IG implementations as services: Captum on a PyTorch twin, and PAIR saliency.

Both need the optional ``services`` extra (``pip install 'jaxrecover[services]'``).
Each service declares where its implementation rounds (``arithmetic``) and
exposes the nodes and weights it actually multiplies with
(:meth:`IGService.quadrature`), read from the library itself, so that
service-aware plans (:func:`jaxrecover.attacks.service_plan`) cancel exactly.

What the libraries do (captum 0.9 ``attr/_core/integrated_gradients.py`` and
``attr/_utils/approximation_methods.py``; saliency 0.2.1
``core/integrated_gradients.py``):

* Captum: Riemann alphas from ``torch.linspace`` in float32 (``.tolist()``),
  Gauss-Legendre alphas in float64; every step size through
  ``torch.tensor(step_sizes).float()`` (float32), also for float64 inputs;
  points ``b + alpha (x - b)``, gradients and sums in the input's dtype. A
  float32 input rounds the alphas to float32 as well.
* PAIR saliency: alphas ``np.linspace(0, 1, n)`` (float64), gradients summed
  into ``np.zeros_like(x, dtype=np.float32)``: float32 accumulation whatever
  the input's dtype; ``total * (x - b) / n`` at the end.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np

from ...explainers import select_output
from ...models import as_model, float_dtype
from ..base import IGService

__all__ = ["CaptumIGService", "SaliencyIGService", "CAPTUM_RULES", "require_extra"]

#: This library's rule name -> Captum's ``method``.
CAPTUM_RULES = {"riemann_right": "riemann_right", "riemann_left": "riemann_left",
                "riemann_middle": "riemann_middle", "riemann_trapezoid": "riemann_trapezoid",
                "gausslegendre": "gausslegendre"}


def require_extra(module: str):
    """Import ``module`` or raise one clear line naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is not installed; real IG services need the 'services' extra: "
                          "pip install 'jaxrecover[services]' (or bash scripts/setup.sh services)") from e


class CaptumIGService(IGService):
    """Captum's ``IntegratedGradients`` on a PyTorch twin of a jaxrecover model, with the same weights.

    Args:
      model: a model name of :data:`jaxrecover.models.MODEL_NAMES` (or a :class:`Model` made by ``make_model``).
      variables: the Flax variables; their float dtype is the service's dtype (float32 or float64).
      rule: one of :data:`CAPTUM_RULES` (Captum's default is ``gausslegendre``).
      steps, fixed_steps, baseline, output, budget: see :class:`IGService`.
      internal_batch_size: passed to Captum (default: all points of a batch at once).
    """

    def __init__(self, model, variables, *, rule: str = "gausslegendre", steps: int = 50, fixed_steps: bool = False,
                 baseline=None, output: str = "logit", budget: int | None = None,
                 internal_batch_size: int | None = None):
        if rule not in CAPTUM_RULES:
            raise ValueError(f"Captum has no rule {rule!r}; choose one of: {', '.join(CAPTUM_RULES)}")
        torch = require_extra("torch")
        attr = require_extra("captum.attr")
        from . import torch_twins
        name = model if isinstance(model, str) else getattr(model, "name", None)
        dtype = float_dtype(variables, what="the variables")
        super().__init__(rule=rule, steps=steps, fixed_steps=fixed_steps, baseline=baseline, dtype=dtype,
                         output=output, budget=budget,
                         arithmetic={"nodes": ("float64 (numpy leggauss)" if rule == "gausslegendre"
                                               else "float32 (torch.linspace)")
                                     + (", then float32 (input dtype)" if dtype == jnp.float32 else ""),
                                     "weights": "float32 (torch.tensor(step_sizes).float())",
                                     "accumulation": dtype.name})
        self._torch = torch
        self._tdtype = torch_twins.torch_dtype(dtype)
        self.twin = torch_twins.torch_twin(name, jax.device_get(variables), self._tdtype)
        self.model_name = name
        self.internal_batch_size = internal_batch_size
        self._ig = attr.IntegratedGradients(self._forward)
        self._tt = torch_twins

    def _forward(self, x):
        logits = self.twin(x)
        if self.output == "prob":
            return self._torch.softmax(logits, dim=-1)
        if self.output == "logprob":
            return self._torch.log_softmax(logits, dim=-1)
        return logits

    def _tensor(self, a):
        return self._torch.from_numpy(np.array(self._tt.to_nchw(np.asarray(a)))).to(self._tdtype)

    def quadrature(self, steps=None):
        from captum.attr._utils.approximation_methods import approximation_parameters
        steps = self.steps if steps is None else int(steps)
        step_sizes, alphas = approximation_parameters(CAPTUM_RULES[self.rule])
        nodes = np.asarray(alphas(steps), np.float64)
        weights = self._torch.tensor(step_sizes(steps)).float().double().numpy()
        if self.dtype == jnp.float32:  # alpha * (x - b) in float32
            nodes = nodes.astype(np.float32).astype(np.float64)
        return nodes, weights

    def logits(self, x) -> np.ndarray:
        """The twin's logits ``[N, C]`` (numpy, the service's dtype): for conformance checks."""
        with self._torch.no_grad():
            return self.twin(self._tensor(x)).numpy()

    def gradient(self, x, target) -> jax.Array:
        """The twin's own Vanilla Gradient (PyTorch autograd) of the explained output, in the service's dtype.

        The reference for attacks on this service: where max-pool windows tie (constant
        MNIST background) PyTorch and JAX route the gradient to different inputs, so
        the twin's VG can differ from the JAX model's VG although the logits agree.
        """
        xt = self._tensor(np.asarray(x)).requires_grad_(True)
        t = self._torch.as_tensor(np.array(target)).long().reshape(-1, 1)
        self._forward(xt).gather(1, t).sum().backward()
        return jnp.asarray(self._tt.from_nchw(xt.grad.detach().numpy()), self.dtype)

    def outputs(self, x, target):
        x = np.asarray(x, self.dtype)
        t = self._torch.as_tensor(np.array(target)).long().reshape(-1, 1)
        with self._torch.no_grad():
            fx = self._forward(self._tensor(x)).gather(1, t)[:, 0].numpy()
            fb = self._forward(self._tensor(self.baseline_for(x))).gather(1, t)[:, 0].numpy()
        return jnp.asarray(fx, self.dtype), jnp.asarray(fb, self.dtype)

    def _answer(self, x, target, steps):
        xn = np.asarray(x)
        attr = self._ig.attribute(self._tensor(xn), baselines=self._tensor(self.baseline_for(xn)),
                                  target=self._torch.as_tensor(np.array(target)).long(), n_steps=steps,
                                  method=CAPTUM_RULES[self.rule], internal_batch_size=self.internal_batch_size)
        return jnp.asarray(self._tt.from_nchw(attr.detach().numpy()), self.dtype)


class SaliencyIGService(IGService):
    """PAIR saliency's ``IntegratedGradients`` (framework-agnostic) driving a jaxrecover model's gradients.

    The rule is ``saliency`` (``np.linspace(0, 1, n)``, weights 1/n, PAIR's
    default 25 steps); gradients come from JAX in the service's dtype and are
    accumulated by PAIR in float32. One ``GetMask`` call per example, as PAIR works.

    Args:
      model: a :class:`jaxrecover.models.Model` or ``logit_fn(params, x_one)``.
      params: the model's variables; their float dtype is the service's dtype.
      batch_size: PAIR's ``batch_size`` (points per gradient call; default all steps in one call).
    """

    def __init__(self, model, params, *, steps: int = 25, fixed_steps: bool = False, baseline=None,
                 output: str = "logit", budget: int | None = None, batch_size: int | None = None):
        core = require_extra("saliency.core")
        dtype = float_dtype(params, what="the params")
        super().__init__(rule="saliency", steps=steps, fixed_steps=fixed_steps, baseline=baseline, dtype=dtype,
                         output=output, budget=budget,
                         arithmetic={"nodes": f"float64 (np.linspace), points in {dtype.name}",
                                     "weights": "1/n applied once at the end (float64)",
                                     "accumulation": "float32 (np.zeros_like(x, dtype=np.float32))"})
        self.model = as_model(model)
        self.params = params
        self.batch_size = batch_size
        self._core = core
        self._ig = core.IntegratedGradients()
        self._grad = jax.jit(jax.vmap(jax.grad(lambda p, x, t, out: select_output(self.model(p, x), t, out), argnums=1),
                                      in_axes=(None, 0, None, None)), static_argnames=("out",))

    def quadrature(self, steps=None):
        steps = self.steps if steps is None else int(steps)
        nodes = np.linspace(0.0, 1.0, steps)
        if self.dtype == jnp.float32:
            nodes = nodes.astype(np.float32).astype(np.float64)
        return nodes, np.full(steps, 1.0 / steps)

    def outputs(self, x, target):
        x = jnp.asarray(x, self.dtype)
        b = self.baseline_for(x)
        f = jax.vmap(lambda xi, t: select_output(self.model(self.params, xi), t, self.output))
        t = jnp.asarray(target)
        return f(x, t), f(b, t)

    def _answer(self, x, target, steps):
        xn = np.asarray(x)
        bn = np.asarray(self.baseline_for(xn))
        key = self._core.base.INPUT_OUTPUT_GRADIENTS
        out = np.empty(xn.shape, np.float64)
        for i in range(xn.shape[0]):
            t = int(np.asarray(target)[i])

            def call_model(points, call_model_args=None, expected_keys=None, t=t):
                g = self._grad(self.params, jnp.asarray(points, self.dtype), t, self.output)
                return {key: np.asarray(g)}

            out[i] = self._ig.GetMask(xn[i], call_model, x_baseline=bn[i], x_steps=steps,
                                      batch_size=self.batch_size or steps)
        return jnp.asarray(out, self.dtype)
