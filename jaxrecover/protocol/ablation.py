"""Ablation: ResNet18 with BatchNorm on BATCH statistics, as a PyTorch model left in ``train()`` mode.

The only place in the package where a model runs outside inference mode.
Captum evaluates the ``m`` path points of one image as ONE batch and
differentiates the sum of their target outputs; in train mode the batch
statistics couple the points, so eq. (4) no longer holds exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import ops
from ..attacks import query_input, recover_eq3, recover_eq4
from ..explainers import integrate, quadrature
from .experiments import RULE, protocol_distance

__all__ = ["make_batchstats_logit_fn", "batchstats_protocol_chunk"]


def make_batchstats_logit_fn(module):
    """``logits_fn(variables, x[B, ...]) -> [B, C]`` with BatchNorm on the statistics of the batch ``x``."""

    def logits_fn(variables, xb):
        # flax's train-mode BatchNorm calls promote_types(dtype, float32) to keep float64 float64; that call is
        # refused under "strict" promotion (the tests' setting), though nothing is mixed: allow it here only
        with jax.numpy_dtype_promotion("standard"):
            out, _ = module.apply(variables, xb, train=True, mutable=["batch_stats"])
        return out

    return logits_fn


@ops.tuned_jit(static_argnames=("logits_fn", "steps", "a"))
def batchstats_protocol_chunk(logits_fn, params, x, target, steps: int = 50, a: float = 0.98):
    """Table 1 and Experiments B, C with BatchNorm on batch statistics, as Captum would compute them.

    VG is the gradient with the chunk ``x`` of test images as the batch.
    Returns ``{experiment: distances[N]}`` and the path-gradient norms ``[N, m]``
    (Figure 5 under batch statistics).
    """
    m = steps

    def ig_batch(xi, ti, scale, n):  # one IG query, its n path points forming one batch
        nodes, weights = quadrature(RULE, n)
        xq = query_input(scale, xi)
        pts = jnp.asarray(nodes, xi.dtype)[:, None, None, None] * xq[None]
        grads = jax.grad(lambda p: jnp.sum(logits_fn(params, p)[:, ti]))(pts)
        return xq * integrate(weights, grads), jnp.sqrt(jnp.sum(grads.reshape(n, -1) ** 2, axis=1))

    vg = jax.grad(lambda xb: jnp.sum(jnp.take_along_axis(logits_fn(params, xb), target[:, None], axis=1)))(x)

    def one(xi, ti, vgi):
        ig_m, norms = ig_batch(xi, ti, 1.0, m)
        ig_m1, _ = ig_batch(xi, ti, (m - 1) / m, m - 1)
        ig_a, _ = ig_batch(xi, ti, a, m)
        rb, mb = recover_eq4(ig_m, ig_m1, xi, m)
        rc, mc = recover_eq3(ig_m, ig_a, xi, a)
        return {"table1": protocol_distance(vgi, ig_m), "B": protocol_distance(vgi, rb, mb),
                "C": protocol_distance(vgi, rc, mc)}, norms

    return jax.vmap(one)(x, target, vg)
