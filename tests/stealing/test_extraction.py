"""Exact extraction of a two-layer ReLU net from an IG service (issue: end-to-end model extraction)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrecover as jr
from jaxrecover import attacks as R
from jaxrecover import services as S
from jaxrecover import stealing as ST


def _net(seed=1, d=8, h=6, k=3, dead_bias=None):
    """A random 8-6-3 ReLU net with biases, as (numpy params, logit_fn, jax params)."""
    rng = np.random.default_rng(seed)
    p = {"W1": rng.standard_normal((h, d)), "b1": 0.5 * rng.standard_normal(h), "W2": rng.standard_normal((k, h)),
         "b2": 0.5 * rng.standard_normal(k)}
    if dead_bias is not None:  # unit 0 never active on inputs of moderate size
        p["b1"][0] = dead_bias

    def logit_fn(q, x):
        return q["W2"] @ jax.nn.relu(q["W1"] @ x.reshape(-1) + q["b1"]) + q["b2"]

    return p, logit_fn, jax.tree.map(jnp.asarray, p)


def _data(n=20, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_right"])
def test_tiny_net_is_extracted_exactly_in_float64(rule):
    p, f, q = _net()
    svc = jr.SimulatedIGService(f, q, rule=rule)
    ex = jr.extract_two_layer(svc, _data(), classes=3, progress=False)
    assert ex.complete and ex.units == 6 and ex.dead == [] and ex.rejected == 0
    assert ex.queries == svc.queries > 0
    want = ST.canonical_two_layer(p)
    for name in ("W1", "b1", "W2", "b2"):
        assert ex.params[name].dtype == np.float64
        np.testing.assert_allclose(ex.params[name], want[name], rtol=0, atol=1e-11)
    far = 10 * np.random.default_rng(3).standard_normal((2000, 8))  # also far from the attacker's data
    assert ST.extraction_fidelity(ex.params, p, far) < 1e-12
    assert ex.consistency < 1e-12


def test_float32_service_gives_a_close_copy():
    p, f, q = _net()
    svc = jr.SimulatedIGService(f, jax.tree.map(lambda a: a.astype(jnp.float32), q), rule="gausslegendre")
    ex = jr.extract_two_layer(svc, _data().astype(np.float32), classes=3, progress=False)
    assert ex.complete and ex.units == 6
    p32 = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in p.items()}
    assert ST.extraction_fidelity(ex.params, p32, _data(500, seed=4)) < 1e-4


def test_canonical_form_removes_permutation_and_positive_scaling():
    p, _, _ = _net(seed=2)
    rng = np.random.default_rng(0)
    perm, c = rng.permutation(6), rng.uniform(0.1, 10.0, 6)
    twin = {"W1": p["W1"][perm] * c[:, None], "b1": p["b1"][perm] * c, "W2": p["W2"][:, perm] / c, "b2": p["b2"]}
    x = _data(100)
    np.testing.assert_allclose(ST.two_layer_logits(twin, x), ST.two_layer_logits(p, x), rtol=1e-12)
    a, b = ST.canonical_two_layer(p), ST.canonical_two_layer(twin)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(a["W1"], axis=1), 1.0, rtol=1e-14)
    # a unit whose output weights are all zero changes nothing and is dropped
    silent = dict(p, W2=p["W2"].copy())
    silent["W2"][:, 3] = 0.0
    assert ST.canonical_two_layer(silent)["W1"].shape == (5, 8)
    # the flax variables of TwoLayerNet's layout give the same logits
    v = ST.two_layer_variables(a, np.float64)
    assert v["params"]["Dense_0"]["kernel"].shape == (8, 6) and v["params"]["Dense_1"]["kernel"].shape == (6, 3)


def test_dead_unit_is_found_and_reported():
    p, f, q = _net(seed=1, dead_bias=-40.0)
    data = _data()
    assert not np.any(data @ p["W1"][0] + p["b1"][0] > 0)  # the premise: unit 0 is dead on the data
    svc = jr.SimulatedIGService(f, q, rule="gausslegendre")
    ex = jr.extract_two_layer(svc, data, classes=3, progress=False)
    assert ex.complete and ex.units == 6 and len(ex.dead) == 1
    want = ST.canonical_two_layer(p)
    k = ex.dead[0]
    assert abs(ex.params["b1"][k] - p["b1"][0] / np.linalg.norm(p["W1"][0])) < 1e-9
    np.testing.assert_allclose(ex.params["W1"], want["W1"], rtol=0, atol=1e-11)
    # it matters far from the data, where the copy still agrees
    far = 30 * np.random.default_rng(3).standard_normal((2000, 8))
    assert np.any(far @ p["W1"][0] + p["b1"][0] > 0)
    assert ST.extraction_fidelity(ex.params, p, far) < 1e-12


def test_budget_that_runs_out_gives_a_clear_error_and_a_partial_result():
    p, f, q = _net()
    svc = jr.SimulatedIGService(f, q, rule="gausslegendre", budget=60)
    with pytest.raises(ST.ExtractionIncomplete, match="query budget ran out") as info:
        jr.extract_two_layer(svc, _data(), classes=3, progress=False)
    part = info.value.partial
    assert isinstance(info.value, S.QueryBudgetExceeded)
    assert not part.complete and part.queries <= 60 and svc.queries <= 60
    assert "budget" in part.message and part.units < 6


def test_bad_requests_are_refused_before_any_query():
    p, f, q = _net()
    svc = jr.SimulatedIGService(f, q, rule="gausslegendre", output="prob")
    with pytest.raises(ValueError, match="logits"):
        jr.extract_two_layer(svc, _data(), classes=3, progress=False)
    assert svc.queries == 0
    svc = jr.SimulatedIGService(f, q, rule="gausslegendre")
    with pytest.raises(ValueError, match="classes"):
        jr.extract_two_layer(svc, _data(), classes=0, progress=False)
    with pytest.raises(ValueError, match="data"):
        jr.extract_two_layer(svc, np.zeros(8), classes=3, progress=False)
    assert svc.queries == 0
