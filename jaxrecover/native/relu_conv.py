"""The sparse ReLU -> convolution path of one example, as two JAX operations backed by the native kernels.

Along a straight path the pre-activations ``z_k = s0 + a_k d`` of a ReLU layer
(the output of an affine stem) are affine in ``a_k``; a unit's ReLU mask
``M_k`` changes only where ``z_k`` changes sign, which for a straight path is
at most once per unit. The next convolution (stride 1, VALID) is linear, so

* forward: ``conv(relu(z_k)) + bias = a_k conv(M_k d) + conv(M_k s0) + bias``;
  both convolutions are carried from point to point, adding or removing the
  kernel slice of each unit whose mask changed (:func:`path_forward`);
* backward: with ``V_k`` the cotangents of the convolution's outputs and
  ``Delta_j = M_j - M_{j-1}``, summation by parts gives, for ANY masks,
  ``sum_k w_k M_k conv^T(V_k) = M_last conv^T(T) - sum_j Delta_j conv^T(Q_j)``
  with ``T = sum_k w_k V_k`` and the prefix sums ``Q_j = sum_{k<j} w_k V_k``;
  the kernel returns ``T`` and the correction (:func:`path_backward`).

So the m convolutions and m transposed convolutions of a dense IG become two
convolutions, one transposed convolution and work proportional to the number
of mask changes. Values equal the dense computation's up to summation order
(tests/test_sparse_path.py compares with plain autodiff in float64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["path_forward", "path_backward"]


NO_GRADIENT = ("IG's native sparse path has no derivative (its kernels have no autodiff rule); to differentiate "
               "through an explanation use IG(sparse_path=False)")


def _call(name, out, *args, pool):
    call = functools.partial(jax.ffi.ffi_call(name, out, vmap_method="sequential"), pool=np.int64(pool))

    @jax.custom_vjp
    def kernel(*a):
        return call(*a)

    def fwd(*a):
        return call(*a), None

    def bwd(_, cotangent):
        raise TypeError(NO_GRADIENT)

    kernel.defvjp(fwd, bwd)
    return kernel(*args)


def path_forward(s0, d, mask, nodes, a0, b0, kernel, pool: int = 0):
    """``U_k = a_k A_k + B_k`` for every node, ``(m, OH, OW, O)``; with ``pool`` p > 0 instead
    ``(relu(max_pool_p(U_k)), first)``, both ``(m, OH // p, OW // p, O)``: the value of ``max_pool(relu(U_k))``
    (window = stride = p) and the row-major tap of each window's first maximum (255 where that maximum is
    <= 0: no gradient), what :func:`path_backward` routes the cotangents by.

    Args (one example): ``s0, d`` ``(H, W, C)``; ``mask`` ``(m, H, W, C)`` uint8 (1 where ``s0 + a_k d > 0``);
    ``nodes`` ``(m,)``; ``a0 = conv(mask[0] d)``, ``b0 = conv(mask[0] s0) + bias``, ``(OH, OW, O)``; ``kernel``
    ``(KH, KW, C, O)`` (HWIO). All floats in one dtype (float32 or float64).
    """
    m, (oh, ow, o) = mask.shape[0], a0.shape
    shape = (1, m, oh // pool, ow // pool, o) if pool else (1, m, oh, ow, o)
    outs = (jax.ShapeDtypeStruct(shape, s0.dtype), jax.ShapeDtypeStruct(shape if pool else (1,), jnp.uint8))
    out, first = _call("jr_relu_conv_path_fwd", outs, s0[None], d[None], mask[None], nodes[None], a0[None],
                       b0[None], kernel[None], pool=pool)
    return (out[0], first[0]) if pool else out[0]


def path_backward(cot, weights, mask, kernel, first=None, pool: int = 0):
    """``(T, correction)``: ``T = sum_k w_k V_k`` ``(OH, OW, O)`` and ``-sum_j Delta_j conv^T(Q_j)``
    ``(H, W, C)``, for ``weights`` ``(m,)``, ``mask`` ``(m, H, W, C)`` uint8 and the cotangents ``cot`` of
    :func:`path_forward`'s output: ``V_k = cot_k`` ``(m, OH, OW, O)``, or with ``pool`` p the pooled
    cotangents routed to each window's ``first`` maximum."""
    _, h, w, c = mask.shape
    kh, kw, _, o = kernel.shape
    shapes = (jax.ShapeDtypeStruct((1, h - kh + 1, w - kw + 1, o), cot.dtype),
              jax.ShapeDtypeStruct((1, h, w, c), cot.dtype))
    first = jnp.zeros((1,), jnp.uint8) if first is None else first
    total, corr = _call("jr_relu_conv_path_bwd", shapes, cot[None], first[None], weights[None], mask[None],
                        kernel[None], pool=pool)
    return total[0], corr[0]


def dense_reference(s0, d, mask, nodes, kernel, bias, cot, weights, conv, conv_t):
    """The same two results computed densely (for tests): ``(U, T, correction)``."""
    m = mask.astype(s0.dtype)
    u = conv(m * (s0[None] + nodes.reshape(-1, 1, 1, 1) * d[None])) + bias.reshape(1, 1, 1, -1)
    g = conv_t(cot)
    t = jnp.tensordot(weights, cot, axes=1)
    direct = jnp.tensordot(weights, m * g, axes=1)
    return u, t, direct - m[-1] * conv_t(t[None])[0]
