"""Vanilla Gradient and Integrated Gradients of ONE example, as pure jit/vmap-compatible functions.

Each function takes a scalar function ``f(x) -> ()`` of one example (or, for
the affine-stem form, the two halves of one) and returns an attribution of
the shape and dtype of ``x``. Batching is ``jax.vmap`` (or
:func:`jaxrecover.engine.explain`, which also chunks and shards); ``steps`` is
always static, so each step count compiles once.

>>> import jax.numpy as jnp
>>> f = lambda z: jnp.sum(z ** 2)
>>> integrated_gradients(f, jnp.ones(3), steps=4, rule="gausslegendre")   # exact for a quadratic
Array([1., 1., 1.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .. import ops
from .quadrature import quadrature

__all__ = [
    "OUTPUTS",
    "select_output",
    "vanilla_gradient",
    "path_points",
    "path_gradients",
    "integrate",
    "integrated_gradients",
    "integrated_gradients_affine_stem",
    "integrated_gradients_relu_conv",
    "completeness_delta",
]

#: What is explained: a class's logit, softmax probability or log-probability.
OUTPUTS = ("logit", "prob", "logprob")


def select_output(logits: jax.Array, target, output: str = "logit") -> jax.Array:
    """The explained scalar of one example's logits ``[C]``: logit, prob or logprob of ``target``."""
    if output == "logit":
        return logits[target]
    if output == "prob":
        return jax.nn.softmax(logits)[target]
    if output == "logprob":
        return jax.nn.log_softmax(logits)[target]
    raise ValueError(f"unknown output {output!r}; choose one of: {', '.join(OUTPUTS)}")


