"""PatternNet / PatternAttribution: estimators, one-pass statistics, the backward rules (issue: PatternNet)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrecover as jr
from jaxrecover.explainers import patterns as P


def _toy(n=4000, seed=0):
    """The slides' example: signal s along (1, 0), distractor along (1, 1); s and the distractor's amplitude
    centred and exactly uncorrelated in the sample."""
    rng = np.random.default_rng(seed)
    s, e = rng.standard_normal(n), rng.standard_normal(n)
    s -= s.mean()
    e -= e.mean()
    e -= (e @ s) / (s @ s) * s
    return np.outer(s, [1.0, 0.0]) + np.outer(e, [1.0, 1.0]), s


def test_toy_linear_estimator_finds_the_signal_and_the_filter_does_not():
    x, s = _toy()
    w = np.array([1.0, -1.0])  # the optimal filter: w^T x = s
    np.testing.assert_allclose(x @ w, s, rtol=0, atol=1e-12)
    xj = jnp.asarray(x)
    y = xj @ jnp.asarray(w)[:, None]
    pats = P.patterns_from_stats(P.layer_stats(xj, y, jnp.ones(y.shape, bool)), w[:, None])
    assert pats["linear"].dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(pats["linear"][:, 0]), [1.0, 0.0], rtol=0, atol=1e-12)  # S_a = signal
    np.testing.assert_allclose(np.asarray(pats["w"][:, 0]), [0.5, -0.5], rtol=0, atol=1e-15)      # S_w: w / w^T w
    np.testing.assert_allclose(np.outer(s, np.asarray(pats["linear"][:, 0])), np.outer(s, [1.0, 0.0]), atol=1e-11)
    x_eval, _ = _toy(seed=1)
    rho_a = P.signal_quality(x, x_eval, w, np.asarray(pats["linear"][:, 0]))
    rho_w = P.signal_quality(x, x_eval, w, np.asarray(pats["w"][:, 0]))
    assert rho_a >= rho_w and rho_a > 0.99
    assert abs(rho_w - (1 - 1 / np.sqrt(5))) < 0.03  # S_w leaves s / 2 in both coordinates: corr 1 / sqrt 5


def test_statistics_of_two_halves_merged_equal_the_whole():
    rng = np.random.default_rng(3)
    x, y = jnp.asarray(rng.standard_normal((100, 7))), jnp.asarray(rng.standard_normal((100, 4)))
    m = y > 0.2
    whole = P.layer_stats(x, y, m)
    merged = P.layer_stats(x[:37], y[:37], m[:37]).merge(P.layer_stats(x[37:], y[37:], m[37:]))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-13)


class _Tiny(nn.Module):
    """conv3x3 4 -> ReLU -> dense 5 -> ReLU -> dense 3, on 28x28x1 (make_model's input shape)."""

    @nn.compact
    def __call__(self, x, train: bool = False, part: str = "all"):
        x = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="Conv_0")(x))
        x = nn.relu(nn.Dense(5, name="Dense_0")(x.reshape(x.shape[0], -1)))
        return nn.Dense(3, name="Dense_1")(x)


def _numpy_patterns(x, w, mask):
    """The estimators by their definitions, plain numpy, float64."""
    y = x @ w
    ex, ey = x.mean(0), y.mean(0)
    cov = (x - ex).T @ (y - ey) / len(x)
    out = {"w": w / (w * w).sum(0), "linear": cov / (w * cov).sum(0)}
    relu = np.zeros_like(w)
    for j in range(w.shape[1]):
        p = mask[:, j]
        num = (x[p] * y[p, j:j + 1]).mean(0) - x[p].mean(0) * ey[j]
        relu[:, j] = num / (w[:, j] @ num)
    out["relu"] = relu
    return out


