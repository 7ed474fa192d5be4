import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover import models


def _conv(k, cin, cout, bias):
    return k * k * cin * cout + (cout if bias else 0)


def _dense(a, b, bias):
    return a * b + (b if bias else 0)


def _expected_params(name):
    """Parameter counts derived from PAPER.md's architecture table."""
    bias = not name.endswith("nobias")
    if name.startswith("twolayer"):
        return _dense(784, 100, bias) + _dense(100, 10, bias)
    if name.startswith("lenet"):
        return _conv(3, 1, 32, bias) + _conv(3, 32, 64, bias) + _dense(12 * 12 * 64, 128, bias) + _dense(128, 10, bias)
    bn = lambda c: 2 * c  # noqa: E731 - scale and shift
    total = _conv(7, 1, 64, False) + bn(64)
    cin = 64
    for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
        total += _conv(3, cin, cout, False) + bn(cout) + _conv(3, cout, cout, False) + bn(cout)
        if stride != 1 or cin != cout:
            total += _conv(1, cin, cout, False) + bn(cout)
        cin = cout
    return total + _dense(512, 10, True)


@pytest.fixture(scope="module", params=models.MODEL_NAMES)
def built(request):
    name = request.param
    return name, models.init_variables(name, jax.random.key(0), jnp.float32)


def test_shapes_and_param_counts(built):
    name, variables = built
    assert models.param_count(variables) == _expected_params(name)
    x = jnp.zeros((3, 28, 28, 1), jnp.float32)
    logits = models.make_batched_logit_fn(name)(variables, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    one = models.make_model(name)(variables, x[0])
    assert one.shape == (10,)
    np.testing.assert_allclose(one, logits[0], rtol=1e-5, atol=1e-5)


def test_nobias_variants_have_no_bias(built):
    name, variables = built
    paths = ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])]
    if name.endswith("nobias"):
        assert not [p for p in paths if p.endswith("bias")]
    elif name != "resnet18":
        assert len([p for p in paths if p.endswith("bias")]) >= 2
    else:  # convs without bias, BN shifts, fc bias
        assert all(not p.endswith("bias") or "bn" in p.lower() or "BatchNorm" in p or p.startswith("fc/") for p in paths)
        assert "batch_stats" in variables


@pytest.mark.parametrize("name", ["twolayer_nobias", "lenet_nobias"])
def test_nobias_models_are_positively_homogeneous(name):
    variables = models.init_variables(name, jax.random.key(0), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (28, 28, 1), jnp.float32)
    f = models.make_model(name)
    np.testing.assert_allclose(f(variables, 2.5 * x), 2.5 * f(variables, x), rtol=1e-4, atol=1e-4)


def test_float64_cast(built):
    name, variables = built
    v64 = models.cast_variables(variables, jnp.float64)
    assert models.tree_dtypes(v64) == {jnp.dtype(jnp.float64)}
    out = models.make_model(name)(v64, jnp.ones((28, 28, 1), jnp.float64))
    assert out.dtype == jnp.float64
    grad = jax.grad(lambda x: models.make_model(name)(v64, x)[3])(jnp.ones((28, 28, 1), jnp.float64))
    assert grad.dtype == jnp.float64


def test_float64_with_x64_off_is_a_clear_error():
    variables = models.init_variables("twolayer", jax.random.key(0))
    with jax.enable_x64(False):
        with pytest.raises(RuntimeError, match="jax_enable_x64"):
            models.cast_variables(variables, jnp.float64)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*twolayer"):
        models.get_model("vgg")
    variables = models.init_variables("twolayer", jax.random.key(0))
    f = models.make_model("twolayer")
    with pytest.raises(ValueError, match=r"\(28, 28, 1\)"):
        f(variables, jnp.zeros((28, 28), jnp.float32))
    with pytest.raises(TypeError, match="dtype"):
        f(variables, jnp.zeros((28, 28, 1), jnp.float64))


