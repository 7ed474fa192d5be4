import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_net
from jaxrecover import engine
from jaxrecover.engine import explain, sizing
from jaxrecover.engine.batch import explain_chunk
from jaxrecover.explainers import IG, OUTPUTS, VG, integrated_gradients, select_output


def test_vg_and_ig_dtypes_follow_the_input():
    logit_fn, params, shape = make_net("conv", jax.random.key(0), True, jnp.float32)
    x = jax.random.normal(jax.random.key(1), (3, *shape), jnp.float32)
    t = jnp.array([0, 1, 2])
    for explainer in (VG(), IG(steps=5)):
        out = explain(explainer, logit_fn, params, x, t)
        chex.assert_shape(out, x.shape)
        assert out.dtype == jnp.float32
    logit64, p64, _ = make_net("conv", jax.random.key(0), True, jnp.float64)
    out = explain(IG(steps=5), logit64, p64, x.astype(jnp.float64), t)
    assert out.dtype == jnp.float64


def test_float64_input_with_x64_off_is_a_clear_error():
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True, jnp.float32)
    with jax.enable_x64(False):
        with pytest.raises(RuntimeError, match="jax_enable_x64"):
            explain(IG(), logit_fn, params, np.zeros((2, *shape), np.float64), np.zeros(2, np.int32))


def test_bad_arguments_are_clear_errors():
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True)
    x = jnp.ones((2, *shape))
    with pytest.raises(ValueError, match="target must have shape"):
        explain(IG(), logit_fn, params, x, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="unknown output"):
        explain(IG(), logit_fn, params, x, jnp.zeros(2, jnp.int32), output="softmax")
    with pytest.raises(TypeError, match="float32 or float64"):
        explain(IG(), logit_fn, params, x.astype(jnp.int32), jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize("output", OUTPUTS)


def test_chunked_equals_unchunked_and_single_example(output):
    logit_fn, params, shape = make_net("dense4", jax.random.key(3), True)
    x = jax.random.normal(jax.random.key(4), (7, *shape))
    b = 0.1 * jax.random.normal(jax.random.key(5), (7, *shape))
    t = jnp.arange(7) % 5
    full = explain(IG(steps=9, rule="gausslegendre"), logit_fn, params, x, t, baseline=b, output=output, chunk_size=None)
    chunked = explain(IG(steps=9, rule="gausslegendre"), logit_fn, params, x, t, baseline=b, output=output, chunk_size=3)
    np.testing.assert_allclose(chunked, full, rtol=1e-12, atol=1e-14)
    f = lambda z: select_output(logit_fn(params, z), t[2], output)  # noqa: E731
    one = integrated_gradients(f, x[2], b[2], steps=9, rule="gausslegendre")
    np.testing.assert_allclose(full[2], one, rtol=1e-12, atol=1e-14)
    vg = explain(VG(), logit_fn, params, x, t, output=output, chunk_size=4)
    np.testing.assert_allclose(vg[2], jax.grad(f)(x[2]), rtol=1e-12)


def test_prob_and_logprob_outputs():
    logits = jnp.asarray([1.0, 2.0, 0.5])
    assert select_output(logits, 1, "logit") == 2.0
    np.testing.assert_allclose(select_output(logits, 1, "prob"), jax.nn.softmax(logits)[1])
    np.testing.assert_allclose(select_output(logits, 1, "logprob"), jnp.log(jax.nn.softmax(logits)[1]))


def test_jitted_ig_does_not_retrace_for_a_new_batch():
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def ig_batch(x, t):
        def one(xi, ti):
            return integrated_gradients(lambda z: logit_fn(params, z)[ti], xi, steps=10)
        return jax.vmap(one)(x, t)

    for seed in range(3):
        x = jax.random.normal(jax.random.key(seed), (4, *shape))
        ig_batch(x, jnp.arange(4) % 5)
    # the library's chunked path: one compilation for every equal-shaped chunk
    explain_chunk.clear_cache()
    x = jax.random.normal(jax.random.key(9), (10, *shape))
    explain(IG(steps=10), logit_fn, params, x, jnp.arange(10) % 5, chunk_size=4)
    assert explain_chunk._cache_size() == 1


@pytest.mark.parametrize("name", ["twolayer", "lenet", "resnet18"])
@pytest.mark.parametrize("rule", ["riemann_right", "gausslegendre", "ig_original"])


def test_affine_stem_ig_equals_plain_ig_on_the_models(name, rule):
    """The stem factorisation is an identity: float64, random weights, a random baseline, every output."""
    from jaxrecover import models

    v = models.init_variables(name, jax.random.key(0), jnp.float64)
    logit_fn = models.make_model(name)
    assert logit_fn.affine_stem is not None
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1), jnp.float64)
    b = 0.2 * jax.random.uniform(jax.random.key(2), (3, 28, 28, 1), jnp.float64)
    t = jnp.asarray([0, 3, 7], jnp.int32)
    for output in ("logit", "logprob"):
        kw = dict(baseline=b, output=output, chunk_size=2)
        fast = explain(IG(steps=6, rule=rule, factor_stem=True), logit_fn, v, x, t, **kw)
        plain = explain(IG(steps=6, rule=rule, factor_stem=False), logit_fn, v, x, t, **kw)
        assert fast.dtype == jnp.float64
        np.testing.assert_allclose(fast, plain, rtol=1e-10, atol=1e-12 * float(jnp.abs(plain).max()))


