"""The native sparse ReLU -> convolution path of IG (jaxrecover.native, IG(sparse_path=True)).

Oracles are exact identities in float64: the kernels against the dense computation they replace (for ANY
mask sequence, not only the single switch a straight path gives), and the whole IG against plain autodiff
(every point differentiated through the whole model) on LeNet with non-zero biases, so units do switch.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrecover as jr
from jaxrecover import native, ops
from jaxrecover.explainers import integrated_gradients, select_output

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the sparse path cannot be built here")

DN = ("NHWC", "HWIO", "NHWC")


def _lenet(dtype):
    return jr.make_model("lenet"), jr.init_variables("lenet", jax.random.key(0), dtype, biases="torch")


def test_native_kernels_build_on_this_machine():
    assert native.available(), native.status()
    assert native.status().startswith("native sparse path: on")


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_kernels_equal_the_dense_sums_for_any_masks(dtype):
    """Forward U_k and backward (T, correction) against dense convolutions, masks switching back and forth."""
    from jaxrecover.native import relu_conv

    assert native.available()
    ks = jax.random.split(jax.random.key(3), 6)
    m, (h, w, c), o = 7, (9, 8, 5), 6
    s0 = jax.random.normal(ks[0], (h, w, c), dtype)
    d = jax.random.normal(ks[1], (h, w, c), dtype)
    mask = jax.random.bernoulli(ks[2], 0.5, (m, h, w, c)).astype(jnp.uint8)  # many units switch twice or more
    nodes = jnp.linspace(0.1, 1.0, m, dtype=dtype)
    kernel = jax.random.normal(ks[3], (3, 3, c, o), dtype)
    bias = jax.random.normal(ks[4], (o,), dtype)
    cot = jax.random.normal(ks[5], (m, h - 2, w - 2, o), dtype)
    weights = jnp.linspace(0.5, 1.5, m, dtype=dtype)

    def conv(a):
        return jax.lax.conv_general_dilated(a, kernel, (1, 1), "VALID", dimension_numbers=DN,
                                            precision=jax.lax.Precision.HIGHEST)

    def conv_t(g):
        return jax.vjp(conv, jnp.zeros((g.shape[0], h, w, c), dtype))[1](g)[0]

    u_ref, t_ref, corr_ref = relu_conv.dense_reference(s0, d, mask, nodes, kernel, bias, cot, weights, conv, conv_t)
    on = mask[0].astype(dtype)
    first = conv(jnp.stack([on * d, on * s0]))
    u = relu_conv.path_forward(s0, d, mask, nodes, first[0], first[1] + bias.reshape(1, 1, -1), kernel)
    t, corr = relu_conv.path_backward(cot, weights, mask, kernel)
    tol = 1e-12 if dtype == jnp.float64 else 1e-4
    # pooled mode: max_pool(relu(U_k)) by 2 (7x6 -> 3x3, the last row dropped) and its first-maximum gradient
    pooled, first_taps = relu_conv.path_forward(s0, d, mask, nodes, first[0], first[1] + bias.reshape(1, 1, -1),
                                                kernel, pool=2)
    p_cot = jax.random.normal(jax.random.key(8), pooled.shape, dtype)
    pool_fn = jax.vmap(lambda a: ops.max_pool(jax.nn.relu(a)[None], (2, 2), strides=(2, 2))[0])
    p_ref, route = jax.vjp(pool_fn, u_ref)
    (v_ref,) = route(p_cot)
    _, pt_ref, pcorr_ref = relu_conv.dense_reference(s0, d, mask, nodes, kernel, bias, v_ref, weights, conv, conv_t)
    pt, pcorr = relu_conv.path_backward(p_cot, weights, mask, kernel, first_taps, pool=2)
    assert first_taps.dtype == jnp.uint8 and set(np.unique(first_taps)) <= {0, 1, 2, 3, 255}
    for got, want in ((u, u_ref), (t, t_ref), (corr, corr_ref), (pooled, p_ref), (pt, pt_ref), (pcorr, pcorr_ref)):
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.abs(want).max()))


@pytest.mark.parametrize("rule", ["riemann_right", "riemann_trapezoid", "gausslegendre", "riemann_middle"])
def test_sparse_ig_equals_plain_autodiff_float64(rule):
    """IG(sparse_path=True) == IG by autodiff through the whole model at every point: float64, random
    baselines, every output kind, through the batch engine (micro-batch loop, chunks, padding)."""
    model, v = _lenet(jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1), jnp.float64)
    b = 0.3 * jax.random.normal(jax.random.key(2), (3, 28, 28, 1), jnp.float64)
    t = jnp.asarray([1, 4, 9], jnp.int32)
    for output in ("logit", "logprob"):
        kw = dict(baseline=b, output=output, chunk_size=2)
        fast = jr.explain(jr.IG(steps=9, rule=rule), model, v, x, t, **kw)
        plain = jr.explain(jr.IG(steps=9, rule=rule, factor_stem=False), model, v, x, t, **kw)
        assert fast.dtype == jnp.float64
        np.testing.assert_allclose(fast, plain, rtol=1e-10, atol=1e-12 * float(jnp.abs(plain).max()))


def test_sparse_ig_with_exact_max_pool_ties_equals_plain_autodiff():
    """MNIST-like images (zero background, a bright blob): conv2's 2x2 windows over the background hold EXACTLY
    equal values, so the first-maximum rule decides; the kernels' pooling must route like ops.max_pool."""
    model, v = _lenet(jnp.float64)
    yy, xx = jnp.meshgrid(jnp.arange(28.0), jnp.arange(28.0), indexing="ij")
    blob = jnp.exp(-((yy - 13.0) ** 2 + (xx - 15.0) ** 2) / 18.0)
    x = jnp.stack([jnp.where(blob > 0.2, 2.8 * blob, 0.0), jnp.where(blob > 0.5, 1.0, 0.0)])[..., None]
    t = jnp.asarray([2, 8], jnp.int32)
    fast = jr.explain(jr.IG(steps=20), model, v, x, t)
    plain = jr.explain(jr.IG(steps=20, factor_stem=False), model, v, x, t)
    np.testing.assert_allclose(fast, plain, rtol=1e-10, atol=1e-12 * float(jnp.abs(plain).max()))
    h = model.affine_stem.stem(v, jnp.zeros((28, 28, 1), jnp.float64))
    k, b = model.relu_conv.conv(v)
    u = jax.lax.conv_general_dilated(jax.nn.relu(h)[None], k, (1, 1), "VALID", dimension_numbers=DN)[0] + b.reshape(1, 1, -1)
    assert bool(jnp.all(u[0::2, 0::2] == u[1::2, 1::2]))  # the background really gives ties


