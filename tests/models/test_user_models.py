"""Your own model: Flax NNX modules, Linen modules of any input shape and plain functions, through the explainers,
the services and attacks, PatternNet and the boundary search (float64 oracles: the module's own autograd and
the same weights in a Linen twin, whose paths are tested against numpy and Foolbox elsewhere)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxrecover as jr
from jaxrecover.explainers import patterns as P


class NCNN(nnx.Module):
    """conv 3x3 (4) -> ReLU -> dense 5 -> ReLU -> dense 3, with biases: a sequential ReLU CNN in NNX."""

    def __init__(self, rngs, bn: bool = False):
        self.conv = nnx.Conv(1, 4, (3, 3), padding="VALID", rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs) if bn else None
        self.hidden = nnx.Linear(4 * 10 * 10, 5, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        h = self.conv(x)
        h = jax.nn.relu(self.bn(h) if self.bn is not None else h)
        h = jax.nn.relu(self.hidden(h.reshape(h.shape[0], -1)))
        return self.out(h)


class LCNN(nn.Module):
    """The same net in Linen (its layers named like the library's: the Linen twin of :class:`NCNN`)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="Conv_0")(x))
        h = nn.relu(nn.Dense(5, name="Dense_0")(h.reshape(h.shape[0], -1)))
        return nn.Dense(3, name="Dense_1")(h)


def _biased(net):
    """Non-zero biases (NNX initialises them to zero: the net would be positively homogeneous)."""
    for i, layer in enumerate((net.conv, net.hidden, net.out)):
        layer.bias[...] = 0.3 * jax.random.normal(jax.random.key(10 + i), layer.bias.shape, jnp.float32)
    return net


@pytest.fixture(scope="module")
def nets():
    net = _biased(NCNN(nnx.Rngs(0)))
    v = jr.cast_variables(jr.model_variables(net), jnp.float64)
    p = v["params"]
    lv = {"params": {"Conv_0": p["conv"], "Dense_0": p["hidden"], "Dense_1": p["out"]}}
    x = jax.random.normal(jax.random.key(1), (6, 12, 12, 1), jnp.float64)
    return net, v, LCNN(), lv, x


def test_nnx_model_explains_like_its_own_autograd(nets):
    net, v, _, _, x = nets
    model = jr.as_model(net, example=x[0])
    assert model is not jr.as_model(net) and jr.as_model(net) is jr.as_model(net)  # built once per module
    assert set(v) == {"params"} and jr.models.tree_dtypes(v) == {jnp.dtype(jnp.float64)}
    t = jnp.array([0, 1, 2, 0, 1, 2])
    vg = jr.explain(jr.VG(), model, v, x, t)
    own = jnp.stack([jax.grad(lambda z: net(z[None].astype(jnp.float32))[0, k].astype(jnp.float64))(xi)
                     for xi, k in zip(x, t)])  # the user's float32 module itself
    assert vg.dtype == jnp.float64 and vg.shape == x.shape
    np.testing.assert_allclose(np.asarray(vg), np.asarray(own), rtol=1e-4, atol=1e-5)
    logits = model.batched(v, x)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(jax.vmap(model, (None, 0))(v, x)))
    ig = jr.explain(jr.IG(steps=16, rule="riemann_right"), model, v, x, t)
    by_hand = jnp.stack([xi * sum(jax.grad(lambda z: model(v, z)[k])(xi * j / 16) for j in range(1, 17)) / 16
                         for xi, k in zip(x, t)])
    np.testing.assert_allclose(np.asarray(ig), np.asarray(by_hand), rtol=1e-11, atol=1e-13)


def test_nnx_model_through_a_service_and_the_exact_plan(nets):
    net, v, _, _, x = nets
    t = jnp.array([2, 1, 0, 2, 1, 0])
    service = jr.SimulatedIGService(net, v, rule="gausslegendre", steps=50)
    rec, mask, report = jr.attack(service, jr.best_plan(service), x, t)
    vg = jr.explain(jr.VG(), net, v, x, t)
    assert bool(mask.all()) and float(jnp.max(jr.normalized_distance(vg, rec))) < 1e-10
    assert sum(report.queries) == service.queries == len(x)  # the gausslegendre midpoint: one query per image