def vanilla_gradient(f: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """VG_f(x) = grad f(x) for a scalar ``f`` of one example; same shape and dtype as ``x``."""
    return jax.grad(f)(x)


def path_points(x: jax.Array, baseline: jax.Array, nodes) -> jax.Array:
    """``b + a_i (x - b)`` for every node: shape ``(n, *x.shape)``, dtype of ``x``."""
    a = jnp.asarray(nodes, x.dtype).reshape((-1,) + (1,) * x.ndim)
    return baseline[None] + a * (x - baseline)[None]


def path_gradients(f, x, baseline, nodes) -> jax.Array:
    """All ``grad f`` at the path points, from ONE ``jax.vmap``: ``(n, *x.shape)``."""
    return jax.vmap(jax.grad(f))(path_points(x, baseline, nodes))


def integrate(weights, grads: jax.Array) -> jax.Array:
    """The quadrature sum ``sum_i w_i grads[i]`` over the leading axis, in the dtype of ``grads``."""
    return jnp.tensordot(jnp.asarray(weights, grads.dtype), grads, axes=1)


def integrated_gradients(
    f: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    baseline: jax.Array | None = None,
    *,
    steps: int = 50,
    rule: str = "riemann_right",
) -> jax.Array:
    """IG of a scalar ``f`` of one example under a quadrature ``rule``.

    Args:
      f: scalar function of one example.
      x: the example, float32/float64 of any shape.
      baseline: same shape and dtype as ``x``; default zeros.
      steps: the rule's step count (static).
      rule: one of :data:`jaxrecover.explainers.RULES`.

    Returns:
      ``(x - b) * sum_i w_i grad f(b + a_i (x - b))``, shape and dtype of ``x``.
    """
    nodes, weights = quadrature(rule, steps)
    baseline = jnp.zeros_like(x) if baseline is None else baseline
    return (x - baseline) * integrate(weights, path_gradients(f, x, baseline, nodes))


def integrated_gradients_affine_stem(
    stem: Callable[[jax.Array], jax.Array],
    body: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    baseline: jax.Array | None = None,
    *,
    steps: int = 50,
    rule: str = "riemann_right",
) -> jax.Array:
    """IG of ``f = body o stem`` for an AFFINE ``stem`` (a model's first layer), the stem computed once.

    An affine stem ``s(z) = A z + c`` maps the straight path to a straight path,
    ``s(b + a (x - b)) = s(b) + a (s(x) - s(b))``, and ``grad f(z) = A^T grad body(s(z))``,
    so ``sum_i w_i grad f(z_i) = A^T sum_i w_i grad body(h_i)``: ONE stem forward
    at ``x`` and ``b`` and ONE transpose (the stem's VJP, the same at every point)
    instead of one of each per path point. Equal to :func:`integrated_gradients`
    of ``body o stem`` up to round-off (tests/test_explainers.py).
    """
    nodes, weights = quadrature(rule, steps)
    baseline = jnp.zeros_like(x) if baseline is None else baseline
    s_x, stem_transpose = jax.vjp(stem, x)
    grads = path_gradients(body, s_x, stem(baseline), nodes)
    (total,) = stem_transpose(ops.weighted_sum(weights, grads))
    return (x - baseline) * total


def _conv_valid(h, kernel):
    return ops.conv_general_dilated(h, kernel, (1, 1), ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def integrated_gradients_relu_conv(
    stem: Callable[[jax.Array], jax.Array],
    kernel: jax.Array,
    bias: jax.Array | None,
    head: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    baseline: jax.Array | None = None,
    *,
    steps: int = 50,
    rule: str = "riemann_right",
    pool: int = 0,
) -> jax.Array:
    """IG of ``f(x) = head(P(conv(relu(stem(x)), kernel) + bias))`` for an AFFINE ``stem``, with the
    convolution carried along the path sparsely (the native kernels of :mod:`jaxrecover.native.relu_conv`).

    ``stem`` maps one example to an ``(H, W, C)`` map; the convolution is stride-1 VALID NHWC/HWIO; ``P`` is
    the identity (``pool`` 0) or ``max_pool(relu(.))`` with window = stride = ``pool`` (computed inside the
    kernels, first-maximum gradient as :func:`jaxrecover.ops.max_pool`); ``head`` maps ``P``'s output to the
    explained scalar. The stem's outputs on the path are
    ``s0 + a_k d`` (:func:`integrated_gradients_affine_stem`), so only the units whose ReLU switches between
    consecutive nodes cost convolution work: two convolutions and one transposed convolution per example
    instead of m of each, plus a kernel slice per switch. Equal to :func:`integrated_gradients` up to
    round-off (tests/test_sparse_path.py); needs :func:`jaxrecover.native.available`.
    """
    from ..native import relu_conv  # the FFI targets are registered by native.available()

    nodes, weights = quadrature(rule, steps)
    baseline = jnp.zeros_like(x) if baseline is None else baseline
    s_x, stem_transpose = jax.vjp(stem, x)
    s0 = stem(baseline)
    d = s_x - s0
    on = path_points(s_x, s0, nodes) > 0
    mask = on.astype(jnp.uint8)
    zero = jnp.zeros((), x.dtype)
    first = _conv_valid(jnp.stack([jnp.where(on[0], d, zero), jnp.where(on[0], s0, zero)]), kernel)
    b0 = first[1] if bias is None else first[1] + bias.reshape((1, 1, -1))
    out = relu_conv.path_forward(s0, d, mask, jnp.asarray(nodes, x.dtype), first[0], b0, kernel, pool=pool)
    out, routes = out if pool else (out, None)
    cot = jax.vmap(jax.grad(head))(out)
    total, correction = relu_conv.path_backward(cot, jnp.asarray(weights, x.dtype), mask, kernel, routes,
                                                pool=pool)
    _, conv_transpose = jax.vjp(lambda h: _conv_valid(h, kernel), s0[None])
    (through,) = conv_transpose(total[None])
    (grad_x,) = stem_transpose(jnp.where(on[-1], through[0], zero) + correction)
    return (x - baseline) * grad_x


def completeness_delta(f, x, baseline, attribution) -> jax.Array:
    """Captum's convergence delta of one example: ``sum(IG) - (f(x) - f(b))`` (0 for exact IG)."""
    baseline = jnp.zeros_like(x) if baseline is None else baseline
    return jnp.sum(attribution) - (f(x) - f(baseline))
