"""Boundary Attribution: boundary search and the BSM / BIG / BSG explainers (issue: Boundary Attribution)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrecover as jr
from jaxrecover import search as B

FREE = B.InputBox(None, None)


def _linear(p, x):
    return p["W"] @ x + p["b"]


def _two_class_linear(seed=0, d=6):
    rng = np.random.default_rng(seed)
    return {"W": jnp.asarray(rng.standard_normal((2, d))), "b": jnp.asarray(rng.standard_normal(2))}


def test_linear_boundary_point_is_the_orthogonal_projection_and_bsm_its_normal():
    p = _two_class_linear()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, 6)))
    labels = jnp.argmax(jax.vmap(lambda z: _linear(p, z))(x), axis=1).astype(jnp.int32)
    res = B.boundary_search(_linear, p, x, labels, methods=("facet",), box=FREE)
    assert res.point.dtype == jnp.float64 and bool(jnp.all(res.success))
    w = p["W"][1] - p["W"][0]
    c = p["b"][1] - p["b"][0]
    proj = x - ((x @ w + c) / (w @ w))[:, None] * w[None]       # onto the hyperplane w.z + c = 0
    np.testing.assert_allclose(np.asarray(res.point), np.asarray(proj), atol=1e-12)
    np.testing.assert_allclose(np.asarray(res.distance), np.abs(np.asarray(x @ w + c)) / np.linalg.norm(w),
                               rtol=1e-10)
    assert bool(jnp.all(res.label != labels)) and bool(jnp.all(res.method == B.SEARCH_METHODS.index("facet")))
    bsm = jr.boundary_attributions(jr.BSM(), _linear, p, x, labels, res)
    np.testing.assert_allclose(np.asarray(bsm), np.asarray(p["W"][labels]), atol=1e-14)  # the logit's gradient
    # the boundary's normal: the difference of the two classes' BSM
    np.testing.assert_allclose(np.asarray(jr.boundary_attributions(jr.BSM(), _linear, p, x, 1 - labels, res) - bsm),
                               np.asarray(jnp.where(labels[:, None] == 0, w, -w)), atol=1e-14)


class _Net:
    """A small 2-layer ReLU net (5 inputs, 16 hidden, 3 classes)."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.p = {"W1": jnp.asarray(rng.standard_normal((16, 5))), "b1": jnp.asarray(rng.standard_normal(16)),
                  "W2": jnp.asarray(rng.standard_normal((3, 16))), "b2": jnp.asarray(rng.standard_normal(3))}

    @staticmethod
    def f(p, x):
        return p["W2"] @ jax.nn.relu(p["W1"] @ x + p["b1"]) + p["b2"]


def test_relu_net_boundary_points_tie_and_nothing_closer_along_random_directions():
    net = _Net()
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((6, 5)))
    f = jax.vmap(lambda z: net.f(net.p, z))
    labels = jnp.argmax(f(x), axis=1).astype(jnp.int32)
    res = B.boundary_search(net.f, net.p, x, labels, methods=("facet",), box=FREE)
    few = B.boundary_search(net.f, net.p, x, labels, methods=("facet",), box=FREE, facet_starts=1)
    assert bool(jnp.all(few.success)) and bool(jnp.all(few.label != labels))
    assert bool(jnp.all(few.distance >= res.distance - 1e-12))  # fewer starts: never closer than all of them
    assert bool(jnp.all(res.success))
    logits = np.asarray(f(res.point))
    own = logits[np.arange(6), np.asarray(labels)]
    best_other = np.max(np.where(np.eye(3)[np.asarray(labels)] > 0, -np.inf, logits), axis=1)
    np.testing.assert_allclose(own, best_other, atol=1e-9)  # a logit tie: on the boundary
    # along 200 random directions, the label does not change before the returned distance (minus a little)
    dirs = rng.standard_normal((200, 5))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    for i in range(6):
        r = float(res.distance[i]) * 0.999
        ts = np.linspace(0, r, 50)[1:]
        z = np.asarray(x[i])[None, None] + ts[None, :, None] * dirs[:, None, :]
        pred = np.argmax(np.asarray(f(jnp.asarray(z.reshape(-1, 5)))), axis=1)
        frac = np.mean(pred != int(labels[i]))
        assert frac == 0, (i, frac)


def test_pgd_and_cw_find_label_changes_batched_equals_single_and_dtypes_kept():
    model = jr.make_model("twolayer")
    for dtype in (jnp.float32, jnp.float64):
        v = jr.init_variables("twolayer", jax.random.key(0), dtype)
        x = jnp.asarray(np.random.default_rng(3).random((4, 28, 28, 1)), dtype)
        labels = jnp.argmax(model.batched(v, x), axis=1).astype(jnp.int32)
        res = B.boundary_search(model, v, x, labels, methods=("pgd", "cw"), cw_steps=30)
        assert res.point.dtype == dtype and res.distance.dtype == dtype
        assert bool(jnp.all(res.success)), res.distance
        assert bool(jnp.all(res.label[res.success] != labels[res.success]))
        box = B.InputBox.mnist()
        assert float(res.point.min()) >= box.lower - 1e-6 and float(res.point.max()) <= box.upper + 1e-6
    one = B.cw_l2(model, v, x[1:2], labels[1:2], steps=30, box=box)
    many = B.cw_l2(model, v, x, labels, steps=30, box=box)
    np.testing.assert_allclose(np.asarray(one[0][0]), np.asarray(many[0][1]), atol=1e-10)  # independent examples
    with pytest.raises(ValueError, match="unknown boundary search"):
        B.boundary_search(model, v, x, labels, methods=("fgsm",))


