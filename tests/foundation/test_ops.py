"""ops.py computes the same function as lax.conv_general_dilated and nn.max_pool."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxrecover import ops

DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("h,k,s,p", [(1, 3, 1, 1), (2, 3, 2, 1), (2, 3, 1, 1), (2, 1, 2, 0), (4, 3, 2, 1),
                                     (7, 3, 1, 1), (7, 3, 2, 1), (3, 3, 1, 0), (5, 7, 2, 3), (26, 3, 1, 0), (9, 3, 1, 0)])
def test_conv_equals_lax_values_and_input_gradients(h, k, s, p):
    x = jax.random.normal(jax.random.key(0), (3, h, h, 4), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (k, k, 4, 5), jnp.float64)
    pad = ((p, p), (p, p))
    ours = lambda z: ops.conv_general_dilated(z, w, (s, s), pad, dimension_numbers=DN)  # noqa: E731
    ref = lambda z: lax.conv_general_dilated(z, w, (s, s), pad, dimension_numbers=DN)  # noqa: E731
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    g = jax.random.normal(jax.random.key(2), ref(x).shape, jnp.float64)
    np.testing.assert_allclose(jax.vjp(ours, x)[1](g)[0], jax.vjp(ref, x)[1](g)[0], rtol=1e-12, atol=1e-12)
    assert ours(x).dtype == jnp.float64


CONV_CASES = [(7, 3, 1, 1), (7, 3, 2, 1), (8, 3, 2, 0), (7, 1, 2, 0), (9, 3, 1, 0), (9, 5, 1, 1), (11, 7, 2, 3)]


@pytest.mark.parametrize("ynn", [True, False], ids=["ynn-form", "plain-form"])
@pytest.mark.parametrize("h,k,s,p", CONV_CASES)
def test_custom_vjp_conv_equals_lax_for_both_library_forms(h, k, s, p, ynn):
    """The custom-VJP convolution (large outputs): values, input AND kernel gradients as lax, in both the
    SAME-padded form used under YNNPACK convolutions and the plain form used under the float32 options."""
    x = jax.random.normal(jax.random.key(0), (2, h, h, 3), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (k, k, 3, 4), jnp.float64)
    pad = ((p, p), (p, p))
    ref = lambda z, v: lax.conv_general_dilated(z, v, (s, s), pad, dimension_numbers=DN)  # noqa: E731
    token = ops._COMPILE_OPTIONS.set(None if ynn else tuple(ops.FLOAT32_CPU_OPTIONS.items()))
    try:
        assert ops._ynn_convolutions() is ynn
        y, vjp = jax.vjp(lambda z, v: ops._conv(z, v, (s, s), pad, None), x, w)
        g = jax.random.normal(jax.random.key(2), y.shape, jnp.float64)
        dx, dw = vjp(g)
        jaxpr = str(jax.make_jaxpr(lambda z: ops._conv(z, w, (s, s), pad, None))(x))
    finally:
        ops._COMPILE_OPTIONS.reset(token)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    dx_ref, dw_ref = vjp_ref(g)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)
    assert dx.dtype == dw.dtype == jnp.float64
    if s == 1 and p != (k - 1) // 2:  # the SAME form: symmetric (k-1)/2 padding under YNNPACK only
        same = f"padding=(({(k - 1) // 2}, {(k - 1) // 2}), ({(k - 1) // 2}, {(k - 1) // 2}))"
        assert (same in jaxpr) == ynn


def test_conv_input_gradient_uses_a_materialised_hwio_kernel():
    """The input gradient convolves with the flipped kernel transposed to HWIO behind a barrier, never with
    autodiff's reversed "OI" kernel (slow inside lax.map loops on XLA:CPU)."""
    x = jnp.ones((2, 9, 9, 3), jnp.float32)
    w = jnp.ones((3, 3, 3, 4), jnp.float32)
    hlo = jax.jit(jax.grad(lambda z: jnp.sum(ops.conv_general_dilated(z, w, (1, 1), "VALID", dimension_numbers=DN))
                           )).lower(x).as_text()
    assert "optimization_barrier" in hlo
    assert "[0, 1, o, i]" not in hlo and "01oi" not in hlo


def test_conv_falls_back_for_other_layouts():
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 5), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (4, 3, 3, 3), jnp.float32)
    a = ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    b = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    np.testing.assert_array_equal(a, b)


POOLS = [((3, 3), (2, 2), ((1, 1), (1, 1))), ((2, 2), (2, 2), ((0, 0), (0, 0)))]


@pytest.mark.parametrize("win,st,pad", POOLS)
def test_max_pool_equals_flax_values_and_gradients(win, st, pad):
    x = jax.random.normal(jax.random.key(0), (2, 14, 14, 3), jnp.float64)
    np.testing.assert_array_equal(ops.max_pool(x, win, st, pad), nn.max_pool(x, win, st, pad))
    g_ours = jax.grad(lambda z: jnp.sum(jnp.sin(ops.max_pool(z, win, st, pad))))(x)
    g_ref = jax.grad(lambda z: jnp.sum(jnp.sin(nn.max_pool(z, win, st, pad))))(x)
    np.testing.assert_array_equal(g_ours, g_ref)


