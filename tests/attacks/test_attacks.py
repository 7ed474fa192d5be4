"""The proof: exact identities on random ReLU nets in float64."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import NET_KINDS, make_net
from jaxrecover import attacks as R
from jaxrecover import services as S
from jaxrecover.services import SimulatedIGService
from jaxrecover.engine import explain
from jaxrecover.explainers import RULES, VG

TOL = 1e-10


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _setup(kind, bias, seed=0, n=6, baseline_scale=0.0):
    logit_fn, params, shape = make_net(kind, jax.random.key(seed), bias)
    x = jax.random.normal(jax.random.key(seed + 100), (n, *shape), jnp.float64)
    b = baseline_scale * jax.random.normal(jax.random.key(seed + 200), (n, *shape), jnp.float64)
    t = jnp.arange(n, dtype=jnp.int32) % 5
    vg = explain(VG(), logit_fn, params, x, t)
    return logit_fn, params, x, b, t, vg


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("m", [2, 3, 4, 7, 50])
def test_every_exact_plan_is_an_identity_of_the_quadrature_sums(rule, m):
    try:
        plan = R.exact_plan(rule, m)
    except ValueError:
        assert m < 3
        return
    assert plan.exact
    assert R.plan_residual(plan) < 1e-12
    assert all(q.steps >= RULES[rule].min_steps for q in plan.queries)


@pytest.mark.parametrize("rule", list(RULES))
def test_inexact_plans_are_reported_inexact(rule):
    assert R.plan_residual(R.approx_plan(rule, 50, 0.98)) > 1e-3
    assert not R.approx_plan(rule, 50).exact and not R.nobias_plan(rule, 50).exact


@pytest.mark.parametrize("kind,bias", [(k, b) for k in NET_KINDS for b in (False, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_paper_eq4_recovers_vg_on_every_net(kind, bias, seed):
    logit_fn, params, x, b, t, vg = _setup(kind, bias, seed)
    m = 50
    oracle = SimulatedIGService(logit_fn, params)
    ig_m = oracle(x, t, steps=m)
    ig_m1 = oracle((m - 1) / m * x, t, steps=m - 1)
    rec, mask = R.recover_eq4(ig_m, ig_m1, x, m)
    assert rec.dtype == jnp.float64 and bool(mask.all())
    assert _rel(rec, vg) < TOL


@pytest.mark.parametrize("kind", NET_KINDS)
def test_paper_eq2_recovers_vg_on_nobias_nets(kind):
    logit_fn, params, x, b, t, vg = _setup(kind, bias=False)
    ig = SimulatedIGService(logit_fn, params)(x, t, steps=50)
    rec, mask = R.recover_eq2(ig, x)
    assert rec.dtype == jnp.float64
    assert _rel(rec, vg) < TOL


def test_paper_eq2_fails_with_bias():
    logit_fn, params, x, b, t, vg = _setup("dense4", bias=True)
    rec, _ = R.recover_eq2(SimulatedIGService(logit_fn, params)(x, t, steps=50), x)
    assert _rel(rec, vg) > 1e-3


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("kind", NET_KINDS)
def test_nobias_plan_generalises_eq2_to_every_rule(rule, kind):
    logit_fn, params, x, b, t, vg = _setup(kind, bias=False)
    plan = R.nobias_plan(rule, 20)
    rec, _, _ = R.attack(SimulatedIGService(logit_fn, params, rule=rule), plan, x, t)
    assert _rel(rec, vg) < TOL


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("kind,bias,baseline", [("dense4", True, 0.3), ("conv", True, 0.3), ("dense2", False, 0.0),
                                                ("conv", False, 0.5)])
def test_every_generalised_plan_recovers_vg(rule, kind, bias, baseline):
    logit_fn, params, x, b, t, vg = _setup(kind, bias, seed=3, baseline_scale=baseline)
    oracle = SimulatedIGService(logit_fn, params, rule=rule, baseline=b)
    for plan in (R.exact_plan(rule, 50), R.exact_plan(rule, 3), R.minimal_plan(rule)):
        rec, mask, _ = R.attack(oracle, plan, x, t)
        assert rec.dtype == jnp.float64
        assert bool(mask.all())
        assert _rel(rec, vg) < TOL, (plan, _rel(rec, vg))


def test_general_plan_equals_paper_eq4_and_eq3():
    logit_fn, params, x, b, t, vg = _setup("conv", True)
    oracle = SimulatedIGService(logit_fn, params)
    plan = R.paper_plan(50)
    assert plan.queries == (R.Query(1.0, 50), R.Query(49 / 50, 49)) and plan.coeffs == (50.0, -49.0)
    via_plan, _, _ = R.attack(oracle, plan, x, t)
    via_eq4, _ = R.recover_eq4(oracle(x, t, steps=50), oracle(0.98 * x, t, steps=49), x, 50)
    np.testing.assert_allclose(via_plan, via_eq4, rtol=1e-9, atol=1e-12)
    eq3_plan = R.approx_plan("riemann_right", 50, 0.98)
    via_plan3, _, _ = R.attack(oracle, eq3_plan, x, t)
    via_eq3, _ = R.recover_eq3(oracle(x, t, steps=50), oracle(0.98 * x, t, steps=50), x, 0.98)
    np.testing.assert_allclose(via_plan3, via_eq3, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("output", ["prob", "logprob"])
def test_eq4_recovers_the_gradient_of_a_smooth_softmax_output(output):
    logit_fn, params, x, b, t, _ = _setup("dense4", True)
    vg = explain(VG(), logit_fn, params, x, t, output=output)
    oracle = SimulatedIGService(logit_fn, params, output=output)
    rec, _, _ = R.attack(oracle, R.paper_plan(50), x, t)
    assert _rel(rec, vg) < TOL
    # and every other rule's exact plan too (the identity needs no piecewise linearity)
    for rule in ("gausslegendre", "ig_original", "riemann_trapezoid"):
        rec, _, _ = R.attack(SimulatedIGService(logit_fn, params, rule=rule, output=output), R.exact_plan(rule, 10), x, t)
        assert _rel(rec, vg) < TOL


def test_coordinates_equal_to_the_baseline_are_nan_and_masked():
    logit_fn, params, x, b, t, vg = _setup("dense2", True, baseline_scale=0.2)
    x = x.at[:, 3].set(b[:, 3]).at[0, 5].set(b[0, 5])
    oracle = SimulatedIGService(logit_fn, params, baseline=b)
    rec, mask, _ = R.attack(oracle, R.paper_plan(50), x, t)
    assert not bool(mask[:, 3].any()) and not bool(mask[0, 5])
    assert bool(jnp.isnan(rec[:, 3]).all()) and bool(jnp.isnan(rec[0, 5]))
    assert not bool(jnp.isinf(rec).any())
    vg = explain(VG(), logit_fn, params, x, t)
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
    costs = {rule: R.minimal_plan(rule).evaluations for rule in RULES}
    assert costs == {"riemann_right": 5, "riemann_left": 5, "riemann_middle": 5, "riemann_trapezoid": 7,
                     "trapezoid": 7, "gausslegendre": 1, "saliency": 3, "ig_original": 7}
    for rule in RULES:
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
    vg = explain(VG(), logit_fn, params, x, t)
    rec, _, _ = R.attack(SimulatedIGService(logit_fn, params), R.paper_plan(50), x, t)
    assert rec.dtype == jnp.float32
    err = _rel(rec, vg)
    assert 1e-9 < err < 1e-2


@settings(max_examples=20, deadline=None)
@given(rule=st.sampled_from(list(RULES)), m=st.integers(3, 60), seed=st.integers(0, 2**16),
       depth=st.integers(1, 3), bias=st.booleans())
def test_property_exact_plans_on_random_relu_nets(rule, m, seed, depth, bias):
    from conftest import _dense_net

    sizes = (5,) + (8,) * depth + (3,)
    logit_fn, params = _dense_net(jax.random.key(seed), sizes, bias, jnp.float64)
    x = jax.random.normal(jax.random.key(seed + 1), (3, 5), jnp.float64)
    b = 0.2 * jax.random.normal(jax.random.key(seed + 2), (3, 5), jnp.float64)
    t = jnp.array([0, 1, 2], jnp.int32)
    vg = explain(VG(), logit_fn, params, x, t)
    if float(jnp.max(jnp.abs(vg))) == 0:  # a dead net has nothing to recover
        return
    rec, _, _ = R.attack(SimulatedIGService(logit_fn, params, rule=rule, baseline=b), R.exact_plan(rule, m), x, t)
    assert float(jnp.max(jnp.abs(rec - vg))) <= TOL * float(jnp.max(jnp.abs(vg)))


def test_service_declares_counts_and_enforces_its_policy():
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True)
    x = jax.random.normal(jax.random.key(1), (4, *shape))
    t = jnp.arange(4) % 5
    service = SimulatedIGService(logit_fn, params, rule="riemann_middle", steps=8, budget=10)
    d = service.describe()
    assert (d["rule"], d["steps"], d["fixed_steps"], d["dtype"], d["baseline"]) == (
        "riemann_middle", 8, False, "float64", "zeros")
    R.attack(service, R.exact_plan("riemann_middle", 4), x, t)  # 2 queries per example
    assert (service.queries, service.evaluations, service.remaining) == (8, 4 * (4 + 3), 2)
    with pytest.raises(S.QueryBudgetExceeded, match="8 of 10 queries used, this request needs 4"):
        service(x, t)
    assert service.queries == 8  # a refused request is not counted
    with pytest.raises(ValueError, match="for rule 'riemann_right' but the service uses 'riemann_middle'"):
        R.attack(service, R.paper_plan(8), x, t)
    fixed = SimulatedIGService(logit_fn, params, steps=20, fixed_steps=True)
    with pytest.raises(S.StepCountRefused, match="fixes the step count at 20"):
        R.attack(fixed, R.paper_plan(20), x, t)  # eq. 4 needs m - 1 = 19 steps
    assert fixed.queries == 0  # refused before any query was spent
    rec, _, _ = R.attack(fixed, R.approx_plan("riemann_right", 20), x, t)  # eq. 3 keeps m
    assert rec.dtype == jnp.float64 and fixed.queries == 8
    with pytest.raises(TypeError, match="answers float64 inputs"):
        fixed(x.astype(jnp.float32), t)


def test_attack_takes_the_baseline_from_the_service():
    """Issue 10: the baseline is given once, by the service; recovery with it is exact."""
    logit_fn, params, shape = make_net("dense4", jax.random.key(2), True)
    x = jax.random.normal(jax.random.key(3), (3, *shape))
    t = jnp.arange(3)
    b = 0.3 * jnp.ones(shape)
    service = SimulatedIGService(logit_fn, params, baseline=b)
    rec, mask, _ = R.attack(service, R.paper_plan(30), x, t)
    vg = explain(VG(), logit_fn, params, x, t)
    assert bool(mask.all())
    np.testing.assert_allclose(rec, vg, rtol=1e-9, atol=1e-12)
    # the old failure mode: the service's answers combined under another baseline (zeros) are wrong
    plan = R.paper_plan(30)
    answers = [service(xq, t, steps=q.steps) for xq, q in zip(R.query_inputs(plan, x, jnp.broadcast_to(b, x.shape)),
                                                              plan.queries)]
    wrong, _ = R.recover(plan, answers, x)
    assert float(np.max(np.abs(np.asarray(wrong - vg)))) > 1e-3


def test_recover_rejects_answers_of_the_wrong_shape_or_dtype():
    x = jnp.ones((2, 3))
    plan = R.paper_plan(10)
    with pytest.raises(ValueError, match="shape and dtype of x"):
        R.recover(plan, [jnp.ones((2, 3)), jnp.ones((3,))], x)
    with pytest.raises(ValueError, match="shape and dtype of x"):
        R.recover(plan, [jnp.ones((2, 3)), jnp.ones((2, 3), jnp.float32)], x)
    with pytest.raises(ValueError, match="2 queries but 1 answers"):
        R.recover(plan, [jnp.ones((2, 3))], x)


def test_service_wrapper_delegates_and_composes():
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True)
    x = jax.random.normal(jax.random.key(1), (2, *shape))
    t = jnp.arange(2)
    inner = SimulatedIGService(logit_fn, params, steps=6)

    class Doubling(S.ServiceWrapper):
        def __call__(self, x, target, *, steps=None):
            return 2 * self.inner(x, target, steps=steps)

    outer = Doubling(Doubling(inner))
    assert outer.rule == "riemann_right" and outer.steps == 6
    np.testing.assert_allclose(outer(x, t), 4 * SimulatedIGService(logit_fn, params, steps=6)(x, t), rtol=1e-14)
    assert inner.queries == 2 and outer.queries == 2
    assert outer.describe()["wrapped_by"] == ["Doubling", "Doubling"]


def test_every_recovery_returns_one_result_type():
    """Recovery(vg, mask, report) from every method; the report's common fields filled the same way for all."""
    from jaxrecover import services as S

    f, p, shape = make_net("dense2", jax.random.key(3), True, jnp.float64)
    x = jax.random.uniform(jax.random.key(4), (2, *shape), jnp.float64, 0.1, 1.0)
    t = jnp.array([0, 3])
    plain = SimulatedIGService(f, p)
    fixed = SimulatedIGService(f, p, steps=50, fixed_steps=True)
    runs = {
        "plan": lambda: R.attack(plain, R.best_plan(plain), x, t),
        "fixed-m jump decoding": lambda: R.recover_fixed_steps(fixed, x, t),
        "fixed-m kinks + jump pairs": lambda: R.recover_fixed_steps_from_kinks(fixed, x, t, grid=2048),
        "lattice least squares": lambda: R.lattice_attack(plain, x, t),
        "finite differences of outputs": lambda: R.recover_from_outputs(fixed, x, t),
        "random-m pairing": lambda: R.recover_random_steps(S.RandomSteps(SimulatedIGService(f, p), 6, 12, seed=0),
                                                          x, t, low=6, high=12),
    }
    for method, run in runs.items():
        res = run()
        assert isinstance(res, R.Recovery) and isinstance(res.report, R.RecoveryReport), method
        vg, mask, report = res  # tuple unpacking works
        assert vg.shape == x.shape and mask.dtype == jnp.bool_ and report.method == method
        assert len(report.queries) == 2 and all(q > 0 for q in report.queries), method
        assert report.seconds > 0 and isinstance(report.evaluations_total, int) and report.evaluations_total > 0
