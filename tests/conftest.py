"""Test configuration: float64 available everywhere, silent dtype mixing forbidden.

x64 is switched on once for the whole session (STYLE.md: one process-wide
setting); float32 code paths must therefore state their dtypes, which is what
the tests check: dtype promotion is "strict" (mixing float32 and float64, or a
float with an int array, is an error) and rank promotion raises. Tests that
need x64 off use ``with jax.enable_x64(False):``, which restores the setting on exit.
"""

import os

os.environ.setdefault("JAXRECOVER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxrecover"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


def _dense_net(key, sizes, bias, dtype):
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        k1, k2, key = jax.random.split(key, 3)
        w = jax.random.normal(k1, (a, b), dtype) * jnp.sqrt(jnp.asarray(2.0 / a, dtype))
        c = jax.random.normal(k2, (b,), dtype) * 0.5 if bias else None
        params.append((w, c))

    def logit_fn(p, x):
        h = x.reshape(-1)
        for i, (w, c) in enumerate(p):
            h = h @ w
            if c is not None:
                h = h + c
            if i < len(p) - 1:
                h = jax.nn.relu(h)
        return h

    return logit_fn, params


def _conv_net(key, bias, dtype, channels=(4, 6), classes=5):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU -> maxpool 2 -> dense -> ReLU -> dense, on (8, 8, 1)."""
    ks = jax.random.split(key, 8)
    p = {
        "c1": jax.random.normal(ks[0], (3, 3, 1, channels[0]), dtype) * 0.5,
        "c2": jax.random.normal(ks[1], (3, 3, channels[0], channels[1]), dtype) * 0.3,
        "d1": jax.random.normal(ks[2], (2 * 2 * channels[1], 12), dtype) * 0.3,
        "d2": jax.random.normal(ks[3], (12, classes), dtype) * 0.3,
    }
    if bias:
        p.update(b1=jax.random.normal(ks[4], (channels[0],), dtype) * 0.3,
                 b2=jax.random.normal(ks[5], (channels[1],), dtype) * 0.3,
                 b3=jax.random.normal(ks[6], (12,), dtype) * 0.3,
                 b4=jax.random.normal(ks[7], (classes,), dtype) * 0.3)

    def conv(x, k):
        return jax.lax.conv_general_dilated(x[None], k, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]

    def logit_fn(p, x):
        h = conv(x, p["c1"])
        h = jax.nn.relu(h + p["b1"][None, None] if "b1" in p else h)
        h = conv(h, p["c2"])
        h = jax.nn.relu(h + p["b2"][None, None] if "b2" in p else h)
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (2, 2, 1), (2, 2, 1), "VALID")
        h = jax.nn.relu(h.reshape(-1) @ p["d1"] + p.get("b3", 0))
        return h @ p["d2"] + p.get("b4", 0)

    return logit_fn, p


def make_net(kind: str, key, bias: bool, dtype=jnp.float64):
    """A small random ReLU net: ``(logit_fn(params, x_one), params, input_shape)``."""
    if kind == "dense2":
        f, p = _dense_net(key, (12, 16, 5), bias, dtype)
        return f, p, (12,)
    if kind == "dense4":
        f, p = _dense_net(key, (12, 20, 20, 20, 5), bias, dtype)
        return f, p, (12,)
    if kind == "conv":
        f, p = _conv_net(key, bias, dtype)
        return f, p, (8, 8, 1)
    raise ValueError(kind)


NET_KINDS = ("dense2", "dense4", "conv")


@pytest.fixture(scope="session")
def mnist():
    from jaxrecover.data import load_dataset

    return load_dataset("mnist")


@pytest.fixture(scope="module")
def tiny(mnist):
    """128 training and 32 test MNIST images (a model trains on them in seconds)."""
    from jaxrecover.data import Dataset

    return Dataset("mnist", mnist.split, mnist.train_images[:128], mnist.train_labels[:128],
                   mnist.test_images[:32], mnist.test_labels[:32])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """A one-epoch TwoLayerNet checkpoint on ``tiny`` (per test module; copy it before damaging it)."""
    from jaxrecover.training import TrainConfig, train_and_evaluate

    path = tmp_path_factory.mktemp("ckpt") / "twolayer"
    train_and_evaluate(TrainConfig(model="twolayer", epochs=1, batch_size=32), path, dataset=tiny, progress=False)
    return path