def test_dense_and_conv_patterns_equal_a_numpy_reference():
    model = jr.make_model(_Tiny())
    v = jr.init_variables(_Tiny(), jax.random.key(0), jnp.float64)
    images = jax.random.normal(jax.random.key(1), (40, 28, 28, 1), jnp.float64)
    assert P.kernel_layers(model, v, images) == ["Conv_0", "Dense_0", "Dense_1"]
    pats = P.fit_patterns(model, v, images, chunk=16, progress=False)
    p, x = jax.tree.map(np.asarray, v["params"]), np.asarray(images)
    # conv: every output position a sample, patch features ordered like the kernel's (kh, kw, C)
    k = p["Conv_0"]["kernel"]
    patches = np.stack([x[:, i:i + 26, j:j + 26, :] for i in range(3) for j in range(3)], axis=3)  # [N,26,26,9,1]
    patches = patches.reshape(-1, 9)
    conv_out = patches @ k.reshape(9, 4) + p["Conv_0"]["bias"]
    ref = _numpy_patterns(patches, k.reshape(9, 4), conv_out > 0)
    for e in P.ESTIMATORS:
        np.testing.assert_allclose(np.asarray(pats["Conv_0"][e]).reshape(9, 4), ref[e], rtol=1e-9, atol=1e-12)
    h = np.maximum(conv_out, 0).reshape(40, -1)
    w = p["Dense_0"]["kernel"]
    ref = _numpy_patterns(h, w, h @ w + p["Dense_0"]["bias"] > 0)
    for e in P.ESTIMATORS:
        np.testing.assert_allclose(np.asarray(pats["Dense_0"][e]), ref[e], rtol=1e-8, atol=1e-12)
    # the last layer has no ReLU after it: every sample counts, so "relu" equals "linear"
    np.testing.assert_allclose(np.asarray(pats["Dense_1"]["relu"]), np.asarray(pats["Dense_1"]["linear"]),
                               rtol=1e-10, atol=1e-13)


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False, part: str = "all"):
        return nn.Dense(3, name="Dense_0")(x.reshape(x.shape[0], -1))


def test_pattern_attribution_of_a_linear_model_is_w_times_a():
    model = jr.make_model(_Linear())
    v = jr.init_variables(_Linear(), jax.random.key(2), jnp.float64)
    images = jax.random.normal(jax.random.key(3), (64, 28, 28, 1), jnp.float64)
    pats = P.fit_patterns(model, v, images, progress=False)
    x, t = images[:3], jnp.array([0, 1, 2])
    got = jr.explain(jr.PatternAttribution(pats, kind="linear"), model, v, x, t)
    assert got.dtype == jnp.float64 and got.shape == x.shape
    w, a = v["params"]["Dense_0"]["kernel"], pats["Dense_0"]["linear"]
    y = jax.vmap(model, in_axes=(None, 0))(v, x)[jnp.arange(3), t]
    want = (w * a)[:, t].T * y[:, None]  # started from the output value, like iNNvestigate
    np.testing.assert_allclose(np.asarray(got).reshape(3, -1), np.asarray(want), rtol=1e-12, atol=1e-14)
    # PatternNet right after PatternAttribution (the same shapes): jit must not reuse the other's trace, so their
    # treedefs must differ (a registered dataclass and its subclass compare equal when their static fields agree)
    assert jax.tree_util.tree_structure(jr.PatternNet(pats)) != jax.tree_util.tree_structure(
        jr.PatternAttribution(pats))
    net = jr.explain(jr.PatternNet(pats, kind="linear"), model, v, x, t)
    np.testing.assert_allclose(np.asarray(net).reshape(3, -1), np.asarray(a[:, t].T * y[:, None]), rtol=1e-12)


@pytest.mark.parametrize("name", ["lenet", "twolayer"])
def test_kernels_as_patterns_give_output_times_gradient(name):
    """With each pattern set to the kernel itself the backward pass is the gradient (an exact oracle)."""
    model = jr.make_model(name)
    v = jr.init_variables(name, jax.random.key(4), jnp.float64)
    x = jax.random.normal(jax.random.key(5), (3, 28, 28, 1), jnp.float64)
    t = jnp.array([1, 4, 7])
    kernels = model.kernels(v)
    got = jr.explain(jr.PatternNet({k: {"relu": kv} for k, kv in kernels.items()}), model, v, x, t)
    vg = jr.explain(jr.VG(), model, v, x, t)
    y = jax.vmap(model, in_axes=(None, 0))(v, x)[jnp.arange(3), t]
    np.testing.assert_allclose(np.asarray(got), np.asarray(vg * y[:, None, None, None]), rtol=1e-12, atol=1e-14)


def test_batchnorm_nets_and_bad_input_are_refused():
    resnet = {"params": {}, "batch_stats": {}}  # refused on sight, before any tracing
    with pytest.raises(ValueError, match="BatchNorm and residual"):
        P.fit_patterns(jr.make_model("resnet18"), resnet, jnp.zeros((4, 28, 28, 1), jnp.float32), progress=False)
    lenet = jr.make_model("lenet")
    v = jr.init_variables("lenet", jax.random.key(0), jnp.float32)
    with pytest.raises(TypeError, match="cast the images"):
        P.fit_patterns(lenet, v, jnp.zeros((4, 28, 28, 1), jnp.float64), progress=False)
    with pytest.raises(ValueError, match="unknown estimator"):
        jr.PatternNet({}, kind="x")


