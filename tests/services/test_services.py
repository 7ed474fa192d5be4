"""Real IG services (Captum, PAIR saliency), service-aware plans, fixed-step recovery and identification."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrecover as jr
from jaxrecover import attacks as R
from jaxrecover.explainers import integrate, path_gradients, select_output


def _rel(a, b):
    return float(jnp.nanmax(jnp.abs(a - b)) / jnp.nanmax(jnp.abs(b)))


def _biased(variables, dtype, scale=0.05, seed=3):
    """Trained-like weights: init plus noise, so biases are non-zero and the net is not homogeneous."""
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(variables))))
    return jax.tree.map(lambda a: (a + scale * jax.random.normal(next(keys), a.shape, a.dtype)).astype(dtype),
                        variables)


@pytest.fixture(scope="module")
def twolayer64():
    v = _biased(jr.init_variables("twolayer", jax.random.key(0), dtype=jnp.float64), jnp.float64)
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1), jnp.float64, -0.5, 2.0)
    t = jnp.array([3, 1, 4, 1])
    return jr.make_model("twolayer"), v, x, t


# ----------------------------------------------------------------------------------------- Captum conformance
captum = pytest.importorskip("captum", reason="the 'services' extra (captum) is not installed")
from jaxrecover.services.external import CAPTUM_RULES, CaptumIGService, SaliencyIGService  # noqa: E402


@pytest.mark.parametrize("name", jr.MODEL_NAMES)
def test_torch_twin_logits_equal_ours(name):
    v = _biased(jr.init_variables(name, jax.random.key(0), dtype=jnp.float64), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1), jnp.float64)
    ours = np.asarray(jax.vmap(lambda xi: jr.make_model(name)(v, xi))(x))
    theirs = CaptumIGService(name, v).logits(np.asarray(x))
    assert theirs.dtype == np.float64
    assert np.max(np.abs(ours - theirs)) <= 1e-12 * np.max(np.abs(ours))


@pytest.mark.parametrize("rule", list(CAPTUM_RULES))
@pytest.mark.parametrize("output", ["logit", "prob"])
def test_captum_answers_are_the_declared_quadrature(twolayer64, rule, output):
    """Captum's answer = (x - b) sum_j w_j grad f(b + a_j (x - b)) with the nodes/weights it declares."""
    model, v, x, t = twolayer64
    b = jnp.full_like(x, -0.25)
    svc = CaptumIGService("twolayer", v, rule=rule, steps=7, baseline=b[0], output=output)
    ans = svc(x, t)
    assert ans.dtype == jnp.float64 and ans.shape == x.shape
    nodes, weights = svc.quadrature(7)
    for i in range(x.shape[0]):
        f = lambda z, i=i: select_output(model(v, z), t[i], output)  # noqa: E731
        ref = (x[i] - b[i]) * integrate(weights, path_gradients(f, x[i], b[i], nodes))
        assert _rel(ans[i], ref) <= 1e-12
    # and its nodes are NOT the ideal ones (float32 linspace / float32 weights), except where exact
    ideal_nodes, ideal_weights = jr.quadrature(rule, 7)
    assert np.max(np.abs(nodes - ideal_nodes)) + np.max(np.abs(weights - ideal_weights)) > 0


@pytest.mark.parametrize("rule", list(CAPTUM_RULES))
def test_service_aware_plan_recovers_vg_from_captum_float64(twolayer64, rule):
    model, v, x, t = twolayer64
    svc = CaptumIGService("twolayer", v, rule=rule)
    vg = jr.explain(jr.VG(), model, v, x, t)
    plan = R.best_plan(svc)
    rec, mask, _ = R.attack(svc, plan, x, t)
    assert rec.dtype == jnp.float64
    assert _rel(rec, vg) <= 1e-12, (plan, _rel(rec, vg))
    naive = R.exact_plan(rule, 50)
    if rule != "gausslegendre":  # the ideal plan on Captum's float32 nodes/weights does not cancel
        assert R.actual_residual(naive, svc.quadrature) > 1e-9
    if plan.exact:
        assert R.actual_residual(plan, svc.quadrature) <= 1e-12
    else:  # riemann_middle: no plan keeps its shared points on Captum's float32 nodes; the cheapest that does so
        # to float32 round-off (5 evaluations), with its assumption stated, before the 54-evaluation telescoping
        assert rule == "riemann_middle" and plan.name.endswith("~f32") and plan.evaluations == 5
        assert "boundary" in plan.assumption