def test_init_variables_torch_biases():
    v = jr.init_variables("lenet", jax.random.key(0), jnp.float32, biases="torch")
    zeros = jr.init_variables("lenet", jax.random.key(0), jnp.float32)
    p, z = v["params"], zeros["params"]
    np.testing.assert_array_equal(p["Conv_1"]["kernel"], z["Conv_1"]["kernel"])  # same weights, new biases
    for layer, fan_in in (("Conv_0", 9), ("Conv_1", 288), ("Dense_0", 9216), ("Dense_1", 128)):
        bias = p[layer]["bias"]
        assert bias.dtype == jnp.float32 and float(jnp.abs(bias).max()) <= 1 / np.sqrt(fan_in)
        assert float(jnp.abs(bias).max()) > 0.5 / np.sqrt(fan_in)
    with pytest.raises(ValueError, match="biases must be"):
        jr.init_variables("lenet", jax.random.key(0), biases="uniform")


def test_lenet_without_biases_takes_the_sparse_path_too():
    """No bias (the kernels' b0 without one); no ReLU switches along a zero-baseline path then."""
    model = jr.make_model("lenet_nobias")
    v = jr.init_variables("lenet_nobias", jax.random.key(0), jnp.float64)
    assert model.relu_conv is not None and model.relu_conv.conv(v)[1] is None
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1), jnp.float64)
    t = jnp.asarray([1, 2], jnp.int32)
    fast = jr.explain(jr.IG(steps=7), model, v, x, t)
    plain = jr.explain(jr.IG(steps=7, factor_stem=False), model, v, x, t)
    np.testing.assert_allclose(fast, plain, rtol=1e-10, atol=1e-12 * float(jnp.abs(plain).max()))


def test_units_do_switch_in_the_oracle():
    """The float64 oracle above is not vacuous: on its nets many first-layer units switch along the path."""
    model, v = _lenet(jnp.float64)
    x = jax.random.normal(jax.random.key(1), (28, 28, 1), jnp.float64)
    s0, sx = model.affine_stem.stem(v, jnp.zeros_like(x)), model.affine_stem.stem(v, x)
    on = (s0[None] + jnp.linspace(0.1, 1.0, 9).reshape(-1, 1, 1, 1) * (sx - s0)[None]) > 0
    assert int(jnp.sum(on[1:] != on[:-1])) > 500


def test_float32_backward_kernel_is_the_float64_one_rounded():
    """The backward kernel's correction is a difference of prefix sums over the path (summation by parts): in
    float32 arithmetic it would cancel and carry the prefix sums' round-off (issue 39). It is accumulated in
    double, so in float32 it equals the float64 kernel on the same inputs rounded once: within one ulp of
    each value (measured: half an ulp; the float32 accumulation it replaces missed by up to 200 ulps)."""
    from jaxrecover.native import relu_conv

    assert native.available()
    ks = jax.random.split(jax.random.key(9), 4)
    m, (h, w, c), o = 64, (12, 12, 8), 16
    mask = jax.random.bernoulli(ks[0], 0.5, (m, h, w, c)).astype(jnp.uint8)  # ~half the units switch per node
    kernel = jax.random.normal(ks[1], (3, 3, c, o), jnp.float32)
    cot = jax.random.normal(ks[2], (m, h - 2, w - 2, o), jnp.float32)
    weights = jax.random.uniform(ks[3], (m,), jnp.float32, 0.5, 1.5)
    t32, corr32 = relu_conv.path_backward(cot, weights, mask, kernel)
    t64, corr64 = relu_conv.path_backward(cot.astype(jnp.float64), weights.astype(jnp.float64), mask,
                                          kernel.astype(jnp.float64))
    assert t32.dtype == corr32.dtype == jnp.float32
    eps = float(jnp.finfo(jnp.float32).eps)
    for got, want in ((t32, t64), (corr32, corr64)):
        err = np.abs(np.asarray(got, np.float64) - np.asarray(want))
        bound = eps * np.abs(np.asarray(want)) + 1e-9 * float(jnp.abs(want).max())
        assert np.all(err <= bound), float(np.max(err / bound))


