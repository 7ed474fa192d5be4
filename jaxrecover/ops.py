"""Exact reformulations of convolution and max-pooling that XLA's CPU backend runs faster.

Both compute the same function as ``lax.conv_general_dilated`` and
``flax.linen.max_pool`` (up to floating-point summation order); only the HLO
differs. They exist because IG differentiates the model at thousands of
points, and on XLA:CPU two of the paper's layers have slow lowerings
(measured in ``docs/PERFORMANCE.md``):

* Convolutions with tiny outputs (ResNet18's last two stages: 3x3 kernels on
  2x2 and 1x1 maps) run at a few GFLOP/s, forward and backward; here they are
  one matmul of the concatenated strided input slices of the kernel taps
  (taps that only see zero padding are skipped).
* Unpadded ("VALID") stride-1 convolutions (LeNet's) are computed with one
  pixel of zero padding and cropped: the kept outputs are the same sums, and
  the padded lowering is faster, most of all for float64 gradients.
* ``max_pool``'s gradient is a select-and-scatter, many times slower than its
  forward pass on XLA:CPU; here pooling is a ``max`` over the strided window
  slices with a custom VJP that sends each window's gradient to its first
  maximum (an argmax and a one-hot mask): the same gradient as PyTorch and as
  XLA's select-and-scatter, ties included.

Per-layer timings: ``python benchmarks/bench_ops.py`` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated", "max_pool"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(dimension_numbers) == _NHWC


#: Convolutions with at most this many output pixels use the tap formulation.
SMALL_OUTPUT_PIXELS = 4


def _tap_conv(lhs, rhs, strides, padding, precision):
    """Convolution as ONE matmul of concatenated strided input slices, one slice per kernel tap.

    Taps whose slice lies entirely in the zero padding contribute nothing and
    are skipped (exactly), so a 3x3 kernel on a 1x1 map costs one tap.
    """
    (h, w), (kh, kw) = lhs.shape[1:3], rhs.shape[:2]
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    slices, taps = [], []
    for i in range(kh):
        rows = range(i - pt, i - pt + sh * (oh - 1) + 1, sh)
        if not any(0 <= r < h for r in rows):
            continue
        for j in range(kw):
            cols = range(j - pl, j - pl + sw * (ow - 1) + 1, sw)
            if not any(0 <= c < w for c in cols):
                continue
            slices.append(lax.slice(x, (0, i, j, 0), (x.shape[0], i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1,
                                                       x.shape[3]), (1, sh, sw, 1)))
            taps.append(rhs[i, j])
    cat = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
    kernel = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=0)
    return jnp.einsum("bhwk,ko->bhwo", cat, kernel, precision=precision)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated``; NHWC convolutions with small outputs go through :func:`_tap_conv`."""
    if isinstance(padding, str) and padding.upper() == "VALID":
        padding = ((0, 0), (0, 0))
    plain = (feature_group_count == 1 and _is_nhwc(dimension_numbers) and not isinstance(padding, str)
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and lhs.ndim == 4 and not kwargs)
    if plain:
        (h, w), (kh, kw) = lhs.shape[1:3], rhs.shape[:2]
        (pt, pb), (pl, pr) = padding
        out_h = (h + pt + pb - kh) // window_strides[0] + 1
        out_w = (w + pl + pr - kw) // window_strides[1] + 1
        if out_h * out_w <= SMALL_OUTPUT_PIXELS:
            return _tap_conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), precision)
        if tuple(window_strides) == (1, 1) and (pt, pb, pl, pr) == (0, 0, 0, 0) and kh > 1 and kw > 1:
            # An unpadded conv, computed padded by one and cropped: the same sums, on XLA:CPU's
            # faster padded-convolution path (benchmarks/bench_ops.py, docs/PERFORMANCE.md).
            y = lax.conv_general_dilated(lhs, rhs, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dimension_numbers,
                                         precision=precision)
            return y[:, 1:-1, 1:-1, :]
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)


def _window_slices(x, window_shape, strides):
    (kh, kw), (sh, sw) = window_shape, strides
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return jnp.stack([x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]
                      for i in range(kh) for j in range(kw)], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pool_padded(x, window_shape, strides):
    return jnp.max(_window_slices(x, window_shape, strides), axis=0)


def _pool_fwd(x, window_shape, strides):
    stacked = _window_slices(x, window_shape, strides)
    first = jnp.argmax(stacked, axis=0)  # first maximum in row-major window order, as PyTorch and XLA
    return jnp.max(stacked, axis=0), (first, x)


def _pool_bwd(window_shape, strides, res, g):
    first, x = res
    taps = window_shape[0] * window_shape[1]
    onehot = (jnp.arange(taps).reshape((taps,) + (1,) * g.ndim) == first[None]).astype(g.dtype)
    _, transpose = jax.vjp(lambda z: _window_slices(z, window_shape, strides), x)
    return (transpose(onehot * g[None])[0],)


_pool_padded.defvjp(_pool_fwd, _pool_bwd)


def max_pool(x, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))):
    """Max-pooling of NHWC ``x``: the values of ``nn.max_pool`` and the gradient of PyTorch and XLA.

    The gradient of each window goes to its FIRST maximum in row-major order
    (ties are common: MNIST's constant background gives equal activations),
    computed with an argmax and a one-hot mask instead of a select-and-scatter.
    """
    window_shape, strides = tuple(window_shape), tuple(strides or window_shape)
    (pt, pb), (pl, pr) = padding
    if pt or pb or pl or pr:
        x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)
    return _pool_padded(x, window_shape, strides)