def test_resnet18_inference_uses_running_statistics():
    variables = models.init_variables("resnet18", jax.random.key(0))
    stats = jax.tree.map(lambda a: a + 0.5, variables["batch_stats"])
    v2 = {**variables, "batch_stats": stats}
    f = models.make_batched_logit_fn("resnet18")
    x = jax.random.normal(jax.random.key(2), (4, 28, 28, 1), jnp.float32)
    # changing the running statistics changes the output, and one example's logits
    # do not depend on the rest of the batch (no batch statistics at inference)
    assert not np.allclose(f(variables, x), f(v2, x))
    np.testing.assert_allclose(f(variables, x)[:1], f(variables, x[:1]), rtol=1e-5, atol=1e-5)


#: Variable names as saved in the checkpoints: the explicit names of the stem/body split must keep them.
TOP_LEVEL_NAMES = {
    "twolayer": {"Dense_0", "Dense_1"},
    "lenet": {"Conv_0", "Conv_1", "Dense_0", "Dense_1"},
    "resnet18": {"conv1", "bn1", "fc"} | {f"BasicBlock_{i}" for i in range(8)},
}


def test_variable_names_are_the_checkpointed_ones(built):
    name, variables = built
    assert set(variables["params"]) == TOP_LEVEL_NAMES[name.removesuffix("_nobias")]


def test_stem_is_affine_and_body_after_stem_is_the_model(built):
    name, variables = built
    with jax.enable_x64(True):
        v = models.cast_variables(variables, jnp.float64)
        logit_fn = models.make_model(name)
        stem, body = logit_fn.affine_stem
        x, z = (jax.random.uniform(jax.random.key(k), (28, 28, 1), jnp.float64) for k in (1, 2))
        np.testing.assert_allclose(body(v, stem(v, x)), logit_fn(v, x), rtol=1e-12, atol=1e-12)
        # affine: s(a x + (1 - a) z) = a s(x) + (1 - a) s(z)
        a = 0.3
        np.testing.assert_allclose(stem(v, a * x + (1 - a) * z), a * stem(v, x) + (1 - a) * stem(v, z),
                                   rtol=1e-12, atol=1e-12)
        assert stem(v, x).dtype == jnp.float64


def test_unknown_part_is_an_error_not_the_full_model():
    module = models.get_model("twolayer")
    variables = models.init_variables(module, jax.random.key(0))
    x = jnp.zeros((1, 28, 28, 1), jnp.float32)
    with pytest.raises(ValueError, match="unknown model part 'trunk'"):
        module.apply(variables, x, part="trunk")
    assert module.apply(variables, x, part="stem").shape == (1, 100)


def test_model_interface_is_cached_and_exposes_kernels_and_activations():
    assert models.make_model("lenet") is models.make_model("lenet")  # one object: jit compiles once
    m = models.make_model("lenet")
    v = models.init_variables("lenet", jax.random.key(0))
    k = m.kernels(v)
    assert {name: a.shape for name, a in k.items()} == {"Conv_0": (3, 3, 1, 32), "Conv_1": (3, 3, 32, 64),
                                                      "Dense_0": (9216, 128), "Dense_1": (128, 10)}
    x = jax.random.normal(jax.random.key(1), (28, 28, 1), jnp.float32)
    acts = m.activations(v, x)
    assert acts["Conv_0"].shape == (26, 26, 32) and acts["Dense_0"].shape == (128,)
    np.testing.assert_allclose(acts["logits"], m(v, x), rtol=1e-6)
    # the first Dense layer's output is its kernel applied to the pooled conv features (pre-activation)
    h = jax.nn.relu(acts["Conv_1"])
    pooled = h.reshape(12, 2, 12, 2, 64).max(axis=(1, 3)).reshape(-1)
    np.testing.assert_allclose(acts["Dense_0"], pooled @ k["Dense_0"] + v["params"]["Dense_0"]["bias"],
                               rtol=1e-4, atol=1e-4)
    plain = models.as_model(lambda p, z: z.sum(keepdims=True))
    with pytest.raises(NotImplementedError, match="plain function"):
        plain.kernels(v)
    assert models.as_model(m) is m
