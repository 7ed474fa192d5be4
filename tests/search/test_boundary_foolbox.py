"""Conformance with Foolbox 3.3.4 (the Boundary Attribution reference's attacks; the services extra installs it):
our L2 PGD and L2 Carlini-Wagner give Foolbox's points on the same JAX model, float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrecover as jr
from jaxrecover import search as B
from jaxrecover.search import boundary as search_boundary

fb = pytest.importorskip("foolbox")


@pytest.fixture(scope="module")
def setup(mnist):
    model = jr.make_model("twolayer")
    v = jr.init_variables("twolayer", jax.random.key(5), jnp.float32)
    x = jnp.asarray(jr.normalize(mnist.test_images[:6], dtype=np.float32))
    labels = jnp.argmax(model.batched(v, x), axis=1).astype(jnp.int32)
    mnist_box = B.InputBox.mnist()  # float32 images lie a hair below its exact lower bound: Foolbox checks
    box = B.InputBox(float(np.float32(mnist_box.lower)) - 1e-6, mnist_box.upper, mnist_box.scale)
    fmodel = fb.JAXModel(jax.jit(lambda z: model.batched(v, z)), bounds=(box.lower, box.upper))
    return model, v, x, labels, box, fmodel


def test_pgd_equals_foolbox_l2pgd(setup):
    model, v, x, labels, box, fmodel = setup
    eps, steps = 0.3 * box.scale, 20
    with jax.numpy_dtype_promotion("standard"):  # Foolbox's own arithmetic mixes int64 and int32
        theirs, _, success = fb.attacks.L2PGD(rel_stepsize=2 * 0.3 / steps, steps=steps, random_start=False)(
            fmodel, x, labels, epsilons=eps)
    ours, ok = B.pgd_l2(model, v, x, labels, eps, 2 * 0.3 / steps, jax.random.key(0), steps=steps, box=box,
                        random_start=False)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(ok), np.asarray(success))
    assert float(jnp.max(jnp.abs(ours - x))) > 0.01  # it moved


def test_cw_equals_foolbox_l2_carlini_wagner(setup):
    model, v, x, labels, box, fmodel = setup
    kw = dict(binary_search_steps=4, steps=60, stepsize=1e-2, initial_const=1e-1)
    with jax.numpy_dtype_promotion("standard"):
        theirs = fb.attacks.L2CarliniWagnerAttack(**kw)(fmodel, x, labels, epsilons=None)[0]
    ours, found, dist = B.cw_l2(model, v, x, labels, box=box, **kw)
    found = np.asarray(found)
    assert ours.dtype == jnp.float32 and found.sum() >= 3, found
    # where CW found a point both return it (Foolbox returns zeros where it found none); 240 float32 Adam steps
    # in two programs round differently, so the kept best step can differ slightly: close, not bit-equal
    np.testing.assert_allclose(np.asarray(ours)[found], np.asarray(theirs)[found], atol=1e-3)
    np.testing.assert_allclose(np.asarray(dist)[found], np.asarray(search_boundary._norms(theirs - x))[found], rtol=1e-3)