def test_captum_service_float32_and_softmax(twolayer64):
    model, v, x, t = twolayer64
    v32, x32 = jr.cast_variables(v, jnp.float32), x.astype(jnp.float32)
    svc = CaptumIGService("twolayer", v32, rule="gausslegendre", output="prob")
    rec, _, _ = R.attack(svc, R.best_plan(svc), x32, t)
    assert rec.dtype == jnp.float32
    vg = jr.explain(jr.VG(), model, v, x, t, output="prob")
    assert _rel(rec.astype(jnp.float64), vg) <= 1e-5


def test_pair_saliency_service(twolayer64):
    pytest.importorskip("saliency")
    model, v, x, t = twolayer64
    svc = SaliencyIGService(model, v, steps=9)
    ours = jr.SimulatedIGService(model, v, rule="saliency", steps=9)(x, t)
    ans = svc(x, t)
    assert ans.dtype == jnp.float64
    assert 0 < _rel(ans, ours) <= 1e-6  # PAIR accumulates in float32 whatever the input dtype
    rec, _, _ = R.attack(svc, R.best_plan(svc), x, t)
    vg = jr.explain(jr.VG(), model, v, x, t)
    assert _rel(rec, vg) <= 1e-6


def test_services_report_outputs(twolayer64):
    model, v, x, t = twolayer64
    for svc in (jr.SimulatedIGService(model, v), CaptumIGService("twolayer", v)):
        fx, fb = svc.outputs(x, t)
        ref = jax.vmap(lambda xi, ti: model(v, xi)[ti])(x, t)
        assert _rel(fx, ref) <= 1e-12 and fb.shape == (4,)


# ----------------------------------------------------------------------------------------- plans on actual nodes
def test_realised_plan_is_exact_on_captum_nodes_and_counts_evaluations():
    v = jr.init_variables("twolayer", jax.random.key(0), dtype=jnp.float64)
    svc = CaptumIGService("twolayer", v, rule="riemann_right")
    plan = R.service_plan(svc)
    assert plan.exact and plan.evaluations == 5
    assert R.actual_residual(plan, svc.quadrature) <= 1e-15
    assert R.plans.realise_plan(R.exact_plan("riemann_right", 50), svc.quadrature) is None  # float32 linspace


def test_service_plan_refuses_fixed_step_services(twolayer64):
    model, v, x, t = twolayer64
    with pytest.raises(ValueError, match="recover_fixed_steps"):
        R.service_plan(jr.SimulatedIGService(model, v, steps=50, fixed_steps=True))




# ----------------------------------------------------------------------------------------- bit-identical shared points
def test_bitwise_shared_tells_dyadic_coincidences_from_ulp_ones():
    v = jr.init_variables("twolayer", jax.random.key(0), dtype=jnp.float64)
    right = CaptumIGService("twolayer", v, rule="riemann_right")
    left = CaptumIGService("twolayer", v, rule="riemann_left")
    p_right = R.best_plan(right)
    # Captum's float32 alpha_2(3) = 2 alpha_1(3) exactly: the paired m = 3 plan shares bit-identical points
    assert R.bitwise_shared(p_right, right.quadrature, jnp.float64)
    # riemann_left's paired plans only coincide to ulps (1.5 * 0.33333334f is not 0.5) ...
    paired = [p for m in range(3, 65)
              if (p := R.realise_plan(R.exact_plan("riemann_left", m), left.quadrature)) is not None]
    assert paired and not any(R.bitwise_shared(p, left.quadrature, jnp.float64) for p in paired)
    assert R.actual_residual(paired[0], left.quadrature) <= 1e-12
    # ... so the library searches the single-rounding plans: fl(0.75 * 4x) = fl(3x) = 0.5 * fl(6x)
    p_left = R.best_plan(left)
    assert p_left.name == "bitwise@service" and p_left.evaluations == 10
    assert R.bitwise_shared(p_left, left.quadrature, jnp.float64)
    assert R.actual_residual(p_left, left.quadrature) <= 1e-15


