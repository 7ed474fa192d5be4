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
* Larger convolutions get a custom VJP: the input gradient is an explicit
  convolution with the flipped kernel materialised in HWIO order (autodiff's
  reversed "OI" kernel ran several times slower inside ``lax.map`` loops).
  Under YNNPACK convolutions (XLA:CPU's default; the float64 path here) both
  directions are computed "SAME"-padded (explicit pad and/or crop), the
  padding YNNPACK runs many times faster than others.
* A weighted sum over the leading axis (IG's quadrature sum) is a fused
  multiply-reduce, except under YNNPACK reductions (XLA:CPU's default options;
  the float64 path here), which ran it ~40x slower than a ``tensordot``
  (14 ms against 0.3 ms for one LeNet image's 50 first-layer gradients).
* ``max_pool``'s gradient is a select-and-scatter, many times slower than its
  forward pass on XLA:CPU; here pooling is a ``max`` over the strided window
  slices with a custom VJP that sends each window's gradient to its first
  maximum (an argmax and a one-hot mask): the same gradient as PyTorch and as
  XLA's select-and-scatter, ties included.

Per-layer timings: ``python benchmarks/bench_ops.py`` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import os
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["conv_general_dilated", "max_pool", "weighted_sum", "cpu_compiler_options", "tuned_jit"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(dimension_numbers) == _NHWC


#: Convolutions with at most this many output pixels use a matmul formulation.
SMALL_OUTPUT_PIXELS = 4


def _geometry(lhs_shape, rhs_shape, strides, padding):
    """Output size and the kernel taps that see at least one input pixel (the others only see padding)."""
    (h, w), (kh, kw) = lhs_shape[1:3], rhs_shape[:2]
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    rows = [i for i in range(kh) if any(0 <= r < h for r in range(i - pt, i - pt + sh * (oh - 1) + 1, sh))]
    cols = [j for j in range(kw) if any(0 <= c < w for c in range(j - pl, j - pl + sw * (ow - 1) + 1, sw))]
    return (oh, ow), [(i, j) for i in rows for j in cols]


def _tap_conv(lhs, rhs, strides, padding, precision):
    """Convolution as ONE matmul of concatenated strided input slices, one slice per kernel tap.

    Taps whose slice lies entirely in the zero padding contribute nothing and
    are skipped (exactly), so a 3x3 kernel on a 1x1 map costs one tap.
    """
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    (oh, ow), taps = _geometry(lhs.shape, rhs.shape, strides, padding)
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    slices = [lax.slice(x, (0, i, j, 0), (x.shape[0], i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, x.shape[3]),
                        (1, sh, sw, 1)) for i, j in taps]
    cat = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
    kernel = jnp.concatenate([rhs[i, j] for i, j in taps], axis=0)
    return jnp.einsum("bhwk,ko->bhwo", cat, kernel, precision=precision)


def _dense_conv(lhs, rhs, strides, padding, precision):
    """Convolution of a tiny map as ONE matmul of the flattened input with the conv's (in, out) matrix.

    The matrix holds kernel tap ``(r - sh*p + pt, c - sw*q + pl)`` between input
    pixel (r, c) and output pixel (p, q), and zeros between pixels no tap joins.
    When every input pixel feeds every output pixel (3x3 on 2x2, anything on
    1x1) it has no zeros and costs less than :func:`_tap_conv`, whose slices
    carry the padding.
    """
    n, h, w, c = lhs.shape
    (kh, kw), o = rhs.shape[:2], rhs.shape[3]
    (sh, sw), ((pt, _), (pl, _)) = strides, padding
    (oh, ow), _ = _geometry(lhs.shape, rhs.shape, strides, padding)
    index = np.full((h * w, oh * ow), kh * kw)  # kh*kw: the appended zero tap
    for r, cc, p, q in itertools.product(range(h), range(w), range(oh), range(ow)):
        i, j = r - sh * p + pt, cc - sw * q + pl
        if 0 <= i < kh and 0 <= j < kw:
            index[r * w + cc, p * ow + q] = i * kw + j
    taps = jnp.concatenate([rhs.reshape(kh * kw, c, o), jnp.zeros((1, c, o), rhs.dtype)])
    matrix = taps[index].transpose(0, 2, 1, 3).reshape(h * w * c, oh * ow * o)
    return jnp.dot(lhs.reshape(n, h * w * c), matrix, precision=precision).reshape(n, oh, ow, o)


def _small_conv(lhs, rhs, strides, padding, precision):
    """:func:`_dense_conv` unless it multiplies over twice the blocks of :func:`_tap_conv`.

    Dense costs h*w*oh*ow (C, O) blocks, taps oh*ow*taps plus the copies of the
    concatenated slices; measured (benchmarks/bench_ops.py), dense is still the
    faster at 1.8x the blocks (ResNet18's 3x3/2 conv from 4x4 to 2x2).
    """
    _, taps = _geometry(lhs.shape, rhs.shape, strides, padding)
    dense = lhs.shape[1] * lhs.shape[2] <= 2 * len(taps)
    return (_dense_conv if dense else _tap_conv)(lhs, rhs, strides, padding, precision)


def _library_form(lhs, rhs, padding, precision, lhs_dilation=(1, 1)):
    """A stride-1 NHWC convolution in the form its CPU library runs fastest (the same sums).

    Under YNNPACK convolutions (XLA:CPU's default; float64 here) "SAME"-padded
    convolutions of odd kernels are many times faster than other paddings
    (benchmarks/bench_ops.py): the input is padded explicitly (behind an
    optimization barrier, so XLA does not fold the pad back into the
    convolution) and/or the extra outputs cropped. Not for one input or output
    channel (LeNet's conv1: slower in that form). Otherwise the plain lax call.
    """
    (kh, kw), (h, w) = rhs.shape[:2], lhs.shape[1:3]
    if (_ynn_convolutions() and tuple(lhs_dilation) == (1, 1) and kh % 2 and kw % 2 and min(h, w) > 1
            and min(rhs.shape[2:]) > 1 and all(p >= 0 for pair in padding for p in pair)):
        same = ((kh - 1) // 2, (kw - 1) // 2)
        pre = [(max(a - c, 0), max(b - c, 0)) for (a, b), c in zip(padding, same)]
        crop = [(max(c - a, 0), max(c - b, 0)) for (a, b), c in zip(padding, same)]
        if any(p for pair in pre for p in pair):
            lhs = lax.optimization_barrier(jnp.pad(lhs, ((0, 0), *pre, (0, 0))))
        y = lax.conv_general_dilated(lhs, rhs, (1, 1), tuple((c, c) for c in same), dimension_numbers=_NHWC,
                                     precision=precision)
        (ct, cb), (cl, cr) = crop
        return y[:, ct : y.shape[1] - cb, cl : y.shape[2] - cr, :]
    return lax.conv_general_dilated(lhs, rhs, (1, 1), padding, lhs_dilation=lhs_dilation, dimension_numbers=_NHWC,
                                    precision=precision)


def _lax_conv(lhs, rhs, strides, padding, precision):
    return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(lhs, rhs, strides, padding, precision):
    """NHWC/HWIO convolution whose input gradient is an explicit convolution with a materialised kernel.

    Autodiff's transpose rule convolves the cotangent with a reversed kernel
    in "OI" order; inside a loop (``lax.map`` over micro-batches) XLA:CPU then
    runs that convolution several times slower than the same sums with the
    flipped, transposed kernel materialised in HWIO order (measured on LeNet).
    Both convolutions also take :func:`_library_form`. Same values and
    gradients as ``lax.conv_general_dilated`` (tests/test_ops.py).
    """
    if tuple(strides) == (1, 1):
        return _library_form(lhs, rhs, padding, precision)
    return _lax_conv(lhs, rhs, strides, padding, precision)


def _conv_fwd(lhs, rhs, strides, padding, precision):
    return _conv(lhs, rhs, strides, padding, precision), (lhs, rhs)


def _conv_bwd(strides, padding, precision, res, g):
    lhs, rhs = res
    (kh, kw), (h, w), (oh, ow) = rhs.shape[:2], lhs.shape[1:3], g.shape[1:3]
    (pt, _), (pl, _) = padding
    (sh, sw) = strides
    # x[r] receives g[p] k[r + pt - s p]: the cotangent dilated by the stride, correlated with the flipped kernel.
    pads = ((kh - 1 - pt, h - (sh * (oh - 1) + 1) + pt), (kw - 1 - pl, w - (sw * (ow - 1) + 1) + pl))
    kernel = lax.optimization_barrier(jnp.flip(rhs, (0, 1)).swapaxes(2, 3))
    d_lhs = _library_form(g, kernel, pads, precision, lhs_dilation=strides)
    d_rhs = jax.vjp(lambda r: _lax_conv(lhs, r, strides, padding, precision), rhs)[1](g)[0]
    return d_lhs, d_rhs


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated``; NHWC convolutions with small outputs become one matmul (:func:`_small_conv`)."""
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
            return _small_conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), precision)
        return _conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)


def _window_slices(x, window_shape, strides):
    """The strided slices of ``x`` seen by each window tap, in row-major tap order."""
    (kh, kw), (sh, sw) = window_shape, strides
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return [lax.slice(x, (0, i, j, 0), (x.shape[0], i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, x.shape[3]),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def _pool_max_and_first(x, window_shape, strides):
    """Window maxima and the tap index of each window's FIRST maximum (row-major), in one fused pass."""
    slices = _window_slices(x, window_shape, strides)
    index_dtype = jnp.int8 if len(slices) <= 127 else jnp.int32
    best, first = slices[0], jnp.zeros(slices[0].shape, index_dtype)
    for k, s in enumerate(slices[1:], start=1):
        better = s > best  # strict: ties keep the earlier tap
        first = jnp.where(better, jnp.asarray(k, index_dtype), first)
        best = jnp.maximum(best, s)
    return best, first


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pool_padded(x, window_shape, strides):
    return _pool_max_and_first(x, window_shape, strides)[0]


def _pool_fwd(x, window_shape, strides):
    best, first = _pool_max_and_first(x, window_shape, strides)
    return best, (first, x.shape)


def _pool_bwd(window_shape, strides, res, g):
    """Each window's cotangent goes to its first maximum: per tap, a masked copy of ``g`` placed on the
    input grid by an interior-padded ``lax.pad`` (the transpose of the strided slice); XLA fuses the sum."""
    first, shape = res
    (sh, sw), (oh, ow) = strides, g.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    total = None
    for k in range(window_shape[0] * window_shape[1]):
        i, j = divmod(k, window_shape[1])
        part = jnp.where(first == k, g, zero)
        config = ((0, 0, 0), (i, shape[1] - i - sh * (oh - 1) - 1, sh - 1),
                  (j, shape[2] - j - sw * (ow - 1) - 1, sw - 1), (0, 0, 0))
        part = lax.pad(part, zero, config)
        total = part if total is None else total + part
    return (total,)


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


def weighted_sum(weights, xs: jax.Array) -> jax.Array:
    """``sum_i weights[i] * xs[i]`` over the leading axis, in the dtype of ``xs``, in the form XLA:CPU runs fastest.

    A multiply-reduce XLA fuses with the producer of ``xs``, except under XLA:CPU's default options (YNNPACK
    reductions: float64 here), where that reduce was ~40x slower than a ``tensordot`` (whose batched form, under
    ``vmap``, was in turn the slower one under the float32 options: ResNet18 IG 26 -> 17 expl/s).
    """
    w = jnp.asarray(weights, xs.dtype)
    if _ynn_convolutions():
        return jnp.tensordot(w, xs, axes=1)
    return jnp.sum(w.reshape((-1,) + (1,) * (xs.ndim - 1)) * xs, axis=0)


# --------------------------------------------------------------------------- compile options

#: Set to "1" to compile everything with XLA's default options.
DEFAULTS_ENV = "JAXRECOVER_XLA_DEFAULTS"
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
#: float32 on XLA:CPU: YNNPACK for matmuls only; its convolutions were slower than XLA's own
#: for the paper's models (docs/PERFORMANCE.md; compare with JAXRECOVER_XLA_DEFAULTS=1).
#: float64 keeps XLA's defaults: there YNNPACK's convolutions were several times FASTER.
FLOAT32_CPU_OPTIONS = {_YNN_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


#: The compile options of the :func:`tuned_jit` function being traced (None: XLA's defaults).
_COMPILE_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("jaxrecover_compile_options", default=None)


def _ynn_convolutions() -> bool:
    """Whether convolutions traced now will run on XLA:CPU's default (YNNPACK) convolutions."""
    options = dict(_COMPILE_OPTIONS.get() or ())
    return jax.default_backend() == "cpu" and options.get(_YNN_OPTION) != FLOAT32_CPU_OPTIONS[_YNN_OPTION]


@functools.lru_cache(maxsize=None)
def _options_supported(backend: str, items: tuple) -> bool:
    try:
        jax.jit(lambda a: a + 1, compiler_options=dict(items)).lower(jnp.zeros(2, jnp.float32)).compile()
    except Exception as err:  # noqa: BLE001 - an option this jaxlib does not know: fall back to defaults
        warnings.warn(f"jaxrecover: XLA rejected compile options {dict(items)} ({type(err).__name__}: "
                      f"{str(err).splitlines()[0][:200]}); using XLA's defaults, which may be slower on CPU.",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def cpu_compiler_options(dtype) -> dict[str, str] | None:
    """XLA compile options for differentiating the paper's models in ``dtype`` (None: XLA's defaults).

    Only float32 on the CPU backend gets options (:data:`FLOAT32_CPU_OPTIONS`).
    None as well when ``XLA_FLAGS`` already sets the YNNPACK option (the user's
    choice wins), when ``JAXRECOVER_XLA_DEFAULTS=1``, or when this jaxlib does not
    know the option (with a warning). Options change how XLA computes, not what:
    results agree to round-off (tests/test_ops.py).
    """
    if (dtype is None or jnp.dtype(dtype) != jnp.float32 or jax.default_backend() != "cpu"
            or os.environ.get(DEFAULTS_ENV, "") not in ("", "0") or _YNN_OPTION in os.environ.get("XLA_FLAGS", "")):
        return None
    items = tuple(sorted(FLOAT32_CPU_OPTIONS.items()))
    return dict(items) if _options_supported(jax.default_backend(), items) else None


def _float_dtype(tree):
    for leaf in jax.tree.leaves(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            return dtype
    return None


def tuned_jit(fun=None, **jit_kwargs):
    """``jax.jit`` compiled with :func:`cpu_compiler_options` of the arguments' float dtype.

    The first floating array among the arguments picks the dtype; each set of
    options gets its own ``jax.jit`` (so its own compilation cache). Supports
    ``.lower``, ``.clear_cache`` and ``._cache_size`` like a jitted function.
    Called inside another jit (traced arguments) it inlines ``fun``: XLA takes
    compiler options only at the top level.
    """
    if fun is None:
        return functools.partial(tuned_jit, **jit_kwargs)
    variants: dict = {}

    def pick(args, kwargs):
        options = cpu_compiler_options(_float_dtype((args, kwargs)))
        key = None if options is None else tuple(sorted(options.items()))
        if key not in variants:

            @functools.wraps(fun)
            def traced(*a, **k):  # the layers of ops.py see the options they will be compiled with
                token = _COMPILE_OPTIONS.set(key)
                try:
                    return fun(*a, **k)
                finally:
                    _COMPILE_OPTIONS.reset(token)

            variants[key] = jax.jit(traced, compiler_options=options, **jit_kwargs)
        return variants[key]

    @functools.wraps(fun)
    def jitted(*args, **kwargs):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
            return fun(*args, **kwargs)  # inside another jit: inline (compiler options belong to the outer one)
        return pick(args, kwargs)(*args, **kwargs)

    jitted.lower = lambda *args, **kwargs: pick(args, kwargs).lower(*args, **kwargs)
    jitted.clear_cache = lambda: [v.clear_cache() for v in variants.values()]
    jitted._cache_size = lambda: sum(v._cache_size() for v in variants.values())
    return jitted
