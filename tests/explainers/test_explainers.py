import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_net
from jaxrecover import explainers as E


def _defined(n):
    """Every rule's nodes and weights for n steps, written from REFERENCES.md (not from the library's table)."""
    i = np.arange(1, n + 1)
    t, v = np.polynomial.legendre.leggauss(n)
    return {
        "riemann_right": (i / n, np.full(n, 1 / n)),
        "riemann_left": ((i - 1) / n, np.full(n, 1 / n)),
        "riemann_middle": ((2 * i - 1) / (2 * n), np.full(n, 1 / n)),
        "riemann_trapezoid": ((i - 1) / (n - 1), np.r_[0.5, np.ones(n - 2), 0.5] / n),
        "trapezoid": ((i - 1) / (n - 1), np.r_[0.5, np.ones(n - 2), 0.5] / (n - 1)),
        "saliency": (np.linspace(0, 1, n), np.full(n, 1 / n)),
        "ig_original": (np.arange(n + 1) / n, np.r_[0.5, np.ones(n - 1), 0.5] / n),
        "gausslegendre": ((1 + t) / 2, v / 2),
    }


@pytest.mark.parametrize("rule", list(E.RULES))
def test_rule_table_matches_reference_definitions(rule):
    n = 7
    nodes, w = E.quadrature(rule, n)
    assert nodes.dtype == np.float64 and w.dtype == np.float64
    expected = _defined(n)
    np.testing.assert_allclose(nodes, expected[rule][0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(w, expected[rule][1], rtol=0, atol=1e-15)
    total = (n - 1) / n if rule == "riemann_trapezoid" else 1.0
    assert w.sum() == pytest.approx(total, abs=1e-14)


def test_steps_below_minimum_and_unknown_rule_are_errors():
    with pytest.raises(ValueError, match="steps >= 2"):
        E.quadrature("riemann_right", 1)
    with pytest.raises(ValueError, match="choose one of"):
        E.quadrature("simpson", 10)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_gauss_legendre_integrates_degree_2n_minus_1_exactly(n):
    nodes, w = E.quadrature("gausslegendre", n)
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
    out = E.integrated_gradients(f, jnp.asarray(x), jnp.asarray(b), steps=m, rule="riemann_right")
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-13)


def _smooth_f():
    w = jnp.asarray(np.random.default_rng(4).normal(size=(5, 3)))
    return lambda z: jnp.sum(jnp.tanh(z @ w) ** 2) + jnp.sum(jnp.sin(z))


@pytest.mark.parametrize("rule", ["riemann_right", "riemann_left", "riemann_middle", "trapezoid", "ig_original"])
def test_completeness_error_falls_with_steps(rule):
    f = _smooth_f()
    x = jnp.asarray(np.random.default_rng(5).normal(size=5))
    errs = [abs(float(E.completeness_delta(f, x, None, E.integrated_gradients(f, x, steps=n, rule=rule))))
            for n in (16, 64, 256, 1024)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # first-order rules gain ~4x per 4x steps, second-order (midpoint, trapezoids) ~16x
    per_step = 0.35 if rule in ("riemann_right", "riemann_left") else 0.1
    assert all(b < per_step * a for a, b in zip(errs, errs[1:])), errs


def test_gauss_legendre_completeness_is_spectrally_accurate():
    f = _smooth_f()
    x = jnp.asarray(np.random.default_rng(5).normal(size=5))
    delta = E.completeness_delta(f, x, None, E.integrated_gradients(f, x, steps=20, rule="gausslegendre"))
    assert abs(float(delta)) < 1e-12


def test_captum_trapezoid_weights_sum_short_of_one():
    f = lambda z: jnp.sum(z)  # noqa: E731 - constant gradient 1
    x = jnp.asarray([1.0, 2.0, -3.0])
    ig = E.integrated_gradients(f, x, steps=10, rule="riemann_trapezoid")
    np.testing.assert_allclose(ig, x * 9 / 10, rtol=1e-15)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(list(E.RULES)), st.integers(2, 40), st.floats(-3, 3), st.floats(-3, 3))
def test_ig_of_a_linear_function_is_exact_times_weight_sum(rule, n, xv, bv):
    """For f linear, grad f is constant: IG = (x - b) * grad * (sum of the weights, from the definitions)."""
    g = jnp.asarray([0.5, -2.0, 3.0])
    f = lambda z: jnp.dot(g, z)  # noqa: E731
    x = jnp.asarray([xv, 1.0, -1.0])
    b = jnp.asarray([bv, 0.5, 0.0])
    ig = E.integrated_gradients(f, x, b, steps=n, rule=rule)
    total = (n - 1) / n if rule == "riemann_trapezoid" else 1.0  # REFERENCES.md: only Captum's trapezoid is short
    np.testing.assert_allclose(ig, (x - b) * g * total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", list(E.RULES))
def test_ig_of_a_quadratic_against_its_closed_form(rule):
    """f(z) = 0.5 z^T S z: grad f(b + a(x-b)) = S b + a S (x - b), so IG = (x-b) * (W0 S b + W1 S (x-b))
    with W0 = sum w_i and W1 = sum w_i a_i computed here from each rule's DEFINITION (not the library's table);
    Gauss-Legendre is exact for this degree-1 integrand, so its W0, W1 are those of the integral too."""
    n = 6
    rng = np.random.default_rng(11)
    s_mat = rng.normal(size=(4, 4))
    s_mat = s_mat + s_mat.T
    x, b = rng.normal(size=4), rng.normal(size=4)
    a, w = _defined(n)[rule]
    expected = (x - b) * (w.sum() * (s_mat @ b) + (w * a).sum() * (s_mat @ (x - b)))
    f = lambda z: 0.5 * z @ jnp.asarray(s_mat) @ z  # noqa: E731
    ig = E.integrated_gradients(f, jnp.asarray(x), jnp.asarray(b), steps=n, rule=rule)
    assert ig.dtype == jnp.float64
    np.testing.assert_allclose(ig, expected, rtol=1e-12, atol=1e-12)


def test_explainer_objects_are_static_pytrees_and_validate():
    ig = E.IG(steps=7, rule="saliency")
    assert jax.tree.leaves(ig) == [] and ig.evaluations == 7 and E.IG(steps=3, rule="ig_original").evaluations == 4
    assert E.VG().evaluations == 1 and hash(ig) == hash(E.IG(steps=7, rule="saliency"))
    with pytest.raises(ValueError, match="choose one of"):
        E.IG(rule="simpson")
    with pytest.raises(ValueError, match="steps >= 2"):
        E.IG(steps=1, rule="riemann_right")
    with pytest.raises(ValueError, match="integer steps"):
        E.IG(steps=2.5)


def test_explainers_are_single_example_functions_under_vmap_and_jit():
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True)
    from jaxrecover.models import as_model

    model = as_model(logit_fn)
    x = jax.random.normal(jax.random.key(1), (3, *shape))
    t = jnp.asarray([0, 1, 2])
    b = jnp.zeros_like(x)
    ig = jax.jit(jax.vmap(lambda xi, ti, bi: E.IG(steps=5)(model, params, xi, ti, bi)))(x, t, b)
    for k in range(3):
        f = lambda z, k=k: logit_fn(params, z)[t[k]]  # noqa: E731
        np.testing.assert_allclose(ig[k], E.integrated_gradients(f, x[k], steps=5), rtol=1e-13)
        np.testing.assert_allclose(E.VG()(model, params, x[k], t[k]), jax.grad(f)(x[k]), rtol=1e-13)