def test_failed_searches_are_masked_never_a_fallback():
    p = _two_class_linear(d=4)
    x = jnp.zeros((2, 4), jnp.float64) + jnp.asarray([[0.0], [5.0]])
    labels = jnp.argmax(jax.vmap(lambda z: _linear(p, z))(x), axis=1).astype(jnp.int32)
    res = B.BoundaryResult(point=x + 0.1, success=jnp.asarray([True, False]), distance=jnp.asarray([0.2, jnp.inf]),
                           label=labels, method=jnp.asarray([2, -1]))
    for e in (jr.BSM(), jr.BIG(), jr.BSG(samples=4)):
        out = np.asarray(jr.boundary_attributions(e, _linear, p, x, labels, res))
        assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1]))
    # BIG is IG from the boundary point: for a linear model, completeness f(x) - f(x') times the weights' sum
    # (Captum's riemann_trapezoid weights sum to 1 - 1/n)
    big = jr.boundary_attributions(jr.BIG(), _linear, p, x, labels, res)
    gap = jax.vmap(lambda z, b, k: _linear(p, z)[k] - _linear(p, b)[k])(x, res.point, labels)
    _, weights = jr.explainers.quadrature("riemann_trapezoid", 10)
    np.testing.assert_allclose(float(jnp.sum(big[0])), weights.sum() * float(gap[0]), rtol=1e-12)


def test_big_service_and_the_nearest_point_shared_along_the_segment():
    """BoundaryBaseline makes a BIG service; its baseline moves with the input, so ray plans refuse it. But every
    point x_c = x' + c (x - x') (0 < c <= 1) has the same nearest boundary point x' (triangle inequality): the
    fact a baseline-free attack could use. Checked on the 5-16-3 ReLU net (float64)."""
    from jaxrecover import attacks as R
    from jaxrecover import services as S
    net = _Net()
    model = jr.models.as_model(net.f)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((6, 5)))
    base = jr.BoundaryBaseline(model, net.p, box=FREE)
    service = S.SimulatedIGService(model, net.p, rule="riemann_trapezoid", steps=10, baseline=base)
    labels = jnp.argmax(model.batched(net.p, x), axis=1).astype(jnp.int32)
    answers = service(x, labels)
    xp = base.last.point
    assert answers.dtype == jnp.float64 and bool(jnp.all(base.last.success))
    np.testing.assert_allclose(np.asarray(answers), np.asarray(
        jr.boundary_attributions(jr.BIG(), model, net.p, x, labels, base.last)), atol=1e-12)
    with pytest.raises(ValueError, match="depends on the input"):
        service.fixed_baseline(x)
    for c in (0.3, 0.7):
        np.testing.assert_allclose(np.asarray(base(xp + c * (x - xp))), np.asarray(xp), atol=1e-7)


def test_big_leaks_vg_once_probes_reveal_the_boundary_point():
    """A BIG service (baseline = each query's nearest boundary point, unknown to the attacker): d + 1 probes
    give the point exactly where the service's search is stable (probe answers proportional: misfit at
    round-off), and the plan on the segment from it then recovers VG to round-off; a zero-baseline guess
    does not."""
    from conftest import make_net

    f, p, shape = make_net("dense2", jax.random.key(3), True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8,) + shape))
    labels = jnp.argmax(jax.vmap(lambda z: f(p, z))(x), axis=1).astype(jnp.int32)
    big = jr.SimulatedIGService(f, p, rule="riemann_trapezoid", steps=10, baseline=jr.BoundaryBaseline(f, p, box=FREE))
    res = B.boundary_search(f, p, x, labels, methods=("facet",), box=FREE)
    vg = jax.vmap(jax.grad(lambda z, t: f(p, z)[t]))(x, labels)
    points, rep = jr.attacks.estimate_boundary_point(big, x, labels)
    assert points.dtype == np.float64 and rep.queries == [13] * 8 and big.queries == 8 * 13
    stable = np.asarray(rep.misfit) < 1e-9
    assert stable.sum() >= 4, rep.misfit
    np.testing.assert_allclose(points[stable], np.asarray(res.point)[stable], atol=1e-9)
    g, mask, _ = jr.attacks.recover_from_big(big, x, labels, plan=jr.exact_plan("riemann_trapezoid", 50))
    d = np.asarray(jr.normalized_distance(g, vg))
    assert np.all(d[stable] < 1e-8), d
    naive, _, _ = jr.attacks.attack(jr.AssumedBaseline(big, jnp.zeros_like(x)), jr.exact_plan("riemann_trapezoid", 50),
                                 x, labels)
    assert np.min(np.asarray(jr.normalized_distance(naive, vg))) > 0.1