def test_sparse_ig_float32_is_as_close_to_float64_as_the_dense_path():
    model, v = _lenet(jnp.float32)
    v64 = jr.cast_variables(v, jnp.float64)
    x = jax.random.normal(jax.random.key(4), (4, 28, 28, 1), jnp.float32)
    t = jnp.asarray([0, 2, 5, 7], jnp.int32)
    truth = jr.explain(jr.IG(), model, v64, x.astype(jnp.float64), t)
    fast = jr.explain(jr.IG(), model, v, x, t)
    dense = jr.explain(jr.IG(sparse_path=False), model, v, x, t)
    assert fast.dtype == jnp.float32

    def err(a):
        return float(jnp.mean(jnp.abs(a.astype(jnp.float64) - truth)) / jnp.mean(jnp.abs(truth)))

    assert err(fast) < 1e-5 and err(fast) <= 2 * err(dense) + 1e-7


def test_single_example_call_and_vmap_agree():
    model, v = _lenet(jnp.float64)
    x = jax.random.normal(jax.random.key(5), (2, 28, 28, 1), jnp.float64)
    ig = jr.IG(steps=5)
    one = jnp.stack([ig(model, v, x[i], 3, jnp.zeros_like(x[i])) for i in range(2)])
    batched = jax.jit(jax.vmap(lambda xi: ig(model, v, xi, 3, jnp.zeros_like(xi))))(x)
    f = lambda z: select_output(model(v, z), 3, "logit")  # noqa: E731
    plain = jnp.stack([integrated_gradients(f, x[i], steps=5) for i in range(2)])
    np.testing.assert_allclose(one, plain, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(batched, plain, rtol=1e-10, atol=1e-13)


def test_switched_off_by_environment_falls_back_to_the_dense_path(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert not native.available()
    assert "off" in native.status() and native.ENV_SWITCH in native.status()
    model, v = _lenet(jnp.float64)
    x = jax.random.normal(jax.random.key(6), (28, 28, 1), jnp.float64)
    ir = jax.jit(lambda z: jr.IG(steps=5)(model, v, z, 1, jnp.zeros_like(z))).lower(x).as_text()
    assert "jr_relu_conv_path" not in ir
    monkeypatch.delenv(native.ENV_SWITCH)
    ir = jax.jit(lambda z: jr.IG(steps=5)(model, v, z, 1, jnp.zeros_like(z))).lower(x).as_text()
    assert "jr_relu_conv_path" in ir


def test_differentiating_through_the_sparse_path():
    """Through the weights (conv2's kernel enters the kernels): a clear error naming the fix. Through the input:
    no error and the dense path's answer (a ReLU net's gradients are piecewise constant in x, so only the
    (x - b) factor carries a derivative, and the kernels' outputs reach the result only through comparisons)."""
    model, v = _lenet(jnp.float64)
    x = jax.random.normal(jax.random.key(7), (28, 28, 1), jnp.float64)

    def total(params, z, sparse):
        return jnp.sum(jr.IG(steps=3, sparse_path=sparse)(model, params, z, 1, jnp.zeros_like(z)))

    with pytest.raises(TypeError, match="sparse_path=False"):
        jax.grad(total)(v, x, True)
    dense = jax.grad(total)(v, x, False)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(dense))
    np.testing.assert_allclose(jax.grad(total, argnums=1)(v, x, True), jax.grad(total, argnums=1)(v, x, False),
                               rtol=1e-10, atol=1e-14)


def test_built_library_is_keyed_and_complete():
    """The cached library's name carries a hash of source, jaxlib, compiler and CPU; no temporary is left."""
    path = native.library_path(native._compiler())
    assert path.exists() and path.stat().st_size > 0
    assert not [p for p in path.parent.iterdir() if p.name.startswith("tmp")]


def test_a_non_valid_geometry_is_a_clear_error():
    from jaxrecover.native import relu_conv

    assert native.available()
    mask = jnp.zeros((3, 6, 6, 2), jnp.uint8)
    kernel = jnp.zeros((3, 3, 2, 4))
    wrong = jnp.zeros((3, 5, 5, 4))  # a VALID 3x3 convolution of 6x6 gives 4x4, not 5x5
    with pytest.raises(Exception, match="stride-1 VALID"):
        jax.block_until_ready(relu_conv.path_backward(wrong, jnp.ones(3), mask, kernel))