def test_nnx_patterns_and_pattern_attribution_equal_the_linen_twin(nets):
    net, v, lm, lv, x = nets
    images = jax.random.normal(jax.random.key(2), (48, 12, 12, 1), jnp.float64)
    nm, lmod = jr.as_model(net), jr.as_model(lm)
    assert P.kernel_layers(nm, v, images) == ["conv", "hidden", "out"]
    pn, pl = (P.fit_patterns(m, w, images, chunk=16, progress=False) for m, w in ((nm, v), (lmod, lv)))
    for a, b in zip(("conv", "hidden", "out"), ("Conv_0", "Dense_0", "Dense_1")):
        for e in P.ESTIMATORS:
            np.testing.assert_allclose(np.asarray(pn[a][e]), np.asarray(pl[b][e]), rtol=1e-10, atol=1e-13)
    renamed = {b: pn[a] for a, b in zip(("conv", "hidden", "out"), ("Conv_0", "Dense_0", "Dense_1"))}
    t = jnp.array([0, 1, 2, 0, 1, 2])
    for cls in (jr.PatternNet, jr.PatternAttribution):
        got = jr.explain(cls(pn), nm, v, x, t)
        want = jr.explain(cls(renamed), lmod, lv, x, t)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-13)


def test_nnx_boundary_search_equals_the_linen_twin(nets):
    net, v, lm, lv, x = nets
    labels = jnp.argmax(jr.as_model(net).batched(v, x), axis=1).astype(jnp.int32)
    box = jr.InputBox(lower=None, upper=None, scale=1.0)
    a = jr.boundary_search(net, v, x, labels, methods=("pgd", "facet"), box=box)
    b = jr.boundary_search(jr.as_model(lm), lv, x, labels, methods=("pgd", "facet"), box=box)
    np.testing.assert_allclose(np.asarray(a.distance), np.asarray(b.distance), rtol=1e-9, atol=1e-12)
    assert bool(jnp.all(a.success)) and bool(jnp.all(a.label != labels))
    np.testing.assert_array_equal(np.asarray(a.label), np.asarray(b.label))


def test_linen_module_of_any_input_shape():
    class RGB(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
            return nn.Dense(7)(h.reshape(h.shape[0], -1))

    module = RGB()
    v = jr.init_variables(module, jax.random.key(0), jnp.float64, example=(16, 16, 3), biases="torch")
    model = jr.as_model(module, example=(16, 16, 3))
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), jnp.float64)
    vg = jr.explain(jr.VG(), model, v, x, jnp.array([0, 6]))
    want = jax.grad(lambda z: module.apply(v, z[None])[0, 6])(x[1])
    np.testing.assert_allclose(np.asarray(vg[1]), np.asarray(want), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"takes examples of shape \(16, 16, 3\).*x\[None\]"):
        jr.explain(jr.VG(), model, v, x[0], 0)
    with pytest.raises(ValueError, match="takes ONE example of shape"):
        model(v, x)


def test_clear_errors_for_what_cannot_work(nets):
    net, v, _, _, x = nets
    x32 = x.astype(jnp.float32)
    with pytest.raises(ValueError, match="scalar|ONE vector|return every class"):
        jr.explain(jr.VG(), lambda p, z: jnp.sum(z), {}, x32, 0)
    with pytest.raises(ValueError, match=r"lambda p, x: f\(p, x\[None\]\)\[0\]"):
        jr.explain(jr.VG(), lambda p, z: jnp.ones((1, 3), z.dtype) * jnp.sum(z), {}, x32, 0)
    with pytest.raises(NotImplementedError, match="plain function"):
        P.fit_patterns(jr.as_model(lambda p, z: z.reshape(-1)[:3]), {"params": {}}, x, progress=False)
    bn = NCNN(nnx.Rngs(0), bn=True)
    vb = jr.model_variables(bn)
    assert set(vb) == {"params", "batch_stats"}
    with pytest.raises(ValueError, match="BatchNorm"):
        P.fit_patterns(jr.as_model(bn), vb, x32, progress=False)
    with pytest.raises(KeyError, match="batch_stats"):
        jr.as_model(bn)(vb["params"] and {"params": vb["params"]}, x32[0])
    with pytest.raises(TypeError, match="model_variables takes a Flax NNX module"):
        jr.model_variables(LCNN())
    with pytest.raises(ValueError, match="biases='torch'"):
        jr.init_variables(net, jax.random.key(0), biases="torch")


def test_nnx_batchnorm_runs_in_eval_mode():
    bn = NCNN(nnx.Rngs(0), bn=True)
    v = jr.model_variables(bn)
    v["batch_stats"]["bn"]["mean"] = jnp.full((4,), 0.5, jnp.float32)  # running statistics, not the batch's
    x = jax.random.normal(jax.random.key(3), (3, 12, 12, 1), jnp.float32)
    model = jr.as_model(bn)
    assert not bn.bn.use_running_average  # the module the user holds keeps its mode: ours is a copy in eval mode
    one = model(v, x[0])
    np.testing.assert_allclose(np.asarray(model.batched(v, x)[0]), np.asarray(one), rtol=1e-5, atol=1e-6)
    bn.bn.mean[...] = v["batch_stats"]["bn"]["mean"]
    bn.eval()
    np.testing.assert_allclose(np.asarray(bn(x[:1])[0]), np.asarray(one), rtol=1e-6, atol=1e-6)
