"""The proof: exact identities on random ReLU nets in float64."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import NET_KINDS, make_net
from jaxrecover import attribution as A
from jaxrecover import recovery as R

TOL = 1e-10


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _setup(kind, bias, seed=0, n=6, baseline_scale=0.0):
    logit_fn, params, shape = make_net(kind, jax.random.key(seed), bias)
    x = jax.random.normal(jax.random.key(seed + 100), (n, *shape), jnp.float64)
    b = baseline_scale * jax.random.normal(jax.random.key(seed + 200), (n, *shape), jnp.float64)
    t = jnp.arange(n, dtype=jnp.int32) % 5
    vg = A.attribute(logit_fn, params, x, t, method="vg")
    return logit_fn, params, x, b, t, vg


@pytest.mark.parametrize("rule", list(A.RULES))
@pytest.mark.parametrize("m", [2, 3, 4, 7, 50])
def test_every_exact_plan_is_an_identity_of_the_quadrature_sums(rule, m):
    try:
        plan = R.exact_plan(rule, m)
    except ValueError:
        assert m < 3
        return
    assert plan.exact
    assert R.plan_residual(plan) < 1e-12
    assert all(q.steps >= A.RULES[rule].min_steps for q in plan.queries)


@pytest.mark.parametrize("rule", list(A.RULES))
def test_inexact_plans_are_reported_inexact(rule):
    assert R.plan_residual(R.approx_plan(rule, 50, 0.98)) > 1e-3
    assert not R.approx_plan(rule, 50).exact and not R.nobias_plan(rule, 50).exact


@pytest.mark.parametrize("kind,bias", [(k, b) for k in NET_KINDS for b in (False, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_paper_eq4_recovers_vg_on_every_net(kind, bias, seed):
    logit_fn, params, x, b, t, vg = _setup(kind, bias, seed)
    m = 50
    oracle = R.ig_oracle(logit_fn, params, t)
    ig_m = oracle(x, m)
    ig_m1 = oracle((m - 1) / m * x, m - 1)
    rec, mask = R.recover_eq4(ig_m, ig_m1, x, m)
    assert rec.dtype == jnp.float64 and bool(mask.all())
    assert _rel(rec, vg) < TOL


@pytest.mark.parametrize("kind", NET_KINDS)
def test_paper_eq2_recovers_vg_on_nobias_nets(kind):
    logit_fn, params, x, b, t, vg = _setup(kind, bias=False)
    ig = R.ig_oracle(logit_fn, params, t)(x, 50)
    rec, mask = R.recover_eq2(ig, x)
    assert rec.dtype == jnp.float64
    assert _rel(rec, vg) < TOL


def test_paper_eq2_fails_with_bias():
    logit_fn, params, x, b, t, vg = _setup("dense4", bias=True)
    rec, _ = R.recover_eq2(R.ig_oracle(logit_fn, params, t)(x, 50), x)
    assert _rel(rec, vg) > 1e-3


@pytest.mark.parametrize("rule", list(A.RULES))
@pytest.mark.parametrize("kind", NET_KINDS)
def test_nobias_plan_generalises_eq2_to_every_rule(rule, kind):
    logit_fn, params, x, b, t, vg = _setup(kind, bias=False)
    plan = R.nobias_plan(rule, 20)
    rec, _ = R.attack(R.ig_oracle(logit_fn, params, t, rule=rule), plan, x)
    assert _rel(rec, vg) < TOL


@pytest.mark.parametrize("rule", list(A.RULES))
@pytest.mark.parametrize("kind,bias,baseline", [("dense4", True, 0.3), ("conv", True, 0.3), ("dense2", False, 0.0),
                                                ("conv", False, 0.5)])
def test_every_generalised_plan_recovers_vg(rule, kind, bias, baseline):
    logit_fn, params, x, b, t, vg = _setup(kind, bias, seed=3, baseline_scale=baseline)
    oracle = R.ig_oracle(logit_fn, params, t, rule=rule, baseline=b)
    for plan in (R.exact_plan(rule, 50), R.exact_plan(rule, 3), R.minimal_plan(rule)):
        rec, mask = R.attack(oracle, plan, x, b)
        assert rec.dtype == jnp.float64
        assert bool(mask.all())
        assert _rel(rec, vg) < TOL, (plan, _rel(rec, vg))


def test_general_plan_equals_paper_eq4_and_eq3():
    logit_fn, params, x, b, t, vg = _setup("conv", True)
    oracle = R.ig_oracle(logit_fn, params, t)
    plan = R.paper_plan(50)
    assert plan.queries == (R.Query(1.0, 50), R.Query(49 / 50, 49)) and plan.coeffs == (50.0, -49.0)
    via_plan, _ = R.attack(oracle, plan, x)
    via_eq4, _ = R.recover_eq4(oracle(x, 50), oracle(0.98 * x, 49), x, 50)
    np.testing.assert_allclose(via_plan, via_eq4, rtol=1e-9, atol=1e-12)
    eq3_plan = R.approx_plan("riemann_right", 50, 0.98)
    via_plan3, _ = R.attack(oracle, eq3_plan, x)
    via_eq3, _ = R.recover_eq3(oracle(x, 50), oracle(0.98 * x, 50), x, 0.98)
    np.testing.assert_allclose(via_plan3, via_eq3, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("output", ["prob", "logprob"])
def test_eq4_recovers_the_gradient_of_a_smooth_softmax_output(output):
    logit_fn, params, x, b, t, _ = _setup("dense4", True)
    vg = A.attribute(logit_fn, params, x, t, method="vg", output=output)
    oracle = R.ig_oracle(logit_fn, params, t, output=output)
    rec, _ = R.attack(oracle, R.paper_plan(50), x)
    assert _rel(rec, vg) < TOL
    # and every other rule's exact plan too (the identity needs no piecewise linearity)
    for rule in ("gausslegendre", "ig_original", "riemann_trapezoid"):
        rec, _ = R.attack(R.ig_oracle(logit_fn, params, t, rule=rule, output=output), R.exact_plan(rule, 10), x)
        assert _rel(rec, vg) < TOL


def test_coordinates_equal_to_the_baseline_are_nan_and_masked():
    logit_fn, params, x, b, t, vg = _setup("dense2", True, baseline_scale=0.2)
    x = x.at[:, 3].set(b[:, 3]).at[0, 5].set(b[0, 5])
    oracle = R.ig_oracle(logit_fn, params, t, baseline=b)
    rec, mask = R.attack(oracle, R.paper_plan(50), x, b)
    assert not bool(mask[:, 3].any()) and not bool(mask[0, 5])
    assert bool(jnp.isnan(rec[:, 3]).all()) and bool(jnp.isnan(rec[0, 5]))
    assert not bool(jnp.isinf(rec).any())
    vg = A.attribute(logit_fn, params, x, t, method="vg")
    assert float(jnp.max(jnp.abs(jnp.where(mask, rec - vg, 0)))) < TOL * float(jnp.max(jnp.abs(vg)))
    rec2, mask2 = R.recover_eq2(jnp.ones(4), jnp.array([1.0, 0.0, -2.0, 0.0]))
    assert mask2.tolist() == [True, False, True, False] and bool(jnp.isnan(rec2[1]))


def test_fixed_step_count_has_no_exact_plan():
    """With every query at the same step count the measure's largest and smallest
    points keep a non-zero weight (docs/RECOVERY.md): no combination of two
    riemann_right answers at n = 50 is exact, whatever the second scale."""
    for a in (0.5, 0.9, 0.98, 49 / 50, 1.5):
        for lam in ((1.0, -1.0), (1.0, -a), (50.0, -49.0)):
            plan = R.QueryPlan("riemann_right", (R.Query(1.0, 50), R.Query(a, 50)), lam, False, "probe")
            assert R.plan_residual(plan) > 1e-3


def test_minimal_plans_are_cheapest_and_known():
    costs = {rule: R.minimal_plan(rule).evaluations for rule in A.RULES}
    assert costs == {"riemann_right": 5, "riemann_left": 5, "riemann_middle": 5, "riemann_trapezoid": 7,
                     "trapezoid": 7, "gausslegendre": 1, "saliency": 3, "ig_original": 7}
    for rule in A.RULES:
        assert all(R.exact_plan(rule, m).evaluations >= costs[rule]
                   for m in range(2, 30) if not (m < 3 and rule not in ("saliency", "ig_original", "gausslegendre")))


def test_recover_checks_answer_count():
    with pytest.raises(ValueError, match="2 queries but 1 answers"):
        R.recover(R.paper_plan(50), [jnp.ones(3)], jnp.ones(3))


def test_float32_service_recovery_is_close_but_not_exact():
    """The same eq. 4 in float32: cancellation costs digits (the paper's ResNet18 question)."""
    logit_fn, params, shape = make_net("dense4", jax.random.key(0), True, jnp.float32)
    x = jax.random.normal(jax.random.key(100), (6, *shape), jnp.float32)
    t = jnp.arange(6, dtype=jnp.int32) % 5
    vg = A.attribute(logit_fn, params, x, t, method="vg")
    rec, _ = R.attack(R.ig_oracle(logit_fn, params, t), R.paper_plan(50), x)
    assert rec.dtype == jnp.float32
    err = _rel(rec, vg)
    assert 1e-9 < err < 1e-2


@settings(max_examples=20, deadline=None)
@given(rule=st.sampled_from(list(A.RULES)), m=st.integers(3, 60), seed=st.integers(0, 2**16),
       depth=st.integers(1, 3), bias=st.booleans())
def test_property_exact_plans_on_random_relu_nets(rule, m, seed, depth, bias):
    from conftest import _dense_net

    sizes = (5,) + (8,) * depth + (3,)
    logit_fn, params = _dense_net(jax.random.key(seed), sizes, bias, jnp.float64)
    x = jax.random.normal(jax.random.key(seed + 1), (3, 5), jnp.float64)
    b = 0.2 * jax.random.normal(jax.random.key(seed + 2), (3, 5), jnp.float64)
    t = jnp.array([0, 1, 2], jnp.int32)
    vg = A.attribute(logit_fn, params, x, t, method="vg")
    if float(jnp.max(jnp.abs(vg))) == 0:  # a dead net has nothing to recover
        return
    rec, _ = R.attack(R.ig_oracle(logit_fn, params, t, rule=rule, baseline=b), R.exact_plan(rule, m), x, b)
    assert float(jnp.max(jnp.abs(rec - vg))) <= TOL * float(jnp.max(jnp.abs(vg)))