def test_auto_chunk_size_follows_the_forward_footprint():
    from jaxrecover import models

    x_one = jnp.zeros((28, 28, 1), jnp.float32)
    sizes = {}
    for name in ("twolayer", "lenet"):
        v = models.init_variables(name, jax.random.key(0), jnp.float32)
        f = models.make_model(name)
        per_point = engine.forward_bytes(f, v, x_one)
        # at least the activations the model must hold: its hidden layer / its conv outputs
        assert per_point >= {"twolayer": 100 * 4, "lenet": (26 * 26 * 32 + 24 * 24 * 64) * 4}[name]
        sizes[name] = engine.auto_chunk_size(f, v, x_one, 50, 2000)
        assert sizes[name] == max(1, min(2000, sizing.AUTO_CHUNK_MAX, sizing.AUTO_CHUNK_BYTES // (50 * per_point)))
        assert engine.auto_chunk_size(f, v, x_one, 50, 3) <= 3
    assert sizes["twolayer"] == sizing.AUTO_CHUNK_MAX and 1 <= sizes["lenet"] < 64
    # the default chunking gives the same attributions as one chunk
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True)
    x = jax.random.normal(jax.random.key(1), (5, *shape))
    np.testing.assert_allclose(explain(IG(), logit_fn, params, x, jnp.arange(5) % 3),
                               explain(IG(), logit_fn, params, x, jnp.arange(5) % 3, chunk_size=None), rtol=1e-12)


def test_micro_batch_loop_equals_one_vmap():
    """A lax.map over micro-batches (with a remainder) computes the same IG as one vmap: float64 LeNet."""
    from jaxrecover import models

    v = models.init_variables("lenet", jax.random.key(0), jnp.float64)
    logit_fn = models.make_model("lenet")
    x = jax.random.uniform(jax.random.key(1), (5, 28, 28, 1), jnp.float64)
    t = jnp.asarray([0, 3, 7, 1, 9], jnp.int32)
    kw = dict(chunk_size=5)
    one_vmap = explain(IG(steps=4), logit_fn, v, x, t, micro_batch=None, **kw)
    for micro in (1, 2):
        looped = explain(IG(steps=4), logit_fn, v, x, t, micro_batch=micro, **kw)
        assert looped.dtype == jnp.float64
        np.testing.assert_allclose(looped, one_vmap, rtol=1e-12, atol=1e-14 * float(jnp.abs(one_vmap).max()))
    with pytest.raises(ValueError, match="micro_batch must be"):
        explain(IG(), logit_fn, v, x, t, micro_batch=0, **kw)
    with pytest.raises(ValueError, match="micro_batch must be"):
        explain(IG(), logit_fn, v, x, t, micro_batch="big", **kw)


def test_auto_micro_batch_by_footprint_and_weights(monkeypatch):
    from jaxrecover import models

    x_one = jnp.zeros((28, 28, 1), jnp.float32)
    got = {}
    for name in ("twolayer", "lenet", "resnet18"):
        v = models.init_variables(name, jax.random.key(0), jnp.float32)
        f = models.make_model(name)
        per_example = 50 * engine.forward_bytes(f, v, x_one)
        weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(v))
        got[name] = engine.auto_micro_batch(f, v, x_one, 50)
        if per_example < sizing.AUTO_LOOP_BYTES:
            assert got[name] is None
        else:
            assert got[name] == max(1, -(-sizing.AUTO_LOOP_WEIGHT_RATIO * weights // per_example))
    # the models of the paper: two-layer nets one vmap, LeNet one image, ResNet18 (45 MB of weights) more
    assert got["twolayer"] is None and got["lenet"] == 1 and got["resnet18"] > 1
    assert engine.auto_chunk_size(f, v, x_one, 50, 1000, micro_batch=got["resnet18"]) == sizing.AUTO_LOOP_CHUNK
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert engine.auto_micro_batch(f, v, x_one, 50) is None  # accelerators: one vmap per chunk


def test_bad_batches_are_clear_errors():
    """Issue 10/11: empty batches, out-of-range or fractional targets, non-finite inputs, odd baselines."""
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True)  # 5 classes
    x = jax.random.normal(jax.random.key(1), (3, *shape))
    with pytest.raises(ValueError, match="non-empty batch"):
        explain(VG(), logit_fn, params, x[:0], jnp.zeros(0, jnp.int32))
    for bad in ([0, 1, 5], [0, -1, 2]):
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\)"):
            explain(VG(), logit_fn, params, x, jnp.asarray(bad))
    with pytest.raises(TypeError, match="integer class indices"):
        explain(VG(), logit_fn, params, x, np.asarray([0.0, 3.7, 1.0]))
    for value in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN/inf"):
            explain(IG(steps=3), logit_fn, params, x.at[1, 2].set(value), jnp.arange(3))
    with pytest.raises(ValueError, match="baseline must have shape"):
        explain(IG(steps=3), logit_fn, params, x, jnp.arange(3), baseline=jnp.zeros((2, *shape)))
    with pytest.raises(TypeError, match="Explainer"):
        explain("ig", logit_fn, params, x, jnp.arange(3))
    # a single int target explains that class for every example
    np.testing.assert_array_equal(explain(VG(), logit_fn, params, x, 2), explain(VG(), logit_fn, params, x,
                                                                               jnp.full(3, 2)))


def test_convergence_delta_is_captums_completeness():
    logit_fn, params, shape = make_net("dense2", jax.random.key(0), True)
    x = jax.random.normal(jax.random.key(1), (4, *shape))
    t = jnp.arange(4) % 5
    f = jax.vmap(lambda xi, ti: logit_fn(params, xi)[ti])
    coarse = explain(IG(steps=4), logit_fn, params, x, t)
    delta = engine.convergence_delta(logit_fn, params, x, t, coarse)
    np.testing.assert_allclose(delta, coarse.reshape(4, -1).sum(1) - (f(x, t) - f(jnp.zeros_like(x), t)),
                               rtol=1e-12, atol=1e-12)
    fine = explain(IG(steps=400, rule="riemann_middle"), logit_fn, params, x, t)
    fine_delta = float(jnp.abs(engine.convergence_delta(logit_fn, params, x, t, fine)).max())
    assert fine_delta < float(jnp.abs(delta).max()) / 5, (fine_delta, delta)
