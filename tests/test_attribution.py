import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_net
from jaxrecover import attribution as A


@pytest.mark.parametrize("rule", list(A.RULES))
def test_rule_table_matches_reference_definitions(rule):
    n = 7
    nodes, w = A.quadrature(rule, n)
    assert nodes.dtype == np.float64 and w.dtype == np.float64
    i = np.arange(1, n + 1)
    expected = {
        "riemann_right": (i / n, np.full(n, 1 / n)),
        "riemann_left": ((i - 1) / n, np.full(n, 1 / n)),
        "riemann_middle": ((2 * i - 1) / (2 * n), np.full(n, 1 / n)),
        "riemann_trapezoid": ((i - 1) / (n - 1), np.r_[0.5, np.ones(n - 2), 0.5] / n),
        "trapezoid": ((i - 1) / (n - 1), np.r_[0.5, np.ones(n - 2), 0.5] / (n - 1)),
        "saliency": (np.linspace(0, 1, n), np.full(n, 1 / n)),
        "ig_original": (np.arange(n + 1) / n, np.r_[0.5, np.ones(n - 1), 0.5] / n),
    }
    if rule == "gausslegendre":
        t, v = np.polynomial.legendre.leggauss(n)
        expected[rule] = ((1 + t) / 2, v / 2)
    np.testing.assert_allclose(nodes, expected[rule][0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(w, expected[rule][1], rtol=0, atol=1e-15)
    total = (n - 1) / n if rule == "riemann_trapezoid" else 1.0
    assert w.sum() == pytest.approx(total, abs=1e-14)


def test_steps_below_minimum_and_unknown_rule_are_errors():
    with pytest.raises(ValueError, match="steps >= 2"):
        A.quadrature("riemann_right", 1)
    with pytest.raises(ValueError, match="choose one of"):
        A.quadrature("simpson", 10)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_gauss_legendre_integrates_degree_2n_minus_1_exactly(n):
    nodes, w = A.quadrature("gausslegendre", n)
    for deg in range(2 * n):
        assert np.dot(w, nodes**deg) == pytest.approx(1 / (deg + 1), abs=1e-13)
    assert abs(np.dot(w, nodes ** (2 * n)) - 1 / (2 * n + 1)) > 1e-11  # and not one degree more


def test_riemann_right_equals_a_plain_numpy_loop():
    w1 = np.random.default_rng(0).normal(size=(6, 9))
    w2 = np.random.default_rng(1).normal(size=(9,))

    def f_np_grad(z):
        h = z @ w1
        return w1 @ (w2 * (h > 0))

    f = lambda z: jnp.dot(jax.nn.relu(z @ jnp.asarray(w1)), jnp.asarray(w2))  # noqa: E731
    x = np.random.default_rng(2).normal(size=6)
    b = np.random.default_rng(3).normal(size=6)
    m = 13
    ref = np.zeros(6)
    for i in range(1, m + 1):
        ref += f_np_grad(b + i / m * (x - b)) / m
    ref *= x - b
    out = A.integrated_gradients(f, jnp.asarray(x), jnp.asarray(b), steps=m, rule="riemann_right")
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-13)


def _smooth_f():
    w = jnp.asarray(np.random.default_rng(4).normal(size=(5, 3)))
    return lambda z: jnp.sum(jnp.tanh(z @ w) ** 2) + jnp.sum(jnp.sin(z))


@pytest.mark.parametrize("rule", ["riemann_right", "riemann_left", "riemann_middle", "trapezoid", "ig_original"])
def test_completeness_error_falls_with_steps(rule):
    f = _smooth_f()
    x = jnp.asarray(np.random.default_rng(5).normal(size=5))
    errs = [abs(float(A.completeness_delta(f, x, None, A.integrated_gradients(f, x, steps=n, rule=rule))))
            for n in (16, 64, 256, 1024)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # first-order rules gain ~4x per 4x steps, second-order (midpoint, trapezoids) ~16x
    per_step = 0.35 if rule in ("riemann_right", "riemann_left") else 0.1
    assert all(b < per_step * a for a, b in zip(errs, errs[1:])), errs


def test_gauss_legendre_completeness_is_spectrally_accurate():
    f = _smooth_f()
    x = jnp.asarray(np.random.default_rng(5).normal(size=5))
    delta = A.completeness_delta(f, x, None, A.integrated_gradients(f, x, steps=20, rule="gausslegendre"))
    assert abs(float(delta)) < 1e-12


def test_captum_trapezoid_weights_sum_short_of_one():
    f = lambda z: jnp.sum(z)  # noqa: E731 - constant gradient 1
    x = jnp.asarray([1.0, 2.0, -3.0])
    ig = A.integrated_gradients(f, x, steps=10, rule="riemann_trapezoid")
    np.testing.assert_allclose(ig, x * 9 / 10, rtol=1e-15)


def test_vg_and_ig_dtypes_follow_the_input():
    logit_fn, params, shape = make_net("conv", jax.random.key(0), True, jnp.float32)
    x = jax.random.normal(jax.random.key(1), (3, *shape), jnp.float32)
    t = jnp.array([0, 1, 2])
    for method in ("vg", "ig"):
        out = A.attribute(logit_fn, params, x, t, method=method, steps=5)
        chex.assert_shape(out, x.shape)
        assert out.dtype == jnp.float32
    logit64, p64, _ = make_net("conv", jax.random.key(0), True, jnp.float64)
    out = A.attribute(logit64, p64, x.astype(jnp.float64), t, steps=5)
    assert out.dtype == jnp.float64


def test_float64_input_with_x64_off_is_a_clear_error():
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True, jnp.float32)
    with jax.enable_x64(False):
        with pytest.raises(RuntimeError, match="jax_enable_x64"):
            A.attribute(logit_fn, params, np.zeros((2, *shape), np.float64), np.zeros(2, np.int32))


def test_bad_arguments_are_clear_errors():
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True)
    x = jnp.ones((2, *shape))
    with pytest.raises(ValueError, match="target must have shape"):
        A.attribute(logit_fn, params, x, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="unknown output"):
        A.attribute(logit_fn, params, x, jnp.zeros(2, jnp.int32), output="softmax")
    with pytest.raises(TypeError, match="float32 or float64"):
        A.attribute(logit_fn, params, x.astype(jnp.int32), jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize("output", A.OUTPUTS)
def test_chunked_equals_unchunked_and_single_example(output):
    logit_fn, params, shape = make_net("dense4", jax.random.key(3), True)
    x = jax.random.normal(jax.random.key(4), (7, *shape))
    b = 0.1 * jax.random.normal(jax.random.key(5), (7, *shape))
    t = jnp.arange(7) % 5
    full = A.attribute(logit_fn, params, x, t, baseline=b, steps=9, rule="gausslegendre", output=output, chunk_size=None)
    chunked = A.attribute(logit_fn, params, x, t, baseline=b, steps=9, rule="gausslegendre", output=output, chunk_size=3)
    np.testing.assert_allclose(chunked, full, rtol=1e-12, atol=1e-14)
    f = lambda z: A.select_output(logit_fn(params, z), t[2], output)  # noqa: E731
    one = A.integrated_gradients(f, x[2], b[2], steps=9, rule="gausslegendre")
    np.testing.assert_allclose(full[2], one, rtol=1e-12, atol=1e-14)
    vg = A.attribute(logit_fn, params, x, t, method="vg", output=output, chunk_size=4)
    np.testing.assert_allclose(vg[2], jax.grad(f)(x[2]), rtol=1e-12)


def test_prob_and_logprob_outputs():
    logits = jnp.asarray([1.0, 2.0, 0.5])
    assert A.select_output(logits, 1, "logit") == 2.0
    np.testing.assert_allclose(A.select_output(logits, 1, "prob"), jax.nn.softmax(logits)[1])
    np.testing.assert_allclose(A.select_output(logits, 1, "logprob"), jnp.log(jax.nn.softmax(logits)[1]))


def test_jitted_ig_does_not_retrace_for_a_new_batch():
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def ig_batch(x, t):
        def one(xi, ti):
            return A.integrated_gradients(lambda z: logit_fn(params, z)[ti], xi, steps=10)
        return jax.vmap(one)(x, t)

    for seed in range(3):
        x = jax.random.normal(jax.random.key(seed), (4, *shape))
        ig_batch(x, jnp.arange(4) % 5)
    # the library's chunked path: one compilation for every equal-shaped chunk
    A._attribute_chunk.clear_cache() if hasattr(A._attribute_chunk, "clear_cache") else None
    x = jax.random.normal(jax.random.key(9), (10, *shape))
    A.attribute(logit_fn, params, x, jnp.arange(10) % 5, steps=10, chunk_size=4)
    assert A._attribute_chunk._cache_size() == 1


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(list(A.RULES)), st.integers(2, 40), st.floats(-3, 3), st.floats(-3, 3))
def test_ig_of_a_linear_function_is_exact_times_weight_sum(rule, n, xv, bv):
    """For f linear, grad f is constant: IG = (x - b) * grad * sum(w) for every rule."""
    g = jnp.asarray([0.5, -2.0, 3.0])
    f = lambda z: jnp.dot(g, z)  # noqa: E731
    x = jnp.asarray([xv, 1.0, -1.0])
    b = jnp.asarray([bv, 0.5, 0.0])
    ig = A.integrated_gradients(f, x, b, steps=n, rule=rule)
    np.testing.assert_allclose(ig, (x - b) * g * A.quadrature(rule, n)[1].sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["twolayer", "lenet", "resnet18"])
