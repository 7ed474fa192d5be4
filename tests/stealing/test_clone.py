"""Clone training from a victim's answers (issue: model extraction, part 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.stealing import clone as C


def _linear(p, x):
    return p["W"] @ x + p["b"]


def test_gradients_identify_what_logits_cannot():
    """A linear victim in 8 dimensions, 3 queries: logits alone leave W undetermined (3 equations per row),
    the explained classes' gradients give W exactly; the trained students show it."""
    rng = np.random.default_rng(0)
    victim = {"W": jnp.asarray(rng.standard_normal((3, 8))), "b": jnp.asarray(rng.standard_normal(3))}
    x = rng.standard_normal((3, 8))
    logits = np.asarray(jax.vmap(lambda z: _linear(victim, z))(jnp.asarray(x)))
    target = np.array([0, 1, 2])
    vg = np.asarray(victim["W"])[target]
    start = {"W": jnp.asarray(rng.standard_normal((3, 8))), "b": jnp.zeros(3, jnp.float64)}
    kw = dict(steps=8000, batch=3, learning_rate=0.01, progress=False)
    only, losses = C.train_clone(_linear, start, C.CloneData(x, logits), kind="logits", **kw)
    assert only["W"].dtype == jnp.float64 and losses[-1] < 1e-6 * losses[0]  # fits the answers...
    assert float(jnp.max(jnp.abs(only["W"] - victim["W"]))) > 0.1          # ...but not the model
    grad, _ = C.train_clone(_linear, start, C.CloneData(x, logits, target, vg), kind="vg", **kw)
    np.testing.assert_allclose(np.asarray(grad["W"]), np.asarray(victim["W"]), atol=1e-6)
    # IG answers read as gradient x input carry the same information for a linear model (zero baseline)
    ig = vg * x
    from_ig, _ = C.train_clone(_linear, start, C.CloneData(x, logits, target, ig, np.zeros_like(x)), kind="ig",
                               **kw)
    np.testing.assert_allclose(np.asarray(from_ig["W"]), np.asarray(victim["W"]), atol=1e-2)  # slower to converge


def test_metrics_and_bad_requests():
    rng = np.random.default_rng(1)
    p = {"W": jnp.asarray(rng.standard_normal((3, 8))), "b": jnp.asarray(rng.standard_normal(3))}
    x = jnp.asarray(rng.standard_normal((50, 8)))
    labels = jnp.argmax(jax.vmap(lambda z: _linear(p, z))(x), axis=1)
    m = C.clone_metrics(_linear, p, _linear, p, x, labels)
    assert m == {"agreement": 1.0, "accuracy": 1.0, "vg_distance": pytest.approx(0.0, abs=1e-7)}
    with pytest.raises(ValueError, match="unknown kind"):
        C.train_clone(_linear, p, C.CloneData(np.zeros((2, 8)), np.zeros((2, 3))), kind="grad")
    with pytest.raises(ValueError, match="needs data.target"):
        C.train_clone(_linear, p, C.CloneData(np.zeros((2, 8)), np.zeros((2, 3))), kind="vg")


@pytest.mark.parametrize("kind", C.CLONE_KINDS)
def test_batched_flax_loss_equals_per_example(kind):
    """A Flax student's loss runs on the whole batch (one module.apply); it equals the per-example (vmap) loss of
    the same model given as a plain function, value and parameter gradient, in float64."""
    import jaxrecover as jr
    model = jr.make_model("twolayer")
    params = jr.init_variables("twolayer", jax.random.key(0), jnp.float64)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.random((5, 28, 28, 1)))
    batch = (x, jnp.asarray(rng.standard_normal((5, 10))), jnp.asarray([0, 3, 9, 3, 1], jnp.int32),
             jnp.asarray(rng.standard_normal(x.shape)), jnp.asarray(rng.random(x.shape)))
    plain = jr.models.as_model(lambda p, z: model.logit_fn(p, z))
    one = jnp.asarray(0.5, jnp.float64)
    fb = jax.value_and_grad(lambda p: C._loss(model, kind, one, p, *batch))
    fp = jax.value_and_grad(lambda p: C._loss(plain, kind, one, p, *batch))
    (lb, gb), (lp, gp) = fb(params), fp(params)
    assert lb.dtype == jnp.float64 and float(lb) > 0
    np.testing.assert_allclose(float(lb), float(lp), rtol=1e-12)
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(gp)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