def test_layer_quality_equals_per_unit_least_squares():
    """The covariance/Woodbury form of rho equals plain least squares unit by unit (linear and two-component)."""
    def data(n, seed):
        r = np.random.default_rng(seed)
        s, e = r.standard_normal(n), r.standard_normal((n, 2))
        mix = np.array([[1, 1, 0, 0, 0, 0.], [0, 0, 1, 0, 1, 0.]])
        return np.outer(s, [1, 0, 0, 1, 0, 0.]) + e @ mix + 0.3 * r.standard_normal((n, 6))

    rng = np.random.default_rng(0)
    xf, xe = data(3000, 1), data(3000, 2)
    w, a_neg, b = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)), 0.3 * rng.standard_normal(3)
    a = w / (w * w).sum(0)
    got = P.layer_signal_quality(xf, xe, w, a)
    np.testing.assert_allclose(got, [P.signal_quality(xf, xe, w[:, j], a[:, j]) for j in range(3)], atol=1e-7)
    assert np.all((got > 0.01) & (got < 0.99))  # a case where the answer is not trivially 0 or 1

    def direct(j):
        def parts(x):
            y = x @ w[:, j]
            m = y + b[j] > 0
            d = x - np.outer(np.where(m, y, 0), a[:, j]) - np.outer(np.where(m, 0, y), a_neg[:, j])
            return y - y.mean(), d - d.mean(0)
        y, d = parts(xf)
        v = np.linalg.lstsq(d, y, rcond=None)[0]
        y, d = parts(xe)
        return 1 - abs(y @ (d @ v)) / np.linalg.norm(y) / np.linalg.norm(d @ v)

    np.testing.assert_allclose(P.layer_signal_quality(xf, xe, w, a, a_neg, b), [direct(j) for j in range(3)],
                               atol=1e-7)


def test_patterns_are_stored_tied_to_weights_and_images(tmp_path):
    from jaxrecover.checkpoint import CheckpointError
    model = jr.make_model(_Linear())
    v = jr.init_variables(_Linear(), jax.random.key(2), jnp.float64)
    images = jax.random.normal(jax.random.key(3), (32, 28, 28, 1), jnp.float64)
    pats = jr.fitted_patterns(tmp_path / "p", model, v, images, progress=False)  # fitted and stored
    again = jr.load_patterns(tmp_path / "p", model, v, images)
    for a, b in zip(jax.tree.leaves(pats), jax.tree.leaves(again)):
        assert np.asarray(b).dtype == np.float64
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = jax.tree.map(lambda a: a + 1.0, v)
    with pytest.raises(CheckpointError, match="other weights"):
        jr.load_patterns(tmp_path / "p", model, other)
    with pytest.raises(CheckpointError, match="other images"):
        jr.load_patterns(tmp_path / "p", model, v, images[:16])
    refit = jr.fitted_patterns(tmp_path / "p", model, v, images[:16], progress=False)  # changed input: refitted
    assert not np.allclose(np.asarray(refit["Dense_0"]["linear"]), np.asarray(pats["Dense_0"]["linear"]))
    assert jr.load_patterns(tmp_path / "p", model, v, images[:16]) is not None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        jr.load_patterns(tmp_path / "missing", model, v)


def test_linear_patterns_give_the_kernels_back_on_the_data_support():
    """a = C w / (w^T C w) per unit, so kernel_from_pattern(a, C) = P w exactly (P: projector on C's range).
    Images with constant pixels (a zero border) make C singular: there the weights are not recoverable and
    the projection is what comes back. Conv layer: its patch covariance, full rank here, gives w itself."""
    model = jr.make_model(_Tiny())
    v = jr.init_variables(_Tiny(), jax.random.key(3), jnp.float64)
    rng = np.random.default_rng(4)
    images = np.zeros((150, 28, 28, 1))
    images[:, 4:24, 4:24] = rng.standard_normal((150, 20, 20, 1))
    pats = P.fit_patterns(model, v, jnp.asarray(images), chunk=50, progress=False)
    for path in ("Conv_0", "Dense_0"):
        x, w, _ = P.layer_samples(model, v, jnp.asarray(images), path)
        cov = np.cov(x, rowvar=False, bias=True)
        got = P.kernel_from_pattern(P.flatten_kernel(np.asarray(pats[path]["linear"])), cov)
        assert got.dtype == np.float64 and got.shape == w.shape
        s = np.linalg.svd(x - x.mean(0), full_matrices=False)
        rank = int(np.sum(s[1] > 1e-10 * s[1][0]))
        basis = s[2][:rank].T
        np.testing.assert_allclose(got, basis @ (basis.T @ w), rtol=1e-6, atol=1e-9 * np.abs(w).max())
        if path == "Conv_0":
            assert rank == w.shape[0]  # full rank: the kernel itself
            np.testing.assert_allclose(got, w, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="flat"):
        P.kernel_from_pattern(np.zeros((3, 3, 1, 4)), np.eye(9))