def test_bitwise_plan_search_finds_the_riemann_left_plan_and_none_for_riemann_middle():
    plan = R.bitwise_plan("riemann_left")
    got = sorted((q.scale, q.steps, round(lam, 9)) for q, lam in zip(plan.queries, plan.coeffs))
    assert got == [(2.0, 2, 1.0), (4.0, 2, -1.0), (4.0, 4, 2.0), (6.0, 2, -1.0)]
    assert R.plan_residual(plan) <= 1e-15 and R.bitwise_shared(plan, lambda n: jr.quadrature("riemann_left", n))
    # riemann_middle: the largest point of any plan is a top node (2n - 1) / (2n), never a power of two
    assert R.bitwise_plan("riemann_middle") is None
    assert R.bitwise_plan("riemann_middle", max_steps=12, odd_factors=(1, 3, 5, 7, 9, 11)) is None
    # a rule with a power-of-two top node at n = 2 has one; a plan is exact on the ideal nodes
    assert R.plan_residual(R.bitwise_plan("riemann_trapezoid")) <= 1e-15


@pytest.mark.parametrize("rule", ["riemann_right", "riemann_left"])
def test_captum_gradient_is_the_twins_autograd_and_bitwise_plans_recover_it_on_max_pool_ties(mnist, rule):
    """On MNIST's constant background LeNet's max-pool windows tie; PyTorch's conv breaks such ties by round-off,
    so a point one ulp away has another gradient. Bit-identical shared points recover the twin's VG exactly."""
    v = _biased(jr.init_variables("lenet", jax.random.key(0), dtype=jnp.float64), jnp.float64)
    x = jnp.asarray(jr.normalize(mnist.test_images[:3], dtype=np.float64))
    t = jnp.asarray(mnist.test_labels[:3])
    svc = CaptumIGService("lenet", v, rule=rule)
    g = svc.gradient(x, t)
    assert g.dtype == jnp.float64 and g.shape == x.shape
    xr = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)  # no ties: the twin's VG is ours
    assert _rel(svc.gradient(xr, t), jr.explain(jr.VG(), jr.make_model("lenet"), v, xr, t)) <= 1e-10
    plan = R.best_plan(svc)
    assert R.bitwise_shared(plan, svc.quadrature, jnp.float64)
    rec, mask, _ = R.attack(svc, plan, x, t)
    assert _rel(jnp.where(mask, rec, 0.0), jnp.where(mask, g, 0.0)) <= 1e-12


def test_ulp_sensitivity_study_prints_its_table_and_riemann_middle_never_evaluates_at_x(tmp_path):
    """The ulp-sensitivity study (SERVICES.md's evidence that riemann_middle cannot reach round-off on max-pool
    nets): runs on random weights, and the riemann_middle plan's largest point is never x bit-identically."""
    from jaxrecover.studies import get_study, run_study

    study = get_study("ulp-sensitivity")
    res = run_study(study, study.make_config(models=("lenet",), n=2, weights=("random",)), out=tmp_path,
                    checkpoints=tmp_path / "ckpt", progress=False)
    row = next(line for line in res.markdown.splitlines() if line.startswith("| lenet | random init"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[-1] == "0 of 2" and cells[-3].startswith("paired-m3@service~f32")
    jax_down = [float(v) for v in cells[5].split(" / ")]
    assert max(jax_down) <= 1e-15     # JAX's VG moves by round-off only (XLA computes tied windows identically)