@pytest.mark.parametrize("rule", ["riemann_right", "gausslegendre", "ig_original"])
def test_affine_stem_ig_equals_plain_ig_on_the_models(name, rule):
    """The stem factorisation is an identity: float64, random weights, a random baseline, every output."""
    from jaxrecover import models

    v = models.init_variables(name, jax.random.key(0), jnp.float64)
    logit_fn = models.make_logit_fn(name)
    assert logit_fn.affine_stem is not None
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1), jnp.float64)
    b = 0.2 * jax.random.uniform(jax.random.key(2), (3, 28, 28, 1), jnp.float64)
    t = jnp.asarray([0, 3, 7], jnp.int32)
    for output in ("logit", "logprob"):
        kw = dict(baseline=b, steps=6, rule=rule, output=output, chunk_size=2)
        fast = A.attribute(logit_fn, v, x, t, factor_stem=True, **kw)
        plain = A.attribute(logit_fn, v, x, t, factor_stem=False, **kw)
        assert fast.dtype == jnp.float64
        np.testing.assert_allclose(fast, plain, rtol=1e-10, atol=1e-12 * float(jnp.abs(plain).max()))


def test_auto_chunk_size_follows_the_forward_footprint():
    from jaxrecover import models

    x_one = jnp.zeros((28, 28, 1), jnp.float32)
    sizes = {}
    for name in ("twolayer", "lenet"):
        v = models.init_variables(name, jax.random.key(0), jnp.float32)
        f = models.make_logit_fn(name)
        per_point = A.forward_bytes(f, v, x_one)
        # at least the activations the model must hold: its hidden layer / its conv outputs
        assert per_point >= {"twolayer": 100 * 4, "lenet": (26 * 26 * 32 + 24 * 24 * 64) * 4}[name]
        sizes[name] = A.auto_chunk_size(f, v, x_one, 50, 2000)
        assert sizes[name] == max(1, min(2000, A.AUTO_CHUNK_MAX, A.AUTO_CHUNK_BYTES // (50 * per_point)))
        assert A.auto_chunk_size(f, v, x_one, 50, 3) <= 3
    assert sizes["twolayer"] == A.AUTO_CHUNK_MAX and 1 <= sizes["lenet"] < 64
    # the default chunking gives the same attributions as one chunk
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True)
    x = jax.random.normal(jax.random.key(1), (5, *shape))
    np.testing.assert_allclose(A.attribute(logit_fn, params, x, jnp.arange(5) % 3),
                               A.attribute(logit_fn, params, x, jnp.arange(5) % 3, chunk_size=None), rtol=1e-12)


def test_micro_batch_loop_equals_one_vmap():
    """A lax.map over micro-batches (with a remainder) computes the same IG as one vmap: float64 LeNet."""
    from jaxrecover import models

    v = models.init_variables("lenet", jax.random.key(0), jnp.float64)
    logit_fn = models.make_logit_fn("lenet")
    x = jax.random.uniform(jax.random.key(1), (5, 28, 28, 1), jnp.float64)
    t = jnp.asarray([0, 3, 7, 1, 9], jnp.int32)
    kw = dict(steps=4, chunk_size=5)
    one_vmap = A.attribute(logit_fn, v, x, t, micro_batch=None, **kw)
    for micro in (1, 2):
        looped = A.attribute(logit_fn, v, x, t, micro_batch=micro, **kw)
        assert looped.dtype == jnp.float64
        np.testing.assert_allclose(looped, one_vmap, rtol=1e-12, atol=1e-14 * float(jnp.abs(one_vmap).max()))
    with pytest.raises(ValueError, match="micro_batch must be"):
        A.attribute(logit_fn, v, x, t, micro_batch=0, **kw)
    with pytest.raises(ValueError, match="micro_batch must be"):
        A.attribute(logit_fn, v, x, t, micro_batch="big", **kw)


def test_auto_micro_batch_by_footprint_and_weights(monkeypatch):
    from jaxrecover import models

    x_one = jnp.zeros((28, 28, 1), jnp.float32)
    got = {}
    for name in ("twolayer", "lenet", "resnet18"):
        v = models.init_variables(name, jax.random.key(0), jnp.float32)
        f = models.make_logit_fn(name)
        per_example = 50 * A.forward_bytes(f, v, x_one)
        weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(v))
        got[name] = A.auto_micro_batch(f, v, x_one, 50)
        if per_example < A.AUTO_LOOP_BYTES:
            assert got[name] is None
        else:
            assert got[name] == max(1, -(-A.AUTO_LOOP_WEIGHT_RATIO * weights // per_example))
    # the models of the paper: two-layer nets one vmap, LeNet one image, ResNet18 (45 MB of weights) more
    assert got["twolayer"] is None and got["lenet"] == 1 and got["resnet18"] > 1
    assert A.auto_chunk_size(f, v, x_one, 50, 1000, micro_batch=got["resnet18"]) == A.AUTO_LOOP_CHUNK
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert A.auto_micro_batch(f, v, x_one, 50) is None  # accelerators: one vmap per chunk