@pytest.mark.parametrize("win,st,pad", POOLS)
def test_max_pool_sends_tied_gradients_to_the_first_maximum(win, st, pad):
    """Constant regions (MNIST background) tie inside windows: the gradient must
    go to the first maximum in row-major order, as PyTorch and XLA's select-and-scatter."""
    x = jnp.zeros((1, 6, 6, 2), jnp.float32).at[:, :3].set(1.0)
    out = ops.max_pool(x, win, st, pad)
    weights = jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape) + 1
    g_ours = jax.grad(lambda z: jnp.sum(weights * ops.max_pool(z, win, st, pad)))(x)
    g_ref = jax.grad(lambda z: jnp.sum(weights * nn.max_pool(z, win, st, pad)))(x)
    np.testing.assert_array_equal(g_ours, g_ref)
    # one input per window receives the whole gradient
    assert int(jnp.sum(g_ours != 0)) == out.size


SMALL = [(1, 3, 1, 1), (2, 3, 1, 1), (2, 3, 2, 1), (2, 1, 2, 0), (4, 3, 2, 1), (4, 3, 1, 1)]


@pytest.mark.parametrize("form", ["_tap_conv", "_dense_conv"])
@pytest.mark.parametrize("h,k,s,p", SMALL)
def test_both_small_conv_forms_equal_lax(form, h, k, s, p):
    x = jax.random.normal(jax.random.key(0), (3, h, h, 4), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (k, k, 4, 5), jnp.float64)
    pad = ((p, p), (p, p))
    ours = lambda z: getattr(ops, form)(z, w, (s, s), pad, None)  # noqa: E731
    ref = lambda z: lax.conv_general_dilated(z, w, (s, s), pad, dimension_numbers=DN)  # noqa: E731
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    g = jax.random.normal(jax.random.key(2), ref(x).shape, jnp.float64)
    np.testing.assert_allclose(jax.vjp(ours, x)[1](g)[0], jax.vjp(ref, x)[1](g)[0], rtol=1e-12, atol=1e-12)


def test_compile_options_by_dtype_and_env(monkeypatch):
    monkeypatch.delenv(ops.DEFAULTS_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert ops.cpu_compiler_options(jnp.float32) == ops.FLOAT32_CPU_OPTIONS  # CI and this machine: CPU
    assert ops.cpu_compiler_options(jnp.float64) is None
    assert ops.cpu_compiler_options(None) is None
    monkeypatch.setenv(ops.DEFAULTS_ENV, "1")
    assert ops.cpu_compiler_options(jnp.float32) is None
    monkeypatch.delenv(ops.DEFAULTS_ENV)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert ops.cpu_compiler_options(jnp.float32) is None  # the user's XLA_FLAGS win


def test_tuned_jit_equals_jit_and_caches_per_option_set():
    def f(w, x):
        return jnp.sum(jnp.tanh(ops.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN)) ** 2)

    g = jax.grad(f, argnums=1)
    tuned = ops.tuned_jit(g)
    for dt in (jnp.float32, jnp.float64):
        x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3), dt)
        w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4), dt)
        out = tuned(w, x)
        assert out.dtype == dt
        tol = 1e-5 if dt == jnp.float32 else 1e-12
        np.testing.assert_allclose(out, jax.jit(g)(w, x), rtol=tol, atol=tol)
    assert tuned._cache_size() == 2  # one compilation per dtype / option set
    tuned(w, x)
    assert tuned._cache_size() == 2


def test_tuned_jit_tells_the_layers_their_compile_options():
    """VALID convs skip the pad-and-crop form exactly when YNNPACK convolutions are off (float32 on CPU)."""
    seen = {}

    def probe(x):
        seen[x.dtype] = ops._ynn_convolutions()
        return 2 * x

    tuned = ops.tuned_jit(probe)
    tuned(jnp.ones(3, jnp.float32))
    tuned(jnp.ones(3, jnp.float64))
    assert seen == {jnp.dtype(jnp.float32): False, jnp.dtype(jnp.float64): True}
    jax.jit(probe)(jnp.ones(4, jnp.float32))  # plain jit: XLA's defaults
    assert seen[jnp.dtype(jnp.float32)] is True


@pytest.mark.parametrize("ynn", [True, False], ids=["tensordot-form", "fused-reduce-form"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_weighted_sum_equals_the_explicit_sum_in_both_forms(ynn, dtype):
    """IG's quadrature sum: the tensordot form (YNNPACK reductions) and the fused multiply-reduce form give
    sum_i w_i x_i in the dtype of x, also under vmap; the form follows the compile options being traced."""
    xs = jax.random.normal(jax.random.key(3), (3, 50, 6, 6, 4), dtype)
    w = np.linspace(0.02, 1.0, 50)
    ref = np.einsum("k,bkhwc->bhwc", w, np.asarray(xs, np.float64))
    token = ops._COMPILE_OPTIONS.set(None if ynn else tuple(ops.FLOAT32_CPU_OPTIONS.items()))
    try:
        out = jax.vmap(lambda x: ops.weighted_sum(w, x))(xs)
        jaxpr = str(jax.make_jaxpr(lambda x: ops.weighted_sum(w, x))(xs[0]))
    finally:
        ops._COMPILE_OPTIONS.reset(token)
    assert out.dtype == dtype and out.shape == (3, 6, 6, 4)
    tol = 1e-5 if dtype == jnp.float32 else 1e-13
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
    assert ("dot_general" in jaxpr) == ynn and ("reduce_sum" in jaxpr) != ynn
