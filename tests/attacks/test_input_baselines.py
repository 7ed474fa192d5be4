"""Input-dependent baselines (the blurred input) and VG from reported output values (no extra needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrecover as jr
from conftest import make_net
from jaxrecover import attacks as R
from jaxrecover import services as S


def _rel(a, b, mask=None):
    d = jnp.abs(a - b) if mask is None else jnp.where(mask, jnp.abs(a - b), 0.0)
    return float(jnp.max(d) / jnp.max(jnp.abs(b)))


def _conv_setup(n=3):
    logit_fn, p, shape = make_net("conv", jax.random.key(5), bias=True)
    x = jax.random.normal(jax.random.key(6), (n, *shape), jnp.float64)
    return logit_fn, p, x, jnp.arange(n) % 5


# ----------------------------------------------------------------------------------------- the blur operator
def test_blur_baseline_is_linear_keeps_constants_and_dtype():
    blur = jr.BlurBaseline(1.0)
    k1, k2 = jax.random.split(jax.random.key(0))
    u = jax.random.normal(k1, (2, 8, 8, 1), jnp.float64)
    v = jax.random.normal(k2, (2, 8, 8, 1), jnp.float64)
    np.testing.assert_allclose(blur(2.0 * u - 3.0 * v), 2.0 * blur(u) - 3.0 * blur(v), rtol=0, atol=1e-13)
    c = jnp.full((1, 8, 8, 1), -0.42, jnp.float64)
    np.testing.assert_allclose(blur(c), c, rtol=0, atol=1e-15)
    assert blur(u).dtype == jnp.float64 and blur(u.astype(jnp.float32)).dtype == jnp.float32
    assert float(jnp.max(jnp.abs(blur(u) - u))) > 0.1  # it does blur
    with pytest.raises(ValueError, match="sigma > 0"):
        jr.BlurBaseline(0.0)
    with pytest.raises(ValueError, match="too small"):
        jr.BlurBaseline(5.0)(u)  # radius 13 on 8x8 images
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        blur(u[0])


def test_service_with_blur_baseline_answers_ig_from_the_blurred_input():
    logit_fn, p, x, t = _conv_setup()
    blur = jr.BlurBaseline(1.0)
    svc = jr.SimulatedIGService(logit_fn, p, rule="riemann_trapezoid", steps=16, baseline=blur)
    want = jr.explain(jr.IG(steps=16, rule="riemann_trapezoid"), logit_fn, p, x, t, baseline=blur(x))
    np.testing.assert_allclose(svc(x, t), want, rtol=0, atol=1e-12)
    assert "blur(sigma=1)" in repr(svc)
    fx, fb = svc.outputs(x, t)
    np.testing.assert_allclose(fb, jax.vmap(logit_fn, in_axes=(None, 0))(p, blur(x))[jnp.arange(3), t], atol=1e-12)
    # ray plans and fixed-m decoding need a fixed baseline: one clear error, before any query
    with pytest.raises(ValueError, match="depends on the input"):
        R.attack(svc, R.exact_plan("riemann_trapezoid", 4), x, t)
    fixed = jr.SimulatedIGService(logit_fn, p, steps=50, fixed_steps=True, baseline=blur)
    with pytest.raises(ValueError, match="depends on the input"):
        R.recover_fixed_steps(fixed, x, t)
    assert svc.queries == 3 and fixed.queries == 0


# ----------------------------------------------------------------------------------------- the chain recovery
@pytest.mark.parametrize("rule", ["riemann_right", "riemann_trapezoid", "saliency"])
def test_chain_recovers_vg_exactly_under_a_blurred_baseline(rule):
    logit_fn, p, x, t = _conv_setup()
    svc = jr.SimulatedIGService(logit_fn, p, rule=rule, baseline=jr.BlurBaseline(1.0))
    vg, mask, rep = R.recover_input_baseline(svc, x, t)
    truth = jr.explain(jr.VG(), logit_fn, p, x, t)
    assert vg.dtype == jnp.float64 and all(rep.closed) and rep.steps == 2
    assert float(jnp.mean(mask)) > 0.95
    assert _rel(vg, truth, mask) <= 1e-10, rep
    assert svc.queries == sum(rep.queries) and svc.evaluations == sum(rep.evaluations)
    # the answer at x alone (one query, as if the baseline were fixed at B x) is far off
    one = svc(x, t, steps=2) / (x - svc.baseline_for(x))
    assert _rel(jnp.where(mask, one, 0.0), truth, mask) > 1e-3


def test_chain_refuses_rules_without_a_top_node_at_one_and_fixed_baselines():
    logit_fn, p, x, t = _conv_setup(1)
    svc = jr.SimulatedIGService(logit_fn, p, rule="riemann_middle", baseline=jr.BlurBaseline(1.0))
    with pytest.raises(ValueError, match="top one at 1"):
        R.recover_input_baseline(svc, x, t)
    with pytest.raises(ValueError, match="fixed baseline"):
        R.recover_input_baseline(jr.SimulatedIGService(logit_fn, p), x, t)


def test_chain_that_does_not_close_is_reported_and_masked():
    logit_fn, p, x, t = _conv_setup(1)
    svc = jr.SimulatedIGService(logit_fn, p, rule="riemann_right", baseline=jr.BlurBaseline(1.0))
    vg, mask, rep = R.recover_input_baseline(svc, x, t, max_queries=2)
    assert rep.closed == [False] and not bool(mask.any()) and bool(jnp.all(jnp.isnan(vg)))


# ----------------------------------------------------------------------------------------- output values
@pytest.mark.parametrize("kind", ["dense2", "conv"])
def test_finite_differences_of_reported_outputs_recover_vg(kind):
    logit_fn, p, shape = make_net(kind, jax.random.key(5), bias=True)
    x = jax.random.normal(jax.random.key(6), (2, *shape), jnp.float64)
    t = jnp.array([0, 1])
    svc = jr.SimulatedIGService(logit_fn, p, steps=50, fixed_steps=True)
    vg, mask, rep = R.recover_from_outputs(svc, x, t, h=2.0 ** -10)
    truth = jr.explain(jr.VG(), logit_fn, p, x, t)
    assert vg.dtype == jnp.float64 and bool(mask.all())
    assert _rel(vg, truth) <= 1e-9
    d = int(np.prod(shape))
    assert all(q >= 2 * d + 1 for q in rep.queries) and svc.queries == sum(rep.queries)


def test_finite_differences_retry_where_a_boundary_lies_within_h():
    logit_fn, p, shape = make_net("dense2", jax.random.key(5), bias=True)
    x = jax.random.normal(jax.random.key(6), (1, *shape), jnp.float64)
    svc = jr.SimulatedIGService(logit_fn, p, steps=50)
    vg, mask, rep = R.recover_from_outputs(svc, x, jnp.array([0]), h=0.5, retries=12)
    truth = jr.explain(jr.VG(), logit_fn, p, x, jnp.array([0]))
    assert rep.retried[0] > 0 and rep.unresolved[0] == 0
    assert _rel(vg, truth) <= 1e-8
    with pytest.raises(S.QueryBudgetExceeded):
        R.recover_from_outputs(jr.SimulatedIGService(logit_fn, p, budget=10), x, jnp.array([0]))
